r"""Normalizing-flow families: a diagonal Gaussian pushed through invertible maps.

Every parameter of the flow lives in the per-datapoint vector lambda, so a flow family
is used exactly like the Gaussian ones: an encoder can output lambda (amortized), and
:func:`amortized.fit_local` can free lambda_i (per-datapoint), with no shared state.

The transforms are ``torch.distributions.Transform`` objects whose parameters carry a
batch dimension, so one transform holds a different flow for every datapoint.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
import zuko
from torch import Tensor, nn
from torch.distributions import (
    AffineTransform,
    Independent,
    Normal,
    Transform,
    TransformedDistribution,
    constraints,
)
from torch.distributions.transforms import _InverseTransform

from .base import VariationalFamily, gaussian_step_scale

__all__ = ["PlanarTransform", "PlanarFlow", "InverseAutoregressiveFlow", "IAFHead", "made_masks"]

#: softplus(a) = 1 at a = log(e - 1): the planar map with u = LOG_E_MINUS_1 * w / |w|^2 is
#: the identity, which gives the flow its prior initialisation.
LOG_E_MINUS_1 = math.log(math.e - 1)


class _WeakInverse:
    """``Transform.inv`` held by a weak reference, so a transform and its inverse form no
    reference cycle.

    torch 2.13's ``Transform.inv`` keeps the inverse by a strong reference, and the
    inverse keeps the transform: the pair is a cycle, freed only by Python's cyclic
    collector, and with it every tensor the transform holds (an IAF's per-row weights and
    its cached draw, 12 MB for 100 rows). ``TransformedDistribution.log_prob`` takes the
    inverse of every map, so training an IAF left a cycle per step and its memory grew
    by about 250 MB an epoch between collections. torch 2.6 held it weakly, as here.
    """

    @property
    def inv(self) -> Transform:
        inv = self._inv() if isinstance(self._inv, weakref.ref) else self._inv
        if inv is None:
            inv = _InverseTransform(self)
            self._inv = weakref.ref(inv)
        return inv


class _Affine(_WeakInverse, AffineTransform):
    """``AffineTransform`` whose inverse is held weakly (:class:`_WeakInverse`)."""


class PlanarTransform(_WeakInverse, Transform):
    r"""Planar map f(z) = z + u_hat tanh(w^T z + b) (Rezende & Mohamed 2015), batched.

    ``u`` and ``w`` are ``(*batch, D)`` and ``b`` is ``(*batch,)``; z is
    ``(*sample, *batch, D)``. ``u_hat = u + (softplus(w^T u) - 1 - w^T u) w / |w|^2``
    keeps w^T u_hat >= -1, which makes the map invertible (Rezende & Mohamed, appendix A).
    The inverse solves the scalar equation w^T y = a + w^T u_hat tanh(a + b) for
    a = w^T z by bisection (it is monotone in a), then z = y - u_hat tanh(a + b).

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

    Example:
        >>> t = PlanarTransform(torch.randn(3, 2), torch.randn(3, 2), torch.randn(3))
        >>> z = torch.randn(5, 3, 2)
        >>> torch.allclose(t.inv(t(z)), z, atol=1e-5)
        True
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u: Tensor, w: Tensor, b: Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        wu = (w * u).sum(-1, keepdim=True)  # (*batch, 1)
        w_sq = w.square().sum(-1, keepdim=True).clamp_min(1e-12)
        self.u_hat = u + (F.softplus(wu) - 1 - wu) * w / w_sq  # (*batch, D)
        self.w, self.b = w, b

    def _call(self, z: Tensor) -> Tensor:
        a = (z * self.w).sum(-1) + self.b  # (*sample, *batch)
        return z + self.u_hat * torch.tanh(a)[..., None]

    def _inverse(self, y: Tensor) -> Tensor:
        c = (y * self.w).sum(-1)  # w^T y, (*sample, *batch)
        wu = (self.w * self.u_hat).sum(-1)  # >= -1
        lo, hi = c - wu.abs(), c + wu.abs()  # |tanh| <= 1 brackets the root
        for _ in range(64):  # bisection: the residual is increasing in a
            mid = (lo + hi) / 2
            above = mid + wu * torch.tanh(mid + self.b) > c
            lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
        a = (lo + hi) / 2
        return y - self.u_hat * torch.tanh(a + self.b)[..., None]

    def log_abs_det_jacobian(self, z: Tensor, y: Tensor) -> Tensor:
        # det(I + u_hat psi^T) = 1 + psi^T u_hat with psi = (1 - tanh^2(a)) w.
        a = (z * self.w).sum(-1) + self.b
        wu = (self.w * self.u_hat).sum(-1)
        return torch.log(torch.abs(1 + (1 - torch.tanh(a).square()) * wu))


