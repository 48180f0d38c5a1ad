"""How a DTensor parameter is laid out, and the checks that refuse layouts the optimizers cannot handle.

The orthogonalized optimizers need whole matrices. For a DTensor sharded along one tensor dim over one
mesh dim (FSDP2's ``Shard(0)``, HSDP's ``(Replicate(), Shard(0))``, tensor parallel ``Shard(0)`` /
``Shard(1)``) they assemble each matrix on one owner rank of that mesh dim's process group
(:class:`ShardLayout`). Other shardings (several mesh dims, strided shards: 2-D FSDP + TP) are gathered
whole on every rank (``full_tensor``), which is correct but repeats the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from emerging_optimizers.distributed.comm import is_dtensor
from emerging_optimizers.distributed.ownership import shard_sizes

__all__ = ["ShardLayout", "check_dtensor_placements", "is_flat_param", "shard_layout"]


@dataclass(frozen=True)
class ShardLayout:
    """A tensor split along ``dim`` over the ``size`` ranks of ``group`` (``rank``: ours in it)."""

    group: Any
    mesh_dim: int
    dim: int
    size: int
    rank: int
    key: tuple[int, int]  # (id of the mesh, mesh dim): params with equal keys exchange together

    def local_shape(self, shape: torch.Size | tuple[int, ...], rank: int) -> torch.Size:
        """Shape of rank ``rank``'s shard of a tensor of global ``shape``."""
        dims = list(shape)
        dims[self.dim] = shard_sizes(shape[self.dim], self.size)[rank]
        return torch.Size(dims)

    def split(self, full: torch.Tensor) -> list[torch.Tensor]:
        """``full`` cut into the ranks' shards (DTensor's ``Shard`` layout: ``torch.chunk``, empty at the end)."""
        return list(full.split(shard_sizes(full.shape[self.dim], self.size), dim=self.dim))


def is_flat_param(p: Any) -> bool:
    """Whether ``p`` is FSDP1's ``FlatParameter`` (``use_orig_params=False``): many tensors flattened into one."""
    try:
        from torch.distributed.fsdp._flat_param import FlatParameter
    except ImportError:  # pragma: no cover
        return False
    return isinstance(p, FlatParameter)


def _is_shard(pl: Any) -> bool:
    """``Shard(d)`` or the strided shard FSDP2 uses on top of tensor parallelism (``_StridedShard``)."""
    return bool(pl.is_shard()) or "StridedShard" in type(pl).__name__


def check_dtensor_placements(p: Any, who: str) -> None:
    """Refuse placements no optimizer can step (``Partial``: a parameter is never a pending sum)."""
    bad = [pl for pl in p.placements if not (pl.is_replicate() or _is_shard(pl))]
    if bad:
        raise ValueError(
            f"{who}: a DTensor parameter of shape {tuple(p.shape)} has placements {tuple(p.placements)}; "
            f"{', '.join(map(str, bad))} cannot be stepped (a parameter must be Replicate() or Shard(d) on "
            "every mesh dim). Redistribute it to Shard/Replicate placements."
        )


def shard_layout(p: torch.Tensor) -> ShardLayout | str | None:
    """``None``: not sharded (a plain tensor or a replicated DTensor: the local tensor is the whole matrix);
    a :class:`ShardLayout`: sharded along one dim over one mesh dim; ``"gather"``: any other sharding."""
    if not is_dtensor(p):
        return None
    placements = p.placements  # type: ignore[attr-defined]
    sharded = [i for i, pl in enumerate(placements) if _is_shard(pl)]
    if not sharded or all(p.device_mesh.size(i) == 1 for i in sharded):  # type: ignore[attr-defined]
        return None  # the local tensor is the whole matrix (e.g. FSDP2 on one rank)
    if len(sharded) > 1 or type(placements[sharded[0]]).__name__ != "Shard":
        return "gather"
    mesh = p.device_mesh  # type: ignore[attr-defined]
    mesh_dim = sharded[0]
    group = mesh.get_group(mesh_dim)
    dim = placements[mesh_dim].dim % p.ndim
    return ShardLayout(group=group, mesh_dim=mesh_dim, dim=dim, size=mesh.size(mesh_dim),
                       rank=mesh.get_local_rank(mesh_dim), key=(id(mesh), mesh_dim))
