"""Start N real processes on loopback (gloo), and stop every one of them even when the test fails.

``run_ranks(worker, world, *args)`` calls ``worker(rank, world, port, errors, *args)`` in ``world`` spawned
processes; a worker reports a failure by putting its traceback on ``errors`` (and must destroy its process
group in a ``finally``). The test fails with every rank's traceback, or when a rank exits non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(worker: Callable[..., None], world: int, *args: Any, timeout: float = 120) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    env = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    procs = []
    try:
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, errors, *args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout  # one deadline for all ranks, not one per rank
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:  # stop every rank, even when the test fails
            if p.is_alive():
                p.kill()
                p.join()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


#: A collective that waits longer than this raises (with the stack of where it waited) instead of hanging:
#: a rank that fails between collectives leaves the others waiting in their next one.
COLLECTIVE_TIMEOUT_S = 90


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int, errors: Any) -> Iterator[None]:
    """The body of a worker: one thread, a gloo process group on loopback, any failure reported on ``errors``
    (with the rank), and the group destroyed whatever happens."""
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        yield
    except Exception:
        errors.put(f"rank {rank} of {world}:\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Leave at once: the result is on ``errors`` already, and interpreter shutdown can wait forever on
        # threads that torch's libraries left behind (seen: a rank that finished its work never exited)
        sys.stderr.flush()
        os._exit(0)
