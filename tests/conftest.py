import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    """Tests are small: one thread is faster on a shared 2-core machine and makes results reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
