r"""Shampoo with learning-rate grafting and blocking (arXiv:1802.09568, arXiv:2002.09018, arXiv:2309.06497).

For a parameter viewed as a matrix (N-D parameters as ``[out, -1]``) with gradient :math:`G_t` at step
:math:`t = 1, 2, \ldots`, after weight decay (``weight_decay_method``; ``l2`` adds :math:`\lambda W` to
:math:`G_t`, the multiplicative methods scale :math:`W`)::

    m_t = beta1 m_{t-1} + (1 - beta1) G_t,   m_hat = m_t / (1 - beta1^t)          filtered gradient ("exp_avg")
    grafted method (element-wise, on the whole parameter):
        adam:    v_t = beta2 v + (1 - beta2) G^2,  A = m_hat / (sqrt(v_t / (1 - beta2^t)) + eps)   ("exp_avg_sq")
        rmsprop: v_t = beta2 v + (1 - beta2) G^2,  A = m_hat / (sqrt(v_t) + eps)                   ("exp_avg_sq")
        adagrad: v_t = v + G^2,                    A = m_hat / (sqrt(v_t) + eps)                   ("sum")
        none:    A = m_hat
    per block B of the matrix (blocks of at most max_preconditioner_dim x max_preconditioner_dim):
        b_t = 1 - (1 - shampoo_beta) / (1 - shampoo_beta^t)       (shampoo_beta = 1: plain sums)
        L_B <- b_t L_B + (1 - b_t) G_B G_B^T,   R_B <- b_t R_B + (1 - b_t) G_B^T G_B    ("L_i", "R_i")
        every precondition_frequency steps from start_preconditioning_step on:
            L_B^{-1/p}, R_B^{-1/p} = inverse_root(., p), p = 4 (inv_root_override)  ("L_inv_root_i", "R_inv_root_i")
        S_B = L_B^{-1/p} m_hat_B R_B^{-1/p}                       the Shampoo direction
        D_B = S_B * ||A_B|| / (||S_B|| + 1e-16)                   grafted: the step size is the grafted method's
              (D_B = S_B with grafting "none")
    before start_preconditioning_step, and for parameters Shampoo does not cover:  D = A
    momentum (0: none):   buf <- mu buf + (1 - mu) D;   D <- (1 - mu) D + mu buf (nesterov)  or  D <- buf
                                                                                  ("momentum_buffer")
    W <- W - lr D

``inverse_root`` regularises :math:`L + (\epsilon + \epsilon_{rel}\lambda_{\max}) I` (``root_eps``,
``root_relative_eps``) and computes the root by ``eigh`` (default, float64 retry on failure; if that fails
too the previous root is kept) or a coupled Newton iteration (``root_method="newton"``: matmuls only).
The factors always see the raw gradient; ``m_hat`` (``beta1 = 0``: the gradient itself) is what gets
preconditioned, so ``betas[0]`` is Distributed Shampoo's gradient filter and ``betas[1]`` its grafting beta2.

**Reductions.** Before ``start_preconditioning_step`` (and with ``momentum=0``) a step is exactly one step of
the grafted method: ``Adam``/``AdamW`` with ``betas`` and ``eps`` (grafting ``"adam"``), ``RMSProp`` with
``alpha = betas[1]`` (``"rmsprop"``, ``betas[0] = 0``), ``torch.optim.Adagrad`` (``"adagrad"``, ``betas[0] = 0``),
momentum-free SGD (``"none"``, ``betas[0] = 0``). The grafted state is updated by the library's kernels:
:func:`adam_kernel` for Adam, :func:`rmsprop_kernel` for RMSProp (with a filter, ``betas[0] > 0``, the Adam kernel
without the second-moment bias correction, i.e. RMSProp's denominator under the filtered numerator).

Coverage: 2-D and N-D parameters get Kronecker factors; a matrix is split into blocks (``use_blocking``) so no
factor exceeds ``max_preconditioner_dim``; with ``use_blocking=False`` a parameter with a larger dimension, and
every 0-D/1-D parameter, takes the grafted method's step (``D = A``).

Defaults and why:

* ``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``grafting="adam"``: the step size is AdamW's, so
  AdamW's learning rate and schedule carry over (Distributed Shampoo's README advice: graft from the optimizer
  you tuned). ``weight_decay=0.01`` decoupled, as AdamW and the rest of this family.
* ``shampoo_beta=0.999``: factors averaged over ~1000 steps, bias-corrected (Distributed Shampoo recommends its
  ``betas[1]`` equal to Adam's beta2; its default 1.0, AdaGrad-style sums, is available).
* ``precondition_frequency=10``, ``start_preconditioning_step=None`` (= the frequency): an ``eigh`` of a
  1024 x 1024 factor costs ~0.14 s on one CPU core (~6 matmuls of that size) against ~4 matmuls per step for
  the factor updates and the preconditioning, so refreshing every 10 steps adds ~35 % to a block's step.
  Distributed Shampoo defaults to 1 and recommends tens to hundreds at scale; ours is the middle ground.
* ``max_preconditioner_dim=1024`` (Distributed Shampoo's default), ``root_eps=1e-12`` (its ``epsilon``),
  ``root_relative_eps=1e-6``: float32 ``eigh`` cannot resolve eigenvalues much below 1e-7 of the largest, and a
  relative floor bounds the amplification of the smallest directions to :math:`10^{6/p}` (~32 for p = 4)
  whatever the gradients' scale.
* ``momentum=0.0``, ``nesterov=False``: as Distributed Shampoo (whose AlgoPerf entry enables Nesterov momentum).
  Momentum is an EMA of the final direction, this library's convention (Muon, PSGD, MOSO): it keeps the grafted
  method's step size, and ``MuonAdamW(matrix_optimizer="shampoo")``'s ``momentum=0.95`` means the same as for
  Muon. It is Distributed Shampoo's momentum with ``dampening = momentum``; its default ``dampening=0`` (torch
  SGD's heavy ball) multiplies the step by :math:`1/(1-\mu)`.

Where ours differs from Distributed Shampoo (facebookresearch/optimizers):

* **Matrix Shampoo on ``[out, -1]``**: N-D tensors get two factors (rows, and the flattened rest), not one per
  dimension with :math:`p = 2k`; 1-D parameters take the grafted diagonal step instead of a d x d factor.
* Weight decay acts on :math:`W` directly (``decoupled``: :math:`W \leftarrow (1 - \eta\lambda) W`), not through
  the search direction and hence not through momentum; momentum is always dampened (EMA, above); no ``beta3``.
* Not here: distributed and sharded execution (DDP/FSDP/HSDP distributors, DTensor), merging of small
  dimensions (``use_merge_dims``), one-sided or diagonal handling of large dimensions (only blocking or the
  grafted fallback), PT2 compilation, eigenvalue-corrected Shampoo (use SOAP), normalised/LARS/LAMB grafting,
  ``exponent_multiplier`` and per-dimension root overrides, preconditioner-dtype and communication-dtype
  configs, root-inverse residual tracking, iterate averaging.
* Checkpoints are plain ``state_dict()`` (Distributed Shampoo needs ``distributed_state_dict``); resuming is
  bit-identical; every hyperparameter lives in the param group; ``step(closure)`` works; bf16/fp16 parameters
  keep float32 state (float64 parameters float64); ``l2`` weight decay never modifies ``p.grad``. Apart from the
  root refresh (``eigh`` waits for its result) a step never synchronises the host.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT
from emerging_optimizers.legacy_soap.matrix_root_inverse_utils import (
    INVERSE_ROOT_METHODS,
    InverseRootMethodT,
    inverse_root,
)
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.adam import adam_kernel, adam_scalars
from emerging_optimizers.scalar_optimizers.rmsprop import rmsprop_kernel
from emerging_optimizers.shampoo.shampoo_base import TensorPair
from emerging_optimizers.utils import check_beta, check_betas, check_choice, check_nonneg, fp32_matmul_precision

__all__ = [
    "GRAFTING_METHODS",
    "GraftingT",
    "Shampoo",
    "ShampooPreconditioner",
    "block_slices",
    "corrected_shampoo_beta",
    "graft_update",
    "update_kronecker_factors",
]

_LOG = logging.getLogger(__name__)

GraftingT = Literal["adam", "rmsprop", "adagrad", "none"]
GRAFTING_METHODS: tuple[str, ...] = ("adam", "rmsprop", "adagrad", "none")
#: State key of each grafted method's second-moment statistic (``"none"`` has none).
_GRAFT_KEY = {"adam": "exp_avg_sq", "rmsprop": "exp_avg_sq", "adagrad": "sum"}
_NORM_EPS = 1e-16

Block = tuple[slice, slice]


# ---------------------------------------------------------------------------------------------- pure math
def update_kronecker_factors(L: torch.Tensor, R: torch.Tensor, grad: torch.Tensor, shampoo_beta: float) -> None:
    """``L <- b L + (1-b) G G^T``, ``R <- b R + (1-b) G^T G`` in place; ``shampoo_beta == 1``: ``L += G G^T``."""
    if shampoo_beta == 1.0:
        L.addmm_(grad, grad.mT)
        R.addmm_(grad.mT, grad)
    else:
        L.lerp_(grad @ grad.mT, 1.0 - shampoo_beta)
        R.lerp_(grad.mT @ grad, 1.0 - shampoo_beta)


def corrected_shampoo_beta(shampoo_beta: float, step: int) -> float:
    """``1 - (1 - b) / (1 - b**step)``: the EMA coefficient whose average is unbiased from step 1 (1 stays 1)."""
    if shampoo_beta == 1.0:
        return 1.0
    return 1.0 - (1.0 - shampoo_beta) / (1.0 - shampoo_beta**step)


def block_slices(rows: int, cols: int, max_dim: int, blocking: bool = True) -> list[Block] | None:
    """The blocks of a ``rows x cols`` matrix, row-major: ``(row_slice, col_slice)`` of at most ``max_dim`` each.

    Without ``blocking`` the whole matrix is one block if both dims fit, else ``None`` (no Kronecker factors).
    """
    if not blocking:
        return [(slice(0, rows), slice(0, cols))] if max(rows, cols) <= max_dim else None
    row_cuts = [slice(i, min(i + max_dim, rows)) for i in range(0, rows, max_dim)]
    col_cuts = [slice(j, min(j + max_dim, cols)) for j in range(0, cols, max_dim)]
    return [(r, c) for r in row_cuts for c in col_cuts]


def graft_update(
    grafting: str,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    second_moment: torch.Tensor | None,
    *,
    betas: tuple[float, float],
    eps: float,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grafted method's update ``A`` and the filtered gradient ``m_hat`` (module docstring); state in place.

    ``second_moment`` is ``exp_avg_sq`` (adam, rmsprop), ``sum`` (adagrad) or ``None`` (none); ``step`` is 1-based.
    """
    beta1, beta2 = betas
    if grafting == "adam" or (grafting == "rmsprop" and beta1 != 0):
        assert second_moment is not None
        scalars = adam_scalars(betas, True, False, step, eps)
        if grafting == "rmsprop":
            scalars["bc2_sqrt"] = 1.0  # RMSProp with a filtered numerator: no second-moment bias correction
        update = adam_kernel(grad, exp_avg, second_moment, **scalars)
        return update, exp_avg / scalars["bc1"]
    if beta1 == 0:  # no filter: the gradient itself (kept in exp_avg, which always holds the filtered gradient)
        exp_avg.copy_(grad)
        m_hat = grad
    else:
        exp_avg.lerp_(grad, 1.0 - beta1)
        m_hat = exp_avg / (1.0 - beta1**step)
    if grafting == "rmsprop":
        assert second_moment is not None
        return rmsprop_kernel(grad, second_moment, alpha=beta2, eps=eps), m_hat
    if grafting == "adagrad":
        assert second_moment is not None
        second_moment.addcmul_(grad, grad)
        return m_hat / (second_moment.sqrt() + eps), m_hat
    return m_hat, m_hat


