"""Analytic Gaussian-mixture reference for the signal tests (closed forms, float64, no autograd).

A mixture ``p(x) = Σ_i π_i N(x; μ_i, Σ_i)`` in ``R^d`` stays a Gaussian mixture under both forward-noising forms:

- variance exploding (VE), ``y = x + σ n``:            ``p_σ(y) = Σ_i π_i N(y; μ_i, Σ_i + σ² I)``;
- variance preserving (VP, DDPM), ``x_t = α x + s n``: ``p_t(y) = Σ_i π_i N(y; α μ_i, α² Σ_i + s² I)``,
  with ``α = sqrt(ᾱ_t)`` and ``s = sqrt(1 − ᾱ_t)``;
- the linear interpolant of flow matching / rectified flow, ``x_t = (1 − σ) x + σ n``: the same form with
  ``α = 1 − σ``, ``s = σ`` (:meth:`GaussianMixture.flow`).

So every quantity is exact. With component precisions ``P_i = C_i^{-1}`` (``C_i`` the noised covariance),
component scores ``g_i(y) = −P_i (y − m_i)`` and posterior weights ``w_i(y) = π_i N_i(y) / p(y)``:

- score            ``s(y) = ∇ log p(y) = Σ_i w_i g_i``
- Hessian          ``H(y) = ∇² log p(y) = Σ_i w_i (−P_i + g_i g_iᵀ) − s sᵀ``
- diagonal of H    ``Σ_i w_i (−diag P_i + g_i ⊙ g_i) − s ⊙ s``
- trace of H       ``Σ_i w_i (−tr P_i + ‖g_i‖²) − ‖s‖²``   (the Laplacian of log p)
- p-Laplacian      ``div(‖s‖^{p−2} s) = ‖s‖^{p−2} [tr H + (p − 2) sᵀHs / ‖s‖²]``
- normalised ∞-Laplacian ``sᵀHs / ‖s‖²``
- noise prediction ``ε(y) = −s_noise · s(y)`` (``s_noise = σ`` for VE, ``sqrt(1 − ᾱ_t)`` for VP).

For ``x_t = α x_0 + s n`` (any α ≥ 0, s > 0) the posterior of ``x_0`` is exact too. Per component (Gaussian
conditioning), ``E[x_0 | y, i] = μ_i + α Σ_i C_i^{-1} (y − α μ_i) = μ_i − α Σ_i g_i(y)``, so

- posterior mean     ``x̂_0(y) = E[x_0 | x_t = y] = Σ_i w_i (μ_i − α Σ_i g_i)``, which for α > 0 is Tweedie's
  ``(y + s² ∇log p_t(y)) / α``; at α = 0 (pure noise) it is the prior mean ``Σ_i π_i μ_i``;
- velocity           ``v(y) = E[ε − x_0 | x_t = y] = ε̂ − x̂_0 = −s ∇log p_t(y) − x̂_0(y)``, for α > 0
  ``−s ∇log p_t(y) − (y + s² ∇log p_t(y)) / α`` (the target of a ``flow_prediction`` network; on the linear
  interpolant the velocity ``d x_t / dσ`` of rectified flow).

These are methods of the *clean* mixture (:meth:`GaussianMixture.posterior_mean_fn`,
:meth:`GaussianMixture.velocity_fn`, :meth:`GaussianMixture.target_fn`), since they need its components; ``eps_fn``
and the exact quantities above are methods of the *noised* one. :class:`MixtureNet` wraps the targets as a network
with a diffusers UNet's call signature (:func:`flow_coefs`, :func:`ddpm_coefs` map its timesteps to ``(α, s)``).

Covariances may be isotropic (a scalar or one per component), diagonal (``(N, d)``) or full (``(N, d, d)``).
Variance zero is allowed for the clean mixture (point masses): it only needs to be positive after noising.

Queries accept ``y`` of shape ``(B, d)`` or ``(B, *event)`` with ``prod(event) == d``; outputs keep the batch layout
(``score`` and ``eps_fn`` return the same shape as ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

__all__ = ["GaussianMixture", "MixtureNet", "ddpm_coefs", "flow_coefs", "point_masses"]

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture:
    """A Gaussian mixture with exact density, score and score-Jacobian (see module docstring)."""

    def __init__(
        self,
        means: torch.Tensor,
        weights: torch.Tensor | None = None,
        covariances: torch.Tensor | float = 1.0,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (N, d); found shape {tuple(means.shape)}")
        n, d = means.shape
        if weights is None:
            weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape ({n},); found {tuple(weights.shape)}")
        if (weights < 0).any() or not torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"weights must be non-negative and sum to 1; found sum {float(weights.sum())}")
        cov = torch.as_tensor(covariances, dtype=torch.float64)
        if cov.ndim == 0:
            cov = cov.expand(n, d).clone()
        elif cov.shape == (n,):
            cov = cov[:, None].expand(n, d).clone()
        elif cov.shape not in ((n, d), (n, d, d)):
            raise ValueError(
                f"covariances must be a scalar, shape ({n},), ({n}, {d}) (diagonal) or ({n}, {d}, {d}) (full); "
                f"found {tuple(cov.shape)}"
            )
        self.means = means
        self.weights = weights
        self.cov = cov
        self.full = cov.ndim == 3

    # ------------------------------------------------------------------ construction / noising
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _add_isotropic(self, scale: float, var: float) -> GaussianMixture:
        if self.full:
            eye = torch.eye(self.dim, dtype=torch.float64)
            cov = scale**2 * self.cov + var * eye
        else:
            cov = scale**2 * self.cov + var
        return GaussianMixture(scale * self.means, self.weights, cov)

    def ve(self, sigma: float) -> GaussianMixture:
        """Law of ``y = x + σ n``: covariances gain ``σ² I``."""
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0; found {sigma}")
        return self._add_isotropic(1.0, float(sigma) ** 2)

    def vp(self, alpha: float, noise_std: float) -> GaussianMixture:
        """Law of ``x_t = α x + s n`` (DDPM form): means scale by α, covariances become ``α² Σ + s² I``."""
        return self._add_isotropic(float(alpha), float(noise_std) ** 2)

    def vp_from_alpha_bar(self, alpha_bar: float) -> GaussianMixture:
        """``vp(sqrt(ᾱ), sqrt(1 − ᾱ))``."""
        if not 0.0 < alpha_bar <= 1.0:
            raise ValueError(f"alpha_bar must lie in (0, 1]; found {alpha_bar}")
        return self.vp(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar))

    def flow(self, sigma: float) -> GaussianMixture:
        """Law of the linear interpolant ``x_t = (1 − σ) x + σ n``, ``σ ∈ [0, 1]`` (rectified flow, flow matching:
        SD3, Flux): ``vp(α, σ)`` with ``α = 1 − σ`` — means scale by α, covariances become ``α² Σ + σ² I``."""
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"the interpolant's sigma must lie in [0, 1]; found {sigma}")
        return self.vp(1.0 - float(sigma), float(sigma))

    # ------------------------------------------------------------------ internals
    def _flatten(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(y)
        if y.ndim == 1:
            y = y[None]
        flat = y.reshape(y.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected points with {self.dim} coordinates per sample; found shape {tuple(y.shape)}")
        return flat

    def _check_positive(self) -> None:
        bad = (torch.linalg.eigvalsh(self.cov) if self.full else self.cov) <= 0
        if bad.any():
            raise ValueError("a component has a non-positive variance; noise the mixture (ve / vp) before querying")

    def _precision(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Precisions (``(N, d)`` diagonal or ``(N, d, d)`` full) and log-determinants of the covariances."""
        self._check_positive()
        if self.full:
            chol = torch.linalg.cholesky(self.cov)
            prec = torch.cholesky_inverse(chol)
            logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        else:
            prec = 1.0 / self.cov
            logdet = torch.log(self.cov).sum(-1)
        return prec, logdet

    def _components(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log joint ``log π_i + log N_i(y)`` (B, N), component scores g_i (B, N, d), precisions."""
        prec, logdet = self._precision()
        diff = y[:, None, :] - self.means[None]  # (B, N, d)
        if self.full:
            g = -torch.einsum("nij,bnj->bni", prec, diff)
        else:
            g = -prec[None] * diff
        maha = -(diff * g).sum(-1)  # (y-m)ᵀ P (y-m)
        log_joint = torch.log(self.weights)[None] - 0.5 * (maha + logdet[None] + self.dim * _LOG_2PI)
        return log_joint, g, prec

    # ------------------------------------------------------------------ exact quantities
    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """``log p(y)``, shape (B,)."""
        log_joint, _, _ = self._components(self._flatten(y))
        return torch.logsumexp(log_joint, dim=1)

    def posterior_weights(self, y: torch.Tensor) -> torch.Tensor:
        """``w_i(y) = π_i N_i(y) / p(y)``, shape (B, N)."""
        log_joint, _, _ = self._components(self._flatten(y))
        return torch.softmax(log_joint, dim=1)

    def score(self, y: torch.Tensor) -> torch.Tensor:
        """``∇ log p(y)``, same shape as ``y``."""
        y = torch.as_tensor(y)
        flat = self._flatten(y)
        log_joint, g, _ = self._components(flat)
        w = torch.softmax(log_joint, dim=1)
        return (w[..., None] * g).sum(1).reshape(y.shape)

    def _stats(self, y: torch.Tensor):
        flat = self._flatten(y)
        log_joint, g, prec = self._components(flat)
        w = torch.softmax(log_joint, dim=1)
        s = (w[..., None] * g).sum(1)
        return w, g, prec, s

    def hessian(self, y: torch.Tensor) -> torch.Tensor:
        """``∇² log p(y)`` (the score Jacobian, symmetric), shape (B, d, d)."""
        w, g, prec, s = self._stats(y)
        if self.full:
            mean_prec = torch.einsum("bn,nij->bij", w, prec)
        else:
            mean_prec = torch.diag_embed(w @ prec)
        outer = torch.einsum("bn,bni,bnj->bij", w, g, g)
        return -mean_prec + outer - s[:, :, None] * s[:, None, :]

    def hessian_diag(self, y: torch.Tensor) -> torch.Tensor:
        """Diagonal of ``∇² log p(y)``, shape (B, d)."""
        w, g, prec, s = self._stats(y)
        diag_prec = torch.diagonal(prec, dim1=-2, dim2=-1) if self.full else prec
        return -(w @ diag_prec) + (w[..., None] * g * g).sum(1) - s * s

    def laplacian(self, y: torch.Tensor) -> torch.Tensor:
        """``Δ log p(y) = tr ∇² log p(y)`` (the divergence of the score), shape (B,)."""
        w, g, prec, s = self._stats(y)
        tr_prec = torch.diagonal(prec, dim1=-2, dim2=-1).sum(-1) if self.full else prec.sum(-1)
        return -(w @ tr_prec) + (w * (g * g).sum(-1)).sum(1) - (s * s).sum(-1)

    def score_hessian_score(self, y: torch.Tensor) -> torch.Tensor:
        """``sᵀ H s`` (curvature along the score, unnormalised), shape (B,); no d×d matrix is formed."""
        w, g, prec, s = self._stats(y)
        if self.full:
            quad_prec = torch.einsum("bi,nij,bj->bn", s, prec, s)
        else:
            quad_prec = (s * s) @ prec.T
        gs = (g * s[:, None, :]).sum(-1)  # (B, N)
        ss = (s * s).sum(-1)
        return (w * (-quad_prec + gs * gs)).sum(1) - ss * ss

    def infinity_laplacian(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised ∞-Laplacian ``sᵀ H s / ‖s‖²``, shape (B,)."""
        s = self._flatten(self.score(y))
        return self.score_hessian_score(y) / (s * s).sum(-1)

    def p_laplacian(self, y: torch.Tensor, p: float) -> torch.Tensor:
        """``Δ_p log p = div(‖s‖^{p−2} s) = ‖s‖^{p−2} [tr H + (p − 2) sᵀHs/‖s‖²]``, shape (B,).

        ``p = 1`` is ``div(s/‖s‖)``, ``p = 2`` the Laplacian; ``p = inf`` returns the normalised ∞-Laplacian.
        """
        if math.isinf(p):
            return self.infinity_laplacian(y)
        s = self._flatten(self.score(y))
        norm = torch.linalg.vector_norm(s, dim=-1)
        lap = self.laplacian(y)
        if p == 2:
            return lap
        return norm ** (p - 2) * (lap + (p - 2) * self.score_hessian_score(y) / norm**2)

    def _weights_scores_fn(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``flat (B, d) ↦ (w (B, N), g (B, N, d))``, posterior weights and component scores in the dtype of the
        input, written with differentiable torch ops (the closed form of :meth:`_components`)."""
        means = self.means
        weights = self.weights
        prec, logdet = self._precision()
        full = self.full
        dim = self.dim

        def fn(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if flat.shape[1] != dim:
                raise ValueError(f"expected points with {dim} coordinates per sample; found shape {tuple(flat.shape)}")
            dt = flat.dtype
            diff = flat[:, None, :] - means.to(dt)[None]
            g = -torch.einsum("nij,bnj->bni", prec.to(dt), diff) if full else -prec.to(dt)[None] * diff
            maha = -(diff * g).sum(-1)
            log_joint = torch.log(weights.to(dt))[None] - 0.5 * (maha + logdet.to(dt)[None])
            return torch.softmax(log_joint, dim=1), g

        return fn

    def eps_fn(self, noise_std: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ ε(x) = −noise_std · ∇ log p(x)`` in the dtype of ``x``.

        Call it on the *noised* mixture, with the noise scale that produced it (``σ`` for ``ve(σ)``,
        ``sqrt(1 − ᾱ)`` for ``vp_from_alpha_bar(ᾱ)``, ``σ`` for ``flow(σ)``). Differentiable in ``x`` (used by the
        autograd estimators).
        """
        field = self._weights_scores_fn()

        def fn(x: torch.Tensor) -> torch.Tensor:
            # Closed form written with differentiable torch ops so JVP/VJP-based estimators can run on it.
            w, g = field(x.reshape(x.shape[0], -1))
            return (-noise_std * (w[..., None] * g).sum(1)).reshape(x.shape)

        return fn

    def _posterior_fn(self, alpha: float, noise_std: float) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
        """``x ↦ (ε̂, x̂_0)`` flat (B, d), the exact posterior means of ``n`` and ``x_0`` given ``α x_0 + s n = x``
        (module docstring), differentiable in ``x``. Called on the *clean* mixture."""
        alpha, noise_std = float(alpha), float(noise_std)
        if alpha < 0 or not noise_std > 0:
            raise ValueError(f"need alpha >= 0 and noise_std > 0; found alpha={alpha}, noise_std={noise_std}")
        field = self.vp(alpha, noise_std)._weights_scores_fn()
        means, cov, full = self.means, self.cov, self.full

        def fn(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dt = flat.dtype
            w, g = field(flat)
            score = (w[..., None] * g).sum(1)
            # E[x_0 | y, i] = μ_i − α Σ_i g_i(y)   (Gaussian conditioning, no division by α)
            cov_g = torch.einsum("nij,bnj->bni", cov.to(dt), g) if full else cov.to(dt)[None] * g
            x0 = (w[..., None] * (means.to(dt)[None] - alpha * cov_g)).sum(1)
            return -noise_std * score, x0

        return fn

    def posterior_mean_fn(self, alpha: float, noise_std: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ x̂_0(x) = E[x_0 | α x_0 + s n = x] = Σ_i w_i (μ_i − α Σ_i g_i)`` (Tweedie's ``(x + s² ∇log p_t)/α``
        for α > 0; the prior mean at α = 0), same shape and dtype as ``x``, differentiable.

        Call it on the *clean* mixture with the noising's ``α`` and ``s = noise_std`` (DDPM: ``sqrt(ᾱ)``,
        ``sqrt(1 − ᾱ)``; the linear interpolant: ``1 − σ``, ``σ``).
        """
        post = self._posterior_fn(alpha, noise_std)
        return lambda x: post(x.reshape(x.shape[0], -1))[1].reshape(x.shape)

    def velocity_fn(self, alpha: float, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ v(x) = E[ε − x_0 | α x_0 + σ ε = x] = ε̂ − x̂_0``, the exact target of a ``flow_prediction`` network;
        for α > 0 ``v = −σ s − (x + σ² s)/α``, ``s = ∇ log p_t(x)`` the score of ``vp(α, σ)``. Same shape and dtype
        as ``x``, differentiable.

        Call it on the *clean* mixture. On the linear interpolant (``α = 1 − σ``, :meth:`flow`) this is the
        velocity field ``d x_t / dσ`` of rectified flow, defined at σ = 1 as well (``v = x − Σ_i π_i μ_i``).
        """
        post = self._posterior_fn(alpha, sigma)

        def fn(x: torch.Tensor) -> torch.Tensor:
            eps, x0 = post(x.reshape(x.shape[0], -1))
            return (eps - x0).reshape(x.shape)

        return fn

    def target_fn(
        self, alpha: float, noise_std: float, prediction_type: str
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦`` the exact output of a perfectly trained network of ``prediction_type`` at ``x_t = x`` for the
        noising ``α x_0 + s n``: ``epsilon`` ε̂ = −s·s(x); ``v_prediction`` ``α ε̂ − s x̂_0`` (Salimans & Ho 2022);
        ``sample`` x̂_0; ``flow_prediction`` ``ε̂ − x̂_0`` (:meth:`velocity_fn`). Called on the *clean* mixture."""
        if prediction_type not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        post = self._posterior_fn(alpha, noise_std)
        a, s = float(alpha), float(noise_std)

        def fn(x: torch.Tensor) -> torch.Tensor:
            eps, x0 = post(x.reshape(x.shape[0], -1))
            out = {"epsilon": lambda: eps, "v_prediction": lambda: a * eps - s * x0, "sample": lambda: x0,
                   "flow_prediction": lambda: eps - x0}[prediction_type]()
            return out.reshape(x.shape)

        return fn

    def sample(self, num: int, generator: torch.Generator) -> torch.Tensor:
        """``num`` exact draws, shape (num, d)."""
        idx = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        z = torch.randn(num, self.dim, dtype=torch.float64, generator=generator)
        if self.full:
            if not (torch.linalg.eigvalsh(self.cov) > 0).all():
                raise ValueError("sampling a full-covariance mixture needs positive-definite covariances")
            lower = torch.linalg.cholesky(self.cov)[idx]
            return self.means[idx] + torch.einsum("bij,bj->bi", lower, z)
        return self.means[idx] + self.cov[idx].clamp_min(0).sqrt() * z


def point_masses(points: torch.Tensor, weights: torch.Tensor | None = None) -> GaussianMixture:
    """The empirical distribution of ``points`` (N, d): a mixture of zero-variance components.

    Its ``ve(σ)`` posterior weights are ``softmax_i(log π_i − ‖y − x_i‖² / 2σ²)`` (Dodson et al.'s empirical
    posterior).
    """
    points = torch.as_tensor(points, dtype=torch.float64)
    return GaussianMixture(points.reshape(points.shape[0], -1), weights, 0.0)


# ---------------------------------------------------------------------------------------------------- as a network
Coefs = Callable[[torch.Tensor], tuple[float, float]]


def flow_coefs(num_train_timesteps: int = 1000) -> Coefs:
    """``t ↦ (α, σ) = (1 − t/T, t/T)``: the linear interpolant at a flow-matching timestep ``t = σ·T`` (diffusers'
    ``FlowMatchEulerDiscreteScheduler``), computed in float64 from the timestep's own value."""
    T = float(num_train_timesteps)

    def coefs(t: torch.Tensor) -> tuple[float, float]:
        sigma = float(torch.as_tensor(t).double()) / T
        return 1.0 - sigma, sigma

    return coefs


def ddpm_coefs(alphas_cumprod: torch.Tensor) -> Coefs:
    """``t ↦ (sqrt(ᾱ_t), sqrt(1 − ᾱ_t))`` at an integer DDPM timestep (``scheduler.alphas_cumprod``, float64)."""
    table = torch.as_tensor(alphas_cumprod).double()

    def coefs(t: torch.Tensor) -> tuple[float, float]:
        tf = float(torch.as_tensor(t).double())
        if tf != round(tf):
            raise ValueError(f"ddpm_coefs: expected an integer timestep, found {tf}")
        ab = float(table[int(round(tf))])
        return math.sqrt(ab), math.sqrt(1.0 - ab)

    return coefs


class MixtureNet(torch.nn.Module):
    """A network with a diffusers UNet's call signature whose output is the exact target of a clean mixture
    (:meth:`GaussianMixture.target_fn`): a perfectly trained model of that law, of any family and parameterisation.

    ``forward(x, t, encoder_hidden_states=None, return_dict=True)``: ``x`` ``[B, C, H, W]`` with ``C·H·W = d``,
    ``t`` a scalar or ``[B]`` timesteps mapped to ``(α, s)`` by ``coefs`` (:func:`flow_coefs`, :func:`ddpm_coefs`);
    returns ``SimpleNamespace(sample=out)`` or, with ``return_dict=False``, ``(out,)``. With several ``mixtures``
    the conditioning picks one per row: row b uses ``mixtures[round(encoder_hidden_states[b].flatten()[0])]`` (a
    "caption" that names its law; none: mixture 0). Computes in float64 (a float64 parameter sets the adapter's
    dtype); ``config`` carries ``in_channels`` and ``sample_size`` for the sampler.
    """

    def __init__(self, mixtures: GaussianMixture | Sequence[GaussianMixture], coefs: Coefs, prediction_type: str,
                 sample_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.mixtures = [mixtures] if isinstance(mixtures, GaussianMixture) else list(mixtures)
        if math.prod(sample_shape) != self.mixtures[0].dim:
            raise ValueError(f"sample_shape {sample_shape} does not hold {self.mixtures[0].dim} coordinates")
        self.coefs, self.prediction_type = coefs, prediction_type
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)
        self.config = SimpleNamespace(in_channels=sample_shape[0], sample_size=sample_shape[-1])
        self._fns: dict[tuple[float, int], Callable[[torch.Tensor], torch.Tensor]] = {}
        self.calls: list[torch.Tensor] = []  # the timesteps of every call (to check what the network was given)

    def _fn(self, t: torch.Tensor, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        key = (float(t), k)
        if key not in self._fns:
            alpha, noise_std = self.coefs(t)
            self._fns[key] = self.mixtures[k].target_fn(alpha, noise_std, self.prediction_type)
        return self._fns[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True):
        B = x.shape[0]
        t = torch.as_tensor(t).detach().cpu().reshape(-1).expand(B)
        self.calls.append(t.clone())
        if encoder_hidden_states is None:
            which = torch.zeros(B, dtype=torch.long)
        else:
            which = encoder_hidden_states.reshape(B, -1)[:, 0].detach().round().long().cpu()
        out = None
        for tv in torch.unique(t):  # rows of one (timestep, law) share one closed form
            for k in torch.unique(which).tolist():
                rows = ((t == tv) & (which == k)).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
                value = self._fn(tv, k)(x)
                out = torch.where(rows, value, torch.zeros_like(value) if out is None else out)
        return SimpleNamespace(sample=out) if return_dict else (out,)
