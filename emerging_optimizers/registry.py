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
           "valid_kwargs", "validate_optimizer_args"]

_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {}
OptT = TypeVar("OptT", bound=type)


def register_optimizer(name: str) -> Callable[[OptT], OptT]:
    """Class decorator registering an optimizer under ``name``.

    Names are case-insensitive (stored lower case). Registering a name twice raises ``ValueError``, whatever
    the class (as in the reference library): pick another name for a variant of a registered optimizer.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Invalid optimizer name {name!r}: use a non-empty string.")
    key = name.lower()

    def decorator(cls: OptT) -> OptT:
        if key in _REGISTRY:
            raise ValueError(
                f"Optimizer {name} already registered (to {_REGISTRY[key].__module__}.{_REGISTRY[key].__qualname__}); "
                "register the new class under another name."
            )
        _REGISTRY[key] = cls  # type: ignore[assignment]
        return cls

    return decorator


def get_optimizer_name_list() -> list[str]:
    """All registered names, sorted."""
    return sorted(_REGISTRY)


def get_optimizer_cls(name: str) -> type[torch.optim.Optimizer]:
    """The class registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    cls = _REGISTRY.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"Unknown optimizer {name!r}: not found in the registry; registered optimizers: "
            f"{', '.join(get_optimizer_name_list())}."
        )
    return cls


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


def validate_optimizer_args(opt_cls: type, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` if ``kwargs`` holds an argument ``opt_cls``'s constructor does not take.

    ``params`` is ignored. Constructors that forward ``**kwargs`` to a base class are followed to it
    (:func:`valid_kwargs`), so a subclass with a ``*args, **kwargs`` signature is checked against what it
    really accepts.
    """
    valid = valid_kwargs(opt_cls)
    unknown = sorted(set(kwargs) - set(valid) - {"params"})
    if unknown:
        raise TypeError(
            f"Optimizer '{opt_cls.__name__}' does not accept arguments: {', '.join(unknown)}; "
            f"valid arguments: {', '.join(valid)}."
        )


def get_configured_optimizer_cls(name: str, **kwargs: Any) -> type[torch.optim.Optimizer]:
    """A subclass of the registered class whose constructor has ``kwargs`` bound as defaults.

    Unknown keyword arguments raise ``TypeError`` listing the valid ones (:func:`validate_optimizer_args`),
    at configuration time rather than when the optimizer is first built.
    """
    cls = get_optimizer_cls(name)
    validate_optimizer_args(cls, kwargs)
    bound = dict(kwargs)

    def __init__(self: Any, params: Any, **more: Any) -> None:
        cls.__init__(self, params, **{**bound, **more})

    return type(f"Configured{cls.__name__}", (cls,), {"__init__": __init__, "__doc__": cls.__doc__,
                                                        "configured_kwargs": bound})
