"""Optimizer specs on the command line (``name[:key=value,...]``) and building optimizers from the registry.

Grammar: ``muon:lr=0.04,momentum=0.9`` or ``adamw:betas=(0.9,0.95)``. Values are Python literals
(``0.04``, ``(0.9, 0.95)``, ``None``), ``true``/``false``/``none`` in any case, or else a bare string
(``weight_decay_method=decoupled``). Commas inside brackets do not split. A token without ``:`` may list
several names separated by commas (``adamw,lion``).

An optimizer that only handles matrices (``matrix_only``: ``muon``, ``scion``, ..., the manifold optimizers)
runs inside the whole-model optimizer ``muon_adamw`` as its ``matrix_optimizer`` when it trains a model.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import emerging_optimizers
from emerging_optimizers import registry

__all__ = ["UsageError", "OptimizerSpec", "parse_specs", "load_registry", "family_of", "is_whole_model", "resolve",
           "default_kwargs", "build_optimizer", "WHOLE_MODEL"]

#: The registered optimizer that takes a whole model: orthogonalized updates for hidden matrices, AdamW for
#: the rest; other orthogonalized optimizers run inside it as ``matrix_optimizer``.
WHOLE_MODEL = "muon_adamw"


class UsageError(ValueError):
    """Bad command-line input (unknown name, malformed override, bad value); the message says the fix."""


def load_registry() -> list[str]:
    """Import every module of the package (registering its optimizers) and return the registered names.

    ``import emerging_optimizers`` should register everything; walking the modules as well makes a module that
    a subpackage's ``__init__`` does not (yet) import still appear. ``cli`` itself is skipped.
    """
    root = emerging_optimizers.__name__
    for info in pkgutil.walk_packages(emerging_optimizers.__path__, prefix=root + ".",
                                      onerror=lambda name: None):
        if info.name == f"{root}.cli" or info.name.startswith(f"{root}.cli.") or info.name == f"{root}.__main__":
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # a module needing an optional dependency (e.g. triton) that is not installed
            continue
    return registry.get_optimizer_name_list()


def family_of(cls: type) -> str:
    """``scalar_optimizers`` -> ``scalar``, ``orthogonalized_optimizers`` -> ``orthogonalized``, ``compat`` ..."""
    parts = cls.__module__.split(".")
    sub = parts[1] if len(parts) > 1 and parts[0] == emerging_optimizers.__name__ else parts[0]
    return sub.removesuffix("_optimizers")


def is_whole_model(name: str) -> bool:
    cls = registry.get_optimizer_cls(name)
    return name == WHOLE_MODEL or "matrix_optimizer" in registry.valid_kwargs(cls)


def default_kwargs(cls: type) -> dict[str, Any]:
    """Constructor defaults of ``cls`` (following ``**kwargs`` to base classes, as ``registry.valid_kwargs``)."""
    out: dict[str, Any] = {}
    names = registry.valid_kwargs(cls)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in names and p.name not in out:
                out[p.name] = p.default if p.default is not p.empty else "<required>"
    return {n: out[n] for n in names if n in out}


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of a comparison: ``label`` as typed, registry ``name`` and user ``overrides``."""

    label: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _check_name(name: str, valid: list[str]) -> None:
    if name not in valid:
        raise UsageError(f"Unknown optimizer {name!r}; registered optimizers: {', '.join(valid)}. "
                         "Run `emopt list` for their families and defaults.")


