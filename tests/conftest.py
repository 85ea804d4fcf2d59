'''Fixtures shared by the test modules (builders and reference formulas live in plain modules beside them:
references.py, tiny_vit.py, toys.py, conformance.py, oracle_*.py, restoration.py, helpers.py).'''
import pytest
import torch


@pytest.fixture
def generator():
    '''Seeded random number generator.'''
    return torch.Generator().manual_seed(0xa77)


@pytest.fixture(scope='module')
def single_thread():
    '''Tiny models run much faster on one thread (and do not fight other processes for the CPU); modules opt in with
    ``pytestmark = pytest.mark.usefixtures('single_thread')``.'''
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
