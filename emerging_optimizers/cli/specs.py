"""Optimizer specs on the command line (``name[:key=value,...]``) and building optimizers from the registry.

Grammar: ``muon:lr=0.04,momentum=0.9`` or ``adamw:betas=(0.9,0.95)``. Values are Python literals
(``0.04``, ``(0.9, 0.95)``, ``None``), ``true``/``false``/``none`` in any case, or else a bare string
(``weight_decay_method=decoupled``). Commas inside brackets do not split. A token without ``:`` may list
several names separated by commas (``adamw,lion``).

An optimizer that only handles matrices (``matrix_only``: ``muon``, ``scion``, ..., the manifold optimizers)
runs inside the whole-model optimizer ``muon_adamw`` as its ``matrix_optimizer`` when it trains a model: the
name is always wrapped, never rejected (unless ``muon_adamw`` itself is missing from the installation).

Every registered name is either runnable by ``emopt compare`` or refused before anything trains, with the
reason (:func:`build_optimizer`): a constructor argument without a default that neither the task nor the user
gives is refused as ``name needs <arg>``. ``muon_hyperball`` (weights kept on a sphere, which it checks when it
is built) gets one param group per parameter whose ``hyperball_radius`` is that parameter's initial norm, so it
trains the model as initialised; with ``muon_hyperball:hyperball_radius=R`` the hidden matrices are projected
onto the sphere of radius ``R`` first (:func:`param_groups_for`).

Modules of the package that fail to import are recorded, never skipped silently: :func:`import_errors`
(``emopt list`` prints them and exits with status 1).

Besides the registered names, the torch.optim baselines of :mod:`emerging_optimizers.cli.baselines`
(``torch_muon``, ``torch_adamw``) are accepted everywhere a name is, with the same override grammar; their family
is ``torch.optim`` (:func:`family_of_name`).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import emerging_optimizers
from emerging_optimizers import registry

__all__ = ["UsageError", "OptimizerSpec", "parse_specs", "load_registry", "import_errors", "family_of",
           "family_of_module", "family_of_name", "is_baseline", "is_whole_model", "resolve", "default_kwargs",
           "required_kwargs", "param_groups_for", "build_optimizer", "WHOLE_MODEL"]

#: The registered optimizer that takes a whole model: orthogonalized updates for hidden matrices, AdamW for
#: the rest; other orthogonalized optimizers run inside it as ``matrix_optimizer``.
WHOLE_MODEL = "muon_adamw"


class UsageError(ValueError):
    """Bad command-line input (unknown name, malformed override, bad value); the message says the fix."""


#: Modules of the package that failed to import in the last :func:`load_registry`: name -> error text.
_IMPORT_ERRORS: dict[str, str] = {}


def _error_text(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"


def load_registry() -> list[str]:
    """Import every module of the package (registering its optimizers) and return the registered names.

    ``import emerging_optimizers`` should register everything; walking the modules as well makes a module that
    a subpackage's ``__init__`` does not (yet) import still appear. ``cli`` itself is skipped. A module that
    fails to import (a missing optional dependency such as triton, or a bug) is not skipped silently: its name
    and error are kept for :func:`import_errors`, which ``emopt list`` prints (and ``emopt compare`` names when
    an optimizer is unknown).
    """
    root = emerging_optimizers.__name__
    _IMPORT_ERRORS.clear()

    def onerror(name: str) -> None:  # a package that pkgutil itself failed to import while walking
        _IMPORT_ERRORS.setdefault(name, _error_text(sys.exc_info()[1]))

    for info in pkgutil.walk_packages(emerging_optimizers.__path__, prefix=root + ".", onerror=onerror):
        if info.name == f"{root}.cli" or info.name.startswith(f"{root}.cli.") or info.name == f"{root}.__main__":
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # recorded and reported, never dropped: see import_errors()
            _IMPORT_ERRORS[info.name] = _error_text(exc)
    return registry.get_optimizer_name_list()


def import_errors() -> dict[str, str]:
    """Modules of the package that failed to import during the last :func:`load_registry` (module -> error).

    Their optimizers are missing from the registry; ``emopt list`` shows each with its family and error.
    """
    return dict(_IMPORT_ERRORS)


def family_of_module(module: str) -> str:
    """``emerging_optimizers.scalar_optimizers.adam`` -> ``scalar``, ``emerging_optimizers.contrib.muown`` ->
    ``contrib`` (the family of the optimizers a module registers)."""
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 and parts[0] == emerging_optimizers.__name__ else parts[0]
    return sub.removesuffix("_optimizers")


def family_of(cls: type) -> str:
    """``scalar_optimizers`` -> ``scalar``, ``orthogonalized_optimizers`` -> ``orthogonalized``, ``compat`` ..."""
    return family_of_module(cls.__module__)


def _baselines() -> Any:
    from emerging_optimizers.cli import baselines  # imports this module: not at the top

    return baselines


def is_baseline(name: str) -> bool:
    """``name`` is a torch.optim baseline (``torch_muon``, ``torch_adamw``), not a registered optimizer."""
    return _baselines().is_baseline(name)


def family_of_name(name: str) -> str:
    """The family of a registered name (:func:`family_of`), or ``torch.optim`` for a baseline."""
    if is_baseline(name):
        return _baselines().FAMILY
    return family_of(registry.get_optimizer_cls(name))


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


def required_kwargs(cls: type) -> list[str]:
    """Constructor arguments of ``cls`` (other than ``params``) that have no default."""
    names = registry.valid_kwargs(cls)
    seen: set[str] = set()
    required: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in names and p.name not in seen:
                seen.add(p.name)
                if p.default is p.empty:
                    required.append(p.name)
    return required


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of a comparison: ``label`` as typed, registry ``name`` and user ``overrides``."""

    label: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


