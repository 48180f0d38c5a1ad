r"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis (arXiv:2409.11321), optionally with KL-Shampoo
factors (arXiv:2509.03378).

For a matrix parameter :math:`W \in \mathbb R^{m\times n}` with gradient :math:`G` at step :math:`t = 1, 2, \ldots`
(float32 or float64 arithmetic whatever the parameter dtype)::

    beta_s' = 1 - (1 - beta_s) / (1 - beta_s^t)      if correct_shampoo_beta_bias (default: correct_bias)
    plain:  L <- beta_s' L + (1 - beta_s') G G^T ;      R <- beta_s' R + (1 - beta_s') G^T G
    KL:     L <- beta_s' L + (1 - beta_s')/n G Q_R diag(lam_R)^-1 Q_R^T G^T
            R <- beta_s' R + (1 - beta_s')/m G^T Q_L diag(lam_L)^-1 Q_L^T G          (lam floored, see below)
    every precondition_frequency steps (and at t = 1), refresh the eigenbases:
        exp_avg <- Q_L exp_avg Q_R^T                               (out of the old basis)
        Q_L, Q_R, lam_L, lam_R <- eigh(L), eigh(R)                   at t = 1 or with use_eigh, else
                                  power_iter_steps of Q <- qr(F Q).Q, columns sorted by Rayleigh quotient
        exp_avg <- Q_L^T exp_avg Q_R ;  exp_avg_sq follows the column permutation of the sort
    weight decay (weight_decay_method) ;  G' = Q_L^T G Q_R
    U = Q_L Adam(G'; exp_avg, exp_avg_sq, betas, eps, correct_bias, nesterov, t) Q_R^T
    U <- U min(1, max_update_rms / (rms(U) + 1e-7))   if max_update_rms > 0 ;   W <- W - lr U

Adam's moments live in the rotated coordinates; the Kronecker factors see the raw gradient (``l2`` decay is
added after them, as in the reference library). The projections use ``tensordot`` one factor per axis
(:func:`project_in`, :func:`project_out`).

Defaults: those of the reference library (``betas=(0.9, 0.95)``, ``shampoo_beta=0.95``, ``eps=1e-8``,
``weight_decay=0.01`` decoupled, QR refresh with one power step under "high" matmul precision, factors and
projections under "highest"), and ``lr=3e-3``, which the reference requires: the update has Adam's per-entry
scale, and 3e-3 is the default of the original SOAP implementation (Vyas et al.).

Where ours differs from the reference library (``emerging_optimizers.legacy_soap.soap``):

* **exp_avg_sq follows the sorted eigenbasis.** The QR refresh re-sorts the basis columns by Rayleigh quotient;
  the reference leaves ``exp_avg_sq`` in place, so second moments attach to other eigen-directions whenever
  the order changes. Here ``exp_avg_sq`` is permuted along each factor's axis with the same permutation (as the
  original SOAP code does). The ``eigh`` path leaves it unchanged (its columns are freshly sorted).
