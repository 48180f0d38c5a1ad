r"""Muown: Muon on the row directions, Adam on the row norms (row-norm control, arXiv:2605.10797).

Every row of a weight :math:`W \in \mathbb{R}^{m \times n}` is written as a length times a direction,
:math:`W_i = g_i\,V_i/\lVert V_i\rVert` (weight normalisation by rows). The state keeps the lengths
:math:`g` (``g``, ``(m, 1)``) and the row norms of :math:`V` (``v_norm``); the directions are read back from
the weight, :math:`u = W/g`, :math:`V = u \odot \lVert V\rVert_{\mathrm{row}}`. With :math:`G = \nabla_W L`, one step
is (in float32, float64 for float64 weights)::

    grad_g = rowsum(G * u)                                   (dL/dg)
    grad_V = (g / v_norm) * (G - u * grad_g)                 (dL/dV, the weight-norm chain rule)
    M <- mu M + (1 - mu) grad_V;  D = grad_V.lerp(M, mu) if nesterov else M
    V' = V - lr * NS_K(D) * s(m, n) * extra_scale_factor     (Muon on V)
    g  <- g - lr * Adam(grad_g; betas, adam_eps)             (bias-corrected; states m_g, v_g)
    g  <- g * (1 - lr * weight_decay)                        (decoupled decay of the lengths only)
    v_norm <- |V'|_row;   W <- g * V' / v_norm

Muon then only turns the rows, and the row lengths -- which Muon's fixed-size steps control poorly -- get
their own adaptive learning. Both branches share ``lr``. Rows that are exactly zero stay zero (their
direction is undefined): initialise the weights with non-zero rows.

Defaults: ``lr=3e-4``, ``momentum=0.95``, ``weight_decay=0.0``, ``betas=(0.9, 0.95)``, ``adam_eps=1e-8``,
``fp32_matmul_prec="medium"``, ``quintic`` x 5, ``scale_mode="spectral"``. Every option is per param group.
Parameters must be 2-D; bf16/fp16 weights are supported (state and maths in float32; float64 weights keep
float64 state). The update is not a single ``W - lr * U`` step, so no ``weight_update_hook`` is accepted.

:func:`row_norm_fn` (``u_i = G_i / max(|G_i|, eps)``), a cheap row-wise "orthogonalization" usable as the
``scaled_orthogonalize_fn`` of :class:`~emerging_optimizers.orthogonalized_optimizers.OrthogonalizedOptimizer`,
lives in :mod:`emerging_optimizers.contrib.row_norm` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emerging_optimizers.base import NonfiniteT, ParamsT, _grads_of
from emerging_optimizers.contrib.row_norm import row_norm_fn, row_norms
from emerging_optimizers.orthogonalized_optimizers.muon import Muon, MuonScaleT
from emerging_optimizers.orthogonalized_optimizers.muon_utils import NSCoeffT, NSMethodT
from emerging_optimizers.registry import register_optimizer
from emerging_optimizers.scalar_optimizers.adam import calculate_adam_update
from emerging_optimizers.utils import FP32MatmulPrecT, check_betas, check_positive, fp32_matmul_precision

__all__ = ["Muown", "row_norm_fn", "row_norms", "weight_norm_grads"]


# ---------------------------------------------------------------------------------------------- pure math
def weight_norm_grads(
    w: torch.Tensor, grad: torch.Tensor, g: torch.Tensor, v_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, grad_g, grad_V)`` of the row weight normalisation ``W = g * V / |V|_row`` (module docstring).

    Rows with ``g == 0`` (or ``v_norm == 0``) get ``u = 0`` (and ``grad_V = 0``) instead of 0/0.
    """
    u = torch.where(g == 0, torch.zeros_like(w), w / g)
    grad_g = (grad * u).sum(dim=1, keepdim=True)
    ratio = torch.where(v_norm == 0, torch.zeros_like(g), g / v_norm)
    grad_v = ratio * (grad - u * grad_g)
    return u, grad_g, grad_v


