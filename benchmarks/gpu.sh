#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one device call (prepare with
# benchmarks/gpu_prepare.sh; carry [".whl", "devdata"]):
#
#   bash benchmarks/gpu.sh                      # on the device: writes $OUT/gpu.log
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh   # a dry run of every step here, in minutes
#
# 1. epoch time of the default MNIST VAE (784-200-200-50) on all 50,000 images;
# 2. training throughput against the hand loop (and Pyro, carried as wheels);
# 3. IWAE-5000 and AIS log p(x) on the full test set, from the FFG-trained model;
# 4. fit_local against a one-datapoint loop and Pyro.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
out=${OUT:-runs/gpu}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
if [ -d .whl ] && [ "$device" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
data=devdata
epochs=3 points=0 batched=1000 rounds=5 iwae_k=5000 ais_steps=100 loop=20 steps=300 small=()
if [ -n "${QUICK:-}" ]; then
    epochs=1 points=20 batched=50 rounds=1 iwae_k=50 ais_steps=5 loop=2 steps=20
    small=(--hidden 20 --latent-dim 4)
fi
step() { echo; echo "## $*"; date -u +%T; }

step device
"$python" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

step "epoch time: amortized train, default model, all training images, $epochs epochs"
"$python" -m amortized train --dataset binarized-mnist --data-dir "$data" --device "$device" \
    --epochs "$epochs" --no-progress --run-dir "$out/train" --seed 0 "${small[@]}"
"$python" -c "
import json, sys
for line in open('$out/train/metrics.jsonl'):
    r = json.loads(line)
    print(f\"epoch {r['epoch']}: {r['seconds']:.2f} s, valid ELBO {r['valid_elbo']:.2f}\")"

step "training throughput"
"$python" benchmarks/throughput.py --data-dir "$data" --device "$device" --rounds "$rounds" \
    ${QUICK:+--train-points 1000 --epochs 1}

step "log p(x): IWAE-5000 and AIS on the test set"
"$python" benchmarks/log_px.py --run-dir "$data/run" --data-dir "$data" --device "$device" \
    --points "$points" --iwae-k "$iwae_k" --ais-steps "$ais_steps" --ais-batch 1000

step "fit_local against a loop and Pyro"
"$python" benchmarks/fit_local.py --run-dir "$data/run" --data-dir "$data" --device "$device" \
    --batched-points "$batched" --loop-points "$loop" --steps "$steps" --skip-stopping-rule
step done
