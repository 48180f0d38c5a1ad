"""Weight update hooks: their maths on plain tensors, their validation, and their use inside an optimizer."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from emerging_optimizers import weight_update_hooks as hooks
from emerging_optimizers.orthogonalized_optimizers import orthogonalized_optimizer as base
from emerging_optimizers.orthogonalized_optimizers.muon import Muon
from emerging_optimizers.orthogonalized_optimizers.muon_hyperball import MuonHyperball
from emerging_optimizers.weight_update_hooks import (
    HyperballHook,
    NoOpWeightUpdateHook,
    RadialBrakeHook,
    RelativeUpdateHook,
    WeightUpdateHook,
    scale_to_norm_,
)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def test_reexports_and_protocol():
    assert hooks.WeightUpdateHook is base.WeightUpdateHook
    assert hooks.NoOpWeightUpdateHook is base.NoOpWeightUpdateHook
    for hook in (HyperballHook(1.0), RadialBrakeHook(), RelativeUpdateHook(), NoOpWeightUpdateHook()):
        assert isinstance(hook, WeightUpdateHook)


def test_hyperball_hook():
    hook = HyperballHook(radius=2.0)
    p, u = rand(4, 3), rand(4, 3)
    u_dir = u / u.norm()
    assert hook.pre_weight_update_inplace(p, u) is None
    torch.testing.assert_close(u, 2.0 * u_dir, rtol=1e-15, atol=0)
    p_dir = p / p.norm()
    hook.post_weight_update_inplace(p, None)
    torch.testing.assert_close(p, 2.0 * p_dir, rtol=1e-15, atol=0)
    z = torch.zeros(3, 3)
    hook.pre_weight_update_inplace(p, z)  # no direction: stays zero, no NaN
    assert z.abs().max() == 0
    tiny = torch.full((2, 2), 1e-20)
    HyperballHook(1.0, eps=1e-15).post_weight_update_inplace(tiny, None)
    assert tiny.abs().max() == 0


def test_radial_brake_hook():
    hook = RadialBrakeHook(outward_scale=0.5, inward_scale=0.25)
    p = rand(5, 4)
    r0 = hook.pre_weight_update_inplace(p, torch.zeros_like(p))
    torch.testing.assert_close(r0, p.norm(), rtol=1e-15, atol=0)
    for factor, s in [(1.3, 0.5), (0.6, 0.25)]:  # outward, inward
        q = p * factor + 0.1 * rand(5, 4)
        direction, r1 = q / q.norm(), q.norm()
        hook.post_weight_update_inplace(q, r0)
        torch.testing.assert_close(q.norm(), r0 + s * (r1 - r0), rtol=1e-13, atol=0)
        torch.testing.assert_close(q / q.norm(), direction, rtol=1e-13, atol=1e-15)
    # |delta| < eps: the radius is kept at r0
    q = p.clone()
    RadialBrakeHook(eps=1e-3).post_weight_update_inplace(q, r0)
    torch.testing.assert_close(q.norm(), r0)
    # a weight that became zero stays zero (no 0/0)
    z = torch.zeros(2, 2)
    hook.post_weight_update_inplace(z, torch.tensor(1.0))
    assert z.abs().max() == 0
    # defaults: shrinking is free, growth is halved
    d = RadialBrakeHook()
    assert (d.outward_scale, d.inward_scale, d.eps) == (0.5, 1.0, 1e-15)


def test_relative_update_hook():
    hook = RelativeUpdateHook()
    p, u = rand(3, 6), rand(3, 6)
    direction = u / u.norm()
    hook.pre_weight_update_inplace(p, u)
    torch.testing.assert_close(u, direction * p.norm(), rtol=1e-14, atol=0)
    u2 = rand(3, 6)
    hook.pre_weight_update_inplace(torch.zeros(3, 6), u2)  # nothing to be relative to
    assert u2.abs().max() == 0
    q = p.clone()
    hook.post_weight_update_inplace(q, None)
    assert torch.equal(q, p)


def test_bf16_scaled_with_a_single_rounding():
    x = torch.randn(64, 32).bfloat16()
    expected = (x.float() * (3.0 / torch.linalg.vector_norm(x, dtype=torch.float32))).bfloat16()
    scale_to_norm_(x, 3.0)
    assert torch.equal(x, expected)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: HyperballHook(0.0), "radius"),
        (lambda: HyperballHook(float("inf")), "radius"),
        (lambda: HyperballHook(1.0, eps=0.0), "eps"),
        (lambda: HyperballHook(1.0, eps=float("nan")), "eps"),
        (lambda: RadialBrakeHook(outward_scale=1.5), "outward_scale"),
        (lambda: RadialBrakeHook(inward_scale=-0.1), "inward_scale"),
        (lambda: RadialBrakeHook(eps=True), "eps"),
        (lambda: RelativeUpdateHook(eps=float("inf")), "eps"),
        (lambda: RelativeUpdateHook(eps=-1.0), "eps"),
    ],
)
def test_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_muon_with_hyperball_hook_equals_muon_hyperball():
    w0 = torch.randn(6, 4)
    w0 = w0 / w0.norm() * 1.5
    grads = [torch.randn(6, 4) for _ in range(3)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = Muon([a], lr=0.05, weight_update_hook=HyperballHook(1.5))
    opt_b = MuonHyperball([b], lr=0.05, hyperball_radius=1.5)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)
    assert abs(float(a.detach().norm()) - 1.5) < 1e-6


def test_hook_never_rescales_the_momentum():
    """Reference defect: with the identity orthogonalization the hook rescaled the stored momentum itself."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # identity orthogonalization warns
        opt = base.OrthogonalizedOptimizer(
            [p],
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            nesterov=False,
            weight_decay_method="decoupled",
            fp32_matmul_prec="highest",
            weight_update_hook=HyperballHook(10.0),
        )
    g = torch.randn(4, 4)
    p.grad = g
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.1 * g)


def test_hooks_module_imported_first_has_no_cycle():
    """The hooks module re-exports from the optimizer package, whose MuonHyperball imports the hooks module:
    importing the hooks module first in a fresh interpreter must work (~5 s, the price of a fresh import)."""
    code = (
        "import emerging_optimizers.weight_update_hooks; "
        "from emerging_optimizers.orthogonalized_optimizers.muon_hyperball import MuonHyperball; "
        "from emerging_optimizers.weight_update_hooks import HyperballHook, WeightUpdateHook"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
