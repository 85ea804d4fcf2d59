'''Small helpers shared by several test modules.'''
from contextlib import contextmanager

import torch


class Twice(torch.nn.Module):
    '''Calls the same GELU module twice.'''
    def __init__(self):
        super().__init__()
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.act(self.act(x))


@contextmanager
def recorded_sites():
    '''Collect, in order, the operation sites (``'<module>.<op>'``) that the interception engine attributes while the
    context is open (through :py:data:`zennit_attn.engine.op_listeners`).
    '''
    from zennit_attn.engine import op_listeners

    sites = []
    token = op_listeners.set(op_listeners.get() + (lambda site, tensor: sites.append(site),))
    try:
        yield sites
    finally:
        op_listeners.reset(token)


def rule_runs(model, run):
    '''Run ``run()`` (a forward and a backward pass inside a composite context) and return
    ``{name: (forward calls, rule backward calls)}`` for every module of ``model`` that carries a Zennit rule.
    '''
    from zennit_attn.check import hooked_modules

    ruled = hooked_modules(model)
    forwards = {id(module): 0 for _, module, _ in ruled}
    backwards = dict(forwards)

    def count(module, args, output):
        forwards[id(module)] += 1

    def wrap(module, original):
        def backward_relevance(*args, **kwargs):
            backwards[id(module)] += 1
            return original(*args, **kwargs)
        return backward_relevance

    handles = [module.register_forward_hook(count) for _, module, _ in ruled]
    wrapped = []
    for _, module, hook in ruled:
        if 'backward_relevance' not in vars(hook):
            hook.backward_relevance = wrap(module, hook.backward_relevance)
            wrapped.append(hook)
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        for hook in wrapped:
            del hook.backward_relevance
    return {name: (forwards[id(module)], backwards[id(module)]) for name, module, _ in ruled}


def input_relevance(model, composite, call, seed, **inputs):
    '''Relevance at several inputs at once: ``call(model, **inputs)`` with ``composite`` registered on ``model``,
    seeded with ``seed(output)``; the relevance of an input is its gradient (the rules' convention).

    Returns ``(output, {name: relevance})`` for every floating-point tensor in ``inputs``.
    '''
    leaves = {
        key: value.detach().requires_grad_(True) if isinstance(value, torch.Tensor) and value.is_floating_point()
        else value
        for key, value in inputs.items()
    }
    variable = [key for key, value in leaves.items() if isinstance(value, torch.Tensor) and value.requires_grad]
    with composite.context(model) as modified:
        output = call(modified, **leaves)
        grads = torch.autograd.grad(output, [leaves[key] for key in variable], seed(output))
    return output.detach(), dict(zip(variable, grads))
