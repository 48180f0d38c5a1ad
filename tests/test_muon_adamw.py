"""MuonAdamW: routing rule, equality with a separate matrix optimizer + AdamW, checkpoints, schedulers, bf16,
summary and input errors (emerging_optimizers/orthogonalized_optimizers/muon_adamw.py)."""

from __future__ import annotations

import copy
import inspect
import io

import pytest
import torch
from torch import nn

import emerging_optimizers.orthogonalized_optimizers  # noqa: F401 - registers the orthogonalized family
from emerging_optimizers import registry
from emerging_optimizers.orthogonalized_optimizers.muon_adamw import MuonAdamW, default_route, matrix_optimizer_names
from emerging_optimizers.scalar_optimizers import AdamW


class Net(nn.Module):
    """Embedding, a conv kernel, an MLP, a norm and a head: every kind of param the rule sorts."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, conv: bool = True) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1) if conv else None
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.to(dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        if self.conv is not None:
            x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.fc2(torch.tanh(self.fc1(x)))
        return self.head(self.norm(x).mean(1))


MATRIX = ["conv.weight", "fc1.weight", "fc2.weight"]
GEN = torch.Generator().manual_seed(1)
IDX, Y = torch.randint(0, 11, (16, 6), generator=GEN), torch.randint(0, 5, (16,), generator=GEN)


def loss_fn(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(IDX).float(), Y)


def train(model: nn.Module, opts: list[torch.optim.Optimizer], steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


def sides(opt: MuonAdamW) -> dict[str, str]:
    return {n: g["side"] for g in opt.param_groups for n in g["param_names"]}


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize(
    "name, shape, side",
    [
        ("blocks.0.fc1.weight", (32, 16), "matrix"),
        ("conv.weight", (8, 4, 3, 3), "matrix"),
        ("encoder.layer.0.attention.output.dense.weight", (16, 16), "matrix"),  # BERT: "output" is not the owner
        ("multihead_attn.in_proj_weight", (48, 16), "matrix"),
        ("blocks.0.token_mixing.fc1.weight", (16, 16), "matrix"),  # "token" only counts in the param's own name
        ("fc.bias", (16,), "adamw"),
        ("norm.weight", (16,), "adamw"),
        ("scale", (), "adamw"),
        ("embed.weight", (20, 16), "adamw"),
        ("model.embed_tokens.weight", (20, 16), "adamw"),
        ("transformer.wte.weight", (20, 16), "adamw"),
        ("transformer.wpe.weight", (20, 16), "adamw"),
        ("patch_embed.proj.weight", (16, 3, 4, 4), "adamw"),
        ("pos_embed", (1, 17, 16), "adamw"),
        ("cls_token", (1, 1, 16), "adamw"),
        ("register_tokens", (4, 16), "adamw"),
        ("lm_head.weight", (20, 16), "adamw"),
        ("head.weight", (10, 16), "adamw"),
        ("head.fc.weight", (10, 16), "adamw"),
        ("classifier.weight", (10, 16), "adamw"),
        ("output.weight", (20, 16), "adamw"),
        ("regressor.weight", (1, 16), "adamw"),  # a [1, d] matrix is a vector
        ("", (16, 16), "adamw"),  # unnamed: the conservative side (rule 5)
    ],
)
def test_default_route(name, shape, side):
    assert default_route(name, torch.zeros(shape)) == side


def test_named_parameters_module_and_plain_params_are_routed():
    model = Net()
    opt = MuonAdamW(model.named_parameters())
    assert sorted(n for n, s in sides(opt).items() if s == "matrix") == MATRIX
    assert [g["side"] for g in opt.param_groups] == ["matrix", "adamw"]
    # An nn.Module also routes nn.Embedding weights by type, whatever their name.
    model.shared = model.embed
    del model.embed
    assert sides(MuonAdamW(model))["shared.weight"] == "adamw"
    assert sides(MuonAdamW(model.named_parameters()))["shared.weight"] == "adamw"  # T5's name for the table
    model.table = model.shared
    del model.shared
    assert sides(MuonAdamW(model))["table.weight"] == "adamw"
    assert sides(MuonAdamW(model.named_parameters()))["table.weight"] == "matrix"  # by name alone: a matrix
    # Plain tensors have no names: matrices go to the conservative side (AdamW), with a warning.
    w, b = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4))
    with pytest.warns(UserWarning, match="no name"):
        opt = MuonAdamW([w, b])
    assert [(g["side"], g["params"]) for g in opt.param_groups] == [("adamw", [w, b])]
    with pytest.warns(UserWarning, match="no name"):
        assert [g["side"] for g in MuonAdamW([w]).param_groups] == ["adamw"]


def test_route_override_and_pinned_groups():
    model = Net()
    opt = MuonAdamW(model.named_parameters(),
                    route=lambda n, p: "adamw" if n.startswith("fc2") else default_route(n, p))
    assert sorted(n for n, s in sides(opt).items() if s == "matrix") == ["conv.weight", "fc1.weight"]
    assert "route()" in opt.summary()

    named = dict(model.named_parameters())
    opt = MuonAdamW(
        [
            {"params": [(n, named[n]) for n in ("fc1.weight", "fc1.bias")], "adamw_lr": 1e-2, "lr": 0.05},
            {"params": [("head.weight", named["head.weight"])], "side": "matrix", "momentum": 0.5},  # pinned
            {"params": [("fc2.weight", named["fc2.weight"])], "use_muon": False, "lr": 1e-4, "betas": (0.8, 0.9)},
            {"params": [(n, p) for n, p in named.items() if n.startswith(("embed", "conv", "norm", "head.b"))]},
        ],
        lr=0.01,
        adamw_lr=2e-3,
    )
    got = [(g["side"], g["param_names"], g["lr"]) for g in opt.param_groups]
    assert got == [
        ("matrix", ["fc1.weight"], 0.05),
        ("adamw", ["fc1.bias"], 1e-2),
        ("matrix", ["head.weight"], 0.01),
        ("adamw", ["fc2.weight"], 1e-4),
        ("matrix", ["conv.weight"], 0.01),
        ("adamw", ["embed.weight", "conv.bias", "norm.weight", "norm.bias", "head.bias"], 2e-3),
    ]
    assert opt.param_groups[2]["momentum"] == 0.5 and opt.param_groups[3]["betas"] == (0.8, 0.9)
    assert all("use_muon" not in g for g in opt.param_groups)
    train(model, [opt], 2)


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the defaults: NorMuon (Nesterov) + AdamW
        dict(lr=0.03, momentum=0.9, weight_decay=0.1, nesterov=False, adamw_lr=1e-2, adamw_betas=(0.8, 0.99),
             adamw_eps=1e-6, adamw_weight_decay=0.05, matrix_optimizer="muon",
             matrix_kwargs=dict(num_ns_steps=3, scale_mode="shape_scaling"),
             adamw_kwargs=dict(nesterov=True, weight_decay_method="l2")),
    ],
)
def test_equals_separate_muon_and_adamw(kwargs):
    model, ref = Net(), Net()
    opt = MuonAdamW(model.named_parameters(), **kwargs)
    defaults = {k: p.default for k, p in inspect.signature(MuonAdamW).parameters.items() if k != "params"}
    k = {**defaults, "matrix_kwargs": {}, "adamw_kwargs": {}, **kwargs}
    ref_named = dict(ref.named_parameters())
    matrix_cls = registry.get_optimizer_cls(k["matrix_optimizer"])
    assert type(opt.matrix_optimizer) is matrix_cls
    wd = {} if k["weight_decay"] is None else {"weight_decay": k["weight_decay"]}  # None: the class's default
    muon = matrix_cls([ref_named[n] for n in MATRIX], lr=k["lr"], momentum=k["momentum"], nesterov=k["nesterov"],
                      **wd, **k["matrix_kwargs"])
    adamw = AdamW([p for n, p in ref_named.items() if n not in MATRIX], lr=k["adamw_lr"], betas=k["adamw_betas"],
                  eps=k["adamw_eps"], weight_decay=k["adamw_weight_decay"], **k["adamw_kwargs"])
    assert train(model, [opt], 5) == train(ref, [muon, adamw], 5)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name


def test_every_matrix_optimizer_runs_inside():
    """Every registered orthogonalized optimizer works as ``matrix_optimizer`` (the CLI builds it so).

    No conv kernel here: some of them (AdaptiveMuon, ...) take 2-D matrices only and say so.
    """
    names = matrix_optimizer_names()
    assert "muon" in names and "muon_adamw" not in names
    special = {"muon_hyperball": {"hyperball_radius": 1.0}}
    matrices = ["fc1.weight", "fc2.weight"]
    for name in names:
        model, ref = Net(conv=False), Net(conv=False)
        for m in (model, ref):
            with torch.no_grad():  # unit Frobenius norm: muon_hyperball requires |W| == radius
                for n in matrices:
                    w = m.get_parameter(n)
                    w.div_(w.norm())
        kw = special.get(name, {})
        opt = registry.get_optimizer_cls("muon_adamw")(model.named_parameters(), matrix_optimizer=name, lr=1e-2,
                                                       matrix_kwargs=kw)
        assert type(opt.matrix_optimizer) is registry.get_optimizer_cls(name)
        ref_named = dict(ref.named_parameters())
        cls = registry.get_optimizer_cls(name)
        # MuonAdamW hands its momentum / weight decay / Nesterov to the matrix optimizers that take them
        # (weight decay: MuonAdamW's default None leaves each matrix optimizer's own)
        shared = {k: v for k, v in {"momentum": 0.95, "nesterov": True}.items() if k in registry.valid_kwargs(cls)}
        inner = cls([ref_named[n] for n in matrices], lr=1e-2, **shared, **kw)
        adamw = AdamW([p for n, p in ref_named.items() if n not in matrices], lr=3e-3, betas=(0.9, 0.95),
                      weight_decay=0.0)
        train(model, [opt], 3)
        train(ref, [inner, adamw], 3)
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (name, n)


# ---------------------------------------------------------------------------------------------- torch contract
def test_state_dict_resume_is_bit_identical_and_inner_views_follow():
    model = Net()
    opt = MuonAdamW(model.named_parameters(), adamw_weight_decay=0.01)
    train(model, [opt], 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, [opt], 4)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = Net(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = MuonAdamW(resumed.named_parameters(), lr=0.5, adamw_lr=0.5)  # hyperparameters come from the ckpt
    opt2.load_state_dict(ckpt["opt"])
    for side, inner in (("matrix", opt2.matrix_optimizer), ("adamw", opt2.adamw)):
        assert inner.state is opt2.state
        assert all(a is b for a, b in zip(inner.param_groups, [g for g in opt2.param_groups if g["side"] == side]))
    train(resumed, [opt2], 4)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


def test_load_state_dict_refuses_other_optimizers_and_other_routing():
    model = Net()
    opt = MuonAdamW(model.named_parameters())
    train(model, [opt], 1)
    good = copy.deepcopy(opt.state_dict())
    other = torch.optim.AdamW(model.parameters())
    train(model, [other], 1)
    with pytest.raises(ValueError, match="different optimizer"):
        opt.load_state_dict(other.state_dict())
    flipped = MuonAdamW(model.named_parameters(), route=lambda n, p: "adamw" if p.ndim < 2 or "fc" in n else "matrix")
    train(model, [flipped], 1)
    with pytest.raises(ValueError, match="2 param groups, this optimizer has 1"):
        MuonAdamW(model.named_parameters(), route=lambda n, p: "adamw").load_state_dict(good)
    with pytest.raises(ValueError, match="has shape"):  # the same group sides, but other params on each side
        opt.load_state_dict(flipped.state_dict())
    weights = [p for n, p in model.named_parameters() if n in MATRIX]
    rest = [p for n, p in model.named_parameters() if n not in MATRIX]
    pinned = MuonAdamW([{"params": rest, "side": "adamw"}, {"params": weights, "side": "matrix"}])
    with pytest.raises(ValueError, match="group 0 is a 'matrix' group in the state dict and a 'adamw' group here"):
        pinned.load_state_dict(good)
    assert all(torch.equal(v, good["state"][i][k]) if isinstance(v, torch.Tensor) else v == good["state"][i][k]
               for i, s in opt.state_dict()["state"].items() for k, v in s.items())


def test_lr_scheduler_scales_both_sides():
    model, ref = Net(), Net()
    opt = MuonAdamW(model.named_parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch)
    ref_opt = MuonAdamW(ref.named_parameters(), lr=0.02)
    for _ in range(3):
        train(model, [opt], 1)
        train(ref, [ref_opt], 1)
        sched.step()
        for g in ref_opt.param_groups:
            g["lr"] *= 0.5
    assert [g["lr"] for g in opt.param_groups] == [0.02 / 8, 3e-3 / 8]
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert "0.0025" in opt.summary() and "0.000375" in opt.summary()


def test_closure_returns_loss_and_matches_manual_step():
    model, ref = Net(), Net()
    opt, ref_opt = MuonAdamW(model.named_parameters()), MuonAdamW(ref.named_parameters())

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        return loss

    for _ in range(3):
        with torch.no_grad():
            loss = opt.step(closure)
        assert loss.item() == train(ref, [ref_opt], 1)[0]
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_splits_and_refuses_bad_groups_whole():
    model = Net()
    named = dict(model.named_parameters())
    first = [n for n in named if not n.startswith("fc2")]
    opt = MuonAdamW([(n, named[n]) for n in first])
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [("fc1.weight", named["fc1.weight"])]})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [("fc2.weight", named["fc2.weight"]), ("fc2.bias", named["fc2.bias"])],
                             "adamw_lr": -1.0})
    assert len(opt.param_groups) == n_groups
    assert len(opt.matrix_optimizer.param_groups) + len(opt.adamw.param_groups) == n_groups
    opt.add_param_group({"params": [("fc2.weight", named["fc2.weight"]), ("fc2.bias", named["fc2.bias"])],
                         "lr": 0.01})
    assert [(g["side"], g["param_names"], g["lr"]) for g in opt.param_groups[n_groups:]] == [
        ("matrix", ["fc2.weight"], 0.01), ("adamw", ["fc2.bias"], 3e-3)]
    before = named["fc2.weight"].detach().clone()
    train(model, [opt], 1)
    assert not torch.equal(before, named["fc2.weight"])


# ---------------------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("fp32_state", [False, True])
def test_bf16_params(fp32_state):
    model = Net(dtype=torch.bfloat16)
    opt = MuonAdamW(model.named_parameters(), lr=0.02, adamw_lr=1e-2, fp32_state=fp32_state)
    losses = train(model, [opt], 20)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses[::4]
    state_dtype = torch.float32 if fp32_state else torch.bfloat16
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    # NorMuon (the default matrix side): momentum + second moment per matrix; AdamW: two moments per param
    assert len(tensors) == 2 * 3 + 2 * 8 and all(t.dtype == state_dtype for t in tensors)
    opt2 = MuonAdamW(model.named_parameters(), fp32_state=fp32_state)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    tensors2 = [v for s in opt2.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(t.dtype == state_dtype and torch.equal(t, u) for t, u in zip(tensors2, tensors))


# ---------------------------------------------------------------------------------------------- reporting
def test_summary_and_repr():
    opt = MuonAdamW(Net(), lr=0.02)
    text = opt.summary()
    lines = text.splitlines()
    assert lines[0].startswith("MuonAdamW: matrix side (NorMuon) 3 tensors")
    assert "adamw side (AdamW) 8 tensors" in lines[0]
    assert lines[1].split() == ["group", "side", "name", "shape", "dtype", "lr", "weight_decay", "why"]
    rows = {line.split()[2]: line.split() for line in lines[2:]}
    # NorMuon's own weight decay (1.0): MuonAdamW leaves it when weight_decay is not given
    assert rows["conv.weight"][1:] == ["matrix", "conv.weight", "8x8x3", "float32", "0.02", "1", "hidden", "matrix"]
    assert rows["embed.weight"][1] == "adamw" and rows["embed.weight"][-1] == "nn.Embedding"
    assert rows["head.weight"][-3:] == ["output", "head", "('head')"]
    assert rows["norm.bias"][-1] == "1-D" and rows["norm.bias"][5] == "0.003"
    with pytest.warns(UserWarning, match="no name"):
        assert "<param 0>" in MuonAdamW([torch.zeros(3, 3, requires_grad=True)]).summary()
    r = repr(opt)
    assert r.startswith("MuonAdamW(matrix_optimizer=NorMuon: 3 params, AdamW: 8 params") and "side: adamw" in r


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = Net()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match="matrix_optimizer: 'adam'.*'muon'"):
        MuonAdamW(model.named_parameters(), matrix_optimizer="adam")
    with pytest.raises(TypeError, match="not an OrthogonalizedOptimizer"):
        MuonAdamW(model.named_parameters(), matrix_optimizer=AdamW)
    with pytest.raises(ValueError, match=r"'fc1.bias' of shape \(16,\).*pinned to the matrix side"):
        MuonAdamW([{"params": [("fc1.bias", named["fc1.bias"])], "side": "matrix"}])
    with pytest.raises(ValueError, match=r"'conv.bias' of shape \(8,\).*routed by route\(\)"):
        MuonAdamW(model.named_parameters(), route=lambda n, p: "matrix")
    with pytest.raises(ValueError, match="returned 'muon'"):
        MuonAdamW(model.named_parameters(), route=lambda n, p: "muon")
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        MuonAdamW(model.named_parameters(), betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="matrix_kwargs sets 'lr'; pass it as MuonAdamW's lr"):
        MuonAdamW(model.named_parameters(), matrix_kwargs={"lr": 0.1})
    with pytest.raises(TypeError, match="adamw_kwargs sets 'betas'; pass it as MuonAdamW's adamw_betas"):
        MuonAdamW(model.named_parameters(), adamw_kwargs={"betas": (0.9, 0.9)})
    with pytest.raises(TypeError, match="unexpected argument.*ns_steps.*num_ns_steps"):
        MuonAdamW(model.named_parameters(), matrix_kwargs={"ns_steps": 3})
    with pytest.raises(ValueError, match="Invalid num_ns_steps"):
        MuonAdamW(model.named_parameters(), matrix_kwargs={"num_ns_steps": 0})
    with pytest.raises(ValueError, match=r"Invalid adamw_betas\[1\]: 1.5"):  # named as MuonAdamW takes it
        MuonAdamW(model.named_parameters(), adamw_betas=(0.9, 1.5))
    with pytest.raises(ValueError, match=r"Invalid learning rate \(lr\)"):
        MuonAdamW([torch.zeros(3, requires_grad=True)], lr=-1.0)  # checked even with no matrix params
    with pytest.raises(ValueError, match="'betas'.*write adamw_betas"):
        MuonAdamW([{"params": list(model.named_parameters()), "betas": (0.9, 0.9)}])
    with pytest.raises(ValueError, match="pinned to the adamw side but sets 'momentum'"):
        MuonAdamW([{"params": list(model.named_parameters()), "side": "adamw", "momentum": 0.9}])
    with pytest.raises(ValueError, match="pinned to the matrix side but sets adamw_lr"):
        MuonAdamW([{"params": [("fc1.weight", named["fc1.weight"])], "side": "matrix", "adamw_lr": 0.1}])
    with pytest.raises(ValueError, match="both 'lr' and 'adamw_lr'"):
        MuonAdamW([{"params": [named["fc1.bias"]], "side": "adamw", "lr": 0.1, "adamw_lr": 0.1}])
    with pytest.raises(ValueError, match="disagree"):
        MuonAdamW([{"params": [named["fc1.bias"]], "side": "adamw", "use_muon": True}])
    with pytest.raises(ValueError, match="Invalid side 'muon'"):
        MuonAdamW([{"params": [named["fc1.bias"]], "side": "muon"}])
    with pytest.raises(ValueError, match="empty parameter list"):
        MuonAdamW([])
    with pytest.raises(TypeError, match="route"):
        MuonAdamW(model.named_parameters(), route="by-name")
