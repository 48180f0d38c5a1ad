"""Hypothesis strategies and per-optimizer specs for tests/test_properties.py.

Every registered optimizer gets a :class:`Spec`: how to build it (the base row of ``contract_cases.CASES``, i.e.
the row whose id is the registry name; a row is added here for registered names the table lacks), and which
hyperparameters its constructor takes, each with a kind (``lr``, ``beta``, ``betas``, ``eps``, ``wd``) that
says what is valid (drawn by :func:`valid_hparams`) and what is not (:data:`INVALID`).
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from contract_cases import CASES
from hypothesis import strategies as st

from emerging_optimizers import registry

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
MAX_DIM = 16  # every dimension of a generated tensor is <= MAX_DIM

# ------------------------------------------------------------------------------------------------ specs
#: Constructor argument name -> kind. Kinds: "lr" (finite >= 0), "beta" (in [0, 1)), "beta_closed" (in [0, 1]),
#: "betas" (tuple of "beta", length from the default), "eps" (drawn in [1e-12, 1e-3]; < 0 invalid), "wd"
#: (finite >= 0; drawn <= 1).
HPARAM_KINDS: dict[str, str] = {
    "lr": "lr", "learning_rate": "lr", "adamw_lr": "lr",
    "betas": "betas", "adamw_betas": "betas",
    "momentum": "beta", "shampoo_beta": "beta", "rms_beta": "beta", "beta2": "beta",
    "eps": "eps", "adamw_eps": "eps", "adam_eps": "eps",
    "weight_decay": "wd", "adamw_weight_decay": "wd", "wd": "wd", "wd_lh": "wd",
}

#: (optimizer, argument) -> kind, where an optimizer documents another range than the argument's usual one.
KIND_OVERRIDES: dict[tuple[str, str], str] = {
    ("shampoo", "shampoo_beta"): "beta_closed",  # [0, 1]: 1.0 accumulates (AdaGrad-style Shampoo)
    # weight decay must not scale the weights by <= 0 (the sphere projection of 0 is undefined): with lr <= 1,
    # weight_decay < 1 keeps every method's factor > 0; weight_decay = 1 is refused (tested as invalid there)
    ("muon_hyperball", "weight_decay"): "wd_open",
}

#: Constructor arguments the registry's base rows lack (a required argument, or a cheaper default for
#: a tiny problem: nothing here changes what the properties check).
EXTRA_ROWS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "muon_hyperball": lambda params, **o: registry.get_optimizer_cls("muon_hyperball")(
        params, **{"hyperball_radius": 1.0, **o}),
}


def _onto_unit_sphere(p: torch.Tensor) -> None:
    """MuonHyperball's precondition for ``hyperball_radius=1``: Frobenius norm 1 (a zero tensor stays zero)."""
    norm = float(torch.linalg.vector_norm(p.detach().double()))
    if norm > 0:
        with torch.no_grad():
            p.copy_((p.double() / norm).to(p.dtype))


PREPARE: dict[str, Callable[[torch.Tensor], None]] = {"muon_hyperball": _onto_unit_sphere}


@dataclass(frozen=True)
class Spec:
    name: str
    cls: type
    build: Callable[..., torch.optim.Optimizer]  # build(params, **hparams)
    matrix_only: bool
    hparams: dict[str, Any] = field(default_factory=dict)  # arg name -> default value (those in HPARAM_KINDS)
    #: Categorical options (weight_decay_method, scale_mode, nesterov) -> their choices, from the type hints.
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: Brings a fresh parameter into the optimizer's domain in place (e.g. onto MuonHyperball's sphere).
    prepare: Callable[[torch.Tensor], None] | None = None

    def kind(self, arg: str) -> str:
        return KIND_OVERRIDES.get((self.name, arg), HPARAM_KINDS[arg])


def _hparams_of(cls: type) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items() if n in HPARAM_KINDS}


#: Categorical constructor options drawn alongside the numeric ones (choices from the ``Literal`` hints).
CHOICE_ARGS = ("weight_decay_method", "scale_mode", "nesterov")


def _choices_of(cls: type) -> dict[str, tuple[Any, ...]]:
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable hints: draw no categorical options
        return {}
    out: dict[str, tuple[Any, ...]] = {}
    for arg in CHOICE_ARGS:
        if arg in hints:
            out[arg] = (False, True) if hints[arg] is bool else typing.get_args(hints[arg])
    return {k: v for k, v in out.items() if v}


