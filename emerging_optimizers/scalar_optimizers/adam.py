r"""Adam and AdamW (arXiv:1412.6980, arXiv:1711.05101), with optional Nesterov momentum (NAdam-style).

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \hat m_t = m_t / (1-\beta_1^t) \quad\text{or, with Nesterov,}\quad
    \hat m_t = \beta_1 m_t/(1-\beta_1^{t+1}) + (1-\beta_1) g_t/(1-\beta_1^t) \\
    u_t = \hat m_t / (\sqrt{v_t/(1-\beta_2^t)} + \epsilon), \qquad p \leftarrow p - \eta\, u_t

AdamW is ``weight_decay_method="decoupled"`` (the default of every optimizer here); torch's ``Adam`` with
``weight_decay`` is ``weight_decay_method="l2"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT
from emerging_optimizers.distributed.comm import local
from emerging_optimizers.mixin import WeightDecayT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.base import ScalarOptimizer
from emerging_optimizers.utils import check_betas, check_nonneg

__all__ = ["calculate_adam_update", "adam_scalars", "adam_kernel", "Adam", "AdamW"]


def adam_scalars(betas: tuple[float, float], correct_bias: bool, use_nesterov: bool, step: int,
                 eps: float) -> dict[str, Any]:
    """The step-dependent numbers of Adam: bias corrections ``bc1``, ``sqrt(bc2)`` and Nesterov's ``bcn``."""
    b1, b2 = betas
    bc1 = 1.0 - b1**step if correct_bias else 1.0
    bc2 = 1.0 - b2**step if correct_bias else 1.0
    bcn = 1.0 - b1 ** (step + 1) if correct_bias else 1.0
    return dict(beta1=b1, beta2=b2, eps=eps, bc1=bc1, bc2_sqrt=math.sqrt(bc2), bcn=bcn, nesterov=bool(use_nesterov))