#: dtype names an override may give (``adamw:state_dtype=bfloat16``), with or without ``torch.``
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def _parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    if low.removeprefix("torch.") in _DTYPES:
        return _DTYPES[low.removeprefix("torch.")]
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
    if name not in valid and not is_baseline(name):
        failed = import_errors()
        note = ""
        if failed:
            note = (f" {len(failed)} module(s) of the package failed to import, so their optimizers are missing: "
                    + "; ".join(f"{m} ({family_of_module(m)}): {e}" for m, e in failed.items()) + ".")
        raise UsageError(f"Unknown optimizer {name!r}; registered optimizers: {', '.join(valid)}; torch.optim "
                         f"baselines: {', '.join(_baselines().BASELINES)}. "
                         f"Run `emopt list` for their families and defaults.{note}")


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
    """The registry name to build for ``name`` and its fixed kwargs (``matrix_optimizer`` when wrapped); a
    torch.optim baseline is built as itself."""
    if is_baseline(name):
        return name, {}
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
    if is_baseline(name):
        return _baselines().valid_keys(name)
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
    ``matrix_kwargs``. For a torch.optim baseline: its own name and every value it trains with."""
    if is_baseline(spec.name):
        return spec.name, _baselines().resolved_kwargs(spec, tuned)
    built, fixed = resolve(spec.name)
    merged = {**tuned, **spec.overrides}
    _, matrix_keys = _direct_and_matrix_keys(spec.name)
    matrix = {k: merged.pop(k) for k in matrix_keys if k in merged}
    if matrix:
        merged["matrix_kwargs"] = {**merged.get("matrix_kwargs", {}), **matrix}
    return built, {**merged, **fixed}


#: Placeholder ``hyperball_radius`` for building ``muon_hyperball``; every param group sets its own.
_HYPERBALL_PLACEHOLDER = 1.0


def param_groups_for(name: str, model: nn.Module, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ``params`` argument for training ``model`` with optimizer ``name``, and the constructor kwargs.

    ``model.named_parameters()`` and ``kwargs`` unchanged, except for ``muon_hyperball``: it keeps every matrix
    on the sphere ``|W|_F = hyperball_radius`` and refuses weights that are not on it when it is built. Without
    a ``hyperball_radius``, each parameter gets its own group whose radius is its initial norm (the model is
    trained as initialised; each weight keeps its norm). With ``hyperball_radius=R`` (an override), the hidden
    matrices (``muon_adamw``'s routing) are projected onto radius ``R`` first.
    """
    if name != "muon_hyperball":
        return model.named_parameters(), kwargs
    matrix = dict(kwargs.get("matrix_kwargs") or {})
    if "hyperball_radius" in matrix:
        from emerging_optimizers.orthogonalized_optimizers.muon_adamw import default_route

        radius = matrix["hyperball_radius"]
        if isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0:
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if default_route(pname, p) == "matrix" and float(p.norm()) > 0:
                        p.mul_(radius / p.norm())
        return model.named_parameters(), kwargs  # a bad radius is refused by the constructor
    groups = [{"params": [(pname, p)], "hyperball_radius": float(torch.linalg.vector_norm(p.detach().double()))}
              for pname, p in model.named_parameters()]
    return groups, {**kwargs, "matrix_kwargs": {**matrix, "hyperball_radius": _HYPERBALL_PLACEHOLDER}}


def _check_required(spec: OptimizerSpec, built: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``spec`` now when a constructor argument without a default is not given (``name needs <arg>``)."""
    built_cls = registry.get_optimizer_cls(built)
    missing = [k for k in required_kwargs(built_cls) if k not in kwargs]
    if built != spec.name:  # a matrix optimizer inside the whole-model one: its own arguments go to matrix_kwargs
        provided = set(kwargs) | set(kwargs.get("matrix_kwargs") or {}) | set(registry.valid_kwargs(built_cls))
        missing += [k for k in required_kwargs(registry.get_optimizer_cls(spec.name)) if k not in provided]
    if missing:
        example = ",".join(f"{k}=VALUE" for k in missing)
        raise UsageError(f"{spec.label!r} cannot be run as given: {spec.name} needs {', '.join(missing)} (no "
                         f"default, and this task has no tuned value); give it, e.g. {spec.name}:{example}.")


def build_optimizer(spec: OptimizerSpec, model: nn.Module,
                    tuned: dict[str, Any]) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """Build ``spec`` for ``model`` from ``model.named_parameters()``; ``tuned`` are the task's defaults.

    Returns the optimizer and the kwargs given to its constructor (for ``muon_hyperball`` with per-parameter
    radii, ``hyperball_radius`` reads ``"initial norm of each parameter"``). A missing required argument and
    constructor errors become :class:`UsageError` naming the spec (``emopt compare`` builds every optimizer
    before training, so these fail at once).
    """
    if is_baseline(spec.name):
        return _baselines().build(spec, model, tuned)
    built, kwargs = constructor_kwargs(spec, tuned)
    params, kwargs = param_groups_for(spec.name, model, kwargs)
    _check_required(spec, built, kwargs)
    cls = registry.get_optimizer_cls(built)
    try:
        opt = cls(params, **kwargs)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Cannot build optimizer {spec.label!r} ({cls.__name__} with {kwargs}): {exc}") from exc
    if isinstance(params, list) and spec.name == "muon_hyperball":
        kwargs = {**kwargs, "matrix_kwargs": {**kwargs["matrix_kwargs"],
                                              "hyperball_radius": "initial norm of each parameter"}}
    return opt, kwargs
