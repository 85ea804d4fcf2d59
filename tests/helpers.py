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


def hooked_call_counts(model, run):
    '''Run ``run()`` and return ``{name: number of calls}`` for every module of ``model`` that carries a rule hook
    (call inside a composite context).
    '''
    hooked = {id(module): name for name, module in model.named_modules() if module._forward_pre_hooks}
    counts = dict.fromkeys(hooked, 0)

    def count(module, args):
        counts[id(module)] += 1

    handles = [module.register_forward_pre_hook(count) for module in model.modules() if id(module) in hooked]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {hooked[key]: value for key, value in counts.items()}