def adam_kernel(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, beta1: float, beta2: float,
                eps: float, bc1: float, bc2_sqrt: float, bcn: float, nesterov: bool) -> torch.Tensor:
    """Element-wise Adam: update both moments in place and return the direction."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.lerp_(grad * grad, 1.0 - beta2)
    if nesterov:
        m_hat = exp_avg * (beta1 / bcn) + grad * ((1.0 - beta1) / bc1)
    else:
        m_hat = exp_avg / bc1
    return m_hat / (exp_avg_sq.sqrt() / bc2_sqrt + eps)


def calculate_adam_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                          betas: tuple[float, float], correct_bias: bool, use_nesterov: bool, step: int,
                          eps: float) -> torch.Tensor:
    """Adam's update ``u`` for one tensor; ``exp_avg``/``exp_avg_sq`` are updated in place, ``grad`` is not.

    ``step`` is the 1-based step number. The caller applies ``p <- p - lr*u``.
    """
    return adam_kernel(grad, exp_avg, exp_avg_sq, **adam_scalars(betas, correct_bias, use_nesterov, step, eps))


def _torch_fused_kernel(opt: Any, group: dict[str, Any], params: list[torch.Tensor]) -> Any:
    """``torch._fused_adamw_`` / ``_fused_adam_`` when they compute this group's step, else None.

    They do for: bias correction on, no Nesterov, weight decay decoupled (AdamW) or L2 (Adam) or none, state
    in the parameter's dtype, dense floating tensors on CPU or CUDA, ``fused`` not False, and outside a
    user's ``torch.compile`` (which fuses the plain path itself).
    """
    if group["fused"] is False or group["nesterov"] or not group["correct_bias"] or torch.compiler.is_compiling():
        return None
    method = group["weight_decay_method"] if group["weight_decay"] else "decoupled"
    kernels = {"decoupled": getattr(torch, "_fused_adamw_", None), "l2": getattr(torch, "_fused_adam_", None)}
    kernel = kernels.get(method)
    if kernel is None:
        return None
    state = opt.state
    for p in params:
        st = state[p]
        lp = local(p)
        dtype = p.dtype
        if (st["exp_avg"].dtype is not dtype or st["exp_avg_sq"].dtype is not dtype
                or lp.device.type not in ("cpu", "cuda") or not dtype.is_floating_point
                or lp.layout is not torch.strided):
            return None
    return kernel


@register_optimizer("adam")
class Adam(ScalarOptimizer):
    """Adam / AdamW.

    Args:
        params: parameters or param groups.
        lr: learning rate (1e-3, as torch.optim.Adam).
        betas: EMA rates of the first and second moments ((0.9, 0.999), as torch).
        eps: added to the denominator (1e-8).
        weight_decay: decay coefficient (0.0).
        nesterov: Nesterov momentum in the first moment (NAdam without its momentum schedule).
        correct_bias: divide the moments by ``1 - beta**t`` (True).
        weight_decay_method: ``"decoupled"`` (AdamW), ``"l2"`` (torch.optim.Adam), ``"independent"`` or ``"palm"``.
        fused, fp32_state: see :class:`~emerging_optimizers.scalar_optimizers.base.ScalarOptimizer`.
    """

    scalars_use_param = False

    state_keys = ("exp_avg", "exp_avg_sq")
    kernel = staticmethod(adam_kernel)

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, nesterov: bool = False, correct_bias: bool = True,
                 weight_decay_method: WeightDecayT = "decoupled", fused: bool | None = None,
                 fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, nesterov=nesterov,
                        correct_bias=correct_bias, weight_decay_method=weight_decay_method)
        super().__init__(params, defaults, fused=fused, fp32_state=fp32_state, nonfinite=nonfinite,
                         state_dtype=state_dtype)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_betas("betas", group["betas"], 2)
        check_nonneg("eps", group["eps"])

    def scalars(self, group: dict[str, Any], step: int, p: torch.Tensor) -> dict[str, Any]:
        return adam_scalars(group["betas"], group["correct_bias"], group["nesterov"], step, group["eps"])

    # ------------------------------------------------------------------ torch's fused kernel
    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's own fused Adam/AdamW kernel (CPU and CUDA, no compilation, any size) where our options mean
        what it computes: the same update (tested equal to :func:`adam_kernel`'s path); otherwise the base's."""
        kernel = _torch_fused_kernel(self, group, params)
        if kernel is None:
            super()._step_group(group, params)
            return
        state = self.state
        buckets: dict[Any, list[torch.Tensor]] = {}
        for p in params:
            st = state[p]
            st["step"] += 1
            buckets.setdefault((local(p).device, p.dtype, st["step"]), []).append(p)
        b1, b2 = group["betas"]
        for (device, _, step), ps in buckets.items():
            sts = [state[p] for p in ps]
            steps = [torch.tensor(float(step), device=device if device.type != "cpu" else None)] * len(ps)
            kernel([local(p) for p in ps], [local(p.grad) for p in ps], [local(st["exp_avg"]) for st in sts],
                   [local(st["exp_avg_sq"]) for st in sts], [], steps, lr=group["lr"], beta1=b1, beta2=b2,
                   weight_decay=group["weight_decay"],
                   eps=group["eps"], amsgrad=False, maximize=False)


@register_optimizer("adamw")
class AdamW(Adam):
    """:class:`Adam` with torch.optim.AdamW's defaults: decoupled weight decay of 0.01."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, nesterov: bool = False, correct_bias: bool = True,
                 weight_decay_method: WeightDecayT = "decoupled", fused: bool | None = None,
                 fp32_state: bool = False, state_dtype: torch.dtype | None = None,
                 nonfinite: NonfiniteT = "skip") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, nesterov=nesterov, correct_bias=correct_bias,
                         weight_decay_method=weight_decay_method, fused=fused, fp32_state=fp32_state,
                         state_dtype=state_dtype, nonfinite=nonfinite)
