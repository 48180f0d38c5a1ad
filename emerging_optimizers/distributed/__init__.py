"""Distributed execution on torch.distributed: ownership of the matrix work, collectives, DTensor layouts.

The optimizers use this package by themselves (``process_group=`` for replicated parameters; DTensor
parameters of FSDP2 / tensor parallelism are detected). See docs/distributed.md.
"""

from emerging_optimizers.distributed.comm import COMM_STATS, CommStats, is_dtensor, local
from emerging_optimizers.distributed.ownership import assign_owners, matrix_ns_flops, rank_loads, shard_sizes

__all__ = ["COMM_STATS", "CommStats", "assign_owners", "is_dtensor", "local", "matrix_ns_flops", "rank_loads",
           "shard_sizes"]