# ---------------------------------------------------------------------------------------------- preconditioner
class ShampooPreconditioner:
    r"""One block's Shampoo preconditioner :math:`x \mapsto L^{-1/p} x R^{-1/p}` (``ShampooPreconditionerProtocol``).

    Reads and writes the state keys ``L_i``, ``R_i``, ``L_inv_root_i``, ``R_inv_root_i`` for block ``i``; the
    optimizer calls :meth:`step` every step, :meth:`update_inverse_roots` on refresh steps, :meth:`precondition`
    to apply it. ``root``, ``method``, ``epsilon``, ``relative_epsilon`` go to :func:`inverse_root`.
    """

    def __init__(self, state: dict[str, Any], /, *, block: int = 0, root: float = 4,
                 method: InverseRootMethodT = "eigh", epsilon: float = 1e-12, relative_epsilon: float = 1e-6) -> None:
        self.block = block
        self.root, self.method, self.epsilon, self.relative_epsilon = root, method, epsilon, relative_epsilon
        self.rebind_state(state, _read=True)

    @staticmethod
    def keys(block: int = 0) -> tuple[str, str, str, str]:
        return f"L_{block}", f"R_{block}", f"L_inv_root_{block}", f"R_inv_root_{block}"

    @staticmethod
    def init_state(shape: tuple[int, ...], device: torch.device, *, dtype: torch.dtype = torch.float32,
                   block: int = 0) -> dict[str, torch.Tensor]:
        """Zero factors and identity inverse roots for a ``(m, n)`` block."""
        if len(shape) != 2:
            raise ValueError(f"ShampooPreconditioner needs a 2-D block shape, got {tuple(shape)}.")
        m, n = shape
        kl, kr, kli, kri = ShampooPreconditioner.keys(block)
        return {
            kl: torch.zeros(m, m, dtype=dtype, device=device),
            kr: torch.zeros(n, n, dtype=dtype, device=device),
            kli: torch.eye(m, dtype=dtype, device=device),
            kri: torch.eye(n, dtype=dtype, device=device),
        }

    def rebind_state(self, state: dict[str, Any], /, *, _read: bool = False) -> None:
        """Write the tensors back into ``state`` (with ``_read``: take them from it)."""
        kl, kr, kli, kri = self.keys(self.block)
        if _read:
            missing = [k for k in (kl, kr, kli, kri) if k not in state]
            if missing:
                raise KeyError(f"Shampoo state lacks {missing}: the block layout changed (max_preconditioner_dim or "
                               "use_blocking set after the first step?)")
            self.factors = TensorPair(state[kl], state[kr])
            self.inv_roots = TensorPair(state[kli], state[kri])
            return
        state[kl], state[kr] = self.factors
        state[kli], state[kri] = self.inv_roots

    def update_kronecker_factors(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        update_kronecker_factors(self.factors.L, self.factors.R, grad, shampoo_beta)

    def init_step(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        self.update_kronecker_factors(grad, shampoo_beta)

    def step(self, grad: torch.Tensor, shampoo_beta: float, /) -> None:
        self.update_kronecker_factors(grad, shampoo_beta)

    def update_inverse_roots(self) -> None:
        """Recompute both inverse roots from the factors; where that fails (eigh in float32 and float64), keep
        the previous root and log a warning."""
        for factor, inv_root in zip(self.factors, self.inv_roots):
            try:
                new = inverse_root(factor, self.root, method=self.method, epsilon=self.epsilon,
                                   relative_epsilon=self.relative_epsilon)
            except (torch.linalg.LinAlgError, RuntimeError) as err:
                _LOG.warning("Shampoo: inverse root of a %s factor failed (%s); keeping the previous one.",
                             tuple(factor.shape), err)
                continue
            inv_root.copy_(new)

    def precondition(self, x: torch.Tensor, /) -> torch.Tensor:
        return self.inv_roots.L @ x @ self.inv_roots.R


# ---------------------------------------------------------------------------------------------- optimizer
def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _matrix_shape(p: torch.Tensor) -> tuple[int, int] | None:
    """``[out, -1]`` for >= 2-D parameters, ``None`` for 0-D/1-D ones."""
    if p.dim() < 2:
        return None
    return p.shape[0], p.numel() // p.shape[0] if p.shape[0] else 0


def _as_matrix(t: torch.Tensor, shape: tuple[int, int], *, view: bool = False) -> torch.Tensor:
    return t.view(shape) if view else t.reshape(shape)


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= {minimum}{extra}.")


@register_optimizer("shampoo")
class Shampoo(WeightDecayMixin, EmergingOptimizer):
    r"""Shampoo with grafting and blocking (module docstring: update rule, defaults, differences).

    Args:
        params: parameters or param groups, of any rank.
        lr: learning rate (>= 0, 1e-3): the grafted method's.
        betas: ``(beta1, beta2)`` in [0, 1) ((0.9, 0.999)): the gradient filter (first moment) and the grafted
            method's second-moment EMA (unused by ``"adagrad"`` and ``"none"``).
        shampoo_beta: EMA coefficient of the Kronecker factors, bias-corrected, in [0, 1]; 1.0 sums (0.999).
        eps: the grafted method's denominator term (>= 0, 1e-8).
        weight_decay: coefficient (>= 0, 0.01).
        momentum: EMA coefficient of the momentum on the final direction, in [0, 1) (0.0: none).
        nesterov: Nesterov's variant of that momentum (False).
        grafting: ``"adam"`` (default), ``"rmsprop"``, ``"adagrad"`` or ``"none"``.
        precondition_frequency: steps between inverse-root refreshes (int >= 1, 10).
        start_preconditioning_step: first step (1-based) that uses the Shampoo direction; the roots are computed
            on it (int >= 1; None: ``precondition_frequency``).
        max_preconditioner_dim: largest factor dimension (int >= 1, 1024).
        use_blocking: split larger matrices into blocks (True); False: such parameters take the grafted step.
        root_method: ``"eigh"`` (default) or ``"newton"`` (coupled Newton iteration, matmuls only).
        root_eps: absolute regularisation of the factors (>= 0, 1e-12).
        root_relative_eps: regularisation relative to the largest eigenvalue (>= 0, 1e-6).
        inv_root_override: root ``p`` of ``L^{-1/p}`` (int >= 0; 0: 4, Shampoo's ``2 x order`` for matrices;
            2 gives ``L^{-1/2} G R^{-1/2}``).
        weight_decay_method: ``"decoupled"`` (default), ``"independent"``, ``"l2"`` or ``"palm"``.

    State per parameter: ``step`` and ``inv_root_step`` (the step of the last root refresh, 0: none yet; ints),
    ``exp_avg``, the grafted statistic (``exp_avg_sq`` or ``sum``), ``momentum_buffer`` while ``momentum != 0``,
    and per block ``i`` the factors ``L_i``, ``R_i`` and their inverse roots ``L_inv_root_i``, ``R_inv_root_i``
    (one key per tensor, as PSGD's ``Q_i``: torch's ``load_state_dict`` would cast tensors inside lists to the
    parameter dtype). ``grafting``, ``max_preconditioner_dim`` and ``use_blocking`` decide that layout: set them
    before the first step.
    """

    matrix_optimizer_ok = True  # usable as MuonAdamW's matrix side (it also handles 1-D params itself)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shampoo_beta: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        grafting: GraftingT = "adam",
        precondition_frequency: int = 10,
        start_preconditioning_step: int | None = None,
        max_preconditioner_dim: int = 1024,
        use_blocking: bool = True,
        root_method: InverseRootMethodT = "eigh",
        root_eps: float = 1e-12,
        root_relative_eps: float = 1e-6,
        inv_root_override: int = 0,
        weight_decay_method: WeightDecayT = "decoupled",
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas, shampoo_beta=shampoo_beta,
            eps=eps, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, grafting=grafting,
            precondition_frequency=precondition_frequency, start_preconditioning_step=start_preconditioning_step,
            max_preconditioner_dim=max_preconditioner_dim, use_blocking=use_blocking, root_method=root_method,
            root_eps=root_eps, root_relative_eps=root_relative_eps, inv_root_override=inv_root_override,
            weight_decay_method=weight_decay_method,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        sb = group["shampoo_beta"]
        if isinstance(sb, bool) or not isinstance(sb, (int, float)) or not 0.0 <= sb <= 1.0:
            raise ValueError(f"Invalid shampoo_beta: {sb!r}; it must be in [0, 1].")
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_beta("momentum", group["momentum"])
        for flag in ("nesterov", "use_blocking"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"Invalid {flag}: {group[flag]!r}; it must be True or False.")
        check_choice("grafting", group["grafting"], GRAFTING_METHODS)
        _check_int("precondition_frequency", group["precondition_frequency"], 1)
        _check_int("start_preconditioning_step", group["start_preconditioning_step"], 1, allow_none=True)
        _check_int("max_preconditioner_dim", group["max_preconditioner_dim"], 1)
        check_choice("root_method", group["root_method"], INVERSE_ROOT_METHODS)
        check_nonneg("root_eps", group["root_eps"])
        check_nonneg("root_relative_eps", group["root_relative_eps"])
        _check_int("inv_root_override", group["inv_root_override"], 0)
        check_weight_decay_method(group["weight_decay_method"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (``betas`` given as a list become a tuple), validated as in the base."""
        if isinstance(param_group.get("betas"), list):
            param_group = {**param_group, "betas": tuple(param_group["betas"])}
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _blocks(p: torch.Tensor, group: dict[str, Any]) -> tuple[tuple[int, int] | None, list[Block] | None]:
        shape = _matrix_shape(p)
        if shape is None:
            return None, None
        return shape, block_slices(*shape, group["max_preconditioner_dim"], group["use_blocking"])

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = _state_dtype(p)
        state: dict[str, Any] = {
            "step": 0,
            "inv_root_step": 0,
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
        }
        if group["grafting"] in _GRAFT_KEY:
            state[_GRAFT_KEY[group["grafting"]]] = torch.zeros_like(p, dtype=dtype,
                                                                    memory_format=torch.contiguous_format)
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        _, blocks = self._blocks(p, group)
        for i, (rs, cs) in enumerate(blocks or []):
            shape = (rs.stop - rs.start, cs.stop - cs.start)
            state.update(ShampooPreconditioner.init_state(shape, p.device, dtype=dtype, block=i))
        return state

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, mu = group["lr"], group["momentum"]
        start = group["start_preconditioning_step"] or group["precondition_frequency"]
        root = group["inv_root_override"] or 4
        for p in params:
            assert p.grad is not None
            state = self.state[p]
            exp_avg = state["exp_avg"]
            # ``.to`` copies low-precision grads; for l2, apply_weight_decay returns a new tensor: p.grad stays.
            grad = apply_weight_decay(p, p.grad.to(exp_avg.dtype), group["weight_decay_method"], lr,
                                      group["weight_decay"])
            t = state["step"] + 1
            second = state.get(_GRAFT_KEY.get(group["grafting"], ""))
            grafted, m_hat = graft_update(group["grafting"], grad, exp_avg, second, betas=group["betas"],
                                          eps=group["eps"], step=t)
            shape, blocks = self._blocks(p, group)
            direction = grafted
            if blocks is not None:
                assert shape is not None
                preconditioners = [
                    ShampooPreconditioner(state, block=i, root=root, method=group["root_method"],
                                          epsilon=group["root_eps"], relative_epsilon=group["root_relative_eps"])
                    for i in range(len(blocks))
                ]
                beta = corrected_shampoo_beta(group["shampoo_beta"], t)
                g2 = _as_matrix(grad, shape)
                with fp32_matmul_precision("highest"):
                    for pre, (rs, cs) in zip(preconditioners, blocks):
                        (pre.init_step if t == 1 else pre.step)(g2[rs, cs], beta)
                    if t >= start:
                        last = state["inv_root_step"]
                        if last == 0 or t - last >= group["precondition_frequency"]:
                            for pre in preconditioners:
                                pre.update_inverse_roots()
                            state["inv_root_step"] = t
                        direction = self._shampoo_direction(preconditioners, blocks, _as_matrix(m_hat, shape),
                                                            _as_matrix(grafted, shape), group["grafting"])
                        direction = direction.view(p.shape)
                for pre in preconditioners:
                    pre.rebind_state(state)
            if mu != 0:
                buf = state.get("momentum_buffer")
                if buf is None:  # momentum switched on after the state was created
                    buf = state["momentum_buffer"] = torch.zeros_like(exp_avg)
                buf.lerp_(direction, 1.0 - mu)
                direction = direction.lerp(buf, mu) if group["nesterov"] else buf
            else:
                state.pop("momentum_buffer", None)  # momentum switched off: the layout follows the group
            p.add_(direction, alpha=-lr)  # float32 direction rounded into a bf16 p once
            state["step"] = t

    @staticmethod
    def _shampoo_direction(preconditioners: list[ShampooPreconditioner], blocks: list[Block], m_hat: torch.Tensor,
                           grafted: torch.Tensor, grafting: str) -> torch.Tensor:
        """Precondition every block of ``m_hat`` and rescale it to the grafted update's norm on that block."""
        out = torch.empty_like(m_hat)
        for pre, (rs, cs) in zip(preconditioners, blocks):
            s = pre.precondition(m_hat[rs, cs])
            if grafting != "none":
                s = s * (torch.linalg.vector_norm(grafted[rs, cs]) / (torch.linalg.vector_norm(s) + _NORM_EPS))
            out[rs, cs] = s
        return out
