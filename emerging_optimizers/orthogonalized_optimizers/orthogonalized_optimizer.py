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
e.g. ``torch.float32`` to keep fp32 momentum for bf16 parameters; ``torch.bfloat16`` for float32 parameters
halves the momentum's memory: the EMA is computed in float32 and stored with stochastic rounding).

Distributed (keyword-only, on the optimizer; docs/distributed.md):

* ``process_group`` (replicated parameters, DDP): each rank of the group orthogonalizes only the matrices it
  owns (owners balanced by Newton-Schulz FLOPs, :func:`~emerging_optimizers.distributed.assign_owners`;
  same-shape matrices batched), then one ``all_gather_into_tensor`` per dtype gives every rank every update
  (and the state the orthogonalization keeps, e.g. NorMuon's second moment): parameters and state stay
  bit-identical on every rank. ``gather_dtype`` (``None``: the update's float32, or ``torch.bfloat16``) is
  the dtype of the gathered updates; every rank, the owner too, applies the gathered values.
* DTensor parameters (FSDP2 ``fully_shard``, HSDP, tensor parallel) are detected by themselves: momentum and
  state stay sharded like the parameter; each matrix is assembled on one owner rank of its sharding group
  (``all_to_all``), orthogonalized there, and the update shards are sent back (a second ``all_to_all``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, ClassVar, Generic

import torch
import torch.distributed as dist

from emerging_optimizers.base import EmergingOptimizer, NonfiniteT, ParamsT, _grads_of, group_default
from emerging_optimizers.distributed.comm import (
    COMM_STATS,
    all_gather_owned,
    exchange,
    is_dtensor,
    local,
    reduce_scatter_owned,
)
from emerging_optimizers.distributed.ownership import assign_owners, matrix_ns_flops
from emerging_optimizers.distributed.sharding import ShardLayout, is_flat_param, shard_layout
from emerging_optimizers.mixin import (
    WeightDecayMixin,
    WeightDecayT,
    apply_weight_decay,
    check_weight_decay_method,
    decay_factor,
)
from emerging_optimizers.scalar_optimizers.base import stochastic_round_
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
        process_group: replicated-parameter (DDP) group over which the orthogonalizations are shared (module
            docstring); ``None``: every rank does all of them (or, for DTensor parameters, their mesh decides).
        gather_dtype: dtype of the updates sent between ranks (``None``: the update's own, float32 or float64;
            ``torch.bfloat16`` halves the bytes).
        reduce_gradients: with ``process_group``, the zero-extra-bytes recipe: the model is *not* wrapped in
            DDP; ``step`` averages each matrix's gradient onto its owner (reduce-scatter), the owner updates
            the momentum and orthogonalizes, and the updates are all-gathered: the bytes of one all-reduce.
            Only owners keep current state: call :meth:`synchronize_state` on every rank before saving.
        **kwargs: extra param-group defaults, passed to ``orthogonalize`` with the rest of the group.
    """

    #: State keys that :meth:`_orthogonalize_params` reads and writes (besides the momentum): distributed
    #: steps hand them to the owner rank with the matrix and send them back.
    orth_state_keys: ClassVar[tuple[str, ...]] = ()
    dtensor_support = True

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
        process_group: Any = None,
        gather_dtype: torch.dtype | None = None,
        reduce_gradients: bool = False,
        **kwargs: Any,
    ) -> None:
        self.process_group = _check_process_group(process_group, type(self).__name__)
        if not isinstance(reduce_gradients, bool):
            raise TypeError(f"Invalid reduce_gradients: {reduce_gradients!r}; it must be True or False.")
        if reduce_gradients and process_group is None:
            raise ValueError(f"{type(self).__name__}(reduce_gradients=True) averages the gradients over a "
                             "process_group; pass process_group= (e.g. torch.distributed.group.WORLD).")
        self.reduce_gradients = reduce_gradients
        self._stale_state = False  # reduce_gradients: non-owners' state lags until synchronize_state()
        if gather_dtype not in (None, torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"Invalid gather_dtype: {gather_dtype!r}; use None (the update's dtype), torch.float32 "
                             "or torch.bfloat16.")
        self.gather_dtype = gather_dtype
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
        _check_distributed_param(self, p, group)
        if self.param_ndim is not None:
            check_matrix(p, type(self).__name__, max_ndim=self.param_ndim[1],
                         hint="Optimize biases, norm weights and scalars with an AdamW-type optimizer "
                         "(emerging_optimizers.AdamW), or the whole model with MuonAdamW.")

    # ------------------------------------------------------------------ state
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        dtype = group.get("momentum_dtype") or p.dtype
        return {"step": 0, "momentum_buffer": torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}

    # ------------------------------------------------------------------ step
    def _momentum_direction(self, p: torch.Tensor, group: dict[str, Any],
                            grad: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 1-3 for one parameter: weight decay, momentum EMA, (Nesterov) direction (``grad``: ``p.grad``
        when not given; the step hands it over, fetched outside a user's torch.compile, see :func:`_grads_of`)."""
        state = self.state[p]
        grad = p.grad if grad is None else grad
        assert grad is not None
        grad = apply_weight_decay(local(p), local(grad), group["weight_decay_method"], group["lr"],
                                  group["weight_decay"])
        buf = local(state["momentum_buffer"])
        mu = group["momentum"]
        state["step"] += 1
        if buf.dtype == torch.bfloat16 and p.dtype != torch.bfloat16:
            # compressed momentum: the EMA in float32, stored with stochastic rounding (unbiased; the bits
            # are a hash of the element and the step, so a resumed run is bit-identical)
            grad = grad.float()
            work = buf.float().lerp_(grad, 1 - mu)
            stochastic_round_(buf, work, float(state["step"]))
            return grad.lerp(work, mu) if group["nesterov"] else work
        if grad.dtype != buf.dtype:
            grad = grad.to(buf.dtype)
        buf.lerp_(grad, 1 - mu)
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

    def _apply_update(self, p: torch.Tensor, update: torch.Tensor, lr: float,
                      grad: torch.Tensor | None = None) -> None:
        """Step 5: subclass and hook pre functions, ``p <- p - lr * update``, post functions."""
        if is_dtensor(p):  # the local shard's update (hooks and pre/post functions are refused for DTensors)
            local(p).add_(update, alpha=-lr)
            return
        if update.shape != p.shape:
            raise ValueError(
                f"{type(self).__name__}.orthogonalize returned shape {tuple(update.shape)} for a parameter of "
                f"shape {tuple(p.shape)}; it must return the parameter's shape."
            )
        if self._update_hooked() and (_shares_storage(update, self.state[p]["momentum_buffer"])
                                      or _shares_storage(update, p.grad if grad is None else grad)):
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
        if self.process_group is not None and dist.get_world_size(self.process_group) > 1:
            self._step_group_replicated(group, params)
            return
        if any(is_dtensor(p) for p in params):
            self._step_group_sharded(group, params)
            return
        # Bucket by bucket (directions, orthogonalization, update), as torch.optim.Muon applies each update as
        # it goes: at most one bucket's directions and updates are alive at a time, not the whole group's.
        for bucket in self._buckets(group, params):
            self._step_bucket(group, bucket)

    def _nonfinite_group(self) -> Any:
        return self.process_group

    # ------------------------------------------------------------------ distributed steps
    def _ns_cost(self, p: torch.Tensor, group: dict[str, Any]) -> float:
        """Newton-Schulz FLOPs of ``p``'s orthogonalization (its ``[out, -1]`` view): balances the owners."""
        return matrix_ns_flops(p.shape[0], math.prod(p.shape[1:]), group.get("num_ns_steps", 5))

    def _comm_dtype(self, p: torch.Tensor) -> torch.dtype:
        """dtype of ``p``'s update between ranks: ``gather_dtype``, else the float32 (float64) update's."""
        if self.gather_dtype is not None:
            return self.gather_dtype
        return torch.promote_types(self.state[p]["momentum_buffer"].dtype, torch.float32)

    def _orthogonalize_many(self, group: dict[str, Any], params: list[torch.Tensor],
                            directions: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`_orthogonalize_params` over ``params`` bucket by bucket (same-shape matrices batched)."""
        where = {id(p): i for i, p in enumerate(params)}
        out: list[torch.Tensor | None] = [None] * len(params)
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            for bucket in self._buckets(group, params):
                idx = [where[id(p)] for p in bucket]
                for i, u in zip(idx, self._orthogonalize_params(bucket, [directions[i] for i in idx], group)):
                    out[i] = u
        return out  # type: ignore[return-value]

    def _step_group_replicated(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """``process_group`` mode: each rank orthogonalizes its own matrices; one all-gather shares them."""
        pg = self.process_group
        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        owners = assign_owners([self._ns_cost(p, group) for p in params], world)
        mine = [i for i, o in enumerate(owners) if o == rank]
        if self.reduce_gradients:  # owners get the mean gradient; the others only decay their copy
            for i, g in enumerate(reduce_scatter_owned([(o, local(p.grad)) for o, p in zip(owners, params)], pg)):
                if g is not None:
                    params[i].grad = g
            for i, p in enumerate(params):
                self._owners[id(p)] = (p, owners[i])
                if owners[i] != rank:
                    apply_weight_decay(p, p.grad, group["weight_decay_method"], group["lr"], group["weight_decay"])
                    self.state[p]["step"] += 1
            self._stale_state = True
        directions = {i: self._momentum_direction(params[i], group) for i in
                      (mine if self.reduce_gradients else range(len(params)))}
        own_updates = dict(zip(mine, self._orthogonalize_many(group, [params[i] for i in mine],
                                                              [directions[i] for i in mine])))
        items = []
        for i, p in enumerate(params):
            dtype = self._comm_dtype(p)
            u = own_updates.get(i)
            items.append((owners[i], None if u is None else u.to(dtype), p.shape, dtype))
            for key in self.orth_state_keys:
                st = self.state[p][key]
                items.append((owners[i], st if u is not None else None, st.shape, st.dtype))
        gathered = iter(all_gather_owned(items, pg))
        for p in params:
            update = next(gathered)
            for key in self.orth_state_keys:
                self.state[p][key].copy_(next(gathered))
            self._apply_update(p, update, group["lr"])

    @property
    def _owners(self) -> dict[int, tuple[torch.Tensor, int]]:
        """``id(p) -> (p, owner rank)`` of the last ``reduce_gradients`` step (for :meth:`synchronize_state`)."""
        return self.__dict__.setdefault("_owner_map", {})

    def synchronize_state(self) -> None:
        """``reduce_gradients``: copy every owner's state to all ranks (a collective: call it on every rank).

        Afterwards the state is identical on every rank, as ``state_dict()`` and torch.distributed.checkpoint
        need; a no-op otherwise.
        """
        if not self._stale_state:
            return
        items, targets = [], []
        rank = dist.get_rank(self.process_group)
        for p, owner in self._owners.values():
            for key, value in self.state[p].items():
                if isinstance(value, torch.Tensor):
                    items.append((owner, value if owner == rank else None, value.shape, value.dtype))
                    targets.append((p, key))
        for (p, key), value in zip(targets, all_gather_owned(items, self.process_group, kind="synchronize_state")):
            self.state[p][key].copy_(value)
        self._stale_state = False

    def state_dict(self) -> dict[str, Any]:
        if self._stale_state:
            raise RuntimeError(
                f"{type(self).__name__}(reduce_gradients=True): only each matrix's owner holds its current state; "
                "call optimizer.synchronize_state() on every rank before state_dict() or a checkpoint."
            )
        return super().state_dict()

    @contextlib.contextmanager
    def _state_swapped(self, p: torch.Tensor, values: dict[str, torch.Tensor]) -> Iterator[None]:
        """``self.state[p]`` shows ``values`` (whole-matrix state on the owner) for the duration."""
        saved = self.state[p]
        self.state[p] = {**saved, **values}
        try:
            yield
        finally:
            self.state[p] = saved

    def _orthogonalize_full(self, group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor],
                            states: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Orthogonalize whole matrices ``directions`` of ``params`` with their whole state ``states``."""
        with contextlib.ExitStack() as stack:
            for p, st in zip(params, states):
                stack.enter_context(self._state_swapped(p, st))
            updates = self._orthogonalize_many(group, params, directions)
            for p, st in zip(params, states):  # the swapped dicts may have been given new tensors
                for key in st:
                    st[key] = self.state[p][key]
        return updates

    def _step_group_sharded(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """DTensor parameters: whole matrices assembled on owner ranks, update shards sent back."""
        directions = [self._momentum_direction(p, group) for p in params]  # local shards
        updates: list[torch.Tensor | None] = [None] * len(params)
        domains: dict[Any, list[int]] = defaultdict(list)
        whole, gather = [], []
        for i, p in enumerate(params):
            layout = shard_layout(p)
            if layout is None:
                whole.append(i)
            elif layout == "gather":
                gather.append(i)
            else:
                domains[layout.key].append(i)  # type: ignore[union-attr]
        if whole:  # plain or replicated: the local tensors are the whole matrices, every rank computes them
            full = self._orthogonalize_full(group, [params[i] for i in whole], [directions[i] for i in whole],
                                            [{k: local(self.state[params[i]][k]) for k in self.orth_state_keys}
                                             for i in whole])
            for i, u in zip(whole, full):
                updates[i] = u
        if gather:
            self._step_gathered(group, params, directions, gather, updates)
        for idx in domains.values():
            self._step_owned_shards(group, params, directions, idx, updates)
        for p, u in zip(params, updates):
            assert u is not None
            self._apply_update(p, u, group["lr"])

    def _step_gathered(self, group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor],
                       idx: list[int], updates: list[torch.Tensor | None]) -> None:
        """Sharded over several mesh dims: every rank gathers the whole matrix (``full_tensor``), keeps its part."""
        from torch.distributed.tensor import DTensor, Replicate

        def full(x: torch.Tensor, like: Any) -> torch.Tensor:
            COMM_STATS.add("full_tensor", x.numel() * x.element_size() * (like.device_mesh.size() - 1))
            return DTensor.from_local(x, like.device_mesh, like.placements, shape=like.shape,
                                      stride=like.stride(), run_check=False).full_tensor()

        def part(x: torch.Tensor, like: Any) -> torch.Tensor:
            rep = DTensor.from_local(x, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
            return rep.redistribute(like.device_mesh, like.placements).to_local()

        ps = [params[i] for i in idx]
        states = [{k: full(local(self.state[p][k]), self.state[p][k]) if is_dtensor(self.state[p][k])
                   else self.state[p][k] for k in self.orth_state_keys} for p in ps]
        outs = self._orthogonalize_full(group, ps, [full(directions[i], params[i]) for i in idx], states)
        for i, p, u, st in zip(idx, ps, outs, states):
            updates[i] = part(u, p)
            for k, v in st.items():
                target = self.state[p][k]
                local(target).copy_(part(v, target) if is_dtensor(target) else v)

    def _step_owned_shards(self, group: dict[str, Any], params: list[torch.Tensor], directions: list[torch.Tensor],
                           idx: list[int], updates: list[torch.Tensor | None]) -> None:
        """Matrices sharded along one dim over one mesh dim: all-to-all to owners, orthogonalize, all-to-all back."""
        layout: ShardLayout = shard_layout(params[idx[0]])  # type: ignore[assignment]
        size, me = layout.size, layout.rank
        owners = assign_owners([self._ns_cost(params[i], group) for i in idx], size)
        keys = self.orth_state_keys
        send: list[list[torch.Tensor]] = [[] for _ in range(size)]
        recv: list[list[tuple[torch.Size, torch.dtype]]] = [[] for _ in range(size)]
        for i, o in zip(idx, owners):
            p = params[i]
            sdt = torch.promote_types(directions[i].dtype, torch.float32)
            send[o].append(directions[i].to(sdt))
            sharded = [k for k in keys if is_dtensor(self.state[p][k])]
            send[o].extend(local(self.state[p][k]) for k in sharded)
            if o == me:
                for r in range(size):
                    recv[r].append((layout.local_shape(p.shape, r), sdt))
                    recv[r].extend((layout.local_shape(self.state[p][k].shape, r), self.state[p][k].dtype)
                                   for k in sharded)
        got = exchange(send, recv, layout.group)
        cursor = [0] * size
        owned, full_dirs, full_states = [], [], []
        for i, o in zip(idx, owners):
            if o != me:
                continue
            p = params[i]
            pieces = []
            for r in range(size):
                pieces.append(got[r][cursor[r]])
                cursor[r] += 1
            owned.append(i)
            full_dirs.append(torch.cat(pieces, dim=layout.dim))
            st = {}
            for k in keys:
                if is_dtensor(self.state[p][k]):
                    parts = []
                    for r in range(size):
                        parts.append(got[r][cursor[r]])
                        cursor[r] += 1
                    st[k] = torch.cat(parts, dim=layout.dim)
                else:
                    st[k] = self.state[p][k]
            full_states.append(st)
        full_updates = self._orthogonalize_full(group, [params[i] for i in owned], full_dirs, full_states)
        send2: list[list[torch.Tensor]] = [[] for _ in range(size)]
        recv2: list[list[tuple[torch.Size, torch.dtype]]] = [[] for _ in range(size)]
        done = dict(zip(owned, zip(full_updates, full_states)))
        for i, o in zip(idx, owners):
            p = params[i]
            cdt = self._comm_dtype(p)
            if o == me:
                u, st = done[i]
                for r, piece in enumerate(layout.split(u.to(cdt))):
                    send2[r].append(piece.contiguous())
                for k in keys:
                    if is_dtensor(self.state[p][k]):
                        for r, piece in enumerate(layout.split(st[k])):
                            send2[r].append(piece.contiguous())
                    else:
                        for r in range(size):
                            send2[r].append(st[k])
            recv2[o].append((layout.local_shape(p.shape, me), cdt))
            for k in keys:
                t = self.state[p][k]
                shape = layout.local_shape(t.shape, me) if is_dtensor(t) else t.shape
                recv2[o].append((shape, t.dtype))
        got2 = exchange(send2, recv2, layout.group)
        cursor = [0] * size
        for i, o in zip(idx, owners):
            p = params[i]
            updates[i] = got2[o][cursor[o]]
            cursor[o] += 1
            for k in keys:
                local(self.state[p][k]).copy_(got2[o][cursor[o]])
                cursor[o] += 1

    def _step_bucket(self, group: dict[str, Any], bucket: list[torch.Tensor]) -> None:
        grads = _grads_of(bucket)
        directions = self._momentum_directions(group, bucket, grads)
        with fp32_matmul_precision(group["fp32_matmul_prec"]):
            updates = self._orthogonalize_params(bucket, directions, group)
        self._apply_updates(bucket, updates, group["lr"], grads)

    def _momentum_directions(self, group: dict[str, Any], params: list[torch.Tensor],
                             grads: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """:meth:`_momentum_direction` of every param (plain tensors), as multi-tensor ops when it can.

        The ``torch._foreach_*`` form runs the same operations (weight decay, ``lerp_``, Nesterov ``lerp``) with
        fewer calls; it is used in eager mode when the method is not overridden and every param, gradient and
        momentum has one dtype (compressed bf16 momentum and mixed dtypes take the per-parameter loop).
        """
        base = OrthogonalizedOptimizer
        # Traced code (torch.compile) fuses the loop anyway; there the foreach form broke MuonHyperball's step.
        if grads is None:
            grads = [p.grad for p in params]  # type: ignore[misc]
        if type(self)._momentum_direction is not base._momentum_direction:  # a subclass's: ``(p, group)``
            return [self._momentum_direction(p, group) for p in params]
        if torch.compiler.is_compiling():
            return [self._momentum_direction(p, group, g) for p, g in zip(params, grads)]
        states = [self.state[p] for p in params]
        bufs = [st["momentum_buffer"] for st in states]
        dtype = params[0].dtype
        for p, g, b in zip(params, grads, bufs):
            if p.dtype != dtype or g.dtype != dtype or b.dtype != dtype:  # type: ignore[union-attr]
                return [self._momentum_direction(p, group, g) for p, g in zip(params, grads)]
        wd, method = group["weight_decay"], group["weight_decay_method"]
        if wd != 0:  # apply_weight_decay, for all params at once
            if method == "l2":
                grads = list(torch._foreach_add(grads, params, alpha=wd))  # type: ignore[arg-type]
            else:
                torch._foreach_mul_(params, decay_factor(method, group["lr"], wd))
        for st in states:
            st["step"] += 1
        mu = group["momentum"]
        torch._foreach_lerp_(bufs, grads, 1 - mu)  # type: ignore[arg-type]
        return list(torch._foreach_lerp(grads, bufs, mu)) if group["nesterov"] else bufs  # type: ignore[arg-type]

    def _update_hooked(self) -> bool:
        """Whether anything may see or change an update before it is applied (hooks, pre/post functions)."""
        cls, base = type(self), OrthogonalizedOptimizer
        return (cls.pre_weight_update_fn_inplace is not base.pre_weight_update_fn_inplace
                or cls.post_weight_update_fn_inplace is not base.post_weight_update_fn_inplace
                or type(self.weight_update_hook) is not NoOpWeightUpdateHook)

    def _apply_updates(self, params: list[torch.Tensor], updates: list[torch.Tensor], lr: float,
                       grads: list[torch.Tensor] | None = None) -> None:
        """:meth:`_apply_update` of every param; one ``torch._foreach_add_`` when nothing hooks into the update
        (no weight-update hook, pre/post functions or ``_apply_update`` of a subclass)."""
        own = type(self)._apply_update is OrthogonalizedOptimizer._apply_update
        if not own or self._update_hooked() or torch.compiler.is_compiling():
            for i, (p, u) in enumerate(zip(params, updates)):
                if own and grads is not None:  # a subclass's _apply_update may not take ``grad``
                    self._apply_update(p, u, lr, grad=grads[i])
                else:
                    self._apply_update(p, u, lr)
            return
        for p, u in zip(params, updates):
            if u.shape != p.shape:
                self._apply_update(p, u, lr)  # raises the shape error
        torch._foreach_add_(params, updates, alpha=-lr)

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


def _check_process_group(group: Any, who: str) -> Any:
    """``group`` if usable by this rank (``None`` passes); a clear error otherwise, before anything is built."""
    if group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{who}(process_group=...): torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first (or pass process_group=None).")
    if group is dist.GroupMember.NON_GROUP_MEMBER or (isinstance(group, dist.ProcessGroup)
                                                      and dist.get_rank(group) < 0):
        raise ValueError(f"{who}: process_group does not contain this rank (global rank {dist.get_rank()}); build "
                         "the optimizer on the group's members only, with a group they all belong to.")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{who}: process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD or "
                        f"dist.new_group(ranks)), got {type(group).__name__}.")
    return group


def _check_distributed_param(opt: Any, p: torch.Tensor, group: dict[str, Any]) -> None:
    """Refuse, at construction, parameters the distributed steps cannot handle (naming the fix)."""
    name = type(opt).__name__
    if is_flat_param(p):
        raise ValueError(
            f"{name} got an FSDP1 FlatParameter of shape {tuple(p.shape)} (FullyShardedDataParallel with "
            "use_orig_params=False): it is many tensors flattened into one shard, and orthogonalizing it would be "
            "silently wrong. Shard the model with FSDP2 (torch.distributed.fsdp.fully_shard): its DTensor "
            "parameters keep their shapes and are assembled whole here."
        )
    if not is_dtensor(p):
        return
    if opt.process_group is not None:
        raise ValueError(
            f"{name}: process_group is for replicated parameters (DDP); got a DTensor parameter of shape "
            f"{tuple(p.shape)} with placements {tuple(p.placements)}. DTensor parameters are detected by "
            "themselves: drop process_group."
        )
    cls = type(opt)
    custom = [f for f in ("pre_weight_update_fn_inplace", "post_weight_update_fn_inplace")
              if getattr(cls, f) is not getattr(OrthogonalizedOptimizer, f)]
    if custom or not isinstance(opt.weight_update_hook, NoOpWeightUpdateHook):
        what = ", ".join(custom) or f"weight_update_hook {type(opt.weight_update_hook).__name__}"
        raise ValueError(
            f"{name} with DTensor parameters (placements {tuple(p.placements)}): {what} works on whole weights, "
            "which sharded parameters are not. Use replicated parameters (DDP, optionally process_group=) for "
            f"{name}, or an optimizer without weight projections (Muon, NorMuon, ...)."
        )
