"""Zeroth-order SGD on the subspace coordinates ``z``: a second forward-only optimizer family beside CMA-ES.

Two-point (antithetic) gradient estimates, as in SPSA (Spall 1992) and MeZO (Malladi et al. 2023, eq. 1): with
``q`` random directions ``u_i ~ N(0, I_d)`` and a step ``eps``, the owner evaluates the ``2q`` candidates
``z + eps u_i`` and ``z - eps u_i`` in ONE batched forward (the population of the tuning loop, so a private run
sends exactly the same shapes as a CMA-ES run of the same population size), and estimates

    g = (1 / q) sum_i (L(z + eps u_i) - L(z - eps u_i)) / (2 eps) * u_i

an unbiased estimate of the gradient of the Gaussian-smoothed loss. The update is Adam (Kingma & Ba 2015) on
``g`` with step ``lr``: the scale of ``z`` is set by the projection (``sigma`` of BBT's scaling), and Adam's
per-coordinate normalisation keeps ``lr`` meaningful in units of ``z`` whatever the loss scale.

Only the losses, computed by the owner in the clear from the revealed logits, enter the update: like CMA-ES it
needs no backward pass and nothing of it runs under MPC. The state (``z``, Adam moments, step, RNG) is plain
arrays and JSON, for checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from secfwt.errors import ConfigError

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


class Spsa:
    """Antithetic two-point zeroth-order Adam on ``z`` (module docstring). ``popsize`` = 2 q forwards a step."""

    def __init__(self, d: int, popsize: int, lr: float, eps: float, seed: int) -> None:
        if popsize < 2 or popsize % 2:
            raise ConfigError(f"optimizer spsa: popsize must be an even number >= 2 (antithetic pairs), got {popsize}")
        if not (lr > 0 and eps > 0):
            raise ConfigError(f"optimizer spsa: lr and eps must be > 0, got lr={lr}, eps={eps}")
        self.d, self.q, self.lr, self.eps = d, popsize // 2, lr, eps
        self.z = np.zeros(d)
        self.m = np.zeros(d)
        self.v = np.zeros(d)
        self.t = 0
        self.rng = np.random.default_rng(seed)
        self._u: np.ndarray | None = None  # the directions of the population asked last

    @property
    def mean(self) -> np.ndarray:
        return self.z

    def ask(self) -> list[np.ndarray]:
        """The ``2q`` candidates ``z + eps u_i, z - eps u_i`` (pairs next to each other)."""
        self._u = self.rng.standard_normal((self.q, self.d))
        out = []
        for u in self._u:
            out += [self.z + self.eps * u, self.z - self.eps * u]
        return out

    def tell(self, losses: list[float]) -> None:
        """One Adam step on the two-point estimate from the losses of the last :meth:`ask` (same order)."""
        if self._u is None or len(losses) != 2 * self.q:
            raise ValueError(f"spsa.tell: expected {2 * self.q} losses of the last ask, got {len(losses)}")
        lv = np.asarray(losses, dtype=np.float64).reshape(self.q, 2)
        coef = (lv[:, 0] - lv[:, 1]) / (2.0 * self.eps)  # (q,)
        g = (coef[:, None] * self._u).mean(axis=0)
        self.t += 1
        self.m = BETA1 * self.m + (1 - BETA1) * g
        self.v = BETA2 * self.v + (1 - BETA2) * g * g
        m_hat = self.m / (1 - BETA1**self.t)
        v_hat = self.v / (1 - BETA2**self.t)
        self.z = self.z - self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
        self._u = None

    def should_stop(self) -> bool:
        return False

    def state(self) -> dict[str, Any]:
        return {"z": self.z, "m": self.m, "v": self.v, "t": self.t, "rng": self.rng.bit_generator.state}

    def restore(self, s: dict[str, Any], array: Any, field: Any) -> None:
        """Set the state from :meth:`state` read back by the checkpoint module's checked ``array``/``field``."""
        z, m, v = (array(s, k, (self.d,), np.float64) for k in ("z", "m", "v"))
        t = field(s, "t", int)
        if t < 0:
            raise ConfigError(f"spsa t: expected >= 0, got {t}")
        rng = np.random.default_rng()
        rng.bit_generator.state = field(s, "rng", dict)
        self.z, self.m, self.v, self.t, self.rng = z, m, v, t, rng
