"""Compressed optimizer state: ``state_dtype=torch.bfloat16`` with stochastic rounding.

The update is computed in float32 and the bf16 state written back stochastically rounded (unbiased), with
bits from a counter-based hash of the element index and the step: a resumed run is bit-identical.
"""

from __future__ import annotations

import inspect
import statistics

import pytest
import torch
from torch import nn

import emerging_optimizers as eo
from emerging_optimizers.scalar_optimizers.base import _hash16, stochastic_round_

SCALAR = [n for n in eo.get_optimizer_name_list()
          if "state_dtype" in inspect.signature(eo.get_optimizer_cls(n)).parameters]


def test_every_scalar_optimizer_takes_state_dtype():
    assert set(SCALAR) >= {"adam", "adamw", "ademamix", "sim_ademamix", "laprop", "lion", "signum", "rmsprop", "madam"}


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    lo, hi = 1.0, 1.0 + 2**-7  # neighbouring bf16 values
    for frac in (0.1, 0.5, 0.9):
        x = torch.full((100_000,), lo + frac * (hi - lo))
        for sign in (1, -1):
            out = torch.empty(x.shape, dtype=torch.bfloat16)
            stochastic_round_(out, sign * x, salt=7.0)
            assert set(out.abs().float().unique().tolist()) <= {lo, hi}
            # mean of 1e5 Bernoulli(frac) draws: standard error < 0.0016 of the gap; 5 sigma
            assert abs(out.float().mean().item() - sign * x[0].item()) < 5 * 0.0016 * (hi - lo)
    exact = torch.randn(1000).to(torch.bfloat16).float()
    out = torch.empty(1000, dtype=torch.bfloat16)
    stochastic_round_(out, exact, salt=1.0)
    assert torch.equal(out.float(), exact)  # values bf16 can hold are kept as they are


def test_rounding_bits_change_with_the_step():
    x = torch.full((4096,), 1.0 + 2**-9)
    a, b = torch.empty(4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16)
    stochastic_round_(a, x, 1.0)
    stochastic_round_(b, x, 2.0)
    assert not torch.equal(a, b)
    stochastic_round_(b, x, 1.0)
    assert torch.equal(a, b)  # same salt, same bits: deterministic


def test_shared_rounding_bits_equal_the_per_tensor_hash():
    """Eagerly, the bits of one salt are hashed once for the longest tensor and sliced for the others: the same
    bits as hashing per tensor (element i's bits depend on i and the salt only), in any order of sizes."""
    torch.manual_seed(0)
    for salt in (3.0, 11.0):
        for n in (100, 5000, 7, 5000, 123_457, 64):
            x = torch.randn(n) * 1e-3 + 1.0
            out = torch.empty(n, dtype=torch.bfloat16)
            stochastic_round_(out, x, salt)
            bits = (x.view(torch.int32) + _hash16(n, salt, x.device)) & -65536
            assert torch.equal(out.float(), bits.view(torch.float32)), (salt, n)


@pytest.mark.parametrize("name", SCALAR)
def test_bf16_state_halves_memory_and_steps(name):
    p = nn.Parameter(torch.randn(32, 16))
    q = nn.Parameter(p.detach().clone())
    small, full = eo.get_optimizer_cls(name)([p], state_dtype=torch.bfloat16), eo.get_optimizer_cls(name)([q])
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad, grad.clone()
        small.step()
        full.step()
    tensors = [v for v in small.state[p].values() if isinstance(v, torch.Tensor)]
    ref = [v for v in full.state[q].values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == torch.bfloat16 for t in tensors) and p.dtype == torch.float32
    assert sum(t.nbytes for t in tensors) * 2 == sum(t.nbytes for t in ref)
    # five steps of bf16 state: within a few bf16 roundings of the float32-state weights (lr-sized updates)
    torch.testing.assert_close(p, q, atol=5e-3, rtol=0)


