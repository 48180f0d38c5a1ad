"""``emopt bench``: the cost of ``optimizer.step()`` on a GPT-like parameter set, against torch.optim.

Parameters: :class:`~emerging_optimizers.cli.models.CharTransformer` with ``--layers`` blocks of width
``--dim`` and a ``--vocab`` embedding and untied head (defaults 6 x 512 and 8192: 27M parameters), with
fixed random gradients (shared by all variants; optimizers never modify gradients). Every variant owns
its own copy of the parameters and its own state.

Which parameters a variant updates: scalar, PSGD and whole-model optimizers get all of them; matrix-only
optimizers (orthogonalized, manifold) and ``torch.optim.Muon`` get the hidden 2-D matrices (attention and MLP
weights), as they would in a hybrid setup. The ``params`` column says how many each one steps.

Timing: ``--warmup`` untimed steps (state allocation, compilation), then ``--rounds`` rounds; each round
times ``--steps`` consecutive steps of every variant, in an order rotated every round so no variant
always runs first. Reported: the median over rounds of the mean ms per step, and its ratio to torch's
``AdamW(fused=True)`` (and, for matrix-only variants, to ``torch.optim.Muon``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from emerging_optimizers import registry
from emerging_optimizers.cli import specs
from emerging_optimizers.cli.models import CharTransformer

__all__ = ["Variant", "gpt_like_model", "hidden_matrices", "time_variants", "run"]


def gpt_like_model(layers: int, dim: int, vocab: int, seed: int = 0) -> nn.Module:
    """A :class:`CharTransformer` of the given size (context 64, heads of width 64 where possible)."""
    torch.manual_seed(seed)
    heads = max(1, dim // 64) if dim % 64 == 0 else 1
    return CharTransformer(vocab, context=64, dim=dim, depth=layers, num_heads=heads)


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named 2-D parameters inside the transformer blocks (not the embedding or the head)."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]


@dataclass
class Variant:
    label: str
    opt: torch.optim.Optimizer
    numel: int
    matrix_only: bool
    ms: list[float] = field(default_factory=list)


def time_variants(variants: list[Variant], steps: int, rounds: int, warmup: int) -> None:
    """Fill ``v.ms`` with one mean ms/step per round for each variant, interleaved."""
    for v in variants:
        for _ in range(warmup):
            v.opt.step()
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = time.perf_counter()
            for _ in range(steps):
                v.opt.step()
            v.ms.append((time.perf_counter() - t0) * 1e3 / steps)


def run(args: argparse.Namespace) -> int:
    names = specs.load_registry()
    tokens = args.optimizers or [n for n in ("adamw", "muon", specs.WHOLE_MODEL) if n in names]
    spec_list = specs.parse_specs(tokens)
    for s in spec_list:
        if specs.is_baseline(s.name):
            raise specs.UsageError(f"{s.label!r} is a torch.optim baseline of `emopt compare`; `emopt bench` times "
                                   "torch.optim.AdamW and torch.optim.Muon itself (unless --no-torch): give our "
                                   "optimizers only.")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, spec_list)
    finally:
        torch.set_num_threads(old_threads)


def _run(args: argparse.Namespace, spec_list: list[specs.OptimizerSpec]) -> int:
    template = gpt_like_model(args.layers, args.dim, args.vocab)
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-3 for n, p in template.named_parameters()}
    total = sum(p.numel() for p in template.parameters())
    hidden_numel = sum(p.numel() for _, p in hidden_matrices(template))

    def copy_model() -> nn.Module:
        model = copy.deepcopy(template)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        return model

    variants: list[Variant] = []
    builders: list[tuple[str, Callable[[], Variant]]] = []
    if not args.no_torch:
        builders.append(("torch AdamW fused", lambda: Variant(
            "torch AdamW fused", torch.optim.AdamW(list(copy_model().parameters()), fused=True), total, False)))
        builders.append(("torch AdamW foreach", lambda: Variant(
            "torch AdamW foreach", torch.optim.AdamW(list(copy_model().parameters()), foreach=True), total, False)))
        if hasattr(torch.optim, "Muon"):
            builders.append(("torch Muon", lambda: Variant(
                "torch Muon", torch.optim.Muon([p for _, p in hidden_matrices(copy_model())]), hidden_numel, True)))
    for s in spec_list:
        cls = registry.get_optimizer_cls(s.name)
        matrix_only = bool(getattr(cls, "matrix_only", False)) and not specs.is_whole_model(s.name)

        def build(s: specs.OptimizerSpec = s, cls: type = cls, matrix_only: bool = matrix_only) -> Variant:
            model = copy_model()
            params = hidden_matrices(model) if matrix_only else list(model.named_parameters())
            try:
                opt = cls(params, **s.overrides)
            except (TypeError, ValueError) as exc:
                raise specs.UsageError(f"Cannot build optimizer {s.label!r} ({cls.__name__}): {exc}") from exc
            return Variant(s.label, opt, hidden_numel if matrix_only else total, matrix_only)

        builders.append((s.label, build))
    for _, b in builders:
        variants.append(b())

    print(f"GPT-like parameter set: {args.layers} blocks x d_model {args.dim}, vocab {args.vocab}: "
          f"{total / 1e6:.1f}M params ({hidden_numel / 1e6:.1f}M in hidden matrices); {args.threads} thread(s), "
          f"torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps",
          flush=True)
    time_variants(variants, args.steps, args.rounds, args.warmup)
    med = {v.label: statistics.median(v.ms) for v in variants}
    base = med.get("torch AdamW fused")
    muon = med.get("torch Muon")
    w = max(len(v.label) for v in variants)
    print(f"{'optimizer':<{w}}  {'params':>8}  {'ms/step':>9}  {'min':>9}  {'x AdamW fused':>13}  {'x torch Muon':>12}")
    for v in variants:
        r1 = f"{med[v.label] / base:.2f}" if base else "-"
        r2 = f"{med[v.label] / muon:.2f}" if (muon and v.matrix_only) else "-"
        print(f"{v.label:<{w}}  {v.numel / 1e6:>7.1f}M  {med[v.label]:>9.2f}  {min(v.ms):>9.2f}  {r1:>13}  {r2:>12}")
    sys.stdout.flush()
    return 0
