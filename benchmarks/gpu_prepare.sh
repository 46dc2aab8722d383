#!/usr/bin/env bash
# Packs what benchmarks/gpu.sh needs on a device machine, where nothing can be fetched and
# the ../shared beside a checkout does not travel. Run on the CPU box, from the repository
# root; then call the device with carry [".whl", "devdata"] and `bash benchmarks/gpu.sh`.
#
#   .whl/     pure-Python wheels of this project's dependencies that the device's image lacks
#             (its python3 holds torch, numpy, matplotlib, tqdm, scikit-learn, einops)
#   devdata/  binarized_mnist.npz (3.8 MB) and run/, a trained model for log p(x) and fit_local
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA_DIR:-../shared/data}
run=${RUN_DIR:-runs/bmnist-ffg}  # the FFG-trained model of RESULTS.md
mkdir -p .whl devdata/run
cp "$data/binarized_mnist.npz" devdata/
cp "$run/config.toml" "$run/model.pt" devdata/run/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl zuko vector-quantize-pytorch einx frozendict loguru torch-einops-utils mlxtend \
    tomli-w pyro-ppl pyro-api
du -sh .whl devdata