* **KL-Shampoo factors stay well-scaled.** The reference's eigenvalue estimates start at zero, so the first KL
  update divides by ``eps`` (``max|L| ~ 1e8`` after one step): the fresh statistics of later steps are then ~1e-16
  of the stale ones and the basis freezes for hundreds of steps; and while a factor is rank-deficient (the first
  steps of any non-square matrix) new gradient directions are weighted by ``1/eps`` again. Here the first KL
  update uses the isotropic estimate ``rms(G)`` for both factors (the balanced choice: ``L, R ~ rms(G)``,
  ``L (x) R ~ G^2``; the factors then stay at the gradient's scale), and the eigenvalues used by every KL
  update are floored at ``max(eps, kl_eigval_floor * mean(lam))``. (Measured on a small MLP: starting both
  estimates at 1 instead lets the factor scales swing from step to step and the loss diverge.)
* **Any rank.** 1-D (and 0-D) parameters get plain Adam (state ``step``, ``exp_avg``, ``exp_avg_sq``: the
  original SOAP's default for vectors, whose single factor would be a dense d x d matrix); parameters of rank
  > 2 (conv kernels) are optimized as the matrix ``[d_0, d_1 * ... * d_k]``. The reference raises ``TypeError``.
* ``precondition_frequency`` (the reference refreshes every step); the factors still update every step.
* Every hyperparameter lives in the param group (the reference keeps the switches on ``self``); reading
  ``opt.nesterov`` etc. gives the default, assigning sets every group. Validated at construction.
* ``step(closure)`` works; ``l2`` weight decay never modifies ``p.grad``; bf16/fp16 parameters keep float32
  state (float64 parameters float64 state); no host synchronization in a step outside the eigenbasis refresh.

State per matrix parameter (keys of the reference): ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (the matrix
shape), ``L``, ``Q_L``, ``eigvals_L`` (m), ``R``, ``Q_R``, ``eigvals_R`` (n).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, group_default
from emerging_optimizers.legacy_soap import soap_utils
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.adam import calculate_adam_update
from emerging_optimizers.utils import (
    FP32_MATMUL_PRECISIONS,
    FP32MatmulPrecT,
    MatrixShapeError,
    check_beta,
    check_betas,
    check_choice,
    check_nonneg,
    check_positive_int,
    clip_update_rms_,
    fp32_matmul_precision,
)

__all__ = [
    "SOAP",
    "calculate_soap_update",
    "project_in",
    "project_out",
    "update_eigenbasis_and_exp_avgs",
    "update_kronecker_factors",
    "update_kronecker_factors_kl_shampoo",
]


# ---------------------------------------------------------------------------------------------- pure math
def _check_2d(grad: torch.Tensor, fn: str) -> None:
    if grad.dim() != 2:
        raise MatrixShapeError(f"{fn} is only supported for 2D gradients, got shape {tuple(grad.shape)}.")


@torch.no_grad()
def update_kronecker_factors(kronecker_factor_list: Sequence[torch.Tensor], grad: torch.Tensor,
                             shampoo_beta: float) -> None:
    r"""Plain Shampoo factors, in place: :math:`L \leftarrow \beta L + (1-\beta) GG^\top`,
    :math:`R \leftarrow \beta R + (1-\beta) G^\top G` (``kronecker_factor_list = [L, R]``, 2-D ``grad``)."""
    _check_2d(grad, "update_kronecker_factors")
    L, R = kronecker_factor_list
    L.lerp_(grad @ grad.T, 1 - shampoo_beta)
    R.lerp_(grad.T @ grad, 1 - shampoo_beta)


@torch.no_grad()
def update_kronecker_factors_kl_shampoo(
    kronecker_factor_list: Sequence[torch.Tensor],
    grad: torch.Tensor,
    shampoo_beta: float,
    eigenbasis_list: Iterable[torch.Tensor],
    eigvals_list: Iterable[torch.Tensor],
    eps: float,
    eigval_exp: float = -1.0,
    *,
    eigval_floor: float = 0.0,
) -> None:
    r"""KL-Shampoo factors (arXiv:2509.03378), in place.

    With ``[L, R] = kronecker_factor_list``, their (previous) eigenbases ``[Q_L, Q_R]`` and eigenvalue estimates
    :math:`\lambda_L, \lambda_R` (``eigvals_list``), :math:`p` = ``eigval_exp``::

        L <- beta L + (1 - beta)/n  G Q_R diag(lam_R^p) Q_R^T G^T
        R <- beta R + (1 - beta)/m  G^T Q_L diag(lam_L^p) Q_L^T G

    Each :math:`\lambda` is clamped from below at ``max(eps, eigval_floor * mean(lam))`` before the power
    (``eigval_floor=0``, the default, is the reference's clamp at ``eps``; the optimizer passes its
    ``kl_eigval_floor``). Computed as :math:`(GQ)\,\mathrm{diag}(s)\,(GQ)^\top`, without forming
    :math:`Q\,\mathrm{diag}(s)\,Q^\top`. Raises ``TypeError`` (a :class:`~emerging_optimizers.utils.MatrixShapeError`)
    for a gradient that is not 2-D.
    """
    _check_2d(grad, "update_kronecker_factors_kl_shampoo")
    L, R = kronecker_factor_list
    (Q_L, Q_R), (lam_L, lam_R) = list(eigenbasis_list), list(eigvals_list)
    m, n = grad.shape

    def scale(lam: torch.Tensor, dim: int) -> torch.Tensor:
        floor = lam.mean().mul(eigval_floor).clamp_min(eps) if eigval_floor > 0 else eps
        return lam.clamp_min(floor).pow(eigval_exp) / dim

    GQ = grad @ Q_R  # (m, n)
    new_L = (GQ * scale(lam_R, n)) @ GQ.T
    GtQ = grad.T @ Q_L  # (n, m)
    new_R = (GtQ * scale(lam_L, m)) @ GtQ.T
    L.lerp_(new_L, 1 - shampoo_beta)
    R.lerp_(new_R, 1 - shampoo_beta)


@torch.no_grad()
def project_in(x: torch.Tensor, eigenbasis_list: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Rotate ``x`` into the eigenbases: contract axis ``i`` with ``Q_i`` (:math:`Q_L^\top x Q_R` for a matrix)."""
    for Q in eigenbasis_list:
        x = torch.tensordot(x, Q, dims=[[0], [0]])
    return x


@torch.no_grad()
def project_out(x: torch.Tensor, eigenbasis_list: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Inverse of :func:`project_in` for orthogonal bases (:math:`Q_L x Q_R^\top` for a matrix)."""
    for Q in eigenbasis_list:
        x = torch.tensordot(x, Q, dims=[[0], [1]])
    return x


@torch.no_grad()
def update_eigenbasis_and_exp_avgs(
    kronecker_factor_list: Sequence[torch.Tensor],
    eigenbasis_list: Sequence[torch.Tensor],
    exp_avg_sq: torch.Tensor,
    exp_avg: torch.Tensor,
    use_eigh: bool = False,
    power_iter_steps: int = 1,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Refresh the eigenbases and carry Adam's moments over to them (nothing is modified in place).

    1. ``exp_avg`` is rotated out of the old bases (:func:`project_out`);
    2. new bases: ``eigh`` of every factor (``use_eigh``), or ``power_iter_steps`` rounds of orthogonal iteration
       from the old bases with the columns sorted by Rayleigh quotient;
    3. ``exp_avg`` is rotated into the new bases; on the QR path ``exp_avg_sq`` is permuted along each factor's axis
       by that factor's sort permutation, so every second moment stays with its eigen-direction (the reference
       library returns it unchanged). On the ``eigh`` path ``exp_avg_sq`` is returned unchanged.

    Returns:
        ``(eigvals_list, eigenbasis_list, exp_avg, exp_avg_sq)``: the new eigenvalue estimates (descending) and
        bases, and the moments in the new bases.
    """
    exp_avg = project_out(exp_avg, eigenbasis_list)
    if use_eigh:
        eigvals_list, new_basis_list = soap_utils.get_eigenbasis_eigh(kronecker_factor_list)
    else:
        eigvals_list, new_basis_list, perm_list = soap_utils.get_eigenbasis_qr(
            kronecker_factor_list, eigenbasis_list, power_iter_steps, return_indices=True
        )
        for axis, perm in enumerate(perm_list):
            exp_avg_sq = exp_avg_sq.index_select(axis, perm)
    exp_avg = project_in(exp_avg, new_basis_list)
    return eigvals_list, new_basis_list, exp_avg, exp_avg_sq


def _clip_update_rms_in_place(u: torch.Tensor, max_rms: float, eps: float = 1e-7) -> None:
    """Scale ``u`` in place by ``min(1, max_rms / (rms(u) + eps))`` (the reference's name; see
    :func:`emerging_optimizers.utils.clip_update_rms_`)."""
    clip_update_rms_(u, max_rms, eps)


def calculate_soap_update(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    eigenbasis_list: Sequence[torch.Tensor],
    *,
    betas: tuple[float, float],
    eps: float,
    correct_bias: bool,
    nesterov: bool,
    step: int,
    max_update_rms: float = 0.0,
) -> torch.Tensor:
    """SOAP's update ``U`` for a (weight-decayed) gradient: Adam in the eigenbases, rotated back, RMS-clipped.

    ``exp_avg``/``exp_avg_sq`` (in the rotated coordinates) are updated in place; ``step`` is 1-based. An empty
    ``eigenbasis_list`` gives plain Adam. The caller applies ``W <- W - lr * U``.
    """
    grad_projected = project_in(grad, eigenbasis_list)
    adam_update = calculate_adam_update(grad_projected, exp_avg, exp_avg_sq, betas, correct_bias, nesterov, step, eps)
    update = project_out(adam_update, eigenbasis_list)
    _clip_update_rms_in_place(update, max_update_rms)
    return update


# ---------------------------------------------------------------------------------------------- optimizer
def _check_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        extra = " or None" if allow_none else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be True or False{extra}.")


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


_correct_shampoo_beta_bias = group_default("correct_shampoo_beta_bias")


def step_on_streams(params: list[torch.Tensor], streams: Any, step_param: Callable[[torch.Tensor], None]) -> None:
    """``step_param(p)`` for every param, round-robin on the CUDA ``streams`` (fenced against the current stream
    before and after), or in order on the current stream when there are none or the params are not on CUDA."""
    streams = streams if streams and params and params[0].is_cuda else None
    if streams is not None:
        current = torch.cuda.current_stream()
        for s in streams:
            s.wait_stream(current)
    for i, p in enumerate(params):
        ctx = torch.cuda.stream(streams[i % len(streams)]) if streams else contextlib.nullcontext()
        with ctx:
            step_param(p)
    if streams is not None:
        for s in streams:
            current.wait_stream(s)


@register_optimizer("soap")
class SOAP(WeightDecayMixin, EmergingOptimizer):
    r"""SOAP (module docstring for the update rule, the defaults and the differences from the reference).

    Args:
        params: parameters or param groups, of any rank (1-D: Adam; rank > 2: the matrix ``[d_0, rest]``).
        lr: learning rate (>= 0; 3e-3).
        betas: Adam's ``(beta1, beta2)`` in the eigenbasis, each in [0, 1) ((0.9, 0.95)).
        shampoo_beta: EMA rate of the Kronecker factors in [0, 1) (0.95).
        eps: Adam's epsilon, also the absolute eigenvalue floor of the KL update (>= 0; 1e-8).
        weight_decay: decay coefficient (>= 0; 0.01).
        weight_decay_method: ``"decoupled" | "independent" | "l2" | "palm"`` (``"decoupled"``).
        nesterov: Nesterov momentum in the inner Adam (False).
        correct_bias: Adam's bias correction (True).
        fp32_matmul_prec: float32 matmul precision of the factor updates and projections (``"highest"``).
        use_eigh: refresh with a full ``eigh`` every time (False: orthogonal iteration after the first refresh).
        qr_fp32_matmul_prec: float32 matmul precision of the refresh (``"high"``).
        power_iter_steps: multiply-and-QR rounds per refresh (int >= 1; 1).
        max_update_rms: clip the update's RMS to this (>= 0; 0 = no clipping).
        use_kl_shampoo: KL-Shampoo factor updates (False).
        correct_shampoo_beta_bias: bias-correct ``shampoo_beta`` (``None``: follow ``correct_bias``).
        precondition_frequency: refresh the eigenbases every this many steps (int >= 1; 1, the reference's
            behaviour). The refresh (eigh or QR, O(m^3 + n^3)) dominates the step; 10 is the original SOAP's
            default. Step ``t`` (0-based) refreshes when ``t % precondition_frequency == 0``.
        kl_eigval_floor: floor of the eigenvalues used by the KL update, relative to their mean (>= 0; 1e-4;
            0 = the reference's absolute floor ``eps`` only). Without it a rank-deficient factor (any non-square
            matrix's first steps) weights new gradient directions by ``1/eps`` (factor spikes of 1e4-1e6 x in
            our measurements); 1e-4 bounds them while changing the steady state least (1e-3 and 1e-2 bound
            them further but trained a small MLP measurably worse).
        stream_list: CUDA streams to spread the parameters of a group over (round robin); ignored for parameters
            not on CUDA. Kept on ``self`` (a resource, not a hyperparameter).
    """

    matrix_optimizer_ok = True  # usable as MuonAdamW's matrix side (it takes any rank itself)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        shampoo_beta: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        weight_decay_method: WeightDecayT = "decoupled",
        nesterov: bool = False,
        correct_bias: bool = True,
        fp32_matmul_prec: FP32MatmulPrecT = "highest",
        use_eigh: bool = False,
        qr_fp32_matmul_prec: FP32MatmulPrecT = "high",
        power_iter_steps: int = 1,
        max_update_rms: float = 0.0,
        use_kl_shampoo: bool = False,
        correct_shampoo_beta_bias: bool | None = None,
        precondition_frequency: int = 1,
        kl_eigval_floor: float = 1e-4,
        stream_list: Sequence[Any] | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_method=weight_decay_method,
            nesterov=nesterov,
            correct_bias=correct_bias,
            fp32_matmul_prec=fp32_matmul_prec,
            use_eigh=use_eigh,
            qr_fp32_matmul_prec=qr_fp32_matmul_prec,
            power_iter_steps=power_iter_steps,
            max_update_rms=max_update_rms,
            use_kl_shampoo=use_kl_shampoo,
            correct_shampoo_beta_bias=correct_shampoo_beta_bias,
            precondition_frequency=precondition_frequency,
            kl_eigval_floor=kl_eigval_floor,
        )
        self._validate_group(defaults)
        if stream_list is not None and not isinstance(stream_list, Sequence):
            raise ValueError(f"Invalid stream_list: {stream_list!r}; it must be a list of CUDA streams or None.")
        self.stream_list = list(stream_list) if stream_list else None
        super().__init__(params, defaults, nonfinite=nonfinite)

    # The reference keeps these on ``self``; here reading gives the default, assigning sets every group.
    weight_decay_method = group_default("weight_decay_method")
    nesterov = group_default("nesterov")
    correct_bias = group_default("correct_bias")
    fp32_matmul_prec = group_default("fp32_matmul_prec")
    use_eigh = group_default("use_eigh")
    qr_fp32_matmul_prec = group_default("qr_fp32_matmul_prec")
    power_iter_steps = group_default("power_iter_steps")
    max_update_rms = group_default("max_update_rms")
    use_kl_shampoo = group_default("use_kl_shampoo")
    precondition_frequency = group_default("precondition_frequency")

    @property
    def correct_shampoo_beta_bias(self) -> bool:
        """Whether ``shampoo_beta`` is bias-corrected (the default group's value, ``None`` resolved)."""
        value = self.defaults["correct_shampoo_beta_bias"]
        return self.defaults["correct_bias"] if value is None else value

    @correct_shampoo_beta_bias.setter
    def correct_shampoo_beta_bias(self, value: bool | None) -> None:
        _correct_shampoo_beta_bias.fset(self, value)  # type: ignore[misc]

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters; ``ValueError`` naming the first bad one."""
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_beta("shampoo_beta", group["shampoo_beta"])
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_weight_decay_method(group["weight_decay_method"])
        for name in ("nesterov", "correct_bias", "use_eigh", "use_kl_shampoo"):
            _check_bool(name, group[name])
        _check_bool("correct_shampoo_beta_bias", group["correct_shampoo_beta_bias"], allow_none=True)
        check_choice("fp32_matmul_prec", group["fp32_matmul_prec"], FP32_MATMUL_PRECISIONS)
        check_choice("qr_fp32_matmul_prec", group["qr_fp32_matmul_prec"], FP32_MATMUL_PRECISIONS)
        check_positive_int("power_iter_steps", group["power_iter_steps"])
        check_nonneg("max_update_rms", group["max_update_rms"])
        check_positive_int("precondition_frequency", group["precondition_frequency"])
        check_nonneg("kl_eigval_floor", group["kl_eigval_floor"])

    # ------------------------------------------------------------------ the matrix a parameter is seen as
    def _matrix_shape(self, shape: torch.Size) -> tuple[int, int] | None:
        """The 2-D shape the preconditioner sees for a parameter of ``shape``; ``None``: plain Adam (rank < 2)."""
        if len(shape) < 2:
            return None
        return shape[0], math.prod(shape[1:])

    def _to_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (parameter-shaped) as the matrix of :meth:`_matrix_shape`."""
        return x.reshape(self._matrix_shape(x.shape))  # type: ignore[arg-type]

    def _from_matrix(self, u: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`_to_matrix`."""
        return u.reshape(shape)

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype, device = _state_dtype(p), p.device
        mshape = self._matrix_shape(p.shape)
        if mshape is None:  # 1-D / 0-D: plain Adam
            return {
                "step": 0,
                "exp_avg": torch.zeros(p.shape, dtype=dtype, device=device),
                "exp_avg_sq": torch.zeros(p.shape, dtype=dtype, device=device),
            }
        m, n = mshape
        return {
            "step": 0,
            "exp_avg": torch.zeros(mshape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(mshape, dtype=dtype, device=device),
            "L": torch.zeros(m, m, dtype=dtype, device=device),
            "R": torch.zeros(n, n, dtype=dtype, device=device),
            "Q_L": torch.eye(m, dtype=dtype, device=device),
            "Q_R": torch.eye(n, dtype=dtype, device=device),
            # zeros as in the reference; the first KL update uses rms(G) instead (see the module docstring)
            "eigvals_L": torch.zeros(m, dtype=dtype, device=device),
            "eigvals_R": torch.zeros(n, dtype=dtype, device=device),
        }

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        step_on_streams(params, self.stream_list, lambda p: self._step_param(p, group))

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        assert p.grad is not None
        state = self.state[p]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = p.grad.to(exp_avg.dtype)  # never modified in place below (l2 decay returns a new tensor)
        step = state["step"]
        t = step + 1
        lr = group["lr"]
        adam = dict(betas=group["betas"], eps=group["eps"], correct_bias=group["correct_bias"],
                    nesterov=group["nesterov"], step=t, max_update_rms=group["max_update_rms"])

        if "L" not in state:  # 1-D / 0-D parameter: Adam
            grad = apply_weight_decay(p, grad, group["weight_decay_method"], lr, group["weight_decay"])
            update = calculate_soap_update(grad, exp_avg, exp_avg_sq, [], **adam)
            p.add_(update, alpha=-lr)
            state["step"] = t
            return

        factors = [state["L"], state["R"]]
        bases = [state["Q_L"], state["Q_R"]]
        eigvals = [state["eigvals_L"], state["eigvals_R"]]
        shampoo_beta = group["shampoo_beta"]
        correct_sb = group["correct_shampoo_beta_bias"]
        if group["correct_bias"] if correct_sb is None else correct_sb:
            shampoo_beta = 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t)

        G = self._to_matrix(grad)
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            if group["use_kl_shampoo"]:
                kl_eigvals = eigvals
                if step == 0:  # no estimates yet: the balanced isotropic prior rms(G) I for both factors
                    rms = G.square().mean().sqrt()
                    kl_eigvals = [rms.expand(e.shape) for e in eigvals]
                update_kronecker_factors_kl_shampoo(factors, G, shampoo_beta, bases, kl_eigvals, group["eps"],
                                                    eigval_floor=group["kl_eigval_floor"])
            else:
                update_kronecker_factors(factors, G, shampoo_beta)

        if step % group["precondition_frequency"] == 0:
            with fp32_matmul_precision(group["qr_fp32_matmul_prec"]):
                eigvals, bases, exp_avg, exp_avg_sq = update_eigenbasis_and_exp_avgs(
                    factors, bases, exp_avg_sq, exp_avg, use_eigh=group["use_eigh"] or step == 0,
                    power_iter_steps=group["power_iter_steps"],
                )
            # Rebound, not copied: the new tensors keep the memory layout eigh/QR/tensordot gave them, which
            # decides the rounding of the projections below (as in the reference library).
            state["Q_L"], state["Q_R"] = bases
            state["eigvals_L"], state["eigvals_R"] = eigvals
            state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq

        grad = apply_weight_decay(p, grad, group["weight_decay_method"], lr, group["weight_decay"])
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            update = calculate_soap_update(self._to_matrix(grad), exp_avg, exp_avg_sq, bases, **adam)
        p.add_(self._from_matrix(update, p.shape), alpha=-lr)  # fp32 update rounded into a bf16 p once
        state["step"] = t
