"""Plumbing shared by every optimizer of the package, written once.

:class:`EmergingOptimizer` owns what torch users expect of any ``torch.optim.Optimizer`` and what the
reference library gets wrong:

* ``step(closure)`` runs the closure under ``torch.enable_grad()`` and returns its loss;
* gradients are checked early (sparse and complex gradients raise a ``ValueError`` naming the parameter);
* ``_init_group(group, skip_non_grad_params=True)`` allocates state lazily, or eagerly for every parameter
  (frameworks call it before loading a checkpoint);
* ``nonfinite`` (every optimizer's keyword-only option, per group): a step whose gradients hold NaN or Inf
  changes nothing under ``"skip"`` (the default; counted in every group's ``"nonfinite_skipped"`` and warned
  about, rate-limited), raises :class:`NonFiniteGradientError` naming the parameters under ``"raise"``
  (nothing changed), and runs as before under ``"off"``. The check is one fused reduction per step (a
  single host sync), agreed over all ranks when torch.distributed runs, and comes before any state is made;
* ``load_state_dict`` refuses a state dict saved by another optimizer, or for parameters of other shapes,
  *before* touching anything, and keeps the state dtype the optimizer chose (torch would cast every state
  tensor to the parameter dtype, silently turning fp32 state of bf16 parameters into bf16).

Subclasses implement :meth:`EmergingOptimizer._init_param_state` and :meth:`EmergingOptimizer._step_group`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from emerging_optimizers.distributed.comm import is_dtensor, local
from emerging_optimizers.distributed.sharding import check_dtensor_placements
from emerging_optimizers.utils.nonfinite import (
    NONFINITE_POLICIES,
    NonFiniteGradientError,
    NonfiniteT,
    all_ranks_agree,
    nonfinite_counts,
    nonfinite_flag,
    several_ranks,
)

__all__ = ["EmergingOptimizer", "NonFiniteGradientError", "NonfiniteT", "ParamsT", "group_default",
           "read_only_default"]

#: Group key counting the steps skipped under ``nonfinite="skip"`` (saved with the param groups).
NONFINITE_COUNT_KEY = "nonfinite_skipped"

#: Group keys that LR/momentum schedulers (and torch) add; a checkpoint may have or lack them.
_SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum",
                                   "swa_lr", "param_names", NONFINITE_COUNT_KEY})

ParamsT = Any  # an iterable of tensors, of (name, tensor) pairs, or of param-group dicts, as torch.optim accepts


def read_only_default(name: str) -> property:
    """A read-only attribute showing the constructor's value of the param-group option ``name``.

    The reference library keeps such options on ``self`` and forbids setting them after construction; here
    they live in every param group (so they vary per group and survive ``state_dict()``), and this attribute
    shows the default group's value. Setting it raises ``AttributeError`` naming where to change it.
    """

    def fget(self: torch.optim.Optimizer) -> Any:
        return self.defaults[name]

    def fset(self: torch.optim.Optimizer, value: Any) -> None:
        raise AttributeError(
            f"Cannot set `{name}` post-initialization: pass it to the constructor, or set "
            f"param_groups[i][{name!r}] for the groups it should change."
        )

    return property(fget, fset, doc=f"The constructor's ``{name}`` (read-only; per-group values: param_groups).")


def group_default(name: str) -> property:
    """An attribute for the param-group option ``name`` that the reference library keeps on ``self``.

    Reading gives the constructor's value; assigning sets it in the defaults and in *every* param group
    (what assigning the reference's attribute does), after validating each group with the new value.
    """

    def fget(self: Any) -> Any:
        return self.defaults[name]

    def fset(self: Any, value: Any) -> None:
        for group in self.param_groups:
            self._validate_group({**group, name: value})
        self.defaults[name] = value
        for group in self.param_groups:
            group[name] = value

    return property(fget, fset, doc=f"The ``{name}`` of every param group (assigning sets it in all of them).")


def _caller_stacklevel() -> int:
    """``stacklevel`` pointing a warning at the first frame outside torch and this package (the user's call)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith(("torch.", "emerging_optimizers.")) or module in ("torch", "emerging_optimizers")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _meta_like(p: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor of ``p``'s (global) shape and dtype: state specs without allocating (DTensor too)."""
    return torch.empty(p.shape, dtype=p.dtype, device="meta")


@torch.compiler.disable
def _grads_of(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The params' gradients, fetched outside a user's ``torch.compile(opt.step)``: traced as ``p.grad``,
    Dynamo would guard on each gradient object and recompile whenever ``zero_grad(set_to_none=True)`` frees
    them; handed over as plain inputs, they are guarded on shape and dtype only."""
    return [p.grad for p in params]


class EmergingOptimizer(torch.optim.Optimizer):
    """Base class: closures, grad checks, lazy state, validated ``load_state_dict``."""

    #: State keys a checkpoint may lack (filled with their initial values on load), e.g. the step counter
    #: of optimizers whose reference-library version keeps none.
    optional_state_keys: tuple[str, ...] = ()

    #: Updates matrices only (>= 2-D parameters): a whole model needs it inside ``MuonAdamW``.
    matrix_only: bool = False
    #: Usable as ``MuonAdamW``'s ``matrix_optimizer`` (the side that gets the hidden matrices).
    matrix_optimizer_ok: bool = False
    #: Steps DTensor parameters (FSDP2 ``fully_shard``, tensor parallel). Element-wise optimizers step the
    #: local shards; the orthogonalized family assembles whole matrices; the others refuse them.
    dtensor_support: bool = False

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, nonfinite: NonfiniteT = "skip") -> None:
        """``torch.optim.Optimizer(params, defaults)`` with the ``nonfinite`` policy (module doc) in the defaults."""
        super().__init__(params, {**defaults, "nonfinite": nonfinite})

    # ------------------------------------------------------------------ subclass interface
    def _init_param_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """Fresh state for ``p`` (must also work for a tensor on the ``meta`` device)."""
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update ``params`` (the params of ``group`` that have a gradient, state already created)."""
        raise NotImplementedError

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check a group's hyperparameters (``ValueError`` naming the bad one); the base accepts any."""

    def _validate_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Check one parameter of a group (e.g. its shape); the base accepts any."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its hyperparameters and parameters; on error nothing is added.

        torch's constructor adds every constructor group through here, so they are validated too.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("nonfinite", "skip")  # an optimizer whose defaults lack it (user subclasses)
        group.setdefault(NONFINITE_COUNT_KEY, 0)
        try:
            if group["nonfinite"] not in NONFINITE_POLICIES:
                raise ValueError(f"Invalid nonfinite: {group['nonfinite']!r}; use 'skip' (skip steps with NaN/Inf "
                                 "gradients), 'raise' (stop with an error) or 'off' (no check).")
            self._validate_group(group)
            for p in group["params"]:
                if is_dtensor(p):
                    self._check_dtensor_param(p)
                self._validate_param(p, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_dtensor_param(self, p: Any) -> None:
        name = type(self).__name__
        if not self.dtensor_support:
            raise ValueError(
                f"{name} does not support DTensor (FSDP2 fully_shard / tensor-parallel) parameters: got one of shape "
                f"{tuple(p.shape)} with placements {tuple(p.placements)}. Its update is not element-wise and it does "
                "not assemble sharded matrices. Train it with replicated parameters (DDP), or use an optimizer "
                "that supports DTensor: the element-wise ones (AdamW, Lion, ...), the orthogonalized family "
                "(Muon, NorMuon, ...) or MuonAdamW."
            )
        check_dtensor_placements(p, name)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults/state/param_groups, which would drop what subclasses keep on ``self``
        # (hooks, inner optimizers) from copy.deepcopy and pickle.
        return dict(self.__dict__)

    # ------------------------------------------------------------------ torch.optim interface
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nonfinite_skip():  # validates the gradients it reads (groups with a policy)
            return loss
        self._check_unread_grads()  # and the others: every gradient is valid before anything changes
        for group in self.param_groups:
            self._prepare_group(group, grads_checked=True)
            params = self._params_to_step(group)
            if params:
                self._step_group(group, params)
        return loss

    # ------------------------------------------------------------------ non-finite gradients
    @property
    def nonfinite_skipped(self) -> int:
        """Steps skipped so far because a gradient held NaN or Inf (``nonfinite="skip"``)."""
        return max((g.get(NONFINITE_COUNT_KEY, 0) for g in self.param_groups), default=0)

    def _nonfinite_group(self) -> Any:
        """The process group over which ranks agree to skip a step (None: the default group)."""
        return None

    def _nonfinite_skip(self) -> bool:
        """Apply the groups' ``nonfinite`` policies before anything changes; True: skip this step.

        The common path costs :func:`nonfinite_flag` over the checked gradients and one host sync (plus
        one all-reduce of a flag when torch.distributed runs); only a suspect step looks at each tensor, to
        confirm and to name the parameters.
        """
        if all(g["nonfinite"] == "off" for g in self.param_groups):
            return False
        checked = [(gi, i, p) for gi, group in enumerate(self.param_groups) if group["nonfinite"] != "off"
                   for i, p in enumerate(group["params"]) if p.grad is not None]
        self._check_grads([p for _, _, p in checked])
        suspect = nonfinite_flag([local(p.grad) for _, _, p in checked])
        if suspect.device.type == "meta":  # meta tensors hold no values to check
            return False
        bad = []
        if suspect.item():  # rare: confirm tensor by tensor (finite values whose squares overflow are fine)
            bad = [(gi, i, p, nonfinite_counts(local(p.grad))) for gi, i, p in checked]
            bad = [b for b in bad if any(b[3])]
        if not bad and not several_ranks(self._nonfinite_group()):  # the common case: nothing to agree on
            return False
        flag = all_ranks_agree(torch.tensor(float(bool(bad))), self._nonfinite_group())
        if not flag.item():
            return False
        described = ", ".join(self._describe_nonfinite(gi, i, p, counts) for gi, i, p, counts in bad[:8])
        if len(bad) > 8:
            described += f", and {len(bad) - 8} more"
        if not bad:
            described = "a parameter on another rank"
        name = type(self).__name__
        if any(self.param_groups[gi]["nonfinite"] == "raise" for gi, *_ in bad):
            raise NonFiniteGradientError(
                f"{name}.step: non-finite gradient in {described}; nothing was changed. Find the cause (a bad "
                "batch, an fp16 overflow: use torch.amp.GradScaler), or build the optimizer with "
                "nonfinite='skip' to skip such steps."
            )
        for group in self.param_groups:
            group[NONFINITE_COUNT_KEY] = group.get(NONFINITE_COUNT_KEY, 0) + 1
        count = self.nonfinite_skipped
        if count & (count - 1) == 0:  # warn at 1, 2, 4, 8, ... skips
            warnings.warn(
                f"{name}.step skipped (non-finite gradient in {described}); {count} step(s) skipped so far "
                "(optimizer.nonfinite_skipped). Parameters and optimizer state are unchanged. Pass "
                "nonfinite='raise' to stop instead, or 'off' to disable the check.",
                RuntimeWarning, stacklevel=_caller_stacklevel())
        return True

    def _describe_nonfinite(self, gi: int, i: int, p: torch.Tensor, counts: tuple[int, int, int]) -> str:
        names = self.param_groups[gi].get("param_names")
        label = repr(names[i]) if names and i < len(names) else f"param_groups[{gi}]['params'][{i}]"
        parts = [f"{n} {kind}" for n, kind in zip(counts, ("NaN", "+Inf", "-Inf")) if n]
        return f"{label} (shape {tuple(p.shape)}: {', '.join(parts)})"

    def _init_group(self, group: dict[str, Any], skip_non_grad_params: bool = True) -> None:
        """Check the gradients and create missing state for the group's params that have one.

        With ``skip_non_grad_params=False`` state is created for every param, gradient or not (frameworks call
        it so before loading a checkpoint). Returns None, as the reference library's.
        """
        self._prepare_group(group, skip_non_grad_params)

    @torch.compiler.disable
    def _check_unread_grads(self) -> None:
        """:meth:`_check_grad` for the gradients of the groups with ``nonfinite="off"`` (the non-finite check
        validates the others before reading them)."""
        for group in self.param_groups:
            if group["nonfinite"] == "off":
                self._check_grads([p for p in group["params"] if p.grad is not None])

    @torch.compiler.disable
    def _prepare_group(self, group: dict[str, Any], skip_non_grad_params: bool = True, *,
                       grads_checked: bool = False) -> None:
        # ``step`` calls this, not ``_init_group``: torch.compile replaces a call named ``_init_group`` by its own
        # handling, which assumes torch.optim's tensor ``step`` counters. Under torch.compile(opt.step) it runs
        # eagerly (``compiler.disable``), as torch runs ``_init_group``: state is created once, not traced.
        for p in group["params"]:
            if p.grad is not None:
                if not grads_checked:
                    self._check_grad(p)
            elif skip_non_grad_params:
                continue
            if not self.state[p]:
                self.state[p].update(self._init_param_state(p, group))

    @staticmethod
    def _params_to_step(group: dict[str, Any]) -> list[torch.Tensor]:
        """The group's params that have a gradient (a tensor with no elements has nothing to update)."""
        return [p for p in group["params"] if p.grad is not None and p.numel()]

    def _check_grads(self, params: list[torch.Tensor]) -> None:
        """:meth:`_check_grad` for many params: one cheap pass, then the full check (and its error) for those it
        flags (a step of a small model is ~1 ms: a method call per parameter would be a tenth of it)."""
        strided = torch.strided
        for p in [p for p in params if (g := p.grad).layout is not strided or g.shape != p.shape
                  or g.dtype.is_complex or p.dtype.is_complex]:
            self._check_grad(p)

    def _check_grad(self, p: torch.Tensor) -> None:
        grad = p.grad
        assert grad is not None
        if grad.layout is not torch.strided and grad.is_sparse:
            raise ValueError(
                f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                "use dense gradients, e.g. nn.Embedding(..., sparse=False)."
            )
        if grad.dtype.is_complex or p.dtype.is_complex:
            raise ValueError(
                f"{type(self).__name__} does not support complex parameters or gradients (parameter of shape "
                f"{tuple(p.shape)}, dtype {p.dtype}); optimize torch.view_as_real(p) instead."
            )
        if grad.shape != p.shape:
            raise ValueError(
                f"gradient of shape {tuple(grad.shape)} does not match its parameter of shape {tuple(p.shape)}."
            )

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking it fits this optimizer; on any mismatch raise and change nothing."""
        self._check_state_dict(state_dict)
        state_dict = self._complete_state_dict(state_dict)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # Re-cast from the saved tensors to the dtype this optimizer keeps its state in (see module doc).
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for p, pid in zip(params, saved_ids):
            if pid not in saved_state:
                continue
            spec = self._init_param_state(_meta_like(p), self._group_of(p))
            for key, value in saved_state[pid].items():
                ref = spec.get(key)
                if isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=ref.dtype, copy=True)

    def _complete_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of a checked state dict with what it may lack filled in.

        Group keys missing from a saved group (options this library keeps in the groups but the reference
        library keeps on ``self`` or lacks, ``initial_lr`` of a scheduler created after the save) take this
        optimizer's current values; missing :attr:`optional_state_keys` take their initial values.
        """
        groups = []
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            filled = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            filled.update(saved)
            groups.append(filled)
        state = dict(state_dict["state"])
        if self.optional_state_keys:
            for saved, group in zip(groups, self.param_groups):
                for pid, p in zip(saved["params"], group["params"]):
                    if state.get(pid) and not set(self.optional_state_keys) <= set(state[pid]):
                        spec = self._init_param_state(p.detach(), saved)
                        state[pid] = {**{k: spec[k] for k in self.optional_state_keys if k not in state[pid]},
                                      **state[pid]}
        return {**state_dict, "param_groups": groups, "state": state}

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    def _check_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"{name}.load_state_dict expects a dict with 'state' and 'param_groups'.")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(saved_groups)} param groups, "
                f"this optimizer has {len(self.param_groups)}; it was probably saved by a different optimizer or "
                "for other param groups."
            )
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            foreign = sorted(k for k in saved if k not in group and k not in _SCHEDULER_GROUP_KEYS and k != "params")
            if foreign:
                raise ValueError(
                    f"{name}.load_state_dict: param group {gi} of the state dict has {', '.join(foreign)}, which "
                    f"{name} does not use; it was probably saved by a different optimizer."
                )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} params in the state "
                    f"dict and {len(group['params'])} here."
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            for pid, p in zip(saved["params"], group["params"]):
                saved_state = state_dict["state"].get(pid)
                if not saved_state:
                    continue
                spec = self._init_param_state(_meta_like(p), merged)
                if set(saved_state) != set(spec) and set(saved_state) != set(spec) - set(self.optional_state_keys):
                    raise ValueError(
                        f"{name}.load_state_dict: state of param {pid} (shape {tuple(p.shape)}) has keys "
                        f"{sorted(saved_state)}, expected {sorted(spec)}; it was probably saved by a "
                        "different optimizer or with other options."
                    )
                for key, ref in spec.items():
                    if key not in saved_state:  # an optional key (checked above), filled on load
                        continue
                    value = saved_state[key]
                    if isinstance(ref, torch.Tensor) != isinstance(value, torch.Tensor):
                        raise ValueError(f"{name}.load_state_dict: state {key!r} of param {pid} has the wrong type.")
                    if isinstance(ref, torch.Tensor) and tuple(value.shape) != tuple(ref.shape):
                        raise ValueError(
                            f"{name}.load_state_dict: state {key!r} of param {pid} has shape {tuple(value.shape)}, "
                            f"expected {tuple(ref.shape)} for a parameter of shape {tuple(p.shape)}."
                        )
