r"""PSGD-Kron-Whiten with Procrustes steps (arXiv:1512.04202, arXiv:2402.11858): ``PSGDPro``.

PSGD fits a preconditioner :math:`P` so that preconditioned gradients are "whitened": it minimises
:math:`c(P) = \mathbb E[h^\top P h] + \operatorname{tr}(P^{-1})`, whose minimiser is
:math:`P = \mathbb E[hh^\top]^{-1/2}`. :math:`P = Q^\top Q` with a Kronecker-factored
:math:`Q = Q_1 \otimes \cdots \otimes Q_n`, one factor per dimension of the parameter, fitted on the Lie group
of invertible matrices. For a parameter :math:`W` with gradient :math:`g_t` at step :math:`t = 0, 1, \ldots`::

    weight decay (weight_decay_method), then  m_t = mu m_{t-1} + (1 - mu) g_t          (state "exp_avg")
    eta_t = max(precond_lr / sqrt(1 + t / warmup_steps), min_precond_lr)
    h = m_t + (delta + 1e-7 |m_t|) * xi,   xi ~ N(0, I)           (delta = damping_noise_scale)
    p = P h = (Q^T Q) h                     (every Q_i along dimension i, then every Q_i^T)
    for each dimension i (N_i = numel / d_i):
        A_i = p contracted with itself over every dimension but i                 (d_i x d_i)
        l_i = ||A_i||_2 (a cheap lower bound) + N_i
        L_i <- max(beta_lip L_i + (1 - beta_lip) l_i, l_i)                        (state "L_i")
        dense:    Q_i <- Q_i - (eta_t / L_i) (A_i - N_i I) Q_i,  then  Q_i <- procrustes_step(Q_i)
        diagonal: q_i <- q_i * (1 - (eta_t / L_i) (diag(A_i) - N_i))
    rescale the Q_i to equal largest magnitudes (uniformize_q_in_place)
    u = P m_t, scaled down to RMS max_update_rms if larger (0: no clipping)
    W <- W - lr u

The fitting step is a normalised gradient step of :math:`c` on the group (:math:`L_i` estimates its Lipschitz
constant); its fixed point is :math:`\mathbb E[A_i] = N_i I`, i.e. :math:`P\,\mathbb E[hh^\top]\,P \approx I`
along every dimension. The Procrustes step rotates :math:`Q_i` towards its symmetric positive definite polar
factor without changing :math:`Q_i^\top Q_i`, the "Q0.5EQ1.5" geometry of arXiv:2402.11858. The damping noise
bounds :math:`P \preceq \delta^{-1} I`, so tiny or vanishing gradients are not blown up.

Defaults (those of the reference library): ``lr=3e-3`` (the whitened update has Adam-like per-entry scale),
``weight_decay=0.01`` decoupled, ``momentum=0.9``, ``beta_lip=0.9``, ``precond_lr=0.1`` decaying as
:math:`1/\sqrt{1 + t/10^4}` to ``min_precond_lr=0.01`` (fast fitting early, accurate later),
``precond_init_scale=1.0`` (:math:`P = I` at first: momentum SGD), ``damping_noise_scale=0.1``,
``max_update_rms=0.0`` (no clipping).

Where ours differs from the reference library:

* **Noise from the optimizer state.** Step :math:`t`'s random numbers (the damping noise :math:`\xi` and the
  probes of the norm bounds) come from a ``torch.Generator`` on the parameter's device seeded from the integer
  state ``seed`` (per parameter, derived from the group's ``seed`` and the parameter's position in its group)
  and :math:`t`. The global RNG is never touched, and a run resumed from ``state_dict()`` is bit-identical to
  an uninterrupted one.
* **Diagonal factors** (a vector :math:`q_i`, applied element-wise) for 1-D parameters and for dimensions larger
  than ``max_dense_dim``; the reference allocates a dense :math:`d \times d` factor for every dimension (a
  4096-wide bias gets a 4096x4096 matrix). 0-D parameters are treated as 1-D of size 1: a single diagonal
  factor, i.e. momentum SGD with a scalar step size fitted to whiten the momentum.
* **No host synchronization** in ``step`` (no ``.item()``, no Python branch on a tensor value): the Procrustes
  step size is computed on device.
* **Every hyperparameter in the param group** (the reference keeps the init scale, noise scale, warm-up,
  RMS clip and weight-decay method on ``self``), validated at construction; reading ``opt.max_update_rms``
  etc. gives the default, assigning one sets it in every group.
* ``step(closure)`` works; ``l2`` weight decay never modifies ``p.grad``; bf16/fp16 parameters keep float32
  state (momentum, factors) and the update is rounded into the parameter once; any rank works.
* State keys: ``step`` (int), ``seed`` (int), ``exp_avg``, and one key per factor, ``Q_0, Q_1, ...`` and
  ``L_0, L_1, ...`` (0-dim), instead of the reference's Python lists ``Q``/``L``: torch's ``load_state_dict``
  would cast tensors inside lists to the parameter dtype and our checkpoint checks only see top-level tensors.
  :func:`kron_factors` returns the lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, group_default
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.psgd.procrustes_step import procrustes_step
from emerging_optimizers.psgd.psgd_kron_contractions import apply_preconditioner, partial_contraction
from emerging_optimizers.psgd.psgd_utils import norm_lower_bound_spd, uniformize_q_in_place
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import check_beta, check_nonneg, check_positive, clip_update_rms_

__all__ = [
    "PSGDPro",
    "calculate_psgd_update",
    "kron_factors",
    "precond_lr_schedule",
    "update_dense_factor",
    "update_diag_factor",
    "update_preconditioner",
]

_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------- pure math
def precond_lr_schedule(precond_lr: float, step: int, min_precond_lr: float, warmup_steps: float) -> float:
    """``max(precond_lr / sqrt(1 + step / warmup_steps), min_precond_lr)``: the fitting rate at ``step``."""
    return max(precond_lr / math.sqrt(1.0 + step / warmup_steps), min_precond_lr)


def update_dense_factor(
    Q: torch.Tensor,
    L: torch.Tensor,
    cov: torch.Tensor,
    normalization: float,
    precond_lr: float,
    beta_lip: float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fitting step of a dense factor ``Q`` (d x d) from ``cov`` = A_i (module docstring); returns new ``(Q, L)``.

    ``L`` (0-dim) is the running Lipschitz estimate; ``generator`` feeds the random probes of the norm bounds.
    """
    ell = norm_lower_bound_spd(cov, generator=generator) + normalization
    L = torch.maximum(beta_lip * L + (1.0 - beta_lip) * ell, ell)
    Q = Q - (precond_lr / L) * (cov @ Q - normalization * Q)
    return procrustes_step(Q, generator=generator), L