class _Flow(VariationalFamily):
    """A diagonal Gaussian's scale and shift and a flow's invertible maps, in one of two
    frames (``acts_on``):

    * ``"noise"`` (the default): the maps act on standard normal noise u and then
      ``z = mu + sigma * f(u)``. They work in the units of q's own width, so the same map
      parameters mean the same shape of q whatever the posterior's scale, and the
      optimiser's steps for them need no knowledge of it: a posterior with standard
      deviation 1e-3 is as easy to improve as one with 1 (``tests/test_battery.py``).
    * ``"latent"``: the maps act on ``z_0 = mu + sigma * u``, as in Rezende & Mohamed's and
      Kingma et al.'s figures. A map then acts in the posterior's units, and a step of
      fixed length in its parameters moves a peaked q by many of its widths, so its
      per-datapoint optimum is hard to reach. As an encoder's family it trained the
      better planar VAE, so training uses it by default (``TrainConfig.flow_acts_on``;
      RESULTS.md, issue 17).
    """

    ACTS_ON = ("noise", "latent")
    cheap_density = False  # the inverse: D passes of a MADE, or a bisection per map

    def __init__(self, latent_dim: int, acts_on: str):
        super().__init__(latent_dim)
        if acts_on not in self.ACTS_ON:
            raise ValueError(f"acts_on must be 'noise' or 'latent', got {acts_on!r}")
        self.acts_on = acts_on

    def _maps(self, lam: Tensor) -> tuple[Tensor, Tensor, list[Transform]]:
        """mu, log sigma and the flow's own maps."""
        raise NotImplementedError

    def _framed(self, loc: Tensor, log_scale: Tensor, maps: list[Transform]
                ) -> tuple[Independent, list[Transform]]:  # fmt: skip
        """The base distribution and the transforms from its draw to z."""
        if self.acts_on == "latent":
            return Independent(Normal(loc, log_scale.exp()), 1), maps
        base = Independent(Normal(torch.zeros_like(loc), torch.ones_like(loc)), 1)
        return base, [*maps, _Affine(loc, log_scale.exp(), event_dim=1, cache_size=1)]

    def transforms(self, lam: Tensor) -> list[Transform]:
        """The maps from the base distribution's draw to z (with ``acts_on="noise"`` the
        flow's maps, then the scale and shift)."""
        return self._framed(*self._maps(lam))[1]

    def _distribution(self, lam: Tensor) -> TransformedDistribution:
        return TransformedDistribution(*self._framed(*self._maps(lam)))

    def mean(self, lam: Tensor) -> Tensor:
        """E_q[z] has no closed form; the flow applied to the base mean is returned."""
        base, transforms = self._framed(*self._maps(lam))
        z = base.mean
        for t in transforms:
            z = t(z)
        return z

    def _frame_repr(self) -> str:
        return "" if self.acts_on == "noise" else f", acts_on={self.acts_on!r}"


