r"""Models trained with other libraries, measured here: a pythae VAE, a Pyro model and guide.

Each adapter turns a trained model into what every route of this library takes: a
:class:`amortized.LatentVariableModel` (prior and decoder), an encoder giving each
datapoint's parameter row lambda, and the variational family those rows parameterize.
The gap report, q*, refinement and AIS then run on it unchanged::

    model, encoder, family = from_pythae(AutoModel.load_from_folder("my_vae/final_model"))
    report = gap_report(model, x, encoder, family)

or, on the command line, ``amortized gap --model pythae:my_vae/final_model``.

Both libraries are optional: each adapter imports its library when called. Data are flat
here, ``(batch, data_dim)``; the adapters reshape them to the shape the library's networks
take and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from .config import ConfigError
from .families import DiagonalGaussian
from .model import LatentVariableModel

__all__ = ["from_pythae", "load_pythae", "from_pyro"]

#: pythae models whose encoder gives a diagonal Gaussian q(z|x) (``embedding``,
#: ``log_covariance``) under a standard Normal prior, with a decoder giving the mean of
#: p(x|z): they differ from the VAE only in the loss they were trained on. Flows (VAE_IAF,
#: VAE_LinNF), learned priors (VAMP), other latent spaces (SVAE, PoincareVAE),
#: Hamiltonian posteriors (HVAE, RHVAE) and deterministic encoders are not of this kind.
PYTHAE_GAUSSIAN_VAES = (
    "VAE", "BetaVAE", "DisentangledBetaVAE", "BetaTCVAE", "FactorVAE", "INFOVAE_MMD",
    "MSSSIM_VAE", "IWAE", "MIWAE", "PIWAE", "CIWAE",
)  # fmt: skip


def load_pythae(path: str) -> nn.Module:
    """``pythae.models.AutoModel.load_from_folder(path)``, with errors in one line."""
    try:
        from pythae.models import AutoModel
    except ImportError:
        raise ConfigError("pythae is not installed: pip install pythae") from None
    try:
        return AutoModel.load_from_folder(path)
    except Exception as err:  # a missing or damaged folder: whatever pythae raises
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"cannot load a pythae model from {path}: {text}") from None


def from_pythae(vae: nn.Module) -> tuple[LatentVariableModel, nn.Module, DiagonalGaussian]:
    """A trained pythae VAE as ``(model, encoder, family)``.

    p(z) = N(0, I); p(x|z) is the decoder's ``reconstruction`` read the way pythae's own
    loss and ``get_nll`` read it: Bernoulli probabilities with log-probabilities clipped at
    -100 (``binary_cross_entropy``) for ``reconstruction_loss="bce"``, the mean of a unit
    Gaussian for ``"mse"``. q(z|x) = N(embedding, exp(log_covariance)), a
    :class:`DiagonalGaussian` row ``[mu, log sigma]``.
    """
    name = type(vae).__name__
    if name not in PYTHAE_GAUSSIAN_VAES:
        raise ConfigError(
            f"pythae's {name} is not a Gaussian-encoder VAE with a standard Normal prior; "
            f"the adapter takes {', '.join(PYTHAE_GAUSSIAN_VAES)}"
        )
    config = vae.model_config
    loss = config.reconstruction_loss
    if loss not in ("bce", "mse"):
        raise ConfigError(f"pythae's reconstruction_loss {loss!r} is not bce or mse")
    shape = tuple(config.input_dim)
    latent = int(config.latent_dim)
    vae.eval()
    decoder = _PythaeDecoder(vae.decoder, shape, latent, bernoulli=loss == "bce")
    return LatentVariableModel(decoder, latent), _PythaeEncoder(vae.encoder, shape), \
        DiagonalGaussian(latent)  # fmt: skip


class _PythaeEncoder(nn.Module):
    """x ``(batch, data_dim)`` -> lambda = [mu, log sigma] from pythae's encoder."""

    def __init__(self, encoder: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.net, self.shape = encoder, shape

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x.reshape(x.shape[0], *self.shape))
        return torch.cat([out["embedding"], 0.5 * out["log_covariance"]], dim=-1)


