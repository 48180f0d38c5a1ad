r"""AdaptiveMuon: Muon with a second moment on the orthogonalized momentum (AdaMuon, NorMuon, NAMO).

With momentum direction :math:`D` (weight decay, EMA momentum and Nesterov as in
:class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`), :math:`O = NS_K(D)`
(unscaled Newton-Schulz) and state ``moment2_buffer`` :math:`V` (zeros at the start, no bias correction)::

    adamuon (arXiv:2507.11005):  V <- b2 V + (1 - b2) O*O                       (element-wise, p's shape)
                                 Uh = O / (sqrt(V) + eps)
    normuon (arXiv:2510.05491):  V <- b2 V + (1 - b2) mean_d(O*O)                (d: the long dim; V is (m, 1)
                                                                                  if m >= n, else (1, n))
                                 Ub = O / sqrt(max(V, eps));  Uh = Ub * |O|_F / max(|Ub|_F, eps)
    namo    (arXiv:2602.17080):  v <- b2 v + (1 - b2) |g|_F^2                    (scalar; g = gradient after
                                                                                  weight decay, before momentum)
                                 Uh = O * |D|_F / (sqrt(v) + eps)
    U = Uh * s(m, n) * extra_scale_factor,      W <- W - lr * U

with :math:`s` Muon's scale (:func:`~emerging_optimizers.orthogonalized_optimizers.get_muon_scale_factor`).
AdaMuon rescales every entry of the orthogonal update by its running RMS; NorMuon only equalises the rows
(or columns) and keeps the update's norm; NAMO scales the whole update by how large the momentum is
compared with the gradient's running RMS (an Adam-like step-size adaptation of Muon).

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.01`` (decoupled), ``fp32_matmul_prec="medium"``,
``quintic`` x 5, ``scale_mode="spectral"``, ``moment2_method="adamuon"``, ``beta2=0.95``, ``eps=1e-8``.
The reference library makes ``lr``, ``momentum`` and ``weight_decay`` required; here they get Muon's
defaults (3e-4, 0.95, 0.01). Unlike the reference, ``moment2_method``, ``beta2``, ``eps`` and every Muon
option are per param group, the ``weight_update_hook`` is called, and bf16/fp16 parameters work (the
moments are kept in ``momentum_dtype``, default the parameter's; the maths runs in float32). Parameters
must be 2-D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.distributed.comm import is_dtensor, local
from emerging_optimizers.mixin import WeightDecayT, apply_weight_decay
from emerging_optimizers.orthogonalized_optimizers.muon import Muon, MuonScaleT, get_muon_scale_factor
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, NSMethodT, newton_schulz
from emerging_optimizers.orthogonalized_optimizers.orthogonalized_optimizer import (
    OrthogonalizedOptimizer,
    WeightUpdateHook,
)
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.utils import FP32MatmulPrecT, check_beta, check_choice, check_matrix, check_positive

__all__ = ["AdaptiveMuon", "Moment2MethodT", "calculate_adaptive_muon_update", "moment2_shape", "update_namo_moment2"]

Moment2MethodT = Literal["adamuon", "normuon", "namo"]
_MOMENT2_METHODS: tuple[str, ...] = get_args(Moment2MethodT)


# ---------------------------------------------------------------------------------------------- pure math
def moment2_shape(shape: Sequence[int], moment2_method: Moment2MethodT) -> tuple[int, ...]:
    """Shape of ``moment2_buffer`` for a ``(m, n)`` parameter (module docstring)."""
    m, n = shape
    if moment2_method == "adamuon":
        return (m, n)
    if moment2_method == "normuon":
        return (m, 1) if m >= n else (1, n)
    if moment2_method == "namo":
        return (1,)
    raise ValueError(
        f"Invalid moment2_method: {moment2_method!r}; choose one of {', '.join(map(repr, _MOMENT2_METHODS))}."
    )


def update_namo_moment2(moment2: torch.Tensor, grad: torch.Tensor, beta2: float) -> None:
    """NAMO's scalar state: ``v <- beta2 v + (1 - beta2) |grad|_F^2`` in place (``grad`` after weight decay)."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    sq = torch.linalg.vector_norm(grad, dtype=acc).square()
    moment2.lerp_(sq.reshape(1).to(moment2.dtype), 1.0 - beta2)