def parse_specs(tokens: list[str]) -> list[OptimizerSpec]:
    """Parse ``--optimizers`` tokens; unknown names and malformed overrides raise ``ValueError`` at once."""
    valid = load_registry()
    specs: list[OptimizerSpec] = []
    for token in tokens:
        token = token.strip()
        if ":" not in token:
            for name in filter(None, (s.strip() for s in token.split(","))):
                _check_name(name, valid)
                specs.append(OptimizerSpec(name, name))
            continue
        name, _, rest = token.partition(":")
        name = name.strip()
        _check_name(name, valid)
        overrides: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in _split_top_level(rest))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key.isidentifier() or not value.strip():
                raise UsageError(f"Bad override {item!r} in {token!r}: write key=value, e.g. {name}:lr=0.01 "
                                 f"(valid keys for {name}: {', '.join(_valid_keys(name))}).")
            overrides[key] = _parse_value(value)
        _check_keys(name, overrides, token)
        specs.append(OptimizerSpec(token, name, overrides))
    if not specs:
        raise UsageError(f"No optimizer given; registered optimizers: {', '.join(valid)}.")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UsageError(f"Optimizer(s) listed twice: {', '.join(dup)}; give each once (or with different overrides).")
    return specs


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """The registry name to build for ``name`` and its fixed kwargs (``matrix_optimizer`` when wrapped)."""
    cls = registry.get_optimizer_cls(name)
    if not getattr(cls, "matrix_only", False) or is_whole_model(name):
        return name, {}
    names = registry.get_optimizer_name_list()
    if WHOLE_MODEL not in names or not is_whole_model(WHOLE_MODEL) \
            or "matrix_optimizer" not in registry.valid_kwargs(registry.get_optimizer_cls(WHOLE_MODEL)):
        raise UsageError(f"{name!r} updates matrices only, and training a whole model with it needs the "
                         f"whole-model optimizer {WHOLE_MODEL!r} with a `matrix_optimizer` argument, which is not "
                         "available in this installation; pick a scalar or whole-model optimizer "
                         f"({', '.join(n for n in names if n != name)}).")
    return WHOLE_MODEL, {"matrix_optimizer": name}


def _direct_and_matrix_keys(name: str) -> tuple[list[str], list[str]]:
    """Override keys accepted for ``name``: those of the class built, and (when ``name`` runs inside the
    whole-model optimizer) the matrix optimizer's own ones, which go into its ``matrix_kwargs``."""
    built, fixed = resolve(name)
    direct = [k for k in registry.valid_kwargs(registry.get_optimizer_cls(built)) if k not in fixed]
    if built == name:
        return direct, []
    return direct, [k for k in registry.valid_kwargs(registry.get_optimizer_cls(name)) if k not in direct]


def _valid_keys(name: str) -> list[str]:
    direct, matrix = _direct_and_matrix_keys(name)
    return direct + matrix


def _check_keys(name: str, overrides: dict[str, Any], token: str) -> None:
    valid = _valid_keys(name)
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise UsageError(f"Bad override {', '.join(bad)} in {token!r}: not an argument of {name!r}; "
                         f"valid keys: {', '.join(valid)}.")


def constructor_kwargs(spec: OptimizerSpec, tuned: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name to build for ``spec`` and its keyword arguments: the task's ``tuned`` values, then the
    user's overrides; for a matrix optimizer run inside the whole-model one, its own options go into
    ``matrix_kwargs``."""
    built, fixed = resolve(spec.name)
    merged = {**tuned, **spec.overrides}
    _, matrix_keys = _direct_and_matrix_keys(spec.name)
    matrix = {k: merged.pop(k) for k in matrix_keys if k in merged}
    if matrix:
        merged["matrix_kwargs"] = {**merged.get("matrix_kwargs", {}), **matrix}
    return built, {**merged, **fixed}


def build_optimizer(spec: OptimizerSpec, model: nn.Module,
                    tuned: dict[str, Any]) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Build ``spec`` for ``model`` from ``model.named_parameters()``; ``tuned`` are the task's defaults.

    Returns the optimizer and the kwargs given to its constructor. Constructor errors become ``ValueError``
    naming the spec.
    """
    built, kwargs = constructor_kwargs(spec, tuned)
    cls = registry.get_optimizer_cls(built)
    try:
        opt = cls(model.named_parameters(), **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Cannot build optimizer {spec.label!r} ({cls.__name__} with {kwargs}): {exc}") from exc
    return opt, kwargs