class _PythaeDecoder(nn.Module):
    """z ``(..., batch, latent)`` -> p(x|z) from pythae's decoder, its reconstruction flat."""

    def __init__(self, decoder: nn.Module, shape, latent: int, bernoulli: bool):
        super().__init__()
        self.net, self.latent, self.bernoulli = decoder, latent, bernoulli
        self.data_dim = math.prod(shape)

    def forward(self, z: Tensor) -> Distribution:
        lead = z.shape[:-1]
        mean = self.net(z.reshape(-1, self.latent))["reconstruction"]
        mean = mean.reshape(*lead, self.data_dim)
        if self.bernoulli:
            return Independent(_ClippedBernoulli(probs=mean), 1)
        return Independent(Normal(mean, torch.ones_like(mean), validate_args=False), 1)


class _ClippedBernoulli(Bernoulli):
    """Bernoulli(probs) scored as ``binary_cross_entropy`` scores it (log clipped at -100),
    so a decoder that saturates in float32 gets the likelihood it was trained on."""

    def __init__(self, probs: Tensor):
        super().__init__(probs=probs, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        probs, value = torch.broadcast_tensors(self.probs, value)
        return -F.binary_cross_entropy(probs, value, reduction="none")


def from_pyro(
    model: Callable[[Tensor], object],
    guide: Callable[[Tensor], object],
    data_dim: int,
    *,
    latent: str | None = None,
    observed: str | None = None,
) -> tuple[LatentVariableModel, nn.Module, DiagonalGaussian]:
    """A Pyro model with an amortized guide as ``(model, encoder, family)``.

    ``model(x)`` and ``guide(x)`` take a batch ``(batch, data_dim)``, as in Pyro's VAE
    tutorial: the model draws one latent site ``z ~ p(z)`` in a plate over the batch and
    observes x at one site ``x ~ p(x|z)``; the guide draws the same latent site from a
    diagonal Normal, ``Normal(loc, scale).to_event(1)``, computed from x. ``latent`` and
    ``observed`` name the sites where the model has more than one of each kind.

    p(x|z) is the distribution at the observed site of the model's trace with the latent
    site set to z; p(z) is the latent site's distribution (it must not depend on x).
    lambda is ``[loc, log scale]`` of the guide's latent site. Where ``model`` and
    ``guide`` are methods of one ``nn.Module`` (as in the tutorial) its weights move with
    ``.to(device)``. Each call of the decoder or encoder runs the model or guide under
    Pyro's tracing, so each costs more than the bare networks would.
    """
    try:
        from pyro import poutine
    except ImportError:
        raise ConfigError("pyro is not installed: pip install pyro-ppl") from None
    x = torch.zeros(1, data_dim)
    trace = _trace(poutine, model, x, "the model")
    latent, observed = _sites(trace, latent, observed)
    prior = trace.nodes[latent]["fn"]
    q = _trace(poutine, guide, x, "the guide").nodes.get(latent)
    if q is None:
        raise ConfigError(f"the guide has no sample site {latent!r}, the model's latent")
    base = _diagonal_normal(q["fn"])
    if base is None:
        raise ConfigError(f"the guide's site {latent!r} is {_named(q['fn'])}; the adapter "
                          "takes Normal(loc, scale).to_event(1)")  # fmt: skip
    dim = int(base.loc.shape[-1])
    if tuple(prior.event_shape) != (dim,):
        raise ConfigError(f"the model's site {latent!r} has event shape "
                          f"{tuple(prior.event_shape)}, the guide's ({dim},)")  # fmt: skip
    owner = getattr(model, "__self__", None)
    owner = owner if isinstance(owner, nn.Module) else None
    decoder = _PyroDecoder(poutine, model, latent, observed, data_dim, owner)
    normal = _diagonal_normal(prior)
    if normal is not None:  # as torch's own Normal, so that KL(q || p) has its closed form
        loc, scale = (t.expand(1, dim)[0].detach() for t in (normal.loc, normal.scale))
        prior = Independent(Normal(loc, scale, validate_args=False), 1)
    else:
        prior = _PyroPrior(prior)
    return (LatentVariableModel(decoder, dim, prior=prior),
            _PyroEncoder(poutine, guide, latent, owner), DiagonalGaussian(dim))  # fmt: skip


def _trace(poutine, fn, x: Tensor, what: str):
    try:
        return poutine.trace(fn).get_trace(x)
    except Exception as err:  # the user's model: whatever it raises, in one line
        text = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{what} raised {type(err).__name__}: {text} on x of shape "
                          f"{tuple(x.shape)}") from None  # fmt: skip