def update_diag_factor(
    q: torch.Tensor, L: torch.Tensor, cov_diag: torch.Tensor, normalization: float, precond_lr: float, beta_lip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fitting step of a diagonal factor ``q`` (a vector) from the diagonal of A_i; returns new ``(q, L)``.

    The dense step restricted to diagonal matrices (no Procrustes step is needed: a positive diagonal is already
    symmetric positive definite); ``max(cov_diag)`` is the exact norm of the diagonal A_i.
    """
    ell = cov_diag.amax() + normalization
    L = torch.maximum(beta_lip * L + (1.0 - beta_lip) * ell, ell)
    return q * (1.0 - (precond_lr / L) * (cov_diag - normalization)), L


def _diag_contraction(pg: torch.Tensor, axis: int) -> torch.Tensor:
    """The diagonal of ``partial_contraction(pg, pg, axis)`` without forming the d x d matrix."""
    others = [d for d in range(pg.dim()) if d != axis]
    sq = pg * pg
    return sq.sum(dim=others) if others else sq  # sum(dim=[]) would reduce every dimension


def update_preconditioner(
    Q_list: Sequence[torch.Tensor],
    L_list: Sequence[torch.Tensor],
    exp_avg: torch.Tensor,
    noise: torch.Tensor,
    *,
    precond_lr: float,
    beta_lip: float,
    damping_noise_scale: float,
    generator: torch.Generator | None = None,
) -> None:
    """Fit every factor once on the damped momentum ``h = m + (delta + 1e-7|m|) * noise``, in place.

    ``Q_list[i]`` is dense (d_i x d_i) or diagonal (d_i,); ``L_list[i]`` its 0-dim Lipschitz estimate. All factors
    are fitted from the same ``P h`` (the old ``P``), then balanced by :func:`uniformize_q_in_place`.
    """
    h = exp_avg + (damping_noise_scale + 1e-7 * exp_avg.abs()) * noise
    pg = apply_preconditioner(Q_list, h)
    numel = pg.numel()
    for axis, (Q, L) in enumerate(zip(Q_list, L_list)):
        normalization = numel / Q.shape[0]
        if Q.dim() == 1:
            new_Q, new_L = update_diag_factor(Q, L, _diag_contraction(pg, axis), normalization, precond_lr, beta_lip)
        else:
            cov = partial_contraction(pg, pg, axis)
            new_Q, new_L = update_dense_factor(Q, L, cov, normalization, precond_lr, beta_lip, generator=generator)
        Q.copy_(new_Q)
        L.copy_(new_L)
    uniformize_q_in_place(Q_list)


def calculate_psgd_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    Q_list: Sequence[torch.Tensor],
    L_list: Sequence[torch.Tensor],
    noise: torch.Tensor,
    *,
    momentum: float,
    precond_lr: float,
    beta_lip: float,
    damping_noise_scale: float,
    max_update_rms: float = 0.0,
    generator: torch.Generator | None = None,
    update_precond: bool = True,
) -> torch.Tensor:
    """PSGD-Kron's update ``u = clip(P m)`` (module docstring); ``exp_avg``, ``Q_list``, ``L_list`` change in place.

    With ``update_precond=False`` the factors are left as they are (and ``noise`` is not read): the step only
    applies the current preconditioner.

    ``grad`` (already weight-decayed), ``exp_avg`` and ``noise`` share one shape of ``len(Q_list)`` dims and the
    factors' dtype; ``precond_lr`` is this step's rate (:func:`precond_lr_schedule`).
    """
    exp_avg.lerp_(grad, 1.0 - momentum)
    if update_precond:
        update_preconditioner(Q_list, L_list, exp_avg, noise, precond_lr=precond_lr, beta_lip=beta_lip,
                              damping_noise_scale=damping_noise_scale, generator=generator)
    return clip_update_rms_(apply_preconditioner(Q_list, exp_avg), max_update_rms)


# ---------------------------------------------------------------------------------------------- randomness
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(a: int, b: int) -> int:
    """A well-spread 63-bit seed from two integers (host arithmetic, deterministic across processes)."""
    return _splitmix64(_splitmix64(a & _MASK64) ^ (b & _MASK64)) >> 1


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one parameter's step ``step``: a pure function of ``(seed, step)``."""
    return torch.Generator(device=device).manual_seed(_mix_seed(seed, step))


def _draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (the damping noise xi of the module docstring)."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


# ---------------------------------------------------------------------------------------------- optimizer
def kron_factors(state: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The factors ``[Q_0, Q_1, ...]`` and Lipschitz estimates ``[L_0, L_1, ...]`` of one parameter's state."""
    n = 0
    while f"Q_{n}" in state:
        n += 1
    return [state[f"Q_{i}"] for i in range(n)], [state[f"L_{i}"] for i in range(n)]


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer{bound}.")


@register_optimizer("psgd_pro")
class PSGDPro(WeightDecayMixin, EmergingOptimizer):
    r"""PSGD-Kron-Whiten with Procrustes steps (module docstring for the update rule and the differences).

    Args:
        params: parameters or param groups, of any rank.
        lr: learning rate (>= 0, 3e-3).
        weight_decay: weight-decay coefficient (>= 0, 0.01).
        momentum: EMA coefficient of the momentum ``exp_avg`` in [0, 1) (0.9).
        weight_decay_method: ``"decoupled" | "independent" | "l2" | "palm"`` (``"decoupled"``).
        beta_lip: EMA coefficient of the Lipschitz estimates in [0, 1) (0.9).
        precond_lr: initial fitting rate of the preconditioner (>= 0, 0.1).
        precond_init_scale: initial factors ``scale * I`` (> 0, 1.0).
        damping_noise_scale: ``delta``, scale of the damping noise (>= 0, 0.1).
        min_precond_lr: floor of the fitting rate (>= 0, 0.01).
        warmup_steps: time scale of the fitting-rate decay (> 0, 10000).
        max_update_rms: clip the update's RMS to this (>= 0; 0 = no clipping, the default).
        max_dense_dim: largest dimension that gets a dense factor (int >= 0, 8192); larger dimensions, 1-D and 0-D
            parameters get diagonal factors. A dense factor costs ``d**2`` floats of memory and ``O(d**3)`` work per
            step (two products with a d x d matrix, the norm bound, the Procrustes step); at 8192 that is 256 MiB
            per factor, beyond which a diagonal factor is the practical choice. It is the default threshold of the
            PSGD-Kron implementations after Xi-Lin Li (``max_size_triangular=8192`` in kron_torch, which also gives
            1-D parameters diagonal factors, ``min_ndim_triangular=2``). 0 makes every factor diagonal.
        precond_update_every: fit the factors every this many steps (int >= 1; 1, the reference's behaviour,
            every step); the preconditioner is applied every step. Fitting costs ``O(d**3)`` per dense factor and
            dominates the step (measured: 2.1M-param GPT-like set on one CPU thread, 620x torch's fused AdamW at 1),
            so 5-10 amortises it the way SOAP's ``precondition_frequency`` and kron_torch's update probability do.
            Step ``t`` (0-based) fits when ``t % precond_update_every == 0``; the fitting rate follows ``t``.
        seed: the noise seed of the param groups (int; ``None``: ``torch.initial_seed()`` at construction, so
            ``torch.manual_seed`` makes runs reproducible). Each parameter's state ``seed`` is derived from it and
            the parameter's position in its group.
    """

    matrix_optimizer_ok = True  # usable as MuonAdamW's matrix side (it handles any rank itself)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        *,
        weight_decay_method: WeightDecayT = "decoupled",
        beta_lip: float = 0.9,
        precond_lr: float = 0.1,
        precond_init_scale: float = 1.0,
        damping_noise_scale: float = 0.1,
        min_precond_lr: float = 0.01,
        warmup_steps: int = 10000,
        max_update_rms: float = 0.0,
        max_dense_dim: int = 8192,
        precond_update_every: int = 1,
        seed: int | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            weight_decay_method=weight_decay_method,
            beta_lip=beta_lip,
            precond_lr=precond_lr,
            precond_init_scale=precond_init_scale,
            damping_noise_scale=damping_noise_scale,
            min_precond_lr=min_precond_lr,
            warmup_steps=warmup_steps,
            max_update_rms=max_update_rms,
            max_dense_dim=max_dense_dim,
            precond_update_every=precond_update_every,
            seed=torch.initial_seed() if seed is None else seed,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    # The reference keeps these on ``self``; here reading gives the default, assigning sets every group.
    weight_decay_method = group_default("weight_decay_method")
    precond_init_scale = group_default("precond_init_scale")
    damping_noise_scale = group_default("damping_noise_scale")
    warmup_steps = group_default("warmup_steps")
    max_update_rms = group_default("max_update_rms")

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters; ``ValueError`` naming the first bad one."""
        check_nonneg("lr", group["lr"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_beta("momentum", group["momentum"])
        check_weight_decay_method(group["weight_decay_method"])
        check_beta("beta_lip", group["beta_lip"])
        check_nonneg("precond_lr", group["precond_lr"])
        check_positive("precond_init_scale", group["precond_init_scale"])
        check_nonneg("damping_noise_scale", group["damping_noise_scale"])
        check_nonneg("min_precond_lr", group["min_precond_lr"])
        check_positive("warmup_steps", group["warmup_steps"])
        check_nonneg("max_update_rms", group["max_update_rms"])
        _check_int("max_dense_dim", group["max_dense_dim"], 0)
        _check_int("precond_update_every", group["precond_update_every"], 1)
        _check_int("seed", group["seed"], None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (a ``seed`` of None becomes ``torch.initial_seed()``), validated as in the base."""
        if param_group.get("seed", 0) is None:
            param_group = {**param_group, "seed": torch.initial_seed()}
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = _state_dtype(p)
        position = next((i for i, q in enumerate(group["params"]) if q is p), 0)
        state: dict[str, Any] = {
            "step": 0,
            "seed": _mix_seed(group["seed"], position),
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format),
        }
        scale = group["precond_init_scale"]
        shape = tuple(p.shape) or (1,)  # a 0-D parameter is treated as 1-D of size 1
        for i, d in enumerate(shape):
            if p.dim() >= 2 and d <= group["max_dense_dim"]:
                state[f"Q_{i}"] = torch.eye(d, dtype=dtype, device=p.device) * scale
            else:
                state[f"Q_{i}"] = torch.full((d,), scale, dtype=dtype, device=p.device)
        for i in range(len(shape)):
            state[f"L_{i}"] = torch.ones((), dtype=dtype, device=p.device)
        return state

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            assert p.grad is not None
            state = self.state[p]
            exp_avg = state["exp_avg"]
            # ``.to`` copies low-precision grads; for l2, apply_weight_decay returns a new tensor: p.grad stays as is.
            grad = apply_weight_decay(p, p.grad.to(exp_avg.dtype), group["weight_decay_method"], group["lr"],
                                      group["weight_decay"])
            Q_list, L_list = kron_factors(state)
            step = state["step"]
            fit = step % group["precond_update_every"] == 0
            generator = _step_generator(state["seed"], step, p.device) if fit else None
            m = exp_avg.view(1) if exp_avg.dim() == 0 else exp_avg
            update = calculate_psgd_update(
                grad.view(m.shape),
                m,
                Q_list,
                L_list,
                _draw_noise(m, generator) if generator is not None else m,
                momentum=group["momentum"],
                precond_lr=precond_lr_schedule(group["precond_lr"], step, group["min_precond_lr"],
                                               group["warmup_steps"]),
                beta_lip=group["beta_lip"],
                damping_noise_scale=group["damping_noise_scale"],
                max_update_rms=group["max_update_rms"],
                generator=generator,
                update_precond=fit,
            )
            p.add_(update.view(p.shape), alpha=-group["lr"])  # fp32 update rounded into a bf16 p once
            state["step"] = step + 1
