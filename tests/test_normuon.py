"""NorMuon: AdaptiveMuon(moment2_method="normuon") with its own defaults, and N-D parameters as [out, -1]."""

from __future__ import annotations

import pytest
import torch

import emerging_optimizers as eo
from emerging_optimizers.orthogonalized_optimizers import AdaptiveMuon, NorMuon


def _run(opt_params, grads_seq, make):
    opt = make(opt_params)
    for grads in grads_seq:
        for p, g in zip(opt_params, grads):
            p.grad = g.clone()
        opt.step()
    return opt


@pytest.mark.parametrize("kw", [{}, dict(nesterov=False, weight_decay=0.1, beta2=0.9, lr=0.03),
                                dict(weight_decay_method="l2", scale_mode="shape_scaling")])
def test_2d_is_adaptive_muon_normuon_bit_for_bit(kw):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in ((8, 5), (5, 8), (6, 6))]
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(4)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    _run(a, grads, lambda ps: NorMuon(ps, **kw))
    ref_kw = {"lr": 2e-3, "weight_decay": 1.0, "nesterov": True, **kw, "moment2_method": "normuon"}
    _run(b, grads, lambda ps: AdaptiveMuon(ps, **ref_kw))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_conv_kernel_is_its_flattened_matrix():
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(6, 3, 3, 3, generator=gen)
    grads = [[torch.randn(6, 3, 3, 3, generator=gen)] for _ in range(3)]
    conv = [torch.nn.Parameter(init.clone())]
    flat = [torch.nn.Parameter(init.reshape(6, 27).clone())]
    opt = _run(conv, grads, lambda ps: NorMuon(ps, lr=0.02))
    _run(flat, [[g[0].reshape(6, 27)] for g in grads], lambda ps: NorMuon(ps, lr=0.02))
    assert torch.equal(conv[0].detach().reshape(6, 27), flat[0].detach())
    assert opt.state[conv[0]]["moment2_buffer"].shape == (1, 27)  # the [out, -1] view's second moment


def test_defaults_and_registry():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = eo.registry.get_optimizer_cls("normuon")([p])
    assert type(opt) is NorMuon
    g = opt.param_groups[0]
    assert (g["lr"], g["nesterov"], g["moment2_method"], g["momentum"], g["weight_decay"]) == (2e-3, True,
                                                                                               "normuon", 0.95, 1.0)
    with pytest.raises(ValueError, match="1-D|matri"):
        NorMuon([torch.nn.Parameter(torch.zeros(3))])


def test_muon_adamw_default_matrix_side_is_normuon_and_takes_conv_nets():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    opt = eo.MuonAdamW(model)
    assert type(opt.matrix_optimizer) is NorMuon
    g = opt.matrix_optimizer.param_groups[0]
    assert g["nesterov"] is True and g["lr"] == 2e-3 and g["weight_decay"] == 1.0  # NorMuon's own decay
    x = torch.randn(4, 3, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())
