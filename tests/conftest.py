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
    """Same results on every machine: under ``"medium"`` Newton-Schulz picks bf16 on CPUs with AMX-BF16
    (:func:`emerging_optimizers.utils.cpu_has_amx_bf16`), which would break float32 comparisons there.

    Tests see a CPU without bf16 units unless marked ``@pytest.mark.real_cpu_bf16``; a test may force AMX
    with ``monkeypatch.setattr(eo_utils, "cpu_has_amx_bf16", lambda: True)``.
    """
    if request.node.get_closest_marker("real_cpu_bf16") is None:
        monkeypatch.setattr(eo_utils, "cpu_has_amx_bf16", lambda: False)
        monkeypatch.setattr(eo_utils, "cpu_has_bf16_matmul", lambda: False)
    yield