def _spec(name: str) -> Spec:
    cls = registry.get_optimizer_cls(name)
    rows = [c for c in CASES if c.id == name]
    if name in EXTRA_ROWS:  # this file's own way to build it (e.g. MuonHyperball on unit spheres)
        build = EXTRA_ROWS[name]
    elif rows:
        build = rows[0].build
    else:  # a newly registered optimizer without a contract row: its defaults
        build = lambda params, cls=cls, **o: cls(params, **o)  # noqa: E731
    return Spec(name, cls, build, bool(getattr(cls, "matrix_only", False)), _hparams_of(cls), _choices_of(cls),
                PREPARE.get(name))


NAMES: list[str] = registry.get_optimizer_name_list()
SPECS: dict[str, Spec] = {n: _spec(n) for n in NAMES}

# ------------------------------------------------------------------------------------------------ hyperparameters
lrs = st.one_of(st.floats(1e-4, 1.0), st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 1.0]))
betas_1 = st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 0.999]))
epss = st.one_of(st.floats(1e-12, 1e-3), st.sampled_from([1e-12, 1e-8, 1e-6, 1e-3]))
wds = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-2, 0.1, 1.0]))


def _valid(kind: str, default: Any) -> st.SearchStrategy[Any]:
    if kind == "lr":
        return lrs
    if kind == "beta":
        return betas_1
    if kind == "beta_closed":
        return st.one_of(betas_1, st.just(1.0))
    if kind == "betas":
        return st.tuples(*[betas_1] * len(default))
    if kind == "eps":
        return epss
    if kind == "wd":
        return wds
    if kind == "wd_open":
        return st.one_of(st.floats(0.0, 0.99), st.sampled_from([0.0, 1e-2, 0.1, 0.99]))
    raise AssertionError(kind)


_coin = st.sampled_from([True, False])  # unbiased (st.booleans() leans towards False)


@st.composite
def valid_hparams(draw: st.DrawFn, spec: Spec) -> dict[str, Any]:
    """A subset of the spec's hyperparameters, each drawn from its valid range (the rest keep the defaults)."""
    out = {}
    for arg, default in spec.hparams.items():
        if draw(_coin):
            out[arg] = draw(_valid(spec.kind(arg), default))
    for arg, options in spec.choices.items():
        if draw(_coin):
            out[arg] = draw(st.sampled_from(options))
    return out


#: kind -> values just outside the valid range (or of a wrong type).
INVALID: dict[str, list[Any]] = {
    "lr": [-1e-3, -1.0, math.nan, math.inf, "0.1", None],
    "beta": [-0.1, 1.0, 1.5, math.nan],
    "beta_closed": [-0.1, 1.5, math.nan],
    "eps": [-1e-8, math.nan, math.inf],
    "wd": [-1e-2, -1.0, math.nan, math.inf],
    "wd_open": [-1e-2, -1.0, math.nan, math.inf],
}


@st.composite
def invalid_hparam(draw: st.DrawFn, spec: Spec) -> tuple[str, Any]:
    """One hyperparameter of ``spec`` and a value for it just outside its valid range."""
    literal_choices = sorted(a for a, opts in spec.choices.items() if not isinstance(opts[0], bool))
    arg = draw(st.sampled_from(sorted(spec.hparams) + literal_choices))
    if arg in literal_choices:
        return arg, draw(st.sampled_from(["not_a_choice", "", None]))
    kind = spec.kind(arg)
    if kind == "betas":
        n = len(spec.hparams[arg])
        bad = draw(st.sampled_from(INVALID["beta"]))
        i = draw(st.integers(0, n - 1))
        value: Any = draw(st.one_of(
            st.just(tuple(bad if j == i else 0.9 for j in range(n))),  # one element out of [0, 1)
            st.just(tuple([0.9] * (n + 1))),  # wrong length
        ))
        return arg, value
    return arg, draw(st.sampled_from(INVALID[kind]))


def arg_mentioned(arg: str, message: str) -> bool:
    """Whether an error message names the argument ``arg`` (or the torch spelling of it)."""
    m = message.lower()
    aliases = {arg, arg.replace("_", " ")}
    if arg in ("lr", "learning_rate"):
        aliases |= {"lr", "learning rate", "learning_rate"}
    if arg == "betas":
        aliases |= {"beta"}
    # An ``adamw_``-prefixed argument (MuonAdamW) must be named as such: "lr" or "eps" alone would point
    # at the matrix side's argument of that name.
    return any(a in m for a in aliases)