def _sites(trace, latent: str | None, observed: str | None) -> tuple[str, str]:
    from pyro.poutine.util import site_is_subsample  # plates are sample sites too

    samples = {n: s for n, s in trace.nodes.items()
               if s["type"] == "sample" and not site_is_subsample(s)}  # fmt: skip
    hidden = [n for n, s in samples.items() if not s["is_observed"]]
    seen = [n for n, s in samples.items() if s["is_observed"]]
    for name, kind, found in ((latent, "latent", hidden), (observed, "observed", seen)):
        if name is None and len(found) != 1:
            raise ConfigError(f"the model has {len(found)} {kind} sites ({', '.join(found)}); "
                              f"name one with {kind}=...")  # fmt: skip
        if name is not None and name not in found:
            raise ConfigError(f"the model has no {kind} site {name!r} ({', '.join(found)})")
    return latent or hidden[0], observed or seen[0]


def _diagonal_normal(fn: Distribution) -> Normal | None:
    """The Normal under ``Normal(loc, scale).to_event(1)``, or None."""
    base = getattr(fn, "base_dist", None)
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 \
            and isinstance(base, Normal):  # fmt: skip
        return base
    return None


def _named(fn: Distribution) -> str:
    """``Laplace(...).to_event(1)`` for Pyro's Independent of a Laplace, and so on."""
    if isinstance(fn, Independent):
        return f"{_named(fn.base_dist)}.to_event({fn.reinterpreted_batch_ndims})"
    return f"{type(fn).__name__}(...)"


class _PyroPrior(Distribution):
    """p(z) of the model's latent site, for z of any batch shape."""

    arg_constraints: dict = {}

    def __init__(self, fn: Distribution):
        self.fn = fn
        dim = fn.event_shape
        super().__init__(torch.Size(), dim, validate_args=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.fn.log_prob(z)

    def sample(self, sample_shape=()) -> Tensor:
        return self.fn.sample(sample_shape).squeeze(-1 - len(self.event_shape))


class _PyroEncoder(nn.Module):
    """x -> lambda = [loc, log scale] of the guide's latent site."""

    def __init__(self, poutine, guide, latent: str, owner: nn.Module | None):
        super().__init__()
        self.poutine, self.guide, self.latent = poutine, guide, latent
        self.owner = owner  # registered, so that .to() and .eval() reach its weights

    def forward(self, x: Tensor) -> Tensor:
        fn = self.poutine.trace(self.guide).get_trace(x).nodes[self.latent]["fn"]
        base = _diagonal_normal(fn)
        return torch.cat([base.loc, base.scale.log()], dim=-1)


class _PyroDecoder(nn.Module):
    """z ``(..., batch, latent)`` -> the model's observed-site distribution given z."""

    def __init__(self, poutine, model, latent: str, observed: str, data_dim: int,
                 owner: nn.Module | None):  # fmt: skip
        super().__init__()
        self.poutine, self.model = poutine, model
        self.latent, self.observed, self.data_dim = latent, observed, data_dim
        self.owner = owner

    def forward(self, z: Tensor) -> Distribution:
        lead = z.shape[:-1]
        flat = z.reshape(-1, z.shape[-1])  # the model's plate is over one batch axis
        x = flat.new_zeros(flat.shape[0], self.data_dim)  # shapes only: fn is all we read
        conditioned = self.poutine.condition(self.model, data={self.latent: flat})
        fn = self.poutine.trace(conditioned).get_trace(x).nodes[self.observed]["fn"]
        return _Reshaped(fn, lead)


class _Reshaped(Distribution):
    """A distribution over flat batches of x, seen with the batch shape of z."""

    arg_constraints: dict = {}

    def __init__(self, fn: Distribution, lead: torch.Size):
        self.fn, self.lead = fn, lead
        super().__init__(lead, fn.event_shape, validate_args=False)

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.expand(*self.lead, *self.event_shape).reshape(-1, *self.event_shape)
        return self.fn.log_prob(x).reshape(self.lead)

    def sample(self, sample_shape=()) -> Tensor:
        out = self.fn.sample(sample_shape)
        return out.reshape(*sample_shape, *self.lead, *self.event_shape)

    @property
    def mean(self) -> Tensor:
        return self.fn.mean.reshape(*self.lead, *self.event_shape)
