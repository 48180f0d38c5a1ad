"""Property-based tests (hypothesis) for every registered optimizer.

For every name in ``registry.get_optimizer_name_list()`` (built as in ``contract_cases.CASES``, see
``property_strategies.SPECS``), over drawn shapes (empty tensors, 1-element tensors, vectors, tall / wide /
square / 1xN / Nx1 matrices, 3-D and 4-D tensors), dtypes (float32, float64, bfloat16), hyperparameters
(lr, betas / momentum, eps, weight_decay: valid values, and values just outside the valid range) and
param-group layouts (one group, several groups with their own lr, params without grad, an empty group):

1. **Clear errors only.** Construction and ``step()`` either work or raise a ``ValueError`` / ``TypeError``
   whose message names the offending argument (invalid hyperparameters) or the offending parameter's shape
   (a shape the optimizer does not take). Any other exception (``IndexError``, ``ZeroDivisionError``, a
   ``RuntimeError`` from torch, ...) is a bug. Valid hyperparameters on shapes the optimizer takes (matrices
   for matrix-only optimizers, anything for the others) must be accepted.
2. **Finite in, finite out.** After 1-3 steps with finite, bounded gradients (exact zeros up to 1e2) every
   parameter and every floating-point state tensor is finite; params without a gradient are unchanged.
3. **state_dict round trip.** A fresh optimizer over copies of the params (same groups, same arguments)
   that loads the state dict (after ``torch.save`` / ``torch.load(weights_only=True)``) has an equal state dict
   (tensors ``torch.equal`` with the same dtype, other values ``==``), and one more step with the same
   gradients gives bit-identical params and state in both.

Examples are deterministic (``derandomize=True``) and few per optimizer, tensors tiny (every dim <= 16).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field
from typing import Any

import property_strategies as ps
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

NAMES = ps.NAMES


def _settings(n: int) -> settings:
    # No shrinking: a failure prints its (already small) example; shrinking a failing optimizer would cost
    # CI minutes. Re-run with phases including Phase.shrink to minimise a new failure locally.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------------------------ a problem
@dataclass
class Group:
    shapes: list[tuple[int, ...]]
    no_grad: list[bool]  # per param: leave .grad None
    options: dict[str, Any] = field(default_factory=dict)  # per-group hyperparameters (e.g. its own lr)


@dataclass
class Problem:
    groups: list[Group]
    dtype: torch.dtype
    hparams: dict[str, Any]  # constructor arguments
    steps: int
    recipes: list[list[tuple[str, float, int]]]  # [step][param] -> gradient recipe
    init_seed: int
    zero_init: bool = False
    as_groups: bool = True  # False: a plain list of params (only with one group without options)

    def n_params(self) -> int:
        return sum(len(g.shapes) for g in self.groups)

    def with_dtype(self, dtype: torch.dtype) -> Problem:
        return Problem(self.groups, dtype, self.hparams, self.steps, self.recipes, self.init_seed, self.zero_init,
                       self.as_groups)


def materialize(spec: ps.Spec, pb: Problem) -> tuple[list[torch.nn.Parameter], list[bool], Any]:
    """Fresh params (same values on every call), their no-grad flags and the ``params`` argument."""
    params, no_grad, arg = [], [], []
    for g in pb.groups:
        ps_ = []
        for shape, ng in zip(g.shapes, g.no_grad):
            p = ps.param(shape, pb.dtype, pb.init_seed + len(params), zero=pb.zero_init)
            if spec.prepare is not None:
                spec.prepare(p)
            params.append(p)
            no_grad.append(ng)
            ps_.append(p)
        arg.append({"params": ps_, **g.options})
    if not pb.as_groups:
        arg = arg[0]["params"]
    return params, no_grad, arg


def set_grads(params: list[torch.nn.Parameter], no_grad: list[bool], recipes: list[tuple[str, float, int]]) -> None:
    for p, ng, r in zip(params, no_grad, recipes):
        p.grad = None if ng else ps.make_tensor(tuple(p.shape), p.dtype, r)


def build(spec: ps.Spec, arg: Any, pb: Problem) -> torch.optim.Optimizer:
    return spec.build(arg, **pb.hparams)


# ------------------------------------------------------------------------------------------------ checks
def shape_strings(pb: Problem) -> set[str]:
    return {str(tuple(s)) for g in pb.groups for s in g.shapes}


def assert_clear_shape_error(exc: BaseException, pb: Problem) -> None:
    """Property 1 for shapes: a ValueError/TypeError naming the shape (or dtype) of the parameter it refuses."""
    msg = str(exc)
    assert isinstance(exc, (ValueError, TypeError)), f"internal error {type(exc).__name__}: {msg}"
    # "(4, 0)" anywhere; the 0-d shape "()" only as "shape ()" (a bare "()" could be a call in the message)
    names_it = any((f"shape {s}" in msg) if s == "()" else (s in msg) for s in shape_strings(pb))
    names_it = names_it or str(pb.dtype) in msg
    assert names_it, f"{type(exc).__name__} does not name the offending shape/dtype {shape_strings(pb)}: {msg}"


def iter_tensors(obj: Any, path: str = "") -> Any:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{path}[{i}]")


def assert_finite(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """Property 2: params and every floating-point state tensor are finite."""
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"param {i} of shape {tuple(p.shape)} is not finite: {p}"
    for i, p in enumerate(params):
        if p not in opt.state:
            continue
        for path, t in iter_tensors(opt.state[p]):
            if t.is_floating_point() or t.is_complex():
                assert torch.isfinite(t).all(), f"state{path} of param {i} (shape {tuple(p.shape)}) is not finite: {t}"


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal structures; tensors equal bit for bit and of the same dtype."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ\n{a}\n{b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)), \
            f"{path}: {a!r} vs {b!r}"


# ------------------------------------------------------------------------------------------------ the run
def run(spec: ps.Spec, pb: Problem, *, expect_accepted: bool, save_load: bool = True) -> None:
    """Properties 1-3 on one problem.

    ``expect_accepted``: the problem is valid for the optimizer (valid hyperparameters, shapes it takes), so
    it must not raise at all; otherwise a clear validation error (naming the shape or dtype) ends the run.
    ``save_load``: the round trip goes through ``torch.save`` / ``torch.load(weights_only=True)`` (else a deep
    copy of the state dict: the checkpoint format is covered by the layout test, and loading costs time).
    """
    note(f"{spec.name}: {pb}")
    params, no_grad, arg = materialize(spec, pb)
    before = [p.detach().clone() for p in params]
    try:
        opt = build(spec, arg, pb)
    except Exception as exc:  # the property is about which exceptions occur
        if expect_accepted:
            raise
        assert_clear_shape_error(exc, pb)
        return
    for step in range(pb.steps):
        set_grads(params, no_grad, pb.recipes[step])
        try:
            opt.step()
        except Exception as exc:
            if expect_accepted or step > 0:  # refusing a shape at the first step is acceptable, later is not
                raise
            assert_clear_shape_error(exc, pb)
            return

    # 2. finite results, params without grad untouched
    assert_finite(opt, params)
    for i, (p, b, ng) in enumerate(zip(params, before, no_grad)):
        if ng:
            assert torch.equal(p, b), f"param {i} has no grad but changed"

    # 3. state_dict round trip (through torch.save / torch.load, or a deep copy where that is too slow)
    if save_load:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
    else:
        loaded = copy.deepcopy(opt.state_dict())
    params2, _, arg2 = materialize(spec, pb)
    with torch.no_grad():
        for p2, p in zip(params2, params):
            p2.copy_(p)
    opt2 = build(spec, arg2, pb)
    opt2.load_state_dict(loaded)
    assert_same(opt.state_dict(), opt2.state_dict(), "state_dict")
    last = [(pat, scale, seed + 7919) for pat, scale, seed in pb.recipes[-1]]
    set_grads(params, no_grad, last)
    set_grads(params2, no_grad, last)
    opt.step()
    opt2.step()
    assert_finite(opt, params)
    assert_finite(opt2, params2)
    for i, (p, p2) in enumerate(zip(params, params2)):
        assert torch.equal(p, p2), f"param {i} (shape {tuple(p.shape)}) differs after the resumed step"
    assert_same(opt.state_dict(), opt2.state_dict(), "state_dict after one more step")


# ------------------------------------------------------------------------------------------------ strategies
@st.composite
def problems(draw: st.DrawFn, spec: ps.Spec, shapes: st.SearchStrategy[tuple[int, ...]], *, layouts: bool,
             dtypes: tuple[torch.dtype, ...] = ps.DTYPES) -> Problem:
    if layouts:
        n_groups = draw(st.integers(1, 3))
        groups = []
        for _ in range(n_groups):
            n = draw(st.integers(0 if n_groups > 1 else 1, 3))  # an empty group only next to others
            g_shapes = [draw(shapes) for _ in range(n)]
            g_no_grad = [draw(st.booleans()) if n > 1 else False for _ in range(n)]
            options = draw(group_options(spec)) if n_groups > 1 else {}
            groups.append(Group(g_shapes, g_no_grad, options))
        if not any(g.shapes for g in groups):  # no params at all is not a layout (torch refuses it too)
            groups[0].shapes, groups[0].no_grad = [draw(shapes)], [False]
        as_groups = n_groups > 1 or draw(st.booleans())
    else:
        n = draw(st.integers(1, 2))
        groups = [Group([draw(shapes) for _ in range(n)], [False] * n)]
        as_groups = False
    pb = Problem(groups, draw(st.sampled_from(dtypes)), draw(ps.valid_hparams(spec)),
                 steps=draw(st.sampled_from([2, 3, 1])), recipes=[], init_seed=draw(st.integers(0, 2**16)),
                 zero_init=draw(st.sampled_from([False] * 7 + [True])), as_groups=as_groups)
    pb.recipes = [[draw(ps.grad_recipes()) for _ in range(pb.n_params())] for _ in range(pb.steps)]
    return pb


_GROUP_KEYS: dict[str, frozenset[str]] = {}


def group_keys(spec: ps.Spec) -> frozenset[str]:
    """Hyperparameter names a param group of ``spec`` carries (probed once on a small matrix)."""
    if spec.name not in _GROUP_KEYS:
        p = torch.nn.Parameter(torch.randn(4, 4))
        if spec.prepare is not None:
            spec.prepare(p)
        _GROUP_KEYS[spec.name] = frozenset(spec.build([p]).param_groups[0]) - {"params"}
    return _GROUP_KEYS[spec.name]


@st.composite
def group_options(draw: st.DrawFn, spec: ps.Spec) -> dict[str, Any]:
    """Per-group options: its own lr (mostly), sometimes other hyperparameters the group carries."""
    keys = group_keys(spec)
    out: dict[str, Any] = {}
    if draw(st.integers(0, 3)) > 0:
        out["lr"] = draw(ps.lrs)
    for arg, default in spec.hparams.items():
        if arg in keys and arg != "lr" and draw(st.integers(0, 3)) == 0:
            out[arg] = draw(ps._valid(spec.kind(arg), default))
    return out


# ------------------------------------------------------------------------------------------------ tests
EDGE_KINDS = list(ps.SHAPE_KINDS)


@pytest.mark.parametrize("kind", EDGE_KINDS)
@pytest.mark.parametrize("name", NAMES)
@_settings(3)
@given(data=st.data())
def test_any_shape_steps_finitely_or_is_refused_clearly(name, kind, data):
    """Properties 1-3 for each shape family (each example runs float32, then bfloat16 or float64).

    ``ps.ordinary_kinds`` (non-empty matrices; for optimizers that are not matrix-only also vectors, 3-D and
    4-D tensors) must be accepted. Other shapes (empty, 0-d, 1-element, 1xN, Nx1; vectors and 3-D/4-D tensors
    for matrix-only optimizers) may instead be refused by a ValueError/TypeError naming the shape.
    """
    spec = ps.SPECS[name]
    pb = data.draw(problems(spec, ps.SHAPE_KINDS[kind], layouts=False, dtypes=(torch.float32,)))
    other = data.draw(st.sampled_from([torch.bfloat16, torch.float64]), label="second dtype")
    for dtype in (torch.float32, other):
        accepted = kind in ps.ordinary_kinds(spec) and not (pb.zero_init and spec.prepare)
        run(spec, pb.with_dtype(dtype), expect_accepted=accepted, save_load=False)


@pytest.mark.parametrize("name", NAMES)
@_settings(20)
@given(data=st.data())
def test_param_group_layouts(name, data):
    """Properties 1-3 with one or several groups (own lr and other options), params without grad, empty groups.

    Shapes are ones the optimizer takes, hyperparameters valid: nothing may raise.
    """
    spec = ps.SPECS[name]
    pb = data.draw(problems(spec, ps.shapes(ps.ordinary_kinds(spec)), layouts=True))
    run(spec, pb, expect_accepted=not (pb.zero_init and spec.prepare))


GROUP_KEY = {"learning_rate": "lr"}  # mxnet_signum's constructor argument -> its group key


@pytest.mark.parametrize("name", NAMES)
@_settings(20)
@given(data=st.data())
def test_invalid_hyperparameter_is_refused_clearly(name, data):
    """Property 1 for hyperparameters: a value just outside the valid range (or of the wrong type), given to
    the constructor or in a param group, raises ValueError/TypeError naming the argument, at construction.

    Valid values are exercised by the two tests above (there, construction must succeed)."""
    spec = ps.SPECS[name]
    arg, value = data.draw(ps.invalid_hparam(spec))
    key = GROUP_KEY.get(arg, arg)  # the param-group key of the argument
    in_group = key in group_keys(spec) and data.draw(st.booleans())
    note(f"{name}: {arg}={value!r} {'in a param group' if in_group else 'to the constructor'}")
    shapes = [(4, 3), (3, 4)] if spec.matrix_only else [(4, 3), (3, 4), (5,)]  # MuonAdamW: both sides
    p, *rest = [ps.param(s, torch.float32, i) for i, s in enumerate(shapes)]
    for t in (p, *rest):
        if spec.prepare is not None:
            spec.prepare(t)
    with pytest.raises((ValueError, TypeError)) as info:
        if in_group:
            spec.build([{"params": [p]}, {"params": rest, key: value}])
        else:
            spec.build([p, *rest], **{arg: value})
    assert ps.arg_mentioned(arg, str(info.value)), f"the error does not name {arg!r}: {info.value}"
