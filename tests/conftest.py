import pytest
import torch

# One intra-op thread for the whole suite: the test tensors are tiny, the numerics are the same,
# and on a shared 2-core machine (CI, other jobs, torchrun subprocesses) spinning OpenMP threads
# made tiny steps 3-50x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
