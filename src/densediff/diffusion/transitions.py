"""Discrete (categorical) diffusion over label maps: DDPS paper §3.3 and App. A Eq. 1-3.

States are the K classes, plus one absorbing ``[MASK]`` state (index K) for the ``absorbing``
and ``hybrid`` transitions. Every transition here has the form (one step s -> t)::

    Q[i, j] = a * [i == j] + b / K     for classes i, j < K      (keep, or replace uniformly)
    Q[i, K] = c                        for classes i < K         (mask)
    Q[K, K] = 1                                                  ([MASK] is absorbing)

with a + b + c = 1. Such matrices are closed under products, so q(x_t | x_0) (Eq. 2, the
product Q_1 ... Q_t) has the same form with cumulative coefficients; this module keeps the
cumulative ``abar[t]`` (keep) and ``cbar[t]`` (mask) for t = 0..T (t = 0: no noise) and
derives any s -> t transition from them:

- ``uniform`` (the paper's "replace-only", the only one the authors released): cbar = 0;
- ``absorbing`` ("mask-only"): cbar = 1 - abar, no replacement;
- ``hybrid`` ("replace + mask"): cbar = mask_share * (1 - abar), the rest replaced uniformly.

Schedules of abar (official ``alpha_schedule_torch`` / ``cos_alpha_schedule_torch``): linear
from 0.99999 (t = 1) to 0.000009 (t = T), or cosine rescaled to the same range.

Time convention: the usual DDPM one, t = T is the noisiest state and t = 0 the data. (The
official code runs its model time backwards: its t = 0 is our t = T.)
"""

from __future__ import annotations

import math

import torch

__all__ = ["DiscreteTransition", "alpha_bar_schedule", "sample_categorical", "stride_times"]

ABAR_MAX, ABAR_MIN = 0.99999, 0.000009
"""Range of the keep probability over t = 1..T (official)."""


def alpha_bar_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """``abar[t]`` for t = 0..T (float64): 1 at t = 0, then ``linear`` from 0.99999 to 0.000009
    over t = 1..T, or ``cosine``: ``(cos((i + T) pi / 2T) + 1)^2`` for i = 0..T-1 rescaled to
    that range (official ``cos_alpha_schedule_torch``)."""
    T = timesteps
    if T < 1:
        raise ValueError(f"timesteps must be >= 1, got {T}")
    if kind == "linear":
        ab = torch.linspace(ABAR_MAX, ABAR_MIN, T, dtype=torch.float64) if T > 1 else \
            torch.tensor([ABAR_MIN], dtype=torch.float64)
    elif kind == "cosine":
        i = torch.arange(T, dtype=torch.float64)
        f = (torch.cos((i + T) * math.pi / (2 * T)) + 1) ** 2
        span = (f.max() - f.min()).clamp(min=1e-12)
        ab = (f - f.min()) / span * (ABAR_MAX - ABAR_MIN) + ABAR_MIN
    else:
        raise ValueError(f"unknown discrete schedule {kind!r}; expected linear or cosine")
    return torch.cat([torch.ones(1, dtype=torch.float64), ab])


def stride_times(timesteps: int, steps: int) -> list[int]:
    """The noise levels a ``steps``-step sampler visits (stride sampling, paper §3.4): evenly
    spaced from T down to 1, rounded, without repeats. T = 20: 1 step [20], 2 steps [20, 1],
    3 steps [20, 10, 1] (the official ``inference_timesteps=2`` runs these three)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > timesteps:
        raise ValueError(f"steps ({steps}) must be at most the trained timesteps ({timesteps})")
    if steps == 1:
        return [timesteps]
    pts = [round(timesteps - k * (timesteps - 1) / (steps - 1)) for k in range(steps)]
    return list(dict.fromkeys(pts))


def sample_categorical(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one state per pixel from ``probs`` (B x N x h x w) with the Gumbel-max trick, the
    noise given as ``uniform`` draws in (0, 1) of the same shape (so callers control seeds)."""
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return (probs.clamp(min=1e-30).log() + gumbel).argmax(1)