class PlanarFlow(_Flow):
    r"""q(z; lam): ``layers`` planar maps and a diagonal Gaussian, all per datapoint.

    ``lam = [mu, log sigma, (u_1, w_1, b_1), ..., (u_K, w_K, b_K)]``, so
    ``num_params = 2D + K (2D + 1)``. The prior initialisation makes every planar map the
    identity, so q starts at N(0, I). The maps act on the standard noise by default, or
    on z (``acts_on``, :class:`_Flow`).

    Example:
        >>> family = PlanarFlow(2, layers=3)
        >>> family.num_params
        19
        >>> q = family.distribution(family.prior_init(4))
        >>> q.rsample((5,)).shape
        torch.Size([5, 4, 2])
    """

    name = "planar"

    def __init__(self, latent_dim: int, layers: int = 4, acts_on: str = "noise"):
        super().__init__(latent_dim, acts_on)
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.layers = layers

    @property
    def num_params(self) -> int:
        d = self.latent_dim
        return 2 * d + self.layers * (2 * d + 1)

    def _maps(self, lam: Tensor) -> tuple[Tensor, Tensor, list[Transform]]:
        d = self.latent_dim
        maps = []
        for k in range(self.layers):
            p = lam[..., 2 * d + k * (2 * d + 1) : 2 * d + (k + 1) * (2 * d + 1)]
            maps.append(PlanarTransform(p[..., :d], p[..., d : 2 * d], p[..., 2 * d]))
        return lam[..., :d], lam[..., d : 2 * d], maps

    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        d = self.latent_dim
        w = torch.ones(d, device=device, dtype=dtype) / math.sqrt(d)  # |w| = 1
        layer = torch.cat([LOG_E_MINUS_1 * w, w, w.new_zeros(1)])  # u, w, b: identity map
        lam = torch.cat([w.new_zeros(2 * d), layer.repeat(self.layers)])
        return lam.expand(batch, -1).clone()

    def step_scale(self, lam: Tensor) -> Tensor:
        """The base Gaussian's entries as in :class:`DiagonalGaussian`, the maps' 1."""
        base = gaussian_step_scale(lam, self.latent_dim)
        return torch.cat([base, torch.ones_like(lam[..., base.shape[-1] :])], dim=-1)

    def from_gaussian(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        flows = self.prior_init(1, loc.device, loc.dtype)[0, 2 * self.latent_dim :]
        return torch.cat([loc, log_scale, flows.expand(*loc.shape[:-1], -1)], dim=-1)

    def __repr__(self) -> str:
        return f"PlanarFlow(latent_dim={self.latent_dim}, layers={self.layers}{self._frame_repr()})"


def made_masks(latent_dim: int, hidden: int, reverse: bool = False) -> tuple[Tensor, Tensor]:
    r"""Masks of a one-hidden-layer MADE (Germain et al. 2015) with outputs (shift, scale).

    Input i has degree d_i (1..D, or D..1 with ``reverse``); hidden unit h has degree
    m_h in 1..D-1, cycling. ``M1[h, i] = m_h >= d_i`` and ``M2[o, h] = d_o > m_h`` for
    both the shift and the scale output of coordinate o, so output o depends only on
    the inputs of lower degree: the Jacobian of the flow is triangular.

    Returns ``M1`` ``(hidden, D)`` and ``M2`` ``(2D, hidden)`` as float tensors.

    Example:
        >>> m1, m2 = made_masks(3, 4)
        >>> (m2 @ m1)[:3]  # paths from input i to shift output o: only i < o
        tensor([[0., 0., 0.],
                [2., 0., 0.],
                [4., 2., 0.]])
    """
    degrees = torch.arange(1, latent_dim + 1)
    if reverse:
        degrees = degrees.flip(0)
    hidden_degrees = torch.arange(hidden) % max(latent_dim - 1, 1) + 1
    m1 = (hidden_degrees[:, None] >= degrees[None, :]).float()
    m2 = (degrees[:, None] > hidden_degrees[None, :]).float().repeat(2, 1)
    return m1, m2


class _AutoregressiveStep(_WeakInverse, zuko.transforms.AutoregressiveTransform):
    """zuko's autoregressive transform, remembering log|det J| of its latest forward call.

    Sampling computes the conditioner once for both the output and its log-determinant,
    where ``log_abs_det_jacobian`` would otherwise run it again.
    """

    def __init__(self, meta, passes: int):
        super().__init__(meta, passes, cache_size=1)
        self._last: tuple[Tensor, Tensor, Tensor] | None = None

    def _call(self, x: Tensor) -> Tensor:
        y, ladj = self.meta(x).call_and_ladj(x)
        self._last = (x, y, ladj)
        return y

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and x is self._last[0] and y is self._last[1]:
            return self._last[2]
        return super().log_abs_det_jacobian(x, y)

    def _inverse(self, y: Tensor) -> Tensor:
        # zuko's inverse, its D passes reading each pass's affine map directly: through
        # ``.inv`` every pass would leave a transform-inverse reference cycle (_WeakInverse)
        x = torch.zeros_like(y)
        for _ in range(self.passes):
            x = self.meta(x).base._inverse(y)
        return x


class _IAFLayout:
    """Where each piece of one IAF layer sits in lam: W1 (H, D), b1 (H), W2 (2D, H), b2 (2D)."""

    def __init__(self, latent_dim: int, hidden: int):
        d, h = latent_dim, hidden
        self.shapes = {"w1": (h, d), "b1": (h,), "w2": (2 * d, h), "b2": (2 * d,)}
        self.sizes = {k: math.prod(v) for k, v in self.shapes.items()}
        self.size = sum(self.sizes.values())


class InverseAutoregressiveFlow(_Flow):
    r"""q(z; lam): ``layers`` IAF steps and a diagonal Gaussian's scale and shift, per datapoint.

    Each step (Kingma et al. 2016) maps eps to ``exp(a(eps)) * eps + b(eps)``, where
    ``(b, a)`` come from a masked one-hidden-layer network (MADE) of eps with ``hidden``
    tanh units, so ``b_i, a_i`` depend on ``eps_<i`` only and log|det J| = sum a. The
    order of the coordinates is reversed from one step to the next. The bijection is
    zuko's ``AutoregressiveTransform`` around its ``MonotonicAffineTransform`` (which
    soft-clips a to (-6.9, 6.9)); sampling and the density of one's own samples take one
    pass, the inverse at an arbitrary z takes D.

    The steps act on the standard noise by default, or on z (``acts_on``, :class:`_Flow`).

    ``lam = [mu, log sigma, step_1, ..., step_K]`` and every step holds its network's
    weights ``W1 (H, D), b1 (H), W2 (2D, H), b2 (2D)``: per datapoint, the whole flow is
    free (as in Cremer et al.'s local flow optimisation). An encoder shares W1, W2 and
    b2 across datapoints and outputs mu, log sigma and b1, which conditions each step on
    x through its hidden layer (IAF's context h); see :meth:`amortized_head`.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al.,
        2016) https://arxiv.org/abs/1606.04934; MADE (Germain et al., 2015)
        https://arxiv.org/abs/1502.03509

    Example:
        >>> family = InverseAutoregressiveFlow(2, layers=2, hidden=3)
        >>> family.num_params  # 2D + K (HD + H + 2DH + 2D)
        54
        >>> q = family.distribution(family.prior_init(4))
        >>> q.rsample((5,)).shape
        torch.Size([5, 4, 2])
    """

    name = "iaf"
    check_every = 100
    #: the optimiser's step length for the networks' weights, in the units of
    #: :meth:`step_scale` (times 2 / sqrt(fan-in) for W1 and W2); with ``acts_on="latent"``
    #: every weight's length is 0.25
    weight_step = 0.1

    def __init__(self, latent_dim: int, layers: int = 2, hidden: int | None = None,
                 acts_on: str = "noise"):  # fmt: skip
        super().__init__(latent_dim, acts_on)
        hidden = 2 * latent_dim if hidden is None else hidden
        if layers < 1 or hidden < 1:
            raise ValueError(f"layers and hidden must be >= 1, got {layers} and {hidden}")
        self.layers, self.hidden = layers, hidden
        self.layout = _IAFLayout(latent_dim, hidden)
        self._masks = [made_masks(latent_dim, hidden, reverse=k % 2 == 1) for k in range(layers)]
        # the weights' step lengths, per (device, dtype): step_scale runs at every step
        self._weight_steps = {(torch.device("cpu"), torch.float32): self._weight_step_lengths()}

    @property
    def num_params(self) -> int:
        return 2 * self.latent_dim + self.layers * self.layout.size

    def split(self, lam: Tensor) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
        """``mu``, ``log sigma`` and each step's masked weights, shaped ``(*batch, ...)``.

        One ``split`` call cuts all pieces, so the backward pass assembles lam's gradient
        once instead of once per piece.
        """
        lay, d = self.layout, self.latent_dim
        pieces = lam.split([d, d, *list(lay.sizes.values()) * self.layers], dim=-1)
        steps = []
        for k, (m1, m2) in enumerate(self._masks):
            p = dict(zip(lay.shapes, pieces[2 + 4 * k : 6 + 4 * k], strict=True))
            p = {key: v.unflatten(-1, lay.shapes[key]) for key, v in p.items()}
            p["w1"] = p["w1"] * m1.to(lam)
            p["w2"] = p["w2"] * m2.to(lam)
            steps.append(p)
        return pieces[0], pieces[1], steps

    def _conditioner(self, step: dict[str, Tensor]):
        d = self.latent_dim

        def meta(eps: Tensor) -> Transform:
            # eps (*sample, *batch, D); weights (*batch, ...): one network per datapoint.
            h = torch.tanh(torch.einsum("...d,...hd->...h", eps, step["w1"]) + step["b1"])
            out = torch.einsum("...h,...oh->...o", h, step["w2"]) + step["b2"]
            affine = zuko.transforms.MonotonicAffineTransform(out[..., :d], out[..., d:])
            return zuko.transforms.DependentTransform(affine, 1)

        return meta

    def _maps(self, lam: Tensor) -> tuple[Tensor, Tensor, list[Transform]]:
        loc, log_scale, steps = self.split(lam)
        d = self.latent_dim
        return loc, log_scale, [_AutoregressiveStep(self._conditioner(p), d) for p in steps]

    def _identity_steps(self, device=None, dtype=None) -> Tensor:
        """One datapoint's flow weights making every step the identity: W2 = b2 = 0.

        W1 is a fixed pseudo-random draw (the same for every datapoint), so the hidden
        units differ and W2 receives gradient from the first step.
        """
        g = torch.Generator().manual_seed(0)
        d, h = self.latent_dim, self.hidden
        parts = []
        for _ in range(self.layers):
            w1 = torch.randn(h, d, generator=g) / math.sqrt(d)
            parts += [w1.flatten(), torch.zeros(h + 2 * d * h + 2 * d)]
        return torch.cat(parts).to(device=device, dtype=dtype)

    def _weight_step_lengths(self) -> Tensor:
        """One datapoint's step lengths for the flow's weights ``(num_params - 2D,)``:
        ``weight_step`` for a bias and ``2 weight_step / sqrt(fan-in)`` for W1 and W2, so
        a step of every weight of a unit moves its output by about ``2 weight_step``
        (``acts_on="noise"``); 0.25 for every weight with ``acts_on="latent"``."""
        lay, c = self.layout, self.weight_step
        if self.acts_on == "latent":
            return torch.full((self.layers * lay.size,), 0.25)
        fan_in = {"w1": self.latent_dim, "w2": self.hidden}
        one = [torch.full((lay.sizes[k],), 2 * c / math.sqrt(fan_in[k]) if k in fan_in else c)
               for k in lay.shapes]  # fmt: skip
        return torch.cat(one).repeat(self.layers)

    def step_scale(self, lam: Tensor) -> Tensor:
        """The base Gaussian's entries as in :class:`DiagonalGaussian`, the weights' as
        :meth:`_weight_step_lengths` says."""
        base = gaussian_step_scale(lam, self.latent_dim)
        key = (lam.device, lam.dtype)
        if key not in self._weight_steps:
            self._weight_steps[key] = self._weight_step_lengths().to(lam)
        weights = self._weight_steps[key].expand(*lam.shape[:-1], -1)
        return torch.cat([base, weights], dim=-1)

    def from_gaussian(self, loc: Tensor, log_scale: Tensor) -> Tensor:
        steps = self._identity_steps(loc.device, loc.dtype)
        return torch.cat([loc, log_scale, steps.expand(*loc.shape[:-1], -1)], dim=-1)

    def prior_init(self, batch: int, device=None, dtype=None) -> Tensor:
        zeros = torch.zeros(batch, self.latent_dim, device=device, dtype=dtype)
        return self.from_gaussian(zeros, zeros)

    def amortized_head(self, in_features: int) -> nn.Module:
        return IAFHead(self, in_features)

    def __repr__(self) -> str:
        return (
            f"InverseAutoregressiveFlow(latent_dim={self.latent_dim}, layers={self.layers}, "
            f"hidden={self.hidden}{self._frame_repr()})"
        )


class IAFHead(nn.Module):
    """An encoder's last layer for :class:`InverseAutoregressiveFlow`.

    A linear map gives the per-datapoint part of lam, ``[mu, log sigma, b1_1, ..., b1_K]``
    (b1_k, the bias of step k's hidden layer, carries the context from x); the steps'
    W1, W2 and b2 are parameters shared by all datapoints. ``forward`` assembles the full
    ``(batch, num_params)`` lam, so the encoder's output is an ordinary per-datapoint
    parameter row that :func:`amortized.fit_local` can refine entry by entry.
    """

    def __init__(self, family: InverseAutoregressiveFlow, in_features: int):
        super().__init__()
        self.family = family
        d, h, k = family.latent_dim, family.hidden, family.layers
        self.local = nn.Linear(in_features, 2 * d + k * h)
        shared = family._identity_steps().view(k, -1)
        lay = family.layout
        self.w1 = nn.Parameter(shared[:, : lay.sizes["w1"]].clone())
        self.w2 = nn.Parameter(torch.zeros(k, lay.sizes["w2"]))
        self.b2 = nn.Parameter(torch.zeros(k, lay.sizes["b2"]))

    def forward(self, features: Tensor) -> Tensor:
        fam = self.family
        d, h = fam.latent_dim, fam.hidden
        out = self.local(features)  # (batch, 2D + K H)
        batch = out.shape[:-1]
        parts = [out[..., : 2 * d]]
        for k in range(fam.layers):
            b1 = out[..., 2 * d + k * h : 2 * d + (k + 1) * h]
            parts += [
                self.w1[k].expand(*batch, -1),
                b1,
                self.w2[k].expand(*batch, -1),
                self.b2[k].expand(*batch, -1),
            ]
        return torch.cat(parts, dim=-1)  # (batch, num_params)