def calculate_adaptive_muon_update(
    orth: torch.Tensor,
    moment2: torch.Tensor,
    direction: torch.Tensor,
    *,
    moment2_method: Moment2MethodT,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """The unscaled update ``Uh`` from ``orth = NS(D)`` (float32/64) and the state ``moment2``.

    ``adamuon`` and ``normuon`` update ``moment2`` in place (in its own dtype, computed in ``orth``'s);
    ``namo``'s ``moment2`` must already hold this step's value (:func:`update_namo_moment2`).
    ``direction`` (``D``) is read by ``namo`` only. Returns a new tensor of ``orth``'s dtype.
    """
    if moment2_method == "namo":
        v = moment2.to(orth.dtype)
        d_norm = torch.linalg.vector_norm(direction, dtype=orth.dtype)
        return orth * (d_norm / (v.sqrt() + eps))
    v = moment2.to(orth.dtype)
    if moment2_method == "adamuon":
        v.mul_(beta2).addcmul_(orth, orth, value=1.0 - beta2)
        out = orth / (v.sqrt() + eps)
    elif moment2_method == "normuon":
        dim = -1 if moment2.shape[-1] == 1 else -2
        v.lerp_(orth.square().mean(dim=dim, keepdim=True), 1.0 - beta2)
        out = orth * v.clamp_min(eps).rsqrt()
        out_norm = torch.linalg.vector_norm(out).clamp_min(eps)
        out.mul_(torch.linalg.vector_norm(orth) / out_norm)
    else:
        raise ValueError(
            f"Invalid moment2_method: {moment2_method!r}; choose one of {', '.join(map(repr, _MOMENT2_METHODS))}."
        )
    if v.data_ptr() != moment2.data_ptr():
        moment2.copy_(v)
    return out


# ---------------------------------------------------------------------------------------------- optimizer
@register_optimizer("adaptive_muon")
class AdaptiveMuon(Muon):
    """Muon with an adaptive second moment on the orthogonalized update (module docstring).

    Args:
        params: parameters or param groups (2-D).
        lr: learning rate (3e-4). momentum: EMA coefficient in [0, 1) (0.95). weight_decay: (0.01).
        nesterov, weight_decay_method, fp32_matmul_prec, coefficient_type, num_ns_steps, scale_mode,
        extra_scale_factor: as for :class:`Muon`.
        moment2_method: ``"adamuon" | "normuon" | "namo"``.
        beta2: EMA coefficient of the second moment, in [0, 1) (0.95).
        eps: added to (or flooring) the second moment's root (> 0, 1e-8).
        custom_coefficient_sets, weight_update_hook, ns_method, ns_compute_dtype, momentum_dtype: as for
            :class:`Muon` (``momentum_dtype`` also sets the second moment's dtype).
    """

    param_ndim = (2, 2)
    orth_state_keys = ("moment2_buffer",)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.01,
        *,
        nesterov: bool = False,
        weight_decay_method: WeightDecayT = "decoupled",
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        scale_mode: MuonScaleT = "spectral",
        extra_scale_factor: float = 1.0,
        moment2_method: Moment2MethodT = "adamuon",
        beta2: float = 0.95,
        eps: float = 1e-8,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        weight_update_hook: WeightUpdateHook[Any] | None = None,
        ns_method: NSMethodT = "auto",
        ns_compute_dtype: torch.dtype | None = None,
        momentum_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
    ) -> None:
        # Read by _validate_group while Muon.__init__ builds the defaults and groups.
        self._moment2_defaults = {"moment2_method": moment2_method, "beta2": beta2, "eps": eps}
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            custom_coefficient_sets=custom_coefficient_sets,
            weight_update_hook=weight_update_hook,
            ns_method=ns_method,
            ns_compute_dtype=ns_compute_dtype,
            momentum_dtype=momentum_dtype, nonfinite=nonfinite, process_group=process_group,
            gather_dtype=gather_dtype, reduce_gradients=reduce_gradients,
        )

    @property
    def moment2_method(self) -> Moment2MethodT:
        return self.defaults["moment2_method"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ validation and state
    def _validate_group(self, group: dict[str, Any]) -> None:
        for key, value in self._moment2_defaults.items():
            group.setdefault(key, value)
        super()._validate_group(group)
        check_choice("moment2_method", group["moment2_method"], _MOMENT2_METHODS)
        check_beta("beta2", group["beta2"])
        check_positive("eps", group["eps"])
        if group["stacked_dims"] != 0 or group["split_sizes"] is not None:
            raise ValueError("AdaptiveMuon supports 2-D parameters only: use stacked_dims=0 and split_sizes=None.")

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = super()._init_param_state(p, group)
        buf = state["momentum_buffer"]
        shape = moment2_shape((p.shape[0], math.prod(p.shape[1:])), group["moment2_method"])  # the [out, -1] view
        if shape == tuple(p.shape):  # adamuon: like the parameter (a DTensor parameter's stays sharded like it)
            state["moment2_buffer"] = torch.zeros_like(p, dtype=buf.dtype, memory_format=torch.contiguous_format)
        else:  # a row/column vector or a scalar: whole on every rank
            state["moment2_buffer"] = torch.zeros(shape, dtype=buf.dtype, device=local(p).device)
        return state

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        super()._validate_param(p, group)
        if group["moment2_method"] == "namo" and is_dtensor(p):
            raise ValueError(
                f"{type(self).__name__}(moment2_method='namo') needs the whole gradient's norm, and DTensor "
                f"(FSDP2 / tensor-parallel) parameters hold shards (placements {tuple(p.placements)}); use "
                "moment2_method='normuon' or 'adamuon', or replicated parameters (DDP)."
            )

    # ------------------------------------------------------------------ step
    # As in the reference library: ``orthogonalize`` returns the plain Newton-Schulz output O; the step then
    # applies ``_apply_moment2_normalization`` and ``_apply_muon_scale`` (subclasses may override any of them).
    def _default_scaled_orthogonalize(self, x: torch.Tensor) -> torch.Tensor:
        """``scaled_orthogonalize_fn``: the unscaled ``NS(x)`` with the default group's options (as the reference)."""
        return OrthogonalizedOptimizer._default_scaled_orthogonalize(self, x)  # not Muon's scaled version

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``O = NS(D)``: the plain orthogonalized direction, before the second moment and Muon's scale.

        Float32 (float64 for float64 input) whatever the parameter dtype; ``kwargs`` is the param group.
        """
        check_matrix(grad, f"{type(self).__name__}.orthogonalize")
        work_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        return newton_schulz(
            grad,
            kwargs["num_ns_steps"],
            kwargs["coefficient_type"],
            kwargs["custom_coefficient_sets"],
            method=kwargs["ns_method"],
            compute_dtype=kwargs["ns_compute_dtype"],
            out_dtype=work_dtype,
        )

    def _apply_moment2_normalization(
        self,
        orth_grad: torch.Tensor,
        moment2: torch.Tensor,
        beta2: float,
        eps: float,
        *,
        raw_grad: torch.Tensor | None = None,
        pre_orth_grad: torch.Tensor | None = None,
        moment2_method: Moment2MethodT | None = None,
    ) -> torch.Tensor:
        """Update ``moment2`` in place and return the adapted update ``Uh`` (module docstring).

        ``raw_grad`` (the gradient after weight decay, before momentum) and ``pre_orth_grad`` (the direction
        ``D``) are needed by ``namo`` only. ``moment2_method`` defaults to the constructor's.
        """
        method = self.moment2_method if moment2_method is None else moment2_method
        if method == "namo":
            if raw_grad is None or pre_orth_grad is None:
                raise ValueError("moment2_method='namo' needs raw_grad and pre_orth_grad.")
            update_namo_moment2(moment2, raw_grad, beta2)
        direction = orth_grad if pre_orth_grad is None else pre_orth_grad
        return calculate_adaptive_muon_update(
            orth_grad, moment2, direction, moment2_method=method, beta2=beta2, eps=eps
        )

    def _apply_muon_scale(
        self,
        update: torch.Tensor,
        size_out: int,
        size_in: int,
        *,
        scale_mode: MuonScaleT | None = None,
        extra_scale_factor: float | None = None,
    ) -> torch.Tensor:
        """``update * s(size_out, size_in) * extra_scale_factor`` (the constructor's values unless given)."""
        mode = self.scale_mode if scale_mode is None else scale_mode
        extra = self.extra_scale_factor if extra_scale_factor is None else extra_scale_factor
        return update.mul_(get_muon_scale_factor(size_out, size_in, mode) * extra)

    def _orthogonalize_params(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        orths = super()._orthogonalize_params(params, directions, group)  # self.orthogonalize per parameter
        updates = []
        for p, d, orth in zip(params, directions, orths):
            raw_grad = None
            if group["moment2_method"] == "namo":
                assert p.grad is not None
                raw_grad = p.grad
                if group["weight_decay_method"] == "l2":  # the only method that changes the gradient (not p)
                    raw_grad = apply_weight_decay(p, raw_grad, "l2", group["lr"], group["weight_decay"])
            update = self._apply_moment2_normalization(
                orth, self.state[p]["moment2_buffer"], group["beta2"], group["eps"], raw_grad=raw_grad,
                pre_orth_grad=d, moment2_method=group["moment2_method"],
            )
            updates.append(
                self._apply_muon_scale(update, update.size(-2), update.size(-1), scale_mode=group["scale_mode"],
                                       extra_scale_factor=group["extra_scale_factor"])
            )
        return updates
