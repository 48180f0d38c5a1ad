"""The table of bad gradients tried per optimizer and what each ``nonfinite`` policy did (docs/nonfinite.md).

For every registered optimizer (built as in tests/contract_cases.py, the first row of its name), on a small
MLP after one good step: NaN, +Inf, -Inf in one element of one gradient, and in every gradient.

* ``skip``: "ok" when params and state are bit-identical after the bad step, the counter is 1, and three
  more good steps equal a run that never saw the bad batch (what tests/test_nonfinite.py asserts);
* ``raise``: "ok" when NonFiniteGradientError is raised and nothing changed;
* ``off`` (no check; what every optimizer did before the policy existed): where the bad value went.

Usage: ``python scripts/nonfinite_report.py [--out docs/nonfinite.md]``
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from contract_cases import CASES

from emerging_optimizers import registry
from emerging_optimizers.base import NonFiniteGradientError

KINDS = [(v, w) for v in ("nan", "inf", "-inf") for w in ("one", "all")]


def model_for(case):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    bias = not case.matrix_only
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 3, bias=bias))


def build(case, model, **kw):  # type: ignore[no-untyped-def]
    params = list(model.named_parameters()) if case.id.startswith("muon_adamw") else list(model.parameters())
    return case.build(params, **{case.lr_arg: case.lr, **kw})


def step(model, opt, i):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def bad_grads(model, value: str, where: str) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(99)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    for p in params if where == "all" else params[:1]:
        p.grad.view(-1)[0] = float(value)


def same(a, b) -> bool:  # type: ignore[no-untyped-def]
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outcome(case, policy: str, value: str, where: str) -> str:  # type: ignore[no-untyped-def]
    model = model_for(case)
    opt = build(case, model, nonfinite=policy)
    clean_model = model_for(case)
    clean = build(case, clean_model)
    step(model, opt, 0)
    step(clean_model, clean, 0)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    bad_grads(model, value, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt.step()
        except NonFiniteGradientError:
            unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
            return "raised, unchanged" if unchanged and same(opt.state_dict()["state"], state) else "raised, CHANGED"
        except Exception as e:
            return f"{type(e).__name__}"
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    if policy == "skip":
        ok = unchanged and same(opt.state_dict()["state"], state) and opt.nonfinite_skipped == 1
        for i in range(1, 4):
            step(model, opt, i)
            step(clean_model, clean, i)
        ok = ok and all(torch.equal(p, q) for p, q in zip(model.parameters(), clean_model.parameters()))
        return "skipped, = clean run" if ok else "FAILED"
    weights_bad = not all(torch.isfinite(p).all() for p in model.parameters())
    state_bad = any(not torch.isfinite(t).all() for s in opt.state.values() for t in s.values()
                    if isinstance(t, torch.Tensor) and t.is_floating_point())
    if weights_bad:
        return "into weights"
    if state_bad:
        return "into state"
    return "no visible effect" if unchanged else "finite step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here (default: print)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    by_name = {}
    for case in CASES:
        name = case.id.split("-")[0]
        by_name.setdefault(name, case)
    names = registry.get_optimizer_name_list()
    header = "| optimizer | skip (all 6 inputs) | raise (all 6) | off: " + " | off: ".join(
        f"{v} {w}" for v, w in KINDS) + " |"
    lines = [header, "|" + "---|" * (3 + len(KINDS))]
    for name in names:
        case = by_name.get(name)
        if case is None:
            lines.append(f"| {name} | (no contract case) |")
            continue
        skip = {outcome(case, "skip", v, w) for v, w in KINDS}
        rais = {outcome(case, "raise", v, w) for v, w in KINDS}
        off = [outcome(case, "off", v, w) for v, w in KINDS]
        lines.append(f"| {name} | {', '.join(sorted(skip))} | {', '.join(sorted(rais))} | " + " | ".join(off) + " |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