class DiscreteTransition(torch.nn.Module):
    """Forward process and posterior of a categorical diffusion (see the module doc).

    Args:
        num_classes: K.
        timesteps: T.
        kind: ``uniform`` | ``absorbing`` | ``hybrid``.
        schedule: ``linear`` | ``cosine`` (of abar).
        mask_share: for ``hybrid``, the share of the corrupted mass that goes to [MASK].
    """

    def __init__(self, num_classes: int, timesteps: int, kind: str = "uniform",
                 schedule: str = "linear", mask_share: float = 0.5):
        super().__init__()
        if kind not in ("uniform", "absorbing", "hybrid"):
            raise ValueError(f"unknown transition {kind!r}; expected uniform, absorbing or hybrid")
        if not 0 <= mask_share <= 1:
            raise ValueError(f"mask_share must be in [0, 1], got {mask_share}")
        self.num_classes = num_classes
        self.timesteps = timesteps
        self.kind = kind
        self.has_mask = kind != "uniform"
        self.num_states = num_classes + int(self.has_mask)
        self.mask_index = num_classes if self.has_mask else None
        share = {"uniform": 0.0, "absorbing": 1.0, "hybrid": mask_share}[kind]
        abar = alpha_bar_schedule(schedule, timesteps)
        self.register_buffer("abar", abar.float(), persistent=False)
        self.register_buffer("cbar", (share * (1 - abar)).float(), persistent=False)

    # ---------------------------------------------------------------- coefficients

    def coefficients(self, s: torch.Tensor | int, t: torch.Tensor | int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a, b, c) of the s -> t transition q(x_t | x_s), s <= t (s = 0: Eq. 2's
        q(x_t | x_0); s = t - 1: Eq. 1's one step). Tensors of the broadcast shape of s, t."""
        s = torch.as_tensor(s, device=self.abar.device)
        t = torch.as_tensor(t, device=self.abar.device)
        a = self.abar[t] / self.abar[s]
        c = 1 - (1 - self.cbar[t]) / (1 - self.cbar[s])
        b = (1 - a - c).clamp(min=0)
        return a, b, c

    def matrix(self, s: int, t: int) -> torch.Tensor:
        """The explicit N x N matrix of q(x_t | x_s) (rows: from, columns: to). For tests and
        small K; the methods below never build it."""
        a, b, c = (float(v) for v in self.coefficients(s, t))
        k, n = self.num_classes, self.num_states
        q = torch.zeros(n, n, dtype=torch.float64)
        q[:k, :k] = b / k
        q[:k, :k] += a * torch.eye(k, dtype=torch.float64)
        if self.has_mask:
            q[:k, k] = c
            q[k, k] = 1.0
        return q

    @staticmethod
    def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *([1] * (like.dim() - 1))) if v.dim() else v

    def apply(self, probs: torch.Tensor, s, t) -> torch.Tensor:
        """``probs @ Q_{s->t}``: the distribution of x_t for x_s ~ ``probs`` (B x N x ...,
        N = num_states; s, t scalars or one per batch item). Closed form, O(N)."""
        a, b, c = (self._view(v.to(probs.dtype), probs) for v in self.coefficients(s, t))
        k = self.num_classes
        cls = probs[:, :k]
        mass = cls.sum(1, keepdim=True)
        out = a * cls + b / k * mass
        if not self.has_mask:
            return out
        return torch.cat([out, probs[:, k:] + c * mass], 1)

    # ---------------------------------------------------------------- forward process

    def one_hot(self, x: torch.Tensor) -> torch.Tensor:
        """State indices B x h x w -> B x N x h x w one-hot floats."""
        return torch.nn.functional.one_hot(x, self.num_states).permute(0, 3, 1, 2).float()

    def q_probs(self, x0: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x_0) (Eq. 2) for class indices ``x0`` (B x h x w): B x N x h x w."""
        return self.apply(self.one_hot(x0), 0, t)

    def add_noise(self, x0: torch.Tensor, t, uniform: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (Eq. 2) for class indices ``x0`` (B x h x w): B x h x w states.
        ``uniform``: the draws of :func:`sample_categorical`, B x N x h x w in (0, 1) (None:
        ``torch.rand``)."""
        q = self.q_probs(x0, t)
        return sample_categorical(q, torch.rand_like(q) if uniform is None else uniform)

    def prior_probs(self) -> torch.Tensor:
        """The stationary distribution q(x_T), an N-vector: uniform over the classes for
        ``uniform``, all [MASK] for ``absorbing``, a mix for ``hybrid`` (abar_T ~ 1e-5 of the
        data is neglected)."""
        cT = float(self.cbar[-1])
        p = torch.full((self.num_states,), (1 - cT) / self.num_classes, device=self.abar.device)
        if self.has_mask:
            p[-1] = cT
        return p

    # ---------------------------------------------------------------- posterior

    def likelihood(self, x_t: torch.Tensor, s, t) -> torch.Tensor:
        """``Q_{s->t}[:, x_t]``: q(x_t | x_s = i) for every state i, B x N x h x w."""
        oh = self.one_hot(x_t)
        a, b, c = (self._view(v, oh) for v in self.coefficients(s, t))
        k = self.num_classes
        is_cls = oh[:, :k].sum(1, keepdim=True)
        cls = a * oh[:, :k] + b / k * is_cls
        if not self.has_mask:
            return cls
        is_mask = oh[:, k:]
        return torch.cat([cls + c * is_mask, is_mask], 1)

    def posterior(self, x_t: torch.Tensor, x0_probs: torch.Tensor, s, t) -> torch.Tensor:
        """q(x_s | x_t, x_0) of Eq. 3 for s < t, averaged over x_0 ~ ``x0_probs``:

            sum_x0 p(x0) q(x_t | x_s) q(x_s | x0) / q(x_t | x0)
            = Q_{s->t}[:, x_t] * ((p / q(x_t | .)) @ Qbar_s)   (then normalised)

        With a one-hot ``x0_probs`` this is Eq. 3 exactly; with the model's softmax it is the
        x_0-parameterised reverse step p(x_s | x_t) = E_{x0}[q(x_s | x_t, x0)] (paper §3.4).

        Args:
            x_t: B x h x w current states.
            x0_probs: B x K x h x w (or B x N, the [MASK] entry ignored) probabilities of x_0.
            s, t: noise levels, 0 <= s < t (scalars or one per batch item).

        Returns:
            B x N x h x w probabilities of x_s (pixels where every x_0 in the support is
            impossible given x_t get the prior q(x_s | x_0 ~ p) instead of NaN).
        """
        k = self.num_classes
        p = x0_probs[:, :k].float()
        if self.has_mask:
            p = torch.cat([p, torch.zeros_like(p[:, :1])], 1)
        like_t = self.likelihood(x_t, 0, t)  # q(x_t | x0 = i) for every i
        w = p / like_t.clamp(min=1e-30)
        w = torch.where(like_t > 0, w, torch.zeros_like(w))
        post = self.likelihood(x_t, s, t) * self.apply(w, 0, s)
        z = post.sum(1, keepdim=True)
        fallback = self.apply(p, 0, s)
        return torch.where(z > 0, post / z.clamp(min=1e-30), fallback)
