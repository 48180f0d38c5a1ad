"""A GPT-like parameter set for optimizer benchmarks (no model, just the tensors an optimizer sees)."""

from __future__ import annotations

import torch


def gpt_like_shapes(n_blocks: int = 6, d_model: int = 512, vocab: int = 8192, context: int = 1024,
                    mlp_ratio: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a GPT-2-style model: token/position embeddings, blocks with fused QKV, MLP, norms."""
    d, h = d_model, mlp_ratio * d_model
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (context, d))]
    for i in range(n_blocks):
        shapes += [
            (f"h.{i}.ln_1.weight", (d,)), (f"h.{i}.ln_1.bias", (d,)),
            (f"h.{i}.attn.c_attn.weight", (3 * d, d)), (f"h.{i}.attn.c_attn.bias", (3 * d,)),
            (f"h.{i}.attn.c_proj.weight", (d, d)), (f"h.{i}.attn.c_proj.bias", (d,)),
            (f"h.{i}.ln_2.weight", (d,)), (f"h.{i}.ln_2.bias", (d,)),
            (f"h.{i}.mlp.c_fc.weight", (h, d)), (f"h.{i}.mlp.c_fc.bias", (h,)),
            (f"h.{i}.mlp.c_proj.weight", (d, h)), (f"h.{i}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def make_params(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype = torch.float32,
                seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with random values and random gradients already set."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) * 0.02)
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params
