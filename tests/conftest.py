import pytest
import torch

import emerging_optimizers.utils as eo_utils


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    """Tests are small: one thread is faster on a shared 2-core machine and makes results reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_cpu_bf16_matmul(request, monkeypatch):
    """Same results on every machine: under ``"medium"`` Newton-Schulz picks bf16 on CPUs with bf16 matrix
    units (:func:`emerging_optimizers.utils.cpu_has_bf16_matmul`), which would break float32 comparisons there.

    Tests see a CPU without bf16 units unless marked ``@pytest.mark.real_cpu_bf16``; a test may force them
    with ``monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: True)``.
    """
    if request.node.get_closest_marker("real_cpu_bf16") is None:
        monkeypatch.setattr(eo_utils, "cpu_has_amx_bf16", lambda: False)
        monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: False)
    yield


@pytest.fixture(autouse=True)
def _no_timed_compilation(monkeypatch):
    """Under ``fused=None`` a small optimizer compiles its step once its eager steps have taken
    ``AUTO_FUSE_AFTER_S`` seconds: a long test would then switch paths at a machine-dependent step (and spend
    a minute compiling). Tests keep the eager step; those of the switch itself set the threshold."""
    from emerging_optimizers.scalar_optimizers import base

    monkeypatch.setattr(base, "AUTO_FUSE_AFTER_S", None)
    yield
