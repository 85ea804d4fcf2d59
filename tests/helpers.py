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


ATTENTION_CHAIN = ('attnlrp_scores', 'attnlrp_mask', 'attnlrp_softmax', 'attnlrp_context')


def expected_calls(name, fused, masked=True):
    '''Calls per forward of the hooked module ``name``: the fused attention core runs instead of the unfolded chain
    (or the chain instead of the core), the mask sum only with a mask, everything else once.
    '''
    last = name.rsplit('.', 1)[-1]
    if last == 'attnlrp_attention':
        return int(fused)
    if last in ATTENTION_CHAIN:
        return int(not fused and (masked or last != 'attnlrp_mask'))
    return 1
