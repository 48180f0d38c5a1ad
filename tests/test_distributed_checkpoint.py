"""torch.distributed.checkpoint for every optimizer: save with 2 ranks, load with 1 and with 4, continue exactly.

Each optimizer (the first contract case of every registered name) trains a small float64 MLP for two steps on
2 real processes (gloo, loopback), saves model + optimizer with ``get_state_dict`` / ``dcp.save``, and goes
on for two more steps: the uninterrupted run. Fresh processes (1 rank, then 4 ranks) build the model from
another seed, load with ``dcp.load`` / ``set_state_dict`` and take the same two steps; every parameter must
match the uninterrupted run.

Layout: optimizers that step DTensor parameters run under FSDP2 (``fully_shard``: model and optimizer state
are DTensors, resharded 2 -> 1 and 2 -> 4 by DCP); the others (Kronecker, manifold, weight-projecting ones)
run replicated (every rank the whole batch; DCP de-duplicates the identical state).

Tolerance: float64. Replicated runs compute the same thing on every rank; FSDP2 runs differ only by the
order of the gradient sum over 2 / 1 / 4 ranks (~1e-16 relative), grown by a few steps: ``1e-9`` leaves 10^4
of margin and sits 10^6 below one update. Checked that it bites: loading the model but not the optimizer
state fails it for 31 of the 32 optimizers (rekls_v3's two further steps do not depend on its saved state).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from contract_cases import CASES
from distributed_helpers import gloo_rank, run_ranks
from torch import nn

import emerging_optimizers as eo

pytestmark = pytest.mark.distributed  # starts real processes

STEPS_BEFORE, STEPS_AFTER = 2, 2
#: One contract case per optimizer name (the first, with its default options).
NAMES = list(dict.fromkeys(c.id.split("-")[0] for c in CASES))
_NO_FSDP = {"spel", "muon_hyperball"}  # weight projections need whole weights: refused with DTensor params


def _case(name: str) -> Any:
    return next(c for c in CASES if c.id.split("-")[0] == name)


def _uses_fsdp(name: str) -> bool:
    cls = eo.get_optimizer_cls(name) if name != "mxnet_signum" else None
    return cls is not None and bool(getattr(cls, "dtensor_support", False)) and name not in _NO_FSDP


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 12, generator=g, dtype=torch.float64), torch.randn(8, 10, generator=g, dtype=torch.float64))
            for _ in range(STEPS_BEFORE + STEPS_AFTER)]


def _setup(name: str, seed: int, world: int, rank: int) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    case = _case(name)
    model = _model(seed)
    if case.matrix_only:
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.requires_grad_(False)
    fsdp = _uses_fsdp(name)
    if fsdp:
        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, case.build(params, **{case.lr_arg: case.lr}), fsdp


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches: list[Any], fsdp: bool, rank: int,
           world: int) -> None:
    for x, y in batches:
        if fsdp:  # data parallel: each rank its slice of the batch (FSDP2 averages the gradients)
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def _save_worker(rank: int, world: int, port: int, errors: Any, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with gloo_rank(rank, world, port, errors):
        batches = _batches()
        for name in NAMES:
            model, opt, fsdp = _setup(name, 0, world, rank)
            _train(model, opt, batches[:STEPS_BEFORE], fsdp, rank, world)
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(root) / name))
            _train(model, opt, batches[STEPS_BEFORE:], fsdp, rank, world)
            final = _full_params(model)
            if rank == 0:
                torch.save(final, Path(root) / f"{name}.expected.pt")


def _load_worker(rank: int, world: int, port: int, errors: Any, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    failures = []
    with gloo_rank(rank, world, port, errors):
        batches = _batches()
        for name in NAMES:
            try:
                model, opt, fsdp = _setup(name, 123, world, rank)  # another init: the checkpoint must set it all
                msd, osd = get_state_dict(model, opt)
                state = {"model": msd, "optim": osd}
                dcp.load(state, checkpoint_id=str(Path(root) / name))
                set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                _train(model, opt, batches[STEPS_BEFORE:], fsdp, rank, world)
                expected = torch.load(Path(root) / f"{name}.expected.pt")
                for i, (got, want) in enumerate(zip(_full_params(model), expected)):
                    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9,
                                               msg=lambda m, i=i, name=name: f"{name} param {i} ({world} ranks): {m}")
            except Exception:
                failures.append(f"{name}: {traceback.format_exc()}")
        assert not failures, "\n".join(failures)


def test_checkpoint_saved_on_2_ranks_resumes_on_1_and_4(tmp_path: Path) -> None:
    run_ranks(_save_worker, 2, str(tmp_path), timeout=300)
    run_ranks(_load_worker, 1, str(tmp_path), timeout=300)
    run_ranks(_load_worker, 4, str(tmp_path), timeout=300)
