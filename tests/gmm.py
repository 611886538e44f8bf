"""Analytic Gaussian-mixture reference for the signal tests (closed forms, float64, no autograd).

A mixture ``p(x) = Σ_i π_i N(x; μ_i, Σ_i)`` in ``R^d`` stays a Gaussian mixture under both forward-noising forms:

- variance exploding (VE), ``y = x + σ n``:            ``p_σ(y) = Σ_i π_i N(y; μ_i, Σ_i + σ² I)``;
- variance preserving (VP, DDPM), ``x_t = α x + s n``: ``p_t(y) = Σ_i π_i N(y; α μ_i, α² Σ_i + s² I)``,
  with ``α = sqrt(ᾱ_t)`` and ``s = sqrt(1 − ᾱ_t)``.

So every quantity is exact. With component precisions ``P_i = C_i^{-1}`` (``C_i`` the noised covariance),
component scores ``g_i(y) = −P_i (y − m_i)`` and posterior weights ``w_i(y) = π_i N_i(y) / p(y)``:

- score            ``s(y) = ∇ log p(y) = Σ_i w_i g_i``
- Hessian          ``H(y) = ∇² log p(y) = Σ_i w_i (−P_i + g_i g_iᵀ) − s sᵀ``
- diagonal of H    ``Σ_i w_i (−diag P_i + g_i ⊙ g_i) − s ⊙ s``
- trace of H       ``Σ_i w_i (−tr P_i + ‖g_i‖²) − ‖s‖²``   (the Laplacian of log p)
- p-Laplacian      ``div(‖s‖^{p−2} s) = ‖s‖^{p−2} [tr H + (p − 2) sᵀHs / ‖s‖²]``
- normalised ∞-Laplacian ``sᵀHs / ‖s‖²``
- noise prediction ``ε(y) = −s_noise · s(y)`` (``s_noise = σ`` for VE, ``sqrt(1 − ᾱ_t)`` for VP).

Covariances may be isotropic (a scalar or one per component), diagonal (``(N, d)``) or full (``(N, d, d)``).
Variance zero is allowed for the clean mixture (point masses): it only needs to be positive after noising.

Queries accept ``y`` of shape ``(B, d)`` or ``(B, *event)`` with ``prod(event) == d``; outputs keep the batch layout
(``score`` and ``eps_fn`` return the same shape as ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["GaussianMixture", "point_masses"]

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

    def eps_fn(self, noise_std: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x ↦ ε(x) = −noise_std · ∇ log p(x)`` in the dtype of ``x``.

        Call it on the *noised* mixture, with the noise scale that produced it (``σ`` for ``ve(σ)``,
        ``sqrt(1 − ᾱ)`` for ``vp_from_alpha_bar(ᾱ)``). Differentiable in ``x`` (used by the autograd estimators).
        """
        means = self.means
        weights = self.weights
        prec, logdet = self._precision()
        full = self.full
        dim = self.dim

        def fn(x: torch.Tensor) -> torch.Tensor:
            # Closed form written with differentiable torch ops so JVP/VJP-based estimators can run on it.
            flat = x.reshape(x.shape[0], -1)
            if flat.shape[1] != dim:
                raise ValueError(f"expected points with {dim} coordinates per sample; found shape {tuple(x.shape)}")
            dt = flat.dtype
            diff = flat[:, None, :] - means.to(dt)[None]
            g = -torch.einsum("nij,bnj->bni", prec.to(dt), diff) if full else -prec.to(dt)[None] * diff
            maha = -(diff * g).sum(-1)
            log_joint = torch.log(weights.to(dt))[None] - 0.5 * (maha + logdet.to(dt)[None])
            w = torch.softmax(log_joint, dim=1)
            return (-noise_std * (w[..., None] * g).sum(1)).reshape(x.shape)

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