def test_resume_is_bit_identical():
    def run(steps, opt=None, p=None):
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(64, 64, generator=g) for _ in range(15)]
        for grad in grads[steps[0]:steps[1]]:
            p.grad = grad.clone()
            opt.step()

    torch.manual_seed(0)
    init = torch.randn(64, 64)
    p1 = nn.Parameter(init.clone())
    o1 = eo.AdamW([p1], lr=1e-2, state_dtype=torch.bfloat16)
    run((0, 15), o1, p1)
    p2 = nn.Parameter(init.clone())
    o2 = eo.AdamW([p2], lr=1e-2, state_dtype=torch.bfloat16)
    run((0, 10), o2, p2)
    saved = o2.state_dict()
    p3 = nn.Parameter(p2.detach().clone())
    o3 = eo.AdamW([p3], lr=1e-2, state_dtype=torch.bfloat16)
    o3.load_state_dict(saved)
    assert o3.state[p3]["exp_avg"].dtype == torch.bfloat16
    run((10, 15), o3, p3)
    assert torch.equal(p1, p3)


def test_invalid_state_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        eo.AdamW([nn.Parameter(torch.zeros(2))], state_dtype=torch.float16)


def _train_digits(state_dtype, seed, steps=300):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = eo.AdamW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


@pytest.mark.slow
def test_bf16_state_trains_like_fp32_state_on_real_data():
    """300 AdamW steps on scikit-learn's digits (real scans), 3 seeds: bf16 state ends within seed noise of
    float32 state (mean loss difference below twice the float32 runs' seed-to-seed standard deviation)."""
    full = [_train_digits(None, s) for s in range(3)]
    small = [_train_digits(torch.bfloat16, s) for s in range(3)]
    noise = statistics.stdev(full)
    assert abs(statistics.mean(small) - statistics.mean(full)) <= 2 * noise, (full, small)


@pytest.mark.slow
def test_compiled_path_rounds_like_the_eager_path():
    """fused=True (compiled) with bf16 state: the same hash bits, so the same roundings up to the kernels'
    last-bit differences (which can move a rounding decision: one bf16 step of the state, ~lr * 1e-2)."""
    p = nn.Parameter(torch.randn(64, 64))
    q = nn.Parameter(p.detach().clone())
    a = eo.Lion([p], lr=1e-2, state_dtype=torch.bfloat16, fused=True)
    b = eo.Lion([q], lr=1e-2, state_dtype=torch.bfloat16, fused=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        grad = torch.randn(64, 64, generator=g)
        p.grad, q.grad = grad, grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(a.state[p]["exp_avg"].float(), b.state[q]["exp_avg"].float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(p, q, atol=5e-3, rtol=0)


def test_muon_bf16_momentum_is_stochastically_rounded_and_resumes_bit_identically():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(32, 48, generator=g) for _ in range(12)]
    init = torch.randn(32, 48, generator=g)

    def run(p, opt, lo, hi):
        for grad in grads[lo:hi]:
            p.grad = grad.clone()
            opt.step()

    p1 = nn.Parameter(init.clone())
    o1 = eo.Muon([p1], lr=0.02, momentum_dtype=torch.bfloat16, nesterov=True)
    run(p1, o1, 0, 12)
    assert o1.state[p1]["momentum_buffer"].dtype == torch.bfloat16
    p2 = nn.Parameter(init.clone())
    o2 = eo.Muon([p2], lr=0.02, momentum_dtype=torch.bfloat16, nesterov=True)
    run(p2, o2, 0, 7)
    p3 = nn.Parameter(p2.detach().clone())
    o3 = eo.Muon([p3], lr=0.02, momentum_dtype=torch.bfloat16, nesterov=True)
    o3.load_state_dict(o2.state_dict())
    run(p3, o3, 7, 12)
    assert torch.equal(p1, p3)
    # against float32 momentum: the same trajectory up to the momentum's bf16 rounding (relative 2^-9 a step,
    # on updates of entries ~ lr * sqrt(48) = 0.14: <= ~7e-4 a step, 12 steps, most of it averaging out)
    p4 = nn.Parameter(init.clone())
    run(p4, eo.Muon([p4], lr=0.02, nesterov=True), 0, 12)
    torch.testing.assert_close(p1, p4, atol=5e-3, rtol=0)


def test_muon_adamw_state_dtype_reaches_both_sides():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16))
    opt = eo.MuonAdamW(model, state_dtype=torch.bfloat16)
    x = torch.randint(0, 50, (4, 5))
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    dtypes = {v.dtype for p in model.parameters() for v in opt.state[p].values() if isinstance(v, torch.Tensor)}
    assert dtypes == {torch.bfloat16}
    with pytest.raises(TypeError, match="state_dtype"):
        eo.MuonAdamW(model, adamw_kwargs={"state_dtype": torch.bfloat16})
