"""``torch.compile(opt.step)`` works for every optimizer, as for torch.optim's, and equals the eager step.

Users compile their whole training step; our ``step`` must trace (state creation runs eagerly, as torch runs
``_init_group``; our own compiled fast path steps aside under a user's compile). Each optimizer's first
contract case takes 4 compiled steps next to 4 eager steps of a twin float64 model with full-rank
gradients (32 samples for 8x8 weights: with rank-deficient gradients the eigenbasis and polar-factor
optimizers are not unique, and any rounding difference picks another basis). float64 because the compiled
kernels fuse and reorder arithmetic (last-bit differences per operation) and the Kronecker family is
chaotic in float32 on this problem: in one process, a 1e-7 relative change of the gradients moves rekls's
weights by 4.8 after 4 steps (SOAP 0.7; the bias vectors' rank-1 factors). Tolerance: 1e-9, and 1e-6 for
the Kronecker family (their eigen-solvers amplify float64 rounding to ~1e-8 over 4 steps).
"""

from __future__ import annotations

import pytest
import torch
from contract_cases import CASES
from torch import nn

CASES_BY_NAME = {c.id.split("-")[0]: c for c in reversed(CASES)}  # the first case of every optimizer
#: Compiled down to generated kernels (inductor): one per family. The others are traced by dynamo and run
#: through AOTAutograd (``aot_eager``): the same tracing, without minutes of C++ compilation in the suite.
_INDUCTOR = {"adamw", "lion", "muon", "normuon", "muon_adamw", "soap", "psgd_pro"}
_KRONECKER = {"soap", "kl_soap", "kl_m_soap", "rekls", "rekls_v3", "stacked_soap", "moso", "shampoo", "psgd_pro"}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)).double()


def _params(case, model):
    params = [p for p in model.parameters() if not case.matrix_only or p.ndim >= 2]
    return params


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES_BY_NAME))
def test_compiled_step_equals_eager_step(name: str) -> None:
    torch._dynamo.reset()
    case = CASES_BY_NAME[name]
    model, twin = _model(), _model()
    opt = case.build(_params(case, model), **{case.lr_arg: case.lr})
    ref = case.build(_params(case, twin), **{case.lr_arg: case.lr})
    compiled_step = torch.compile(opt.step, backend="inductor" if name in _INDUCTOR else "aot_eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(32, 8, generator=g, dtype=torch.float64)
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (net(x) ** 2).mean().backward()
        compiled_step()
        ref.step()
    tol = 1e-6 if name in _KRONECKER else 1e-9
    if name == "psgd_pro" and name in _INDUCTOR:
        tol = 2e-5  # its random probes come from the generated code's generator, not eager's (measured 4e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _graph_counts(case, steps: int = 8) -> list[int]:
    """Graphs compiled after each of ``steps`` compiled steps, with ``zero_grad()``'s default (set_to_none)."""
    torch._dynamo.reset()
    model = _model()
    opt = case.build(_params(case, model), **{case.lr_arg: case.lr})
    graphs = [0]

    def counting_backend(gm, example_inputs):
        graphs[0] += 1
        return gm.forward

    compiled_step = torch.compile(opt.step, backend=counting_backend)
    g = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        opt.zero_grad()  # set_to_none=True: fresh gradient tensors every step
        (model(torch.randn(32, 8, generator=g, dtype=torch.float64)) ** 2).mean().backward()
        compiled_step()
        counts.append(graphs[0])
    return counts


#: Compiled with torch.compile(opt.step): the step counter is specialized once, then dynamic (as torch.optim's
#: Python-int steps), so at most the second step compiles again; after it, only the end of a warm-up schedule
#: (a branch on the step: AdEMAMix's case warms up for 5 steps) compiles once more.
_BOUNDED = ["adam", "adamw", "ademamix", "sim_ademamix", "laprop", "lion", "signum", "rmsprop", "madam"]


@pytest.mark.parametrize("name", _BOUNDED)
def test_compiled_step_stops_compiling(name: str) -> None:
    counts = _graph_counts(CASES_BY_NAME[name])
    warmup_end = 1 if name == "ademamix" else 0
    assert counts[-1] - counts[1] == warmup_end, f"graphs compiled after each step: {counts}"
    assert counts[-3:] == [counts[-1]] * 3, f"graphs compiled after each step: {counts}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES_BY_NAME))
def test_every_compiled_step_stops_compiling(name: str) -> None:
    """Every optimizer under torch.compile(opt.step) with zero_grad()'s default set_to_none=True: graphs are
    built in the first steps (the step counter, warm-ups, preconditioner schedules), none after the fourth.
    Before, reading ``p.grad`` in traced code made Dynamo guard on each gradient object and recompile every
    step until its limit (then run eagerly)."""
    counts = _graph_counts(CASES_BY_NAME[name])
    assert counts[4:] == [counts[-1]] * (len(counts) - 4), f"graphs compiled after each step: {counts}"