# ---------------------------------------------------------------------------------------------- optimizer
@register_optimizer("muown")
class Muown(Muon):
    """Muown (module docstring): Muon on row directions, Adam on row lengths.

    Args:
        params: parameters or param groups (2-D).
        lr: learning rate of both branches (3e-4). momentum: Muon's EMA coefficient in [0, 1) (0.95).
        weight_decay: decoupled decay of the row lengths ``g`` (0.0).
        betas: Adam's ``(beta1, beta2)`` for the row lengths ((0.9, 0.95)).
        adam_eps: Adam's epsilon (1e-8).
        fp32_matmul_prec, coefficient_type, num_ns_steps, scale_mode, extra_scale_factor, use_syrk,
        custom_coefficient_sets, ns_method, ns_compute_dtype: Muon's options for the direction branch.
        nesterov: Nesterov direction in the Muon branch (False).
    """

    #: Its own step (weight-norm split) needs whole weights: no DTensor parameters.
    dtensor_support = False


    param_ndim = (2, 2)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 3e-4,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        fp32_matmul_prec: FP32MatmulPrecT = "medium",
        coefficient_type: NSCoeffT = "quintic",
        num_ns_steps: int = 5,
        scale_mode: MuonScaleT = "spectral",
        extra_scale_factor: float = 1.0,
        use_syrk: bool = False,
        nesterov: bool = False,
        custom_coefficient_sets: Sequence[tuple[float, float, float]] | None = None,
        ns_method: NSMethodT = "auto",
        ns_compute_dtype: torch.dtype | None = None,
        nonfinite: NonfiniteT = "skip",
    ) -> None:
        # Read by _validate_group while Muon.__init__ builds the defaults and groups.
        self._muown_defaults = {
            "betas": tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            "adam_eps": adam_eps,
        }
        super().__init__(
            params,
            lr,
            momentum,
            weight_decay,
            nesterov=nesterov,
            weight_decay_method="decoupled",
            fp32_matmul_prec=fp32_matmul_prec,
            coefficient_type=coefficient_type,
            num_ns_steps=num_ns_steps,
            scale_mode=scale_mode,
            extra_scale_factor=extra_scale_factor,
            custom_coefficient_sets=custom_coefficient_sets,
            use_syrk=use_syrk,
            ns_method=ns_method,
            ns_compute_dtype=ns_compute_dtype, nonfinite=nonfinite,
        )

    # ------------------------------------------------------------------ validation and state
    def _validate_group(self, group: dict[str, Any]) -> None:
        for key, value in self._muown_defaults.items():
            group.setdefault(key, value)
        super()._validate_group(group)
        check_betas("betas", group["betas"], 2)
        check_positive("adam_eps", group["adam_eps"])
        if group["weight_decay_method"] != "decoupled":
            raise ValueError(
                f"Invalid weight_decay_method: {group['weight_decay_method']!r}; Muown decays the row lengths with "
                "'decoupled' weight decay only."
            )
        if group["stacked_dims"] != 0 or group["split_sizes"] is not None:
            raise ValueError("Muown supports 2-D parameters only: use stacked_dims=0 and split_sizes=None.")

    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = torch.promote_types(p.dtype, torch.float32)  # float32, or float64 for float64 weights
        norms = row_norms(p.detach().to(dtype))
        return {
            "step": 0,
            "g": norms.clone(),
            "v_norm": norms.clone(),
            "momentum_buffer": torch.zeros(p.shape, dtype=dtype, device=p.device),
            "m_g": torch.zeros_like(norms),
            "v_g": torch.zeros_like(norms),
        }

    # ------------------------------------------------------------------ step
    def _step_bucket(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # called per bucket of same-shape matrices by OrthogonalizedOptimizer._step_group
        lr, mu = group["lr"], group["momentum"]
        dirs_v, directions = [], []
        for p, grad in zip(params, _grads_of(params)):  # fetched outside a user's torch.compile (see _grads_of)
            state = self.state[p]
            assert grad is not None
            state["step"] += 1
            dtype = state["g"].dtype
            u, grad_g, grad_v = weight_norm_grads(p.detach().to(dtype), grad.to(dtype), state["g"], state["v_norm"])
            buf = state["momentum_buffer"]
            buf.lerp_(grad_v, 1.0 - mu)
            directions.append(grad_v.lerp(buf, mu) if group["nesterov"] else buf)
            dirs_v.append((u * state["v_norm"], grad_g))
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            updates = self._muon_updates(directions, group)
        for p, (v, grad_g), update in zip(params, dirs_v, updates):
            state = self.state[p]
            v_new = v.sub_(update, alpha=lr)
            adam = calculate_adam_update(
                grad_g, state["m_g"], state["v_g"], group["betas"], True, False, state["step"], group["adam_eps"]
            )
            if lr == 0:  # moments advanced; recomposing W would only add rounding to a frozen weight
                continue
            g = state["g"]
            g.sub_(adam, alpha=lr).mul_(1.0 - lr * group["weight_decay"])
            v_norm = state["v_norm"]
            v_norm.copy_(row_norms(v_new))
            w_new = torch.where(v_norm == 0, torch.zeros_like(v_new), v_new * (g / v_norm))
            p.copy_(w_new)
