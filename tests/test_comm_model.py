"""The distributed-Muon cost model: formulas checked on tiny cases worked out by hand, plus GPT-scale properties."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from emerging_optimizers.distributed.comm_model import DESIGNS, design_costs, gpt_shapes, table
from emerging_optimizers.distributed.ownership import matrix_ns_flops

C44 = matrix_ns_flops(4, 4)  # 5 * (4*16*4 + 2*64) = 1920
GPT_7B = gpt_shapes(4096, 32, 50304)
GPT_SMALL = gpt_shapes(768, 12, 50304)


def cost(design: str, shapes: list[tuple[int, int]], world: int, other: int = 0, **kw: int) -> dict[str, float]:
    return design_costs(design, shapes, other, world, **kw)


def test_gpt_shapes() -> None:
    shapes, other = gpt_shapes(8, 2, 10)
    assert shapes == ([(8, 8)] * 4 + [(32, 8), (8, 32)]) * 2
    assert other == 10 * 8 * 2 + 5 * 8  # embedding + untied head + (2 L + 1) norms
    assert gpt_shapes(8, 2, 10, tied=True)[1] == 10 * 8 + 5 * 8
    assert gpt_shapes(8, 1, 10, mlp_ratio=2)[0][4:] == [(16, 8), (8, 16)]


@pytest.mark.parametrize("design", DESIGNS)
def test_one_rank_sends_nothing_and_runs_everything(design: str) -> None:
    shapes, other = GPT_SMALL
    c = design_costs(design, shapes, other, 1)
    assert c["bytes_per_rank"] == c["bytes_max_rank"] == c["bytes_grad_sync"] == c["bytes_extra"] == 0
    assert c["ns_flops_max_rank"] == pytest.approx(sum(matrix_ns_flops(m, n) for m, n in shapes))
    assert c["imbalance"] == c["ns_redundancy"] == c["ns_speedup"] == 1.0


def test_two_equal_matrices_on_two_ranks() -> None:
    """W = 2, two 4x4 matrices (M = 32), no other params: f = 1/2, every rank NS-es exactly one matrix."""
    shapes = [(4, 4), (4, 4)]
    expected_opt = {
        "kj-muon": 0.5 * 32 * 4,  # one chunk, all-gather of fp32 params
        "modded-nanogpt": 2 * 0.5 * 32 * 2,  # RS bf16 + AG bf16
        "moonlight-zero1": 2 * 0.5 * 32 * 4,  # RS + AG fp32; partitions align with matrices: no bf16 gather
        "dion-ddp": 0.5 * 32 * 2,  # AG bf16
        "dion-fsdp2": 2 * 0.5 * 2 * (2 * 4) * 2,  # 2 all_to_all of 2 local 2x4 shards, bf16
        "ours-ddp": 0.5 * 2 * 16 * 4,  # AG of W x max payload (16), fp32
        "ours-zero": 0.5 * 2 * 16 * (4 + 4),  # + RS of the grads, fp32
        "ours-fsdp2": 0.5 * (32 / 2) * (4 + 4),  # send the other rank's shard (8 el.), return the own update shard
    }
    ddp, fsdp = 2 * 0.5 * 32 * 4, 2 * 0.5 * 32 * 4
    expected_sync = {"kj-muon": ddp, "modded-nanogpt": 0, "moonlight-zero1": 0, "dion-ddp": ddp, "dion-fsdp2": fsdp,
                     "ours-ddp": ddp, "ours-zero": 0, "ours-fsdp2": fsdp}
    for design, opt in expected_opt.items():
        c = cost(design, shapes, 2)
        assert (c["bytes_per_rank"], c["bytes_max_rank"], c["bytes_grad_sync"]) == (opt, opt, expected_sync[design])
        assert (c["ns_flops_max_rank"], c["ns_flops_mean"], c["imbalance"], c["ns_redundancy"]) == (C44, C44, 1, 1)
    c = cost("torch-muon", shapes, 2)
    assert (c["bytes_per_rank"], c["bytes_grad_sync"]) == (0, ddp)
    assert (c["ns_flops_max_rank"], c["ns_redundancy"]) == (2 * C44, 2)
    assert c["ns_seconds"] == 2 * C44 / 400e12
    assert cost("ours-zero", shapes, 2)["bytes_extra"] == 0  # RS + AG = one all-reduce: zero extra bytes


def test_bf16_gather_option() -> None:
    shapes = [(4, 4), (4, 4)]
    assert cost("ours-ddp", shapes, 2, gather_bytes=2)["bytes_per_rank"] == 0.5 * 2 * 16 * 2
    assert cost("ours-zero", shapes, 2, gather_bytes=2)["bytes_per_rank"] == 0.5 * 2 * 16 * (4 + 2)
    assert cost("ours-fsdp2", shapes, 2, gather_bytes=2)["bytes_per_rank"] == 0.5 * 16 * (4 + 2)
    assert cost("dion-ddp", shapes, 2, gather_bytes=2) == cost("dion-ddp", shapes, 2)  # public designs: own dtypes


def test_gather_padded_to_the_largest_payload() -> None:
    """Padding up to 25% is accepted (one all-gather); beyond, each owner broadcasts its exact payload."""
    shapes = [(4, 4), (4, 4), (4, 4), (2, 2)]  # W = 2: payloads 32 and 20 elements: 2 x 32 <= 1.25 x 52
    assert cost("ours-ddp", shapes, 2)["bytes_per_rank"] == 0.5 * 2 * 32 * 4
    assert cost("ours-zero", shapes, 2)["bytes_per_rank"] == 0.5 * 2 * 32 * 8
    shapes = [(4, 4), (2, 2)]  # payloads 16 and 4: 2 x 16 > 1.25 x 20, so broadcasts of 16 and 4
    assert cost("ours-ddp", shapes, 2)["bytes_per_rank"] == 0.5 * 20 * 4
    assert cost("ours-zero", shapes, 2)["bytes_per_rank"] == 0.5 * 20 * 8
    # FSDP2 all_to_all has uneven splits: no padding; rank 0 owns 4x4, rank 1 owns 2x2 (2 rows of 4 / 1 row of 2).
    c = cost("ours-fsdp2", shapes, 2)
    sent0, sent1 = 2 * 4 * 4 + 1 * 2 * 4, 2 * 4 * 4 + 1 * 2 * 4
    assert (c["bytes_per_rank"], c["bytes_max_rank"]) == ((sent0 + sent1) / 2, max(sent0, sent1))


def test_dion_and_modded_pad_n_to_a_multiple_of_world() -> None:
    shapes = [(4, 4)] * 3  # W = 2: padded to 4 matrices, 2 per rank, one of them zero
    for design in ("dion-ddp", "dion-fsdp2", "modded-nanogpt"):
        c = cost(design, shapes, 2)
        assert (c["padded_matrices"], c["ns_flops_max_rank"], c["imbalance"]) == (1, 2 * C44, 1)
        assert c["ns_redundancy"] == pytest.approx(4 / 3)
    assert cost("dion-ddp", shapes, 2)["bytes_per_rank"] == 0.5 * 4 * 16 * 2
    assert cost("dion-fsdp2", shapes, 2)["bytes_per_rank"] == 2 * 0.5 * 4 * (2 * 4) * 2
    assert cost("modded-nanogpt", shapes, 2)["bytes_per_rank"] == 2 * 0.5 * 4 * 16 * 2
    # Ours: LPT over 3 equal jobs gives 2 + 1; padding to 2 matrices per rank would add 33%, so the two owners
    # broadcast their exact payloads (3 matrices in all).
    c = cost("ours-ddp", shapes, 2)
    assert (c["padded_matrices"], c["ns_flops_max_rank"], c["bytes_per_rank"]) == (0, 2 * C44, 0.5 * 48 * 4)
    assert c["imbalance"] == pytest.approx(2 / 1.5)


def test_dion_ddp_runs_a_single_matrix_group_everywhere() -> None:
    c = cost("dion-ddp", [(4, 4), (4, 4), (2, 8)], 2)
    assert c["bytes_per_rank"] == 0.5 * 32 * 2  # the 2x8 group is not gathered
    assert c["ns_flops_max_rank"] == C44 + matrix_ns_flops(2, 8)
    assert cost("dion-fsdp2", [(2, 8)], 2)["padded_matrices"] == 1  # FSDP2 path pads it instead


def test_kj_muon_round_robin_over_size_sorted_list() -> None:
    """Sorted by p.size() (shape tuple) descending: (4,3), (2,8), (1,1); rank 0 gets (4,3) and (1,1)."""
    c = cost("kj-muon", [(2, 8), (4, 3), (1, 1)], 2)
    assert c["ns_flops_max_rank"] == matrix_ns_flops(4, 3) + matrix_ns_flops(1, 1)
    # chunk 0 gathers 12 + 16 elements; chunk 1 gathers 1 + a padding copy of the smallest (1) element.
    assert c["bytes_per_rank"] == 0.5 * (12 + 16 + 1 + 1) * 4
    # more ranks than matrices: idle ranks send padding copies of the smallest matrix
    assert cost("kj-muon", [(4, 4), (2, 2)], 4)["bytes_per_rank"] == 0.75 * (16 + 4 + 4 + 4) * 4


def test_moonlight_duplicates_ns_at_partition_boundaries() -> None:
    """Two 4x4 on W = 4: partitions of 8 elements, each matrix spans 2 ranks, each rank NS-es one full matrix."""
    c = cost("moonlight-zero1", [(4, 4), (4, 4)], 4)
    assert c["bytes_per_rank"] == 2 * 0.75 * 32 * 4 + 8 * 1 * 2  # RS + AG fp32, own 8-element slice to 1 peer
    assert (c["ns_flops_max_rank"], c["imbalance"], c["ns_redundancy"]) == (C44, 1, 2)
    # 3 matrices of 6 elements on W = 2: partition 9; the middle one straddles and is run by both ranks.
    c = cost("moonlight-zero1", [(2, 3)] * 3, 2)
    assert c["ns_flops_max_rank"] == 2 * matrix_ns_flops(2, 3)
    assert c["bytes_max_rank"] - 2 * 0.5 * 18 * 4 == 3 * 1 * 2  # each rank holds 3 of its elements


def test_other_params_only_in_grad_sync() -> None:
    c = design_costs("ours-zero", [(4, 4), (4, 4)], 10, 2)
    assert c["bytes_grad_sync"] == 2 * 0.5 * 10 * 4
    assert c["bytes_extra"] == 0
    assert design_costs("ours-fsdp2", [(4, 4), (4, 4)], 10, 2)["bytes_grad_sync"] == 2 * 0.5 * (32 + 10) * 4
    # FSDP2's own traffic counts dim-0 padding: 3 rows on 2 ranks are 2 + 1, padded to 2 + 2.
    assert design_costs("ours-fsdp2", [(3, 4)], 0, 2)["bytes_grad_sync"] == 2 * 0.5 * 16 * 4


@pytest.mark.parametrize("shapes_other", [GPT_7B, gpt_shapes(2048, 24, 50304)], ids=["7B", "1B"])
def test_ours_balanced_on_gpt_shapes_for_powers_of_two(shapes_other: tuple[list[tuple[int, int]], int]) -> None:
    shapes, other = shapes_other
    for w in (2, 4, 8, 16, 32, 64):
        assert design_costs("ours-ddp", shapes, other, w)["imbalance"] <= 1.10, w


@pytest.mark.parametrize("shapes_other", [GPT_7B, GPT_SMALL], ids=["7B", "d768x12"])
def test_ours_reaches_the_whole_matrix_optimum(shapes_other: tuple[list[tuple[int, int]], int]) -> None:
    """The limit of whole-matrix ownership, and LPT meets it for every W.

    GPT matrices cost 1 unit (d x d) or 3 units (4d x d, d x 4d); no assignment can beat
    max(ceil(total / W), 3) units on the busiest rank. So imbalance > 1.10 happens exactly where that bound
    forces it: integer granularity at some W that divides the matrices unevenly (7B, W = 63: 6 / (320 / 63)
    = 1.18), and W beyond total / 3 ranks where one big matrix exceeds the mean (7B: W >= 107).
    """
    shapes, other = shapes_other
    flops = [matrix_ns_flops(m, n) for m, n in shapes]
    unit, units = min(flops), round(sum(flops) / min(flops))
    assert max(flops) == 3 * unit
    for w in [*range(2, 65), 128, 256, 1024]:
        c = design_costs("ours-ddp", shapes, other, w)
        assert c["ns_flops_max_rank"] == pytest.approx(max(math.ceil(units / w), 3) * unit), w
        if 3 * unit * w <= 0.1 * sum(flops):  # Graham's LPT bound: max <= mean + largest job
            assert c["imbalance"] <= 1.10
    assert design_costs("ours-ddp", *GPT_7B, 63)["imbalance"] == pytest.approx(6 / (320 / 63))


def test_ours_fsdp2_bytes_shrink_with_world() -> None:
    shapes, other = GPT_7B
    mats = sum(m * n for m, n in shapes)
    worlds = [2, 4, 8, 16, 64, 256, 1024]
    sent = [design_costs("ours-fsdp2", shapes, other, w)["bytes_per_rank"] for w in worlds]
    assert all(a > b for a, b in zip(sent, sent[1:]))
    for w, s in zip(worlds, sent):  # shapes divide evenly: exactly f * (M / W) * (4 + 4)
        assert s == pytest.approx((w - 1) / w * mats / w * 8)


def test_errors_and_table() -> None:
    with pytest.raises(ValueError, match="unknown design"):
        design_costs("zero-3", [(4, 4)], 0, 2)
    with pytest.raises(ValueError, match="world"):
        design_costs("ours-ddp", [(4, 4)], 0, 0)
    rows = table([(4, 4), (4, 4)], 0, [1, 2])
    assert [(r["world"], r["design"]) for r in rows] == [(w, d) for w in (1, 2) for d in DESIGNS]


def test_cli_writes_markdown(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "t.md"
    cmd = [sys.executable, str(root / "benchmarks" / "comm_model_table.py"), "--d-model", "256", "--layers", "2",
           "--vocab", "1000", "--worlds", "1,2,4", "--tflops", "100", "--out", str(out)]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root).stdout
    text = out.read_text()
    assert printed.strip() == text.strip()
    assert "100 TFLOP/s" in text and all(d in text for d in DESIGNS)
