import pytest
import torch

GPU = torch.cuda.is_available()

# Parametrize tests over this: CUDA cases carry the `cuda` marker and are skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="no GPU visible")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny problems: they gain nothing from more, and lose much when the cores
    are busy. Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
