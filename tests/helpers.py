'''Small helpers shared by several test modules.'''
import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def single_thread():
    '''Tiny models run much faster on one thread (and do not fight other processes for the CPU).

    Autouse in every module that imports it: ``from helpers import single_thread``.
    '''
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Twice(torch.nn.Module):
    '''Calls the same GELU module twice.'''
    def __init__(self):
        super().__init__()
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.act(self.act(x))
