"""torch.optim baselines for ``emopt compare`` and ``emopt sweep``: what users compare our optimizers against.

Two names, not in the package's registry (they are torch's optimizers, not ours), accepted wherever a
registered name is, with the same ``NAME:key=value,...`` overrides:

``torch_muon``
    The Muon recipe as people copy it, with torch's own optimizers: ``torch.optim.Muon`` on the hidden
    matrices with ``lr=0.04, momentum=0.95, nesterov=True, weight_decay=0.1, adjust_lr_fn="original"``, and
    ``torch.optim.AdamW`` on everything else (embeddings, head, norms, biases) with ``lr=4e-3`` (override key
    ``adamw_lr``), ``betas=(0.9, 0.95)``, ``weight_decay=0.0`` (:data:`TORCH_MUON_RECIPE`). The split is ours:
    the parameters ``MuonAdamW(model)`` (``muon_adamw``) puts on its matrix side go to ``torch.optim.Muon``, the
    rest to ``torch.optim.AdamW``, so the two hybrids train exactly the same parameters with Muon (a matrix
    that is not 2-D, such as a conv kernel, which ``torch.optim.Muon`` refuses, goes to AdamW). Keys: every
    argument of ``torch.optim.Muon`` (``lr``, ``momentum``, ``nesterov``, ``weight_decay``, ``adjust_lr_fn``,
    ``ns_steps``, ...) and every argument of ``torch.optim.AdamW`` with an ``adamw_`` prefix (``adamw_lr``,
    ``adamw_betas``, ``adamw_weight_decay``, ...). A task's ``hparams["torch_muon"]`` (a sweep's result) replaces
    the recipe's values.
``torch_adamw``
    ``torch.optim.AdamW`` on every parameter, torch's defaults (``fused=None``, ``weight_decay=0.01``), with the
    task's tuned lr of our ``adamw`` (see :meth:`emerging_optimizers.cli.tasks.Task.tuned`).

The two torch optimizers of ``torch_muon`` are one optimizer to the training loop: :class:`TorchMuonAdamW`,
whose ``param_groups`` are the inner optimizers' group dicts themselves (Muon's first), so the lr schedule that
``train_run`` writes into ``group["lr"]`` reaches both, and the lr column shows Muon's lr.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emerging_optimizers.cli.specs import OptimizerSpec, UsageError

__all__ = ["FAMILY", "BASELINES", "Baseline", "TorchMuonAdamW", "TORCH_MUON_RECIPE", "is_baseline", "valid_keys",
           "default_kwargs", "resolved_kwargs", "lr_keys", "build", "muon_split"]

#: The family column of the torch baselines (``emopt list``, ``emopt compare``).
FAMILY = "torch.optim"
_PREFIX = "adamw_"

#: ``torch_muon``'s values: the Muon recipe (Muon on hidden matrices, AdamW on the rest).
TORCH_MUON_RECIPE: dict[str, Any] = {
    "lr": 0.04, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1, "adjust_lr_fn": "original",
    "adamw_lr": 4e-3, "adamw_betas": (0.9, 0.95), "adamw_weight_decay": 0.0,
}


def _signature_defaults(cls: type) -> dict[str, Any]:
    """Constructor arguments of a torch optimizer (but ``params``) with their defaults."""
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _has_torch_muon() -> bool:
    return hasattr(torch.optim, "Muon")


class _MergedState(Mapping):
    """Read-only view of several optimizers' ``state`` (their parameters are disjoint)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, key: Any) -> Any:
        for o in self._optimizers:
            if key in o.state:
                return o.state[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        for o in self._optimizers:
            yield from o.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._optimizers)


class TorchMuonAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` and ``torch.optim.AdamW`` as one optimizer.

    ``param_groups`` is the concatenation of the inner optimizers' group lists (Muon's groups first): the same
    dict objects, so writing ``group["lr"]`` (an lr schedule) changes the inner optimizer's lr. ``step()`` steps
    both, ``zero_grad()`` clears both, ``state`` is a merged read-only view of both states, ``state_dict()`` /
    ``load_state_dict()`` hold ``{"muon": ..., "adamw": ...}``. Either side may be ``None`` when it has no
    parameters.
    """

    def __init__(self, muon: torch.optim.Optimizer | None, adamw: torch.optim.Optimizer | None) -> None:
        self.muon, self.adamw = muon, adamw
        self.optimizers = [o for o in (muon, adamw) if o is not None]
        if not self.optimizers:
            raise ValueError("TorchMuonAdamW needs at least one inner optimizer")
        groups = [g for o in self.optimizers for g in o.param_groups]
        # add_param_group keeps each dict (it only re-lists its "params", with the same tensors)
        super().__init__(groups, {})
        assert all(a is b for a, b in zip(self.param_groups, groups)) and len(self.param_groups) == len(groups)
        self.state = _MergedState(self.optimizers)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict() if self.muon is not None else None,
                "adamw": self.adamw.state_dict() if self.adamw is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for key, o in (("muon", self.muon), ("adamw", self.adamw)):
            if o is not None:
                o.load_state_dict(state_dict[key])


def muon_split(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """``(matrix, rest)``: the named parameters ``MuonAdamW(model)`` puts on its matrix side, and the others,
    in ``model.named_parameters()`` order. ``MuonAdamW`` is built only to read its routing, then discarded."""
    from emerging_optimizers.orthogonalized_optimizers.muon_adamw import MuonAdamW

    probe = MuonAdamW(model)
    matrix_ids = {id(p) for g in probe.param_groups if g["side"] == "matrix" for p in g["params"]}
    del probe
    named = list(model.named_parameters())
    return [(n, p) for n, p in named if id(p) in matrix_ids], [(n, p) for n, p in named if id(p) not in matrix_ids]


# ---------------------------------------------------------------------------------------------- the baselines
@dataclass(frozen=True)
class Baseline:
    name: str
    summary: str
    scope: str  # "whole model" / "any" (the params column of `emopt list`)
    #: every accepted override key -> its default (torch's defaults, then the recipe's)
    defaults: Callable[[], dict[str, Any]]
    #: the learning-rate keys, main one first (``emopt sweep`` scales all of them)
    lr_keys: tuple[str, ...]
    build: Callable[[nn.Module, dict[str, Any]], torch.optim.Optimizer]
    #: shown where the task has no tuned value: where the values come from
    untuned_note: str


def _torch_muon_defaults() -> dict[str, Any]:
    if not _has_torch_muon():
        return dict(TORCH_MUON_RECIPE)
    muon = _signature_defaults(torch.optim.Muon)
    adamw = {_PREFIX + k: v for k, v in _signature_defaults(torch.optim.AdamW).items()}
    return {**muon, **adamw, **TORCH_MUON_RECIPE}


def _build_torch_muon(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    if not _has_torch_muon():
        raise UsageError(f"torch_muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}.")
    matrix, rest = muon_split(model)
    not_2d = [(n, p) for n, p in matrix if p.ndim != 2]  # torch.optim.Muon takes 2-D matrices only
    matrix = [(n, p) for n, p in matrix if p.ndim == 2]
    rest_ids = {id(p) for _, p in rest + not_2d}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) in rest_ids]
    muon_kw = {k: v for k, v in kwargs.items() if not k.startswith(_PREFIX)}
    adamw_kw = {k[len(_PREFIX):]: v for k, v in kwargs.items() if k.startswith(_PREFIX)}
    muon = torch.optim.Muon([p for _, p in matrix], **muon_kw) if matrix else None
    adamw = torch.optim.AdamW([p for _, p in rest], **adamw_kw) if rest else None
    return TorchMuonAdamW(muon, adamw)


def _build_torch_adamw(model: nn.Module, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for _, p in model.named_parameters()], **kwargs)


BASELINES: dict[str, Baseline] = {
    "torch_muon": Baseline(
        name="torch_muon",
        summary="torch.optim.Muon on the hidden matrices (muon_adamw's split) + torch.optim.AdamW on the rest, "
                "the Muon recipe",
        scope="whole model",
        defaults=_torch_muon_defaults,
        lr_keys=("lr", "adamw_lr"),
        build=_build_torch_muon,
        untuned_note="the Muon recipe's values",
    ),
    "torch_adamw": Baseline(
        name="torch_adamw",
        summary="torch.optim.AdamW on every parameter, torch's defaults, lr = the task's tuned adamw lr",
        scope="any",
        defaults=lambda: _signature_defaults(torch.optim.AdamW),
        lr_keys=("lr",),
        build=_build_torch_adamw,
        untuned_note="torch's defaults",
    ),
}


def is_baseline(name: str) -> bool:
    return name in BASELINES


def valid_keys(name: str) -> list[str]:
    return list(BASELINES[name].defaults())


def default_kwargs(name: str) -> dict[str, Any]:
    return BASELINES[name].defaults()


def lr_keys(name: str) -> tuple[str, ...]:
    return BASELINES[name].lr_keys


def resolved_kwargs(spec: OptimizerSpec, tuned: dict[str, Any]) -> dict[str, Any]:
    """The values ``spec`` trains with: defaults (torch's, then the recipe's), the task's ``tuned`` values, the
    user's overrides."""
    defaults = default_kwargs(spec.name)
    tuned = {k: v for k, v in tuned.items() if k in defaults}
    return {**defaults, **tuned, **spec.overrides}


def build(spec: OptimizerSpec, model: nn.Module, tuned: dict[str, Any]) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Build baseline ``spec`` for ``model``; returns the optimizer and the values it was built with."""
    kwargs = resolved_kwargs(spec, tuned)
    try:
        opt = BASELINES[spec.name].build(model, kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Cannot build optimizer {spec.label!r} ({spec.name} with {kwargs}): {exc}") from exc
    return opt, kwargs
