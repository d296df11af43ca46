import pytest
import torch

GPU = torch.cuda.is_available()

# Parametrize tests over this: CUDA cases carry the `cuda` marker and are skipped without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="no GPU visible")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
