"""benchmarks/bench_sizes.py --quick: one table per set with a row per variant, and a summary table (variant x set);
no timing assertions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sizes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sizes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_sizes"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_sizes", None)


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables of ``text``: each a list of rows (header first), separator lines dropped."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not line.startswith("|---"):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return tables


def test_quick_run_prints_a_table_per_set_and_a_summary(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sizes.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    labels = list(bench.variant_builders())
    assert len(labels) == 2 + 2 * len(bench.OURS) + 1

    tables = _tables(text)
    assert len(tables) == len(bench.QUICK_SIZES) + 1
    *per_set, summary = tables
    for table in per_set:
        header, *rows = table
        assert header[0] == "optimizer" and "x floor" in header and "first step s" in header
        assert [r[0] for r in rows] == labels
        assert all(len(r) == len(header) for r in rows)
        base = rows[0]
        assert base[header.index("x torch fused")] == "1.00" and base[header.index("x floor")] == "1.00"
        by_label = {r[0]: r for r in rows}
        b = header.index("B/elem")
        assert by_label["adamw"][b] == "28" and by_label["lion"][b] == "20" and by_label["ademamix"][b] == "36"
        assert by_label["adamw state_dtype=bf16"][b] == "20"
    header, *rows = summary
    assert len(header) == 1 + len(bench.QUICK_SIZES)
    assert [r[0] for r in rows] == labels
    assert all(len(r) == len(header) and all(c != "-" for c in r[1:]) for r in rows)
    assert text.index("Summary") > text.rindex("CPU:") > text.index("Byte floor")

    report = json.loads(out.read_text())
    assert [s["name"] for s in report["sizes"]] == bench.QUICK_SIZES
    assert set(report["sizes"][0]["variants"]) == set(labels)


def test_unknown_set_is_a_usage_error(bench) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "3M"])


def test_a_variant_that_raises_is_reported_failed_and_the_others_go_on(bench, monkeypatch, capsys) -> None:
    class Broken(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            raise RuntimeError("boom")

    builders = bench.variant_builders()
    monkeypatch.setattr(bench, "variant_builders", lambda: {**builders, "broken": Broken})
    assert bench.main(["--quick", "--sizes", "tiny"]) == 0
    header, *rows = _tables(capsys.readouterr().out)[0]
    by_label = {r[0]: r for r in rows}
    assert by_label["broken"][1] == "failed: RuntimeError: boom"
    assert by_label["torch AdamW fused"][header.index("x floor")] == "1.00"
