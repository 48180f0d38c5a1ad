"""Name -> optimizer class registry, and building an optimizer class with configured defaults.

Every optimizer of the package is registered when ``import emerging_optimizers`` runs::

    from emerging_optimizers import registry
    registry.get_optimizer_name_list()            # ['adam', 'ademamix', 'lion', 'muon', ...]
    Lion = registry.get_optimizer_cls("lion")
    MyLion = registry.get_configured_optimizer_cls("lion", lr=3e-4, weight_decay=0.1)
    opt = MyLion(model.parameters())
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["register_optimizer", "get_optimizer_cls", "get_optimizer_name_list", "get_configured_optimizer_cls",
           "valid_kwargs"]

_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {}
OptT = TypeVar("OptT", bound=type)


def register_optimizer(name: str) -> Callable[[OptT], OptT]:
    """Class decorator registering an optimizer under ``name`` (lower case, unique)."""
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"Invalid optimizer name {name!r}: use a non-empty lower-case string.")

    def decorator(cls: OptT) -> OptT:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"Optimizer name {name!r} is already registered to {_REGISTRY[name].__qualname__}.")
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return decorator


def get_optimizer_name_list() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def get_optimizer_cls(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown optimizer {name!r}; registered optimizers: {', '.join(get_optimizer_name_list())}."
        ) from None


def valid_kwargs(cls: type) -> list[str]:
    """Names of the constructor arguments of ``cls`` other than ``params`` (follows ``**kwargs`` to the base)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        has_var_kw = False
        for p in params.values():
            if p.kind is p.VAR_KEYWORD:
                has_var_kw = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in ("self", "params") and p.name not in names:
                names.append(p.name)
        if not has_var_kw or klass is torch.optim.Optimizer:
            break
    return names


def get_configured_optimizer_cls(name: str, **kwargs: Any) -> type[torch.optim.Optimizer]:
    """A subclass of the registered class whose constructor has ``kwargs`` bound as defaults.

    Unknown keyword arguments raise ``TypeError`` listing the valid ones, at configuration time
    rather than when the optimizer is first built.
    """
    cls = get_optimizer_cls(name)
    valid = valid_kwargs(cls)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"{cls.__name__} ({name!r}) got unexpected argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(valid)}."
        )
    bound = dict(kwargs)

    def __init__(self: Any, params: Any, **more: Any) -> None:
        cls.__init__(self, params, **{**bound, **more})

    return type(f"Configured{cls.__name__}", (cls,), {"__init__": __init__, "__doc__": cls.__doc__,
                                                        "configured_kwargs": bound})
