"""Misconfigurations are refused with a clear error before anything changes; FLOP balance of the owners.

The multi-process cases run in one 2-rank launch (gloo, loopback) that checks every error on every rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import gloo_rank, run_ranks
from torch import nn

import emerging_optimizers as eo
from emerging_optimizers.distributed import assign_owners, matrix_ns_flops, rank_loads
from emerging_optimizers.orthogonalized_optimizers import AdaptiveMuon


# ---------------------------------------------------------------------------------------------- work balance
def _gpt_matrices(d: int, layers: int, separate_qkv: bool = True) -> list[tuple[int, int]]:
    per_layer = [(d, d)] * 4 if separate_qkv else [(3 * d, d), (d, d)]
    return (per_layer + [(4 * d, d), (d, 4 * d)]) * layers


@pytest.mark.parametrize("d, layers, qkv", [(768, 12, True), (1024, 24, False), (4096, 32, True)])
@pytest.mark.parametrize("world", [2, 4, 8, 16])
def test_each_rank_gets_its_share_of_newton_schulz_flops(d: int, layers: int, qkv: bool, world: int) -> None:
    """Every rank's Newton-Schulz FLOPs within 10% of total / W on GPT-like sets (LPT owner assignment)."""
    costs = [matrix_ns_flops(m, n) for m, n in _gpt_matrices(d, layers, qkv)]
    loads = rank_loads(costs, assign_owners(costs, world), world)
    mean = sum(costs) / world
    assert max(abs(x - mean) for x in loads) <= 0.10 * mean, [x / mean for x in loads]


def test_owner_assignment_is_deterministic_and_complete() -> None:
    costs = [3.0, 1.0, 2.0, 2.0, 1.0]
    assert assign_owners(costs, 2) == assign_owners(list(costs), 2)
    assert sorted(set(assign_owners(costs, 2))) == [0, 1]
    assert assign_owners(costs, 1) == [0] * 5
    with pytest.raises(ValueError, match="world"):
        assign_owners(costs, 0)


# ---------------------------------------------------------------------------------------------- single process
def test_process_group_needs_torch_distributed() -> None:
    w = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="not initialized"):
        eo.Muon([w], process_group=object())


def test_reduce_gradients_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="process_group"):
        eo.Muon([nn.Parameter(torch.randn(4, 4))], reduce_gradients=True)


def test_gather_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match="gather_dtype"):
        eo.Muon([nn.Parameter(torch.randn(4, 4))], gather_dtype=torch.int8)


def test_matrix_optimizer_without_distribution_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="PSGDPro does not take process_group"):
        eo.MuonAdamW(model, matrix_optimizer="psgd_pro", process_group=object())


# ---------------------------------------------------------------------------------------------- 2 real ranks
def _expect(exc: type[Exception], match: str, fn: Any) -> None:
    with pytest.raises(exc, match=match):
        fn()


def _errors_worker(rank: int, world: int, port: int, errors: Any) -> None:
    with gloo_rank(rank, world, port, errors):
        _check_errors(rank)


def _check_errors(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import DTensor, Partial

    # a process group without this rank (new_group is collective: every rank creates both)
    only = [dist.new_group([0]), dist.new_group([1])]
    other = only[1 - rank]
    _expect(ValueError, "does not contain this rank", lambda: eo.Muon([nn.Parameter(torch.randn(4, 4))],
                                                                       process_group=other))

    # FSDP1 flat parameters: refused by the matrix optimizers and by MuonAdamW (which would train all as AdamW)
    torch.manual_seed(0)
    fsdp1 = FullyShardedDataParallel(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), use_orig_params=False,
                                     device_id=torch.device("cpu"))
    _expect(ValueError, "FlatParameter", lambda: eo.Muon(list(fsdp1.parameters())))
    _expect(ValueError, "FlatParameter", lambda: eo.MuonAdamW(fsdp1))
    eo.AdamW(fsdp1.parameters())  # element-wise optimizers are fine with flat shards

    mesh = init_device_mesh("cpu", (2,))
    model = fully_shard(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)), mesh=mesh)
    weights = [p for p in model.parameters() if p.ndim == 2]
    # DTensor parameters with process_group (that is for replicated parameters)
    _expect(ValueError, "drop process_group", lambda: eo.Muon(weights, process_group=dist.group.WORLD))
    # optimizers whose update or weight projection needs whole weights
    _expect(ValueError, "does not support DTensor", lambda: eo.get_optimizer_cls("shampoo")(model.parameters()))
    _expect(ValueError, "post_weight_update_fn_inplace", lambda: eo.get_optimizer_cls("spel")(weights))
    _expect(ValueError, "does not support DTensor", lambda: eo.get_optimizer_cls("muown")(weights))
    _expect(ValueError, "namo", lambda: AdaptiveMuon(weights, moment2_method="namo"))
    # placements no optimizer can step, named
    partial = nn.Parameter(DTensor.from_local(torch.randn(4, 4), mesh, [Partial()], run_check=False))
    _expect(ValueError, r"Partial\(sum\)|P\(sum\)|Partial", lambda: eo.Muon([partial]))
    _expect(ValueError, "placements", lambda: eo.AdamW([partial]))
    # nothing was changed by the refused constructions: a supported optimizer still steps
    before = [p.detach().full_tensor().clone() for p in weights]
    opt = eo.Muon(weights, lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert all(not torch.equal(b, p.detach().full_tensor()) for b, p in zip(before, weights))


def test_misconfigurations_are_refused_on_real_ranks() -> None:
    run_ranks(_errors_worker, 2, timeout=180)