# ------------------------------------------------------------------------------------------------ shapes
def _d(lo: int = 2) -> st.SearchStrategy[int]:
    return st.integers(lo, MAX_DIM)


#: Shape families. Dims are small (<= MAX_DIM) so that every example is cheap.
SHAPE_KINDS: dict[str, st.SearchStrategy[tuple[int, ...]]] = {
    # empty tensors: a dimension of 0, in each position that a reshape or a norm could trip on
    "empty_1d": st.just((0,)),
    "empty_rows": st.tuples(st.just(0), _d(1)),
    "empty_cols": st.tuples(_d(1), st.just(0)),
    "empty_0x0": st.just((0, 0)),
    "empty_3d": st.tuples(_d(1), st.just(0), _d(1)),
    "empty_4d_out": st.tuples(st.just(0), _d(1), st.integers(1, 3), st.integers(1, 3)),
    "empty_4d_kernel": st.tuples(_d(1), _d(1), st.just(0), st.integers(1, 3)),
    # one element
    "scalar": st.just(()),
    "one_element": st.sampled_from([(1,), (1, 1), (1, 1, 1), (1, 1, 1, 1)]),
    "vector": st.tuples(_d()),
    # matrices
    "square": _d().map(lambda n: (n, n)),
    "tall": st.tuples(_d(3), _d()).map(lambda s: (max(s), min(s) - 1)),
    "wide": st.tuples(_d(3), _d()).map(lambda s: (min(s) - 1, max(s))),
    "row": st.tuples(st.just(1), _d()),
    "col": st.tuples(_d(), st.just(1)),
    # stacked matrices / conv kernels (out, in, kh, kw)
    "3d": st.tuples(_d(1), _d(1), _d(1)).filter(lambda s: math.prod(s) <= 256),
    "4d": st.tuples(_d(1), _d(1), st.integers(1, 3), st.integers(1, 3)).filter(lambda s: math.prod(s) <= 256),
}
ORDINARY_KINDS = ("vector", "square", "tall", "wide", "3d", "4d")


def shapes(kinds: tuple[str, ...] | list[str]) -> st.SearchStrategy[tuple[int, ...]]:
    return st.one_of(*[SHAPE_KINDS[k] for k in kinds])


def ordinary_kinds(spec: Spec) -> tuple[str, ...]:
    """Shape families every step of ``spec`` is expected to accept (2-D only for matrix-only optimizers)."""
    return ("square", "tall", "wide") if spec.matrix_only else ORDINARY_KINDS


# ------------------------------------------------------------------------------------------------ tensors
#: Gradient magnitudes: exact zeros, tiny, ordinary and large (but finite, bounded) values.
GRAD_SCALES = (0.0, 1e-6, 1e-2, 1.0, 1e2)


@st.composite
def grad_recipes(draw: st.DrawFn) -> tuple[str, float, int]:
    """How to fill a gradient: (pattern, scale, seed); drawn as a recipe so examples stay cheap."""
    pattern = draw(st.sampled_from(["randn", "randn", "zeros", "ones", "rank1", "sparse_like"]))
    return pattern, draw(st.sampled_from(GRAD_SCALES)), draw(st.integers(0, 2**16))


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, recipe: tuple[str, float, int]) -> torch.Tensor:
    pattern, scale, seed = recipe
    gen = torch.Generator().manual_seed(seed)
    if pattern == "zeros" or scale == 0.0:
        t = torch.zeros(shape, dtype=torch.float64)
    elif pattern == "ones":
        t = torch.full(shape, scale, dtype=torch.float64)
    elif pattern == "rank1" and len(shape) >= 2:
        u = torch.randn(shape[0], 1, generator=gen, dtype=torch.float64)
        v = torch.randn(1, math.prod(shape[1:]), generator=gen, dtype=torch.float64)
        t = (u @ v).reshape(shape) * scale
    elif pattern == "sparse_like":  # mostly exact zeros, a few entries
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = t * (torch.rand(shape, generator=gen, dtype=torch.float64) < 0.2) * scale
    else:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype)


def param(shape: tuple[int, ...], dtype: torch.dtype, init_seed: int, zero: bool = False) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(init_seed)
    t = torch.zeros(shape, dtype=torch.float64) if zero else torch.randn(shape, generator=gen, dtype=torch.float64)
    return torch.nn.Parameter(t.to(dtype))
