"""Defects the property tests (tests/test_properties.py) found, pinned as plain examples.

Each test failed before its fix: empty tensors crashed nine optimizers (reshape to ``[0, -1]``, a division by
the element count, Muon's scale ``out / in`` with ``in == 0``); MAdam and KL-M-SOAP returned inf (``m / sqrt(v)``
with ``v == 0``, no eps); MuonAdamW's AdamW-side errors named ``lr``/``betas`` (the matrix side's names);
mxnet's Signum accepted any value in a param group; MuonHyperball accepted a weight decay that zeroes the
weights (then could not load its own checkpoint).
"""

from __future__ import annotations

import pytest
import torch
from contract_cases import CASES

import emerging_optimizers as eo
from emerging_optimizers.compat import mxnet

IDS = [c.id for c in CASES]


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0,), (2, 0, 3, 3)])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_tensor_with_no_elements_is_stepped_as_nothing(case, shape):
    if case.matrix_only and len(shape) != 2:
        pytest.skip("matrix-only optimizer")
    if case.id == "muon_hyperball":
        pytest.skip("keeps matrices on a sphere of radius > 0: a matrix of norm 0 is refused by design")
    p = torch.nn.Parameter(torch.zeros(shape))
    q = torch.nn.Parameter(torch.ones(3, 4))  # a normal param beside it still trains
    opt = case.build([p, q], **{case.lr_arg: case.lr})
    for _ in range(2):
        p.grad, q.grad = torch.zeros(shape), torch.full((3, 4), 0.5)
        opt.step()
    assert p.shape == shape and not torch.equal(q, torch.ones(3, 4)) and torch.isfinite(q).all()
    sd = opt.state_dict()
    fresh = case.build([torch.nn.Parameter(torch.zeros(shape)), torch.nn.Parameter(q.detach().clone())],
                       **{case.lr_arg: case.lr})
    fresh.load_state_dict(sd)


@pytest.mark.parametrize("build", [
    lambda p: eo.MAdam([p], lr=0.1, betas=(0.9, 0.0)),  # v = g^2: 0 after a zero gradient, m is not
    lambda p: eo.get_optimizer_cls("kl_m_soap")([p]),  # the same kernel in the eigenbasis, default options
], ids=["madam-beta2-0", "kl_m_soap"])
def test_madam_kernel_never_divides_by_a_zero_second_moment(build):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 16))
    opt = build(p)
    p.grad = torch.randn(3, 16)
    opt.step()
    p.grad = torch.zeros(3, 16)
    opt.step()
    assert torch.isfinite(p).all()


def test_muon_adamw_names_its_adamw_arguments():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    for arg, value in [("adamw_betas", (-0.1, 0.9)), ("adamw_lr", -1.0), ("adamw_eps", float("nan")),
                       ("adamw_weight_decay", -0.1)]:
        with pytest.raises(ValueError, match=arg):
            eo.MuonAdamW(params, **{arg: value})
    with pytest.raises(ValueError, match="adamw_"):  # a group's prefixed option
        eo.MuonAdamW([{"params": [("w", params[0]), ("b", params[1])], "adamw_lr": -1.0}])


def test_mxnet_signum_validates_param_groups():
    p = torch.nn.Parameter(torch.randn(4))
    for key, value in [("lr", -1.0), ("momentum", 1.5), ("wd", -0.01), ("wd_lh", float("nan")),
                       ("rescale_grad", float("inf"))]:
        with pytest.raises(ValueError, match=key):
            mxnet.Signum([{"params": [p], key: value}])


def test_muon_hyperball_refuses_a_weight_decay_that_zeroes_the_weights():
    p = torch.nn.Parameter(torch.eye(4) / 2)
    Hyperball = eo.get_optimizer_cls("muon_hyperball")
    with pytest.raises(ValueError, match="weight_decay"):
        Hyperball([p], hyperball_radius=1.0, weight_decay=1.0, weight_decay_method="independent")
    with pytest.raises(ValueError, match="weight_decay"):
        Hyperball([p], lr=0.5, hyperball_radius=1.0, weight_decay=2.0)
