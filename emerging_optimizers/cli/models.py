"""Small models for the ``emopt`` tasks: a GPT-like character LM, a ViT and an MLP.

Parameter names follow the usual conventions (``embed``, ``pos_embed``, ``blocks.N.attn.qkv``, ``head``)
so that whole-model optimizers that route parameters by name and shape (``muon_adamw``: orthogonalized
updates for hidden matrices, AdamW for embeddings, the output head, norms and biases) see what they
would see in a real transformer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "CharTransformer", "VisionTransformer", "MLP"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (``qkv``) and an output projection (``proj``)."""

    def __init__(self, dim: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` with a 4x GELU MLP."""

    def __init__(self, dim: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, causal)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style init: N(0, 0.02) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


class CharTransformer(nn.Module):
    """Decoder-only character LM: token + learned position embeddings, ``depth`` blocks, untied head.

    ``forward(idx)`` maps ``[batch, time]`` token ids to ``[batch, time, vocab]`` logits.
    """

    def __init__(self, vocab_size: int, context: int = 64, dim: int = 128, depth: int = 4, num_heads: int = 4) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(context, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, causal=True) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        _init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos_embed[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class VisionTransformer(nn.Module):
    """ViT for square single-channel images: non-overlapping patches, a class token, ``depth`` blocks."""

    def __init__(self, image_size: int = 28, patch: int = 7, dim: int = 64, depth: int = 4, num_heads: int = 4,
                 num_classes: int = 10) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size} must be divisible by patch={patch}.")
        self.patch = patch
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, causal=False) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_weights(self)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, p = images.shape[0], self.patch
        # [b, H, W] -> [b, (H/p)*(W/p), p*p]
        patches = images.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))


class MLP(nn.Module):
    """``in -> hidden -> hidden -> classes`` with GELU; named ``fc1``, ``fc2`` (hidden) and ``head``."""

    def __init__(self, in_features: int, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))
