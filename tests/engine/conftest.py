"""Engine tests use tiny models, whose speed with 2 torch threads collapses under load: pin one thread."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
