r"""Base class of the orthogonalized optimizers (Muon and family).

The weight-update hook protocol lives in :mod:`emerging_optimizers.weight_update_hooks` (re-exported here).

For every parameter :math:`W` with gradient :math:`g`, with :math:`\mu` = ``momentum``, one step is::

    1. weight decay (``weight_decay_method``: decoupled | independent | l2 | palm), before the update
    2. M <- mu M + (1 - mu) g                      (state "momentum_buffer", an EMA)
    3. D = (1 - mu) g + mu M  if nesterov else  M
    4. U = orthogonalize(W, D, **group)            (inside fp32_matmul_precision(fp32_matmul_prec))
    5. pre_weight_update_fn_inplace(W, U); s = hook.pre_weight_update_inplace(W, U)
       W <- W - lr U
       post_weight_update_fn_inplace(W);  hook.post_weight_update_inplace(W, s)

``orthogonalize`` defaults to ``scaled_orthogonalize_fn(D)`` for 2-D parameters (identity, with a warning,
when no function is given); subclasses override it, or :meth:`OrthogonalizedOptimizer._orthogonalize_params`
to handle all parameters of a group at once (Muon batches same-shape matrices there).

Unlike the reference library: every hyperparameter (``nesterov``, ``weight_decay_method``,
``fp32_matmul_prec`` included) lives in the param group, so it can vary per group and survives
``state_dict()``; ``l2`` weight decay never modifies ``p.grad``; hooks and the pre/post functions always get a
fresh update tensor, never the stored momentum; ``step(closure)`` works; state keeps a ``step`` counter; the
hyperparameters are validated in the constructor and in ``add_param_group``. Assigning ``nesterov``,
``weight_decay_method`` or ``fp32_matmul_prec`` on the optimizer (as on the reference's) sets every group.

Extra options (keyword-only, stored in the param group): ``momentum_dtype`` (``None``: the parameter's dtype;
e.g. ``torch.float32`` to keep fp32 momentum for bf16 parameters).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, Generic

import torch

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, group_default
from emerging_optimizers.mixin import WeightDecayMixin, WeightDecayT, apply_weight_decay, check_weight_decay_method
from emerging_optimizers.utils import (
    FP32MatmulPrecT,
    check_beta,
    check_choice,
    check_matrix,
    check_nonneg,
    fp32_matmul_precision,
)
from emerging_optimizers.weight_update_hooks.base import HookStateT, NoOpWeightUpdateHook, WeightUpdateHook

__all__ = ["HookStateT", "NoOpWeightUpdateHook", "OrthogonalizedOptimizer", "WeightUpdateHook"]

_FP32_MATMUL_PRECS = ("highest", "high", "medium")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _shares_storage(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class OrthogonalizedOptimizer(WeightDecayMixin, EmergingOptimizer, Generic[HookStateT]):
    """Momentum, then an orthogonalizing map of the momentum as the update (module docstring).

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        momentum: EMA coefficient of the momentum buffer, in [0, 1).
        weight_decay: weight-decay coefficient (>= 0).
        nesterov: use the Nesterov direction ``g.lerp(M, momentum)``.
        weight_decay_method: ``"decoupled" | "independent" | "l2" | "palm"``.
        fp32_matmul_prec: ``"highest" | "high" | "medium"``, set around ``orthogonalize``.
        scaled_orthogonalize_fn: 2-D tensor -> update of the same shape; ``None`` = identity (warns).
        weight_update_hook: a :class:`WeightUpdateHook` (default :class:`NoOpWeightUpdateHook`).
        **kwargs: extra param-group defaults, passed to ``orthogonalize`` with the rest of the group.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float,
        weight_decay: float,
        *,
        nesterov: bool,
        weight_decay_method: WeightDecayT,
        fp32_matmul_prec: FP32MatmulPrecT,
        scaled_orthogonalize_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weight_update_hook: WeightUpdateHook[HookStateT] | None = None,
        nonfinite: NonfiniteT = "skip",
        **kwargs: Any,
    ) -> None:
        if scaled_orthogonalize_fn is None:
            warnings.warn(
                f"{type(self).__name__}: scaled_orthogonalize_fn is None, so the update is the momentum itself "
                "(identity); pass a function such as a Newton-Schulz iteration to orthogonalize.",
                UserWarning,
                stacklevel=2,
            )
            scaled_orthogonalize_fn = _identity
        elif not callable(scaled_orthogonalize_fn):
            raise TypeError(f"scaled_orthogonalize_fn must be callable, got {type(scaled_orthogonalize_fn).__name__}.")
        if weight_update_hook is None:
            weight_update_hook = NoOpWeightUpdateHook()  # type: ignore[assignment]
        elif not isinstance(weight_update_hook, WeightUpdateHook):
            raise TypeError(
                f"weight_update_hook must have pre_weight_update_inplace(p, update) and "
                f"post_weight_update_inplace(p, state) methods, got {type(weight_update_hook).__name__}."
            )
        self.scaled_orthogonalize_fn = scaled_orthogonalize_fn
        self.weight_update_hook: WeightUpdateHook[HookStateT] = weight_update_hook  # type: ignore[assignment]
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            weight_decay_method=weight_decay_method,
            fp32_matmul_prec=fp32_matmul_prec,
            **kwargs,
        )
        self._validate_group(defaults)
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ defaults, read-only views
    # Per-group values live in ``param_groups``; these return the constructor's defaults.
    # The reference keeps these on ``self``; assigning one sets it in every group (see group_default).
    nesterov = group_default("nesterov")
    weight_decay_method = group_default("weight_decay_method")
    fp32_matmul_prec = group_default("fp32_matmul_prec")

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters (subclasses extend this and call ``super()``)."""
        check_nonneg("lr", group["lr"])
        check_beta("momentum", group["momentum"])
        check_nonneg("weight_decay", group["weight_decay"])
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"Invalid nesterov: {group['nesterov']!r}; it must be True or False.")
        check_weight_decay_method(group["weight_decay_method"])
        check_choice("fp32_matmul_prec", group["fp32_matmul_prec"], _FP32_MATMUL_PRECS)
        mdt = group.get("momentum_dtype")
        if mdt is not None and (not isinstance(mdt, torch.dtype) or not mdt.is_floating_point):
            raise ValueError(
                f"Invalid momentum_dtype: {mdt!r}; use None (the parameter's dtype) or e.g. torch.float32."
            )

    #: The reference library keeps no step counter for this family: its checkpoints load with ``step`` 0.
    optional_state_keys = ("step",)
    matrix_only = True
    matrix_optimizer_ok = True

    #: ``(min, max)`` dims of the parameters a subclass takes (``max`` None: any rank >= 2, viewed as
    #: ``[out, -1]``); ``None``: any parameter (the base, whose ``scaled_orthogonalize_fn`` decides).
    param_ndim: ClassVar[tuple[int, int | None] | None] = None

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Check one parameter of a group at construction: a floating matrix of ``param_ndim`` dims."""
        if self.param_ndim is not None:
            check_matrix(p, type(self).__name__, max_ndim=self.param_ndim[1],
                         hint="Optimize biases, norm weights and scalars with an AdamW-type optimizer "
                         "(emerging_optimizers.AdamW), or the whole model with MuonAdamW.")

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = group.get("momentum_dtype") or p.dtype
        return {"step": 0, "momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}

    # ------------------------------------------------------------------ step
    def _momentum_direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Steps 1-3 for one parameter: weight decay, momentum EMA, (Nesterov) direction."""
        state = self.state[p]
        assert p.grad is not None
        grad = apply_weight_decay(p, p.grad, group["weight_decay_method"], group["lr"], group["weight_decay"])
        buf = state["momentum_buffer"]
        if grad.dtype != buf.dtype:
            grad = grad.to(buf.dtype)
        mu = group["momentum"]
        buf.lerp_(grad, 1 - mu)
        state["step"] += 1
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    def _orthogonalize_params(
        self, params: list[torch.Tensor], directions: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Step 4 for the params of one group (already under the group's matmul precision).

        Each parameter is an independent job: ``orthogonalize(p, direction, **group_without_params)``.
        Subclasses may batch or distribute the jobs; the result must equal this loop.
        """
        kwargs = {k: v for k, v in group.items() if k != "params"}
        return [self.orthogonalize(p, d, **kwargs) for p, d in zip(params, directions)]

    def _apply_update(self, p: torch.Tensor, update: torch.Tensor, lr: float) -> None:
        """Step 5: subclass and hook pre functions, ``p <- p - lr * update``, post functions."""
        if update.shape != p.shape:
            raise ValueError(
                f"{type(self).__name__}.orthogonalize returned shape {tuple(update.shape)} for a parameter of "
                f"shape {tuple(p.shape)}; it must return the parameter's shape."
            )
        if _shares_storage(update, self.state[p]["momentum_buffer"]) or _shares_storage(update, p.grad):
            update = update.clone()  # the hooks may modify it in place; never let them touch state or grad
        self.pre_weight_update_fn_inplace(p, update)
        hook_state = self.weight_update_hook.pre_weight_update_inplace(p, update)
        p.add_(update, alpha=-lr)
        self.post_weight_update_fn_inplace(p)
        self.weight_update_hook.post_weight_update_inplace(p, hook_state)

    def _bucket_key(self, p: torch.Tensor, group: dict[str, Any]) -> Hashable:
        """Params with equal keys are orthogonalized together (one :meth:`_orthogonalize_params` call, where
        subclasses batch them) and updated as soon as their bucket is done (default: same shape and dtype)."""
        return (tuple(p.shape), self.state[p]["momentum_buffer"].dtype, p.device)

    def _buckets(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """``params`` split by :meth:`_bucket_key`, in order of first appearance."""
        buckets: dict[Hashable, list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault(self._bucket_key(p, group), []).append(p)
        return list(buckets.values())

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # Bucket by bucket (directions, orthogonalization, update), as torch.optim.Muon applies each update as
        # it goes: at most one bucket's directions and updates are alive at a time, not the whole group's.
        for bucket in self._buckets(group, params):
            self._step_bucket(group, bucket)

    def _step_bucket(self, group: dict[str, Any], bucket: list[torch.Tensor]) -> None:
        directions = [self._momentum_direction(p, group) for p in bucket]
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            updates = self._orthogonalize_params(bucket, directions, group)
        for p, u in zip(bucket, updates):
            self._apply_update(p, u, group["lr"])

    # ------------------------------------------------------------------ extension points
    def _default_scaled_orthogonalize(self, x: torch.Tensor) -> torch.Tensor:
        """The ``scaled_orthogonalize_fn`` of library classes that implement :meth:`orthogonalize` themselves.

        It applies the *library class's* ``orthogonalize`` (the first one defined in this package along the
        MRO) with the default group's options. So a user subclass that overrides ``orthogonalize`` and calls
        ``self.scaled_orthogonalize_fn`` on parts of the matrix (the reference library's documented way to
        split a fused QKV weight) gets the library's math for each part, not a call back into itself.
        """
        for klass in type(self).__mro__:
            impl = klass.__dict__.get("orthogonalize")
            if impl is not None and klass.__module__.startswith("emerging_optimizers."):
                return impl(self, x, x, **self.defaults)  # type: ignore[no-any-return]
        raise TypeError(f"{type(self).__name__} has no library orthogonalize to use as scaled_orthogonalize_fn.")

    def orthogonalize(self, p: torch.Tensor, grad: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The update for ``p`` from its momentum direction ``grad`` (default: ``scaled_orthogonalize_fn``).

        ``kwargs`` is the param group without ``params``. Override to handle other shapes, e.g. a conv
        kernel as ``grad.reshape(grad.shape[0], -1)`` reshaped back, or a fused QKV matrix split into parts.
        """
        check_matrix(grad, f"{type(self).__name__}.orthogonalize",
                     hint="Use Muon (conv kernels, stacked matrices) or override orthogonalize.")
        return self.scaled_orthogonalize_fn(grad)

    def pre_weight_update_fn_inplace(self, p: torch.Tensor, update: torch.Tensor) -> None:
        """Called before ``p <- p - lr * update`` (no-op; subclasses may modify ``update`` in place)."""

    def post_weight_update_fn_inplace(self, p: torch.Tensor) -> None:
        """Called after the update (no-op; subclasses may project ``p`` in place)."""
