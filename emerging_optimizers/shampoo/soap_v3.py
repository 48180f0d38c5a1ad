r"""KL-SOAP as preconditioner objects and one step loop: ``KlSoapV3``, ``ReklsV3``, ``KlMSoap``.

This is the reference library's "v3" packaging of SOAP (arXiv:2409.11321) with the KL-Shampoo factor update
(arXiv:2509.03378): a per-parameter *preconditioner* object owns the Kronecker factors and the eigenbasis,
:class:`SoapBase` owns the loop, and a subclass picks the preconditioner (:attr:`SoapBase.PreconditionerCls`)
and the element-wise optimizer that runs in the eigenbasis (:meth:`SoapBase._scalar_update`). The math is
not written here: the preconditioners call the pure functions of :mod:`emerging_optimizers.legacy_soap.soap`
(factor update, eigenbasis refresh, projections), the inner updates are
:func:`~emerging_optimizers.scalar_optimizers.adam.adam_kernel` and
:func:`~emerging_optimizers.scalar_optimizers.madam.madam_kernel`. ``KlSoapV3`` therefore equals
``legacy_soap.SOAP(use_kl_shampoo=True)`` with the same settings, step for step and bit for bit.

For a parameter viewed as a matrix :math:`G \in \mathbb R^{m\times n}` (its gradient), at step
:math:`t = 1, 2, \ldots`::

    beta_s' = 1 - (1 - beta_s) / (1 - beta_s**t)           (correct_bias; else beta_s)
    KL-Shampoo factors, with Q_L, Q_R, lambda_L, lambda_R from the last refresh (t = 1: lambda = rms(G)):
        L <- beta_s' L + (1 - beta_s')/n * G Q_R diag(floor(lambda_R)**-1) Q_R^T G^T
        R <- beta_s' R + (1 - beta_s')/m * G^T Q_L diag(floor(lambda_L)**-1) Q_L^T G
        floor(lambda) = max(lambda, eps, kl_eigval_floor * mean(lambda))
    refresh (t = 1, then every precondition_frequency steps):
        exp_avg <- Q_L'^T (Q_L exp_avg Q_R^T) Q_R'        (the first moment follows the basis)
        t = 1: eigh of L and R; afterwards KlSoapV3/KlMSoap: one step of orthogonal iteration
        Q <- qr(L Q).Q, columns sorted by their Rayleigh quotients lambda; ReklsV3: eigh every refresh
    weight decay (weight_decay_method)
    G' = Q_L^T G Q_R;  A = inner(G', exp_avg, exp_avg_sq);  U = Q_L A Q_R^T
    U <- U * min(1, max_update_rms / (rms(U) + 1e-7))      (max_update_rms > 0)
    W <- W - lr U

with ``inner`` Adam (``KlSoapV3``, ``ReklsV3``: eps, bias correction, optional Nesterov) or MAdam
(``KlMSoap``: no epsilon, second moment stored times ``2**scale_log2``; ``eps`` then only guards the KL
factor update).

Where ours differs from the reference library:

* **Every hyperparameter in the param group**, validated at construction (``ValueError`` naming it): ``eps``
  (the reference keeps it on ``self``), ``weight_decay_method`` (fixed ``"decoupled"`` there) and the
  options the reference lacks: ``max_update_rms`` (its "TODO: Add RMS clip back"; 0 = off),
  ``correct_bias`` (False: no bias correction of the inner moments nor of ``shampoo_beta``, as legacy SOAP),
  ``nesterov`` (Adam variants) and ``precondition_frequency`` (refresh the eigenbasis every this many steps;
  the factors are updated every step; 1, the default, is the reference). ``scale_log2`` of ``KlMSoap``
  (16, the reference's constant) is a group option too. ``lr`` has a default (3e-3).
* **The defects of the reference's shared math are fixed, as in** :class:`~emerging_optimizers.legacy_soap.soap.SOAP`
  **(same functions, same numbers).** KL factors are well-conditioned from step 1: the reference's first KL
  update divides by ``eps`` (its eigenvalue estimates start at zero, so ``max|L| ~ 1e8`` after one step and
  later gradients barely move the basis); here the first update uses the isotropic estimate ``rms(G)`` for
  both factors, and every KL update floors the eigenvalues at ``max(eps, kl_eigval_floor * mean(lambda))``
  (``kl_eigval_floor=1e-4``; 0 = the reference's floor ``eps``), which bounds the ``1/eps`` weights a
  rank-deficient factor (a non-square matrix's first steps) would give new directions. On the
  orthogonal-iteration path ``exp_avg_sq`` is permuted with the re-sorted basis columns
  (:func:`~emerging_optimizers.legacy_soap.soap.update_eigenbasis_and_exp_avgs`), so every second moment
  stays with its eigen-direction; the reference leaves it in place while ``exp_avg`` follows the basis.
* **Projections by** ``tensordot`` (:func:`~emerging_optimizers.legacy_soap.soap.project_in`), as legacy SOAP;
  the reference's v3 uses ``matmul`` (the same numbers up to rounding), the one thing that kept it from
  equalling legacy SOAP bit for bit.
* **Any parameter rank**: an N-D parameter (e.g. a conv kernel ``(out, in, kh, kw)``) is preconditioned as
  the matrix ``(out, -1)``; its state (``exp_avg``, ``exp_avg_sq`` live in the eigenbasis) has the matrix
  shape. 1-D and 0-D parameters (biases, norms, scalars) get no Kronecker factors: the inner update runs
  on the raw gradient (Adam, resp. MAdam, in the identity basis, as the original SOAP does for 1-D
  tensors), with state ``step``, ``exp_avg``, ``exp_avg_sq`` of the parameter's shape. The reference
  raises ``TypeError`` for anything but 2-D.
* ``step(closure)`` works; ``l2`` weight decay never modifies ``p.grad``; bf16/fp16 parameters keep float32
  state (float64 parameters float64 state) and the update is rounded into the parameter once; a resumed
  run is bit-identical; ``load_state_dict`` checks what it loads.

Known limitation, shared with the reference and legacy SOAP (measured, float32, 64x32): step 1's eigenbases
are the singular vectors of ``G`` (``L ~ G G^T``, ``R ~ G^T G``), so ``G'`` is diagonal up to rounding, and the
inner update normalises the off-diagonal rounding noise (~1e-7 |G|, above ``eps=1e-8``) to entries of size ~1:
the first update has RMS ~0.95 instead of ~0.13 and cosine ~0.13 with the exact one. MAdam (no eps) does this
in float64 too. The original SOAP skips the first step's update, which avoids it.

State per matrix parameter (the reference's keys): ``step`` (int), ``exp_avg``, ``exp_avg_sq`` ``(m, n)``,
``L`` ``(m, m)``, ``R`` ``(n, n)``, ``Q_L``, ``Q_R`` (eigenbases, columns by descending eigenvalue),
``eigvals_L`` ``(m,)``, ``eigvals_R`` ``(n,)``. For ``KlMSoap``, ``exp_avg_sq`` holds ``2**scale_log2``
times the EMA of the squared projected gradient.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, group_default
from emerging_optimizers.legacy_soap.soap import (
    _clip_update_rms_in_place,
    project_in,
    project_out,
    step_on_streams,
    update_eigenbasis_and_exp_avgs,
    update_kronecker_factors_kl_shampoo,
)
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.adam import adam_kernel, adam_scalars
from emerging_optimizers.scalar_optimizers.madam import madam_kernel, madam_scalars
from emerging_optimizers.shampoo.shampoo_base import SoapPreconditionerProtocol, TensorPair
from emerging_optimizers.utils import check_beta, check_betas, check_nonneg, check_positive, check_positive_int
from emerging_optimizers.utils import fp32_matmul_precision as _matmul_precision

__all__ = [
    "KlMSoap",
    "KlSoapPreconditioner",
    "KlSoapV3",
    "ReklsPreconditioner",
    "ReklsV3",
    "SoapBase",
]

#: float32 matmul precisions, as the reference (and legacy SOAP's defaults): factor updates and projections
#: "highest", eigenbasis refresh "high".
_FACTOR_PREC = "highest"
_REFRESH_PREC = "high"

_PRECONDITIONER_KEYS = ("exp_avg", "exp_avg_sq", "L", "R", "Q_L", "Q_R", "eigvals_L", "eigvals_R")


# ---------------------------------------------------------------------------------------------- preconditioners
class KlSoapPreconditioner:
    """One parameter's KL-Shampoo preconditioner: factors ``L, R``, eigenbases ``Q_L, Q_R``, eigenvalues, moments.

    Built around the parameter's state dict at every step (cheap: it binds the tensors, copies nothing). A
    refresh replaces the bases, eigenvalues and moments by new tensors; :meth:`rebind_state` writes them back.
    Refreshes after the first are one step of orthogonal iteration (:attr:`use_eigh` False) or a full eigh.

    Args:
        state: the parameter's state, holding the keys of :meth:`init_state`.
        eps: absolute floor of the eigenvalues in the KL factor update.
        eigval_floor: relative floor: eigenvalues are clamped at ``max(eps, eigval_floor * mean)`` (0: only
            ``eps``, the reference; :class:`SoapBase` passes its group's ``kl_eigval_floor``).
    """

    #: Refresh with a full eigendecomposition (True) or by orthogonal iteration (False).
    use_eigh: ClassVar[bool] = False
    #: Multiply-and-QR rounds per orthogonal-iteration refresh (the reference's 1).
    power_iter_steps: ClassVar[int] = 1

    def __init__(self, state: dict[str, Any], eps: float, *, eigval_floor: float = 0.0) -> None:
        self.kronecker_factor_pair = TensorPair(state["L"], state["R"])
        self.eigenbasis_pair = TensorPair(state["Q_L"], state["Q_R"])
        self.eigvals_pair = TensorPair(state["eigvals_L"], state["eigvals_R"])
        self.exp_avg: torch.Tensor = state["exp_avg"]
        self.exp_avg_sq: torch.Tensor = state["exp_avg_sq"]
        self.eps = eps
        self.eigval_floor = eigval_floor

    @staticmethod
    def init_state(shape: tuple[int, ...], device: torch.device | str | None,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Fresh state of an ``(m, n)`` parameter: zero factors, moments and eigenvalues, identity bases.

        ``ValueError`` for a shape that is not 2-D (:class:`SoapBase` passes an N-D parameter as ``(out, -1)``).
        """
        if len(shape) != 2:
            raise ValueError(f"KlSoapPreconditioner is only supported for 2D tensors, got shape {tuple(shape)}; "
                             "view the parameter as a matrix first.")
        m, n = shape
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        return {
            "exp_avg": torch.zeros(m, n, **kw),
            "exp_avg_sq": torch.zeros(m, n, **kw),
            "L": torch.zeros(m, m, **kw),
            "R": torch.zeros(n, n, **kw),
            "Q_L": torch.eye(m, **kw),
            "Q_R": torch.eye(n, **kw),
            "eigvals_L": torch.zeros(m, **kw),
            "eigvals_R": torch.zeros(n, **kw),
        }

    def rebind_state(self, state: dict[str, Any]) -> None:
        """Write the current tensors back into ``state``; ``KeyError`` naming the keys ``state`` lacks."""
        missing = sorted(set(_PRECONDITIONER_KEYS) - set(state))
        if missing:
            raise KeyError(f"rebind_state: state missing keys {missing}")
        state.update(
            L=self.kronecker_factor_pair.L, R=self.kronecker_factor_pair.R,
            Q_L=self.eigenbasis_pair.L, Q_R=self.eigenbasis_pair.R,
            eigvals_L=self.eigvals_pair.L, eigvals_R=self.eigvals_pair.R,
            exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq,
        )

    def update_kronecker_factors(self, grad: torch.Tensor, shampoo_beta: float,
                                 eigvals: Sequence[torch.Tensor] | None = None) -> None:
        """Accumulate ``grad`` into ``L`` and ``R`` with the KL-Shampoo correction, in place.

        ``eigvals``: the eigenvalue estimates to weight with (default: those of the last refresh).
        """
        update_kronecker_factors_kl_shampoo(
            self.kronecker_factor_pair, grad, shampoo_beta, self.eigenbasis_pair,
            self.eigvals_pair if eigvals is None else eigvals, self.eps, eigval_floor=self.eigval_floor,
        )

    def refresh_eigenbasis(self, use_eigh: bool) -> None:
        """New eigenbases from the factors; ``exp_avg`` is rotated into them, ``exp_avg_sq`` follows the sort."""
        with _matmul_precision(_REFRESH_PREC):
            eigvals, bases, self.exp_avg, self.exp_avg_sq = update_eigenbasis_and_exp_avgs(
                self.kronecker_factor_pair, self.eigenbasis_pair, self.exp_avg_sq, self.exp_avg,
                use_eigh=use_eigh, power_iter_steps=self.power_iter_steps,
            )
        self.eigvals_pair = TensorPair(*eigvals)
        self.eigenbasis_pair = TensorPair(*bases)

    def init_step(self, grad: torch.Tensor, shampoo_beta: float) -> None:
        """The first step: KL factors with the isotropic estimate ``rms(G)`` for both sides, then eigh.

        (The reference uses its zero estimates, i.e. divides by ``eps``; see the module docstring.)
        """
        rms = grad.square().mean().sqrt()
        prior = [rms.expand(e.shape) for e in self.eigvals_pair]
        with _matmul_precision(_FACTOR_PREC):
            self.update_kronecker_factors(grad, shampoo_beta, prior)
        self.refresh_eigenbasis(use_eigh=True)

    def step(self, grad: torch.Tensor, shampoo_beta: float) -> None:
        """A refreshing step: KL factor update, then new eigenbases (the moments follow them)."""
        with _matmul_precision(_FACTOR_PREC):
            self.update_kronecker_factors(grad, shampoo_beta)
        self.refresh_eigenbasis(use_eigh=self.use_eigh)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_L^T x Q_R``: from the parameter basis into the eigenbasis."""
        return project_in(x, self.eigenbasis_pair)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_L x Q_R^T``: from the eigenbasis back into the parameter basis."""
        return project_out(x, self.eigenbasis_pair)


class ReklsPreconditioner(KlSoapPreconditioner):
    """:class:`KlSoapPreconditioner` whose every refresh is a full eigendecomposition ("realtime eigen")."""

    use_eigh: ClassVar[bool] = True


# ---------------------------------------------------------------------------------------------- optimizers
def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _matrix_shape(p: torch.Tensor) -> tuple[int, int] | None:
    """``(out, -1)``, the matrix an N-D parameter is preconditioned as; ``None`` for 0-D/1-D (and empty) ones."""
    if p.dim() < 2 or p.numel() == 0:
        return None
    return p.shape[0], math.prod(p.shape[1:])


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; it must be True or False.")


def _accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(q.name == name or q.kind is q.VAR_KEYWORD for q in params)


@functools.cache
def _accepts_eigval_floor(cls: type) -> bool:
    return _accepts(cls.__init__, "eigval_floor")


class SoapBase(WeightDecayMixin, EmergingOptimizer):
    """The SOAP step loop shared by the family; subclasses choose the preconditioner and the inner update.

    Per parameter and step: build ``PreconditionerCls(state, eps)``; at the first step ``init_step``, on
    refresh steps ``step``, otherwise only ``update_kronecker_factors``; weight decay; project the gradient in,
    run :meth:`_scalar_update` there, project the result out, clip its RMS, ``p -= lr * update``;
    ``rebind_state``. 0-D/1-D parameters run :meth:`_scalar_update` on the raw gradient. See the module
    docstring for the formulas.

    Args:
        params: parameters or param groups, of any rank (module docstring).
        lr: learning rate (>= 0; 3e-3: the update has Adam's per-entry scale, and 3e-3 is the original SOAP's
            default; the reference has none).
        betas: EMA rates of the inner optimizer's two moments, each in [0, 1) ((0.9, 0.95)).
        shampoo_beta: EMA rate of the Kronecker factors, in [0, 1) (0.95).
        eps: absolute eigenvalue floor of the KL factor update and, for the Adam variants, Adam's epsilon
            (> 0; 1e-8).
        weight_decay: weight-decay coefficient (>= 0; 0.01).
        weight_decay_method: ``"decoupled"`` (the reference's only choice), ``"independent"``, ``"l2"``, ``"palm"``.
        correct_bias: bias-correct the inner moments and ``shampoo_beta`` (True, the reference).
        max_update_rms: clip the update's RMS to this (>= 0; 0 = no clipping, the reference).
        precondition_frequency: refresh the eigenbases every this many steps (int >= 1; 1 = every step, the
            reference; the refresh, O(m^3 + n^3), dominates the step, and the original SOAP uses 10). The factors
            are updated every step. Step ``t`` (0-based) refreshes when ``t % precondition_frequency == 0``.
        kl_eigval_floor: relative floor of the eigenvalues in the KL update (>= 0; 1e-4, legacy SOAP's; 0 = the
            reference's absolute floor ``eps`` only).
        stream_list: CUDA streams to spread a group's parameters over, round robin (a resource, kept on
            ``self``; ignored for parameters not on CUDA).
        inner_defaults: the inner update's own hyperparameters, which a subclass adds to every param group
            (``KlSoapV3``: ``nesterov``; ``KlMSoap``: ``scale_log2``).

    Attributes:
        PreconditionerCls: a :class:`~emerging_optimizers.shampoo.shampoo_base.SoapPreconditionerProtocol`
            class; its ``init_state`` is a matrix parameter's state layout. It is built as
            ``PreconditionerCls(state, eps)``, as in the reference, plus ``eigval_floor=kl_eigval_floor`` when
            its constructor takes that keyword (ours do).
    """

    PreconditionerCls: ClassVar[type[SoapPreconditionerProtocol]]
    matrix_optimizer_ok = True  # usable as MuonAdamW's matrix side (it handles any rank itself)

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
        correct_bias: bool = True,
        max_update_rms: float = 0.0,
        precondition_frequency: int = 1,
        kl_eigval_floor: float = 1e-4,
        stream_list: Sequence[Any] | None = None,
        inner_defaults: Mapping[str, Any] | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_method=weight_decay_method,
            correct_bias=correct_bias,
            max_update_rms=max_update_rms,
            precondition_frequency=precondition_frequency,
            kl_eigval_floor=kl_eigval_floor,
            **(inner_defaults or {}),
        )
        self._validate_group(defaults)
        if stream_list is not None and not isinstance(stream_list, Sequence):
            raise ValueError(f"Invalid stream_list: {stream_list!r}; it must be a list of CUDA streams or None.")
        self.stream_list = list(stream_list) if stream_list else None
        # Overrides written for the reference take (..., *, betas, step) only; ours also take the group.
        self._scalar_update_takes_group = _accepts(self._scalar_update, "group")
        super().__init__(params, defaults, nonfinite=nonfinite)

    # The reference keeps these on ``self``; here reading gives the default, assigning sets every group.
    eps = group_default("eps")
    weight_decay_method = group_default("weight_decay_method")
    correct_bias = group_default("correct_bias")
    max_update_rms = group_default("max_update_rms")
    precondition_frequency = group_default("precondition_frequency")

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters; ``ValueError`` naming the first bad one."""
        check_nonneg("lr", group["lr"])
        check_betas("betas", group["betas"], 2)
        check_beta("shampoo_beta", group["shampoo_beta"])
        check_positive("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        check_weight_decay_method(group["weight_decay_method"])
        _check_bool("correct_bias", group["correct_bias"])
        check_nonneg("max_update_rms", group["max_update_rms"])
        check_positive_int("precondition_frequency", group["precondition_frequency"])
        check_nonneg("kl_eigval_floor", group["kl_eigval_floor"])

    # ------------------------------------------------------------------ the inner update
    def _scalar_update(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                       betas: tuple[float, float], step: int, group: dict[str, Any] | None = None) -> torch.Tensor:
        """The element-wise optimizer in the eigenbasis: update both moments in place, return the direction.

        ``step`` is 1-based; ``group`` is the parameter's param group (``None``: the constructor's defaults).
        Overrides written for the reference library, taking only ``betas`` and ``step``, keep working: the
        group is passed only to overrides that accept it.
        """
        raise NotImplementedError

    def _inner_update(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      group: dict[str, Any], step: int) -> torch.Tensor:
        kw: dict[str, Any] = {"group": group} if self._scalar_update_takes_group else {}
        return self._scalar_update(grad, exp_avg, exp_avg_sq, betas=group["betas"], step=step, **kw)

    def _make_preconditioner(self, state: dict[str, Any], group: dict[str, Any]) -> SoapPreconditionerProtocol:
        cls = self.PreconditionerCls
        if _accepts_eigval_floor(cls):
            return cls(state, group["eps"], eigval_floor=group["kl_eigval_floor"])  # type: ignore[call-arg]
        return cls(state, group["eps"])

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype, shape = _state_dtype(p), _matrix_shape(p)
        if shape is None:  # 0-D / 1-D: the inner update alone
            return {"step": 0, "exp_avg": torch.zeros(p.shape, dtype=dtype, device=p.device),
                    "exp_avg_sq": torch.zeros(p.shape, dtype=dtype, device=p.device)}
        spec = self.PreconditionerCls.init_state(shape, p.device)
        return {"step": 0, **{k: v.to(dtype) for k, v in spec.items()}}

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        step_on_streams(params, self.stream_list, lambda p: self._step_param(p, group))

    def _step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        assert p.grad is not None
        state = self.state[p]
        grad = p.grad.to(state["exp_avg"].dtype)  # p.grad itself for float32: never modified in place below
        step = state["step"]
        t = step + 1
        lr = group["lr"]
        shape = _matrix_shape(p)

        if shape is None:  # 0-D / 1-D parameter: the inner update on the raw gradient
            grad = apply_weight_decay(p, grad, group["weight_decay_method"], lr, group["weight_decay"])
            update = self._inner_update(grad, state["exp_avg"], state["exp_avg_sq"], group, t)
            _clip_update_rms_in_place(update, group["max_update_rms"])
            p.add_(update, alpha=-lr)
            state["step"] = t
            return

        shampoo_beta = group["shampoo_beta"]
        if group["correct_bias"]:
            shampoo_beta = 1 - (1 - shampoo_beta) / (1 - shampoo_beta**t)

        precond = self._make_preconditioner(state, group)
        G = grad.reshape(shape)
        if step == 0:
            precond.init_step(G, shampoo_beta)
        elif step % group["precondition_frequency"] == 0:
            precond.step(G, shampoo_beta)
        else:
            with _matmul_precision(_FACTOR_PREC):
                precond.update_kronecker_factors(G, shampoo_beta)

        # decay in the parameter's shape; ``l2`` returns a new gradient (p.grad is left as it is)
        grad = apply_weight_decay(p, grad, group["weight_decay_method"], lr, group["weight_decay"])
        with _matmul_precision(_FACTOR_PREC):
            projected = precond.project_in(grad.reshape(shape))
            inner = self._inner_update(projected, precond.exp_avg, precond.exp_avg_sq, group, t)
            update = precond.project_out(inner)
        _clip_update_rms_in_place(update, group["max_update_rms"])
        p.add_(update.reshape(p.shape), alpha=-lr)  # a float32 update is rounded into a bf16 p once
        precond.rebind_state(state)
        state["step"] = t


@register_optimizer("kl_soap")
class KlSoapV3(SoapBase):
    """KL-SOAP: KL-Shampoo eigenbases refreshed by orthogonal iteration, Adam inside (module docstring).

    Equals ``legacy_soap.SOAP(use_kl_shampoo=True)`` with the same settings, bit for bit.

    Args:
        params, lr, betas, shampoo_beta, eps, weight_decay, weight_decay_method, correct_bias, max_update_rms,
        precondition_frequency, kl_eigval_floor, stream_list: see :class:`SoapBase`.
        nesterov: Nesterov momentum in the inner Adam (False, the reference's only choice).
    """

    PreconditionerCls: ClassVar[type[SoapPreconditionerProtocol]] = KlSoapPreconditioner

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
        max_update_rms: float = 0.0,
        precondition_frequency: int = 1,
        kl_eigval_floor: float = 1e-4,
        stream_list: Sequence[Any] | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        super().__init__(params, lr, betas, shampoo_beta, eps, weight_decay, weight_decay_method=weight_decay_method,
                         correct_bias=correct_bias, max_update_rms=max_update_rms,
                         precondition_frequency=precondition_frequency, kl_eigval_floor=kl_eigval_floor,
                         stream_list=stream_list, inner_defaults={"nesterov": nesterov}, nonfinite=nonfinite)

    nesterov = group_default("nesterov")

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_bool("nesterov", group["nesterov"])

    def _scalar_update(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                       betas: tuple[float, float], step: int, group: dict[str, Any] | None = None) -> torch.Tensor:
        """Adam in the eigenbasis, with the group's ``eps``, ``correct_bias`` and ``nesterov``."""
        g = self.defaults if group is None else group
        return adam_kernel(grad, exp_avg, exp_avg_sq,
                           **adam_scalars(betas, g["correct_bias"], g["nesterov"], step, g["eps"]))


@register_optimizer("rekls_v3")
class ReklsV3(KlSoapV3):
    """Realtime-eigen KL-SOAP: :class:`KlSoapV3` with an eigh at every refresh; equals ``legacy_soap.REKLS``."""

    PreconditionerCls: ClassVar[type[SoapPreconditionerProtocol]] = ReklsPreconditioner


@register_optimizer("kl_m_soap")
class KlMSoap(SoapBase):
    """KL-SOAP with MAdam inside: no epsilon in the inner update (``eps`` only floors the KL factor update).

    Args:
        params, lr, betas, shampoo_beta, eps, weight_decay, weight_decay_method, correct_bias, max_update_rms,
        precondition_frequency, kl_eigval_floor, stream_list: see :class:`SoapBase`.
        scale_log2: ``exp_avg_sq`` holds ``2**scale_log2`` times the EMA of the squared projected gradient (an
            even int; 16, the reference's constant). No ``nesterov``: MAdam has no Nesterov form.
    """

    PreconditionerCls: ClassVar[type[SoapPreconditionerProtocol]] = KlSoapPreconditioner

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
        correct_bias: bool = True,
        max_update_rms: float = 0.0,
        precondition_frequency: int = 1,
        kl_eigval_floor: float = 1e-4,
        scale_log2: int = 16,
        stream_list: Sequence[Any] | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        super().__init__(params, lr, betas, shampoo_beta, eps, weight_decay, weight_decay_method=weight_decay_method,
                         correct_bias=correct_bias, max_update_rms=max_update_rms,
                         precondition_frequency=precondition_frequency, kl_eigval_floor=kl_eigval_floor,
                         stream_list=stream_list, inner_defaults={"scale_log2": scale_log2}, nonfinite=nonfinite)

    scale_log2 = group_default("scale_log2")

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        madam_scalars((0.0, 0.0), False, 1, group["scale_log2"])  # ValueError naming scale_log2 if not even

    def _scalar_update(self, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                       betas: tuple[float, float], step: int, group: dict[str, Any] | None = None) -> torch.Tensor:
        """MAdam in the eigenbasis, with the group's ``correct_bias`` and ``scale_log2``."""
        g = self.defaults if group is None else group
        return madam_kernel(grad, exp_avg, exp_avg_sq, **madam_scalars(betas, g["correct_bias"], step, g["scale_log2"]))
