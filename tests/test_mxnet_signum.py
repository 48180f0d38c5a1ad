"""MXNet's Signum against trajectories derived by hand from MXNet's update rule (SPEC.md section 4).

Params are float64 so the hand-computed decimals hold to 1e-12.
"""

import inspect

import pytest
import torch

from emerging_optimizers.compat.mxnet import Signum


def run(w0, grads, **kw):
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = Signum([w], **kw)
    out = []
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(w.detach().tolist())
    return out, opt, w


def close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_signature_is_mxnets():
    params = list(inspect.signature(Signum).parameters.values())
    # mxnet's arguments in mxnet's order; then our own keyword-only options (the non-finite gradient policy)
    assert [p.name for p in params] == ["params", "learning_rate", "momentum", "wd_lh", "wd", "rescale_grad",
                                        "clip_gradient", "nonfinite"]
    assert [p.default for p in params[1:]] == [0.01, 0.9, 0.0, 0.0, 1.0, None, "skip"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[4:])


def test_momentum_trajectory():
    # mom1 = -0.5*g = [-1, 0.25] -> w = w + 0.1*sign(mom); mom2 = 0.5*mom1 - 0.5*g = [-1.5, 0.375]
    traj, opt, w = run([1.0, -1.0], [[2.0, -0.5], [2.0, -0.5]], learning_rate=0.1, momentum=0.5)
    close(traj, [[0.9, -0.9], [0.8, -0.8]])
    close(opt.state[w]["mom"].tolist(), [-1.5, 0.375])


def test_l2_wd_enters_the_momentum_and_can_flip_the_sign():
    # g' = g + 0.25 w: 0.05, 0.025, 0.0, -0.025; mom: -0.025, -0.025, -0.0125, +0.00625
    traj, _, _ = run([1.0], [[-0.2]] * 4, learning_rate=0.1, momentum=0.5, wd=0.25)
    close(traj, [[0.9], [0.8], [0.7], [0.8]])


def test_decoupled_wd_lh():
    # w = (1 - 0.1*0.5) w + 0.1*sign(mom), mom < 0 throughout
    traj, _, _ = run([2.0], [[1.0], [1.0]], learning_rate=0.1, momentum=0.5, wd_lh=0.5)
    close(traj, [[1.8], [1.61]])


@pytest.mark.parametrize("clip,expected_first", [(0.3, 0.0), (None, -0.2), (-1.0, -0.2), (0.0, -0.2)])
def test_rescale_and_clip(clip, expected_first):
    # rescale 0.5: step 1 g' = [0.5, -0.2, 0.1] (clip 0.3 -> [0.3, -0.2, 0.1]); mom = -0.1 g'
    # step 2 g' = [-0.35, 0.15, -0.15] (clip -> -0.3 first); clipped mom[0] = -0.027 + 0.03 = +0.003,
    # unclipped mom[0] = -0.045 + 0.035 = -0.01: clipping flips the first coordinate's second move.
    traj, _, _ = run([0.0, 0.0, 0.0], [[1.0, -0.4, 0.2], [-0.7, 0.3, -0.3]], learning_rate=0.1, momentum=0.9,
                     rescale_grad=0.5, clip_gradient=clip)
    close(traj[0], [-0.1, 0.1, -0.1])
    close(traj[1], [expected_first, 0.2, 0.0])


def test_momentum_zero_is_signsgd_without_state():
    traj, opt, w = run([1.0, -2.0, 0.5], [[0.3, 0.0, -4.0]], learning_rate=0.1, momentum=0.0, wd=0.5, wd_lh=0.5)
    close(traj, [[0.8, -1.8, 0.55]])
    assert opt.state[w] == {}


def test_lr_lives_in_param_groups_for_schedulers():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = Signum([w], learning_rate=0.4)
    assert opt.param_groups[0]["lr"] == 0.4
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    sched.step()
    opt.step()
    close(w.detach().tolist(), [-0.6, 0.6])


def test_grad_not_modified():
    w = torch.nn.Parameter(torch.ones(3))
    g = torch.tensor([5.0, -5.0, 0.1])
    w.grad = g.clone()
    Signum([w], clip_gradient=1.0, wd=0.1, rescale_grad=2.0).step()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("kw,match", [({"learning_rate": -1}, "learning_rate"), ({"momentum": 1.0}, "momentum"),
                                      ({"wd": -0.1}, "wd"), ({"wd_lh": -1}, "wd_lh"),
                                      ({"clip_gradient": "1"}, "clip_gradient")])
def test_invalid(kw, match):
    with pytest.raises(ValueError, match=match):
        Signum([torch.nn.Parameter(torch.zeros(1))], **kw)
