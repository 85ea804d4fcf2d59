'''Device hygiene of the attribution path: relevance follows the tensors, so an attribution on a GPU cannot meet a
device mismatch.

Without a GPU this is proven three ways: (1) a static scan of the attribution path (rules, engine, layers,
composites, families) for tensors created without ``device=`` (which land on the CPU), for host copies (``.cpu()``,
``.numpy()``, ``.tolist()``) and for hard-coded device names; (2) the rules run on the ``meta`` device, where any
tensor created on the CPU raises ("Tensor on device meta is not on the expected device cpu"; the rules that read
parameters, ε, γ and LayerNorm, are given meta copies of them); (3) on a machine with CUDA, tiny
LLaMA and ViT models attribute on the GPU with the same relevance as on the CPU (skipped here).
'''
import ast
import pathlib

import pytest
import torch

import zennit_attn
from zennit_attn import layers, rules

from references import attribute

pytestmark = pytest.mark.usefixtures('single_thread')

PACKAGE = pathlib.Path(zennit_attn.__file__).parent
#: the modules every attribution runs through
SCANNED = sorted(PACKAGE.glob('rules/*.py')) + [
    PACKAGE / name for name in ('engine.py', 'layers.py', 'composites.py', 'families.py')
]
#: tensor factories whose result is on the default device (the CPU) unless ``device=`` is given
FACTORIES = {
    'zeros', 'ones', 'empty', 'full', 'arange', 'range', 'eye', 'tensor', 'as_tensor', 'linspace', 'logspace', 'rand',
    'randn', 'randint', 'randperm', 'normal', 'scalar_tensor', 'empty_strided', 'tril_indices', 'triu_indices',
    'from_numpy', 'Generator',
}
HOST_COPIES = {'cpu', 'cuda', 'numpy', 'tolist'}
#: (file name, enclosing function, offending call) -> why it is safe; empty: the attribution path has no exception
ALLOWED = {}


def device_findings(source, filename='<source>'):
    '''``[(line, function, call)]`` for every device-unsafe construct in ``source``.'''
    findings = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            torch_call = isinstance(func.value, ast.Name) and func.value.id == 'torch'
            if torch_call and func.attr in FACTORIES and ('device' not in keywords or func.attr == 'from_numpy'):
                findings.append((node.lineno, function, f'torch.{func.attr}'))
            elif func.attr in HOST_COPIES:
                findings.append((node.lineno, function, f'.{func.attr}()'))
            # a device named in the code: device='cpu', .to('cuda'), torch.device('cpu')
            named = [keywords.get('device')]
            if func.attr == 'to' or torch_call and func.attr == 'device':
                named += node.args[:1]
            for value in named:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value != 'meta':
                    findings.append((node.lineno, function, repr(value.value)))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source, filename), None)
    return findings


def test_scanner_finds_device_unsafe_code():
    '''The scan is not vacuous: each kind of construct it looks for is found, and device-following code is not.'''
    unsafe = '''
def rule(x):
    a = torch.zeros(3, dtype=x.dtype)
    b = torch.tensor(1.0)
    c = x.cpu() + x.to('cuda')
    d = torch.arange(4, device='cpu')
    return torch.Generator().manual_seed(0), x.numpy(), x.tolist(), torch.device('cuda:1')
'''
    found = {call for _, _, call in device_findings(unsafe)}
    assert found == {"torch.zeros", "torch.tensor", ".cpu()", "'cuda'", "'cpu'", 'torch.Generator', '.numpy()',
                     '.tolist()', "'cuda:1'"}
    safe = '''
def rule(x):
    ops = {'cpu', 'cuda', 'to'}  # names, not devices
    return torch.zeros(3, dtype=x.dtype, device=x.device) + torch.zeros_like(x) + x.new_ones(3), x.to(x.device)
'''
    assert device_findings(safe) == []


@pytest.mark.parametrize('path', SCANNED, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_attribution_path_creates_tensors_on_the_inputs_device(path):
    findings = [
        f'{path.name}:{line} in {function}(): {call}' for line, function, call in device_findings(path.read_text(),
                                                                                                  str(path))
        if (path.name, function, call) not in ALLOWED
    ]
    assert not findings, (
        'tensors created on the default device (CPU) or copied to the host on the attribution path; pass '
        '`device=` (and `dtype=`) of the input, or allow-list with a reason:\n' + '\n'.join(findings)
    )


# ------------------------------------------------------------------------------------------- rules on the meta device
def meta(*shape, grad=True):
    return torch.empty(*shape, device='meta', dtype=torch.float32).requires_grad_(grad)


def meta_parameters(hook):
    '''Let a rule that reads parameters read meta copies of them (as the engine hands over the tensors a forward used).
    '''
    hook.forward_tensors = lambda module: (None, {
        name: tensor.detach() for name, tensor in list(module.named_parameters(recurse=False))
        + list(module.named_buffers(recurse=False))
    })
    return hook


RULE_CALLS = {
    # name: (carrier, rule, inputs)
    'attention': (lambda: layers.AttentionCore(0.5), rules.AttentionRule, lambda: (
        meta(2, 4, 5, 8), meta(2, 2, 5, 8), meta(2, 2, 5, 8))),
    'attention-cp': (lambda: layers.AttentionCore(0.5), rules.CPAttentionRule, lambda: (
        meta(2, 4, 5, 8), meta(2, 2, 5, 8), meta(2, 2, 5, 8))),
    'attention-sdpa': (lambda: layers.AttentionCore(0.5), rules.SDPAAttentionRule, lambda: (
        meta(2, 4, 5, 8), meta(2, 2, 5, 8), meta(2, 2, 5, 8))),
    'attention-sdpa-cp': (lambda: layers.AttentionCore(0.5), rules.SDPACPAttentionRule, lambda: (
        meta(2, 4, 5, 8), meta(2, 1, 5, 8), meta(2, 1, 5, 8))),
    'matmul': (lambda: layers.MatMul(0.5), rules.MatMulRule, lambda: (meta(2, 5, 8), meta(2, 8, 5))),
    'matmul-constant': (lambda: layers.MatMul(), rules.MatMulRule, lambda: (meta(2, 5, 8), meta(8, 5, grad=False))),
    'softmax': (lambda: layers.Softmax(-1), rules.SoftmaxRule, lambda: (meta(2, 5, 5),)),
    'sum': (layers.Sum, rules.SumRule, lambda: (meta(2, 5, 8), meta(5, 8, grad=False))),
    'product': (layers.Product, rules.ProductRule, lambda: (meta(2, 5, 8), meta(2, 5, 8))),
    'identity': (lambda: layers.Scale(0.5), rules.IdentityRule, lambda: (meta(2, 5, 8),)),
    'mean': (lambda: layers.Mean(1), rules.MeanRule, lambda: (meta(2, 5, 8),)),
    'rope': (layers.RotaryEmbedding, rules.RoPERule, lambda: (
        meta(2, 5, 8), meta(5, 8, grad=False), meta(5, 8, grad=False))),
    'rmsnorm': (lambda: torch.nn.RMSNorm(8, device='meta'), rules.RMSNormRule, lambda: (meta(2, 5, 8),)),
    'layernorm': (lambda: torch.nn.LayerNorm(8, device='meta'), rules.LayerNormRule, lambda: (meta(2, 5, 8),)),
    'epsilon': (lambda: torch.nn.Linear(8, 6, device='meta'), rules.Epsilon, lambda: (meta(2, 5, 8),)),
    'gamma': (lambda: torch.nn.Conv2d(3, 4, 2, device='meta'), rules.Gamma, lambda: (meta(2, 3, 6, 6),)),
}


@pytest.mark.parametrize('name', RULE_CALLS)
def test_rule_relevance_stays_on_the_inputs_device(name):
    '''On the meta device, a tensor created without the input's device fails the rule; none does.'''
    # the ε-rule recomputes a dropped output for the rows that receive relevance (nonzero, which meta tensors cannot
    # answer; rules take meta tensors for outputs they did not keep): assume every row does
    from torch.fx.experimental import _config

    carrier, rule, inputs = RULE_CALLS[name]
    args = inputs()
    module = carrier()
    output = module(*args)
    with _config.patch(meta_nonzero_assume_all_nonzero=True):
        _, relevances = attribute(module, meta_parameters(rule()), args, torch.empty_like(output))
    produced = [rel for rel in relevances if rel is not None]
    assert produced and all(rel.is_meta for rel in produced)
    assert all(rel.shape == arg.shape for rel, arg in zip(relevances, args) if rel is not None)


# ------------------------------------------------------------------------------------------------------ on a GPU
def on_device(setting, device):
    '''A conformance setting ``(wrapper, x, target)`` with the model and every tensor it uses moved to ``device``.'''
    wrapper, x, target = setting
    wrapper = wrapper.to(device)
    kwargs = getattr(wrapper, 'kwargs', None)
    if kwargs:
        wrapper.kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                          for key, value in kwargs.items()}
    return wrapper, x.to(device), target.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('family', ['llama', 'vit'])
@pytest.mark.parametrize('attention', ['exact', 'sdpa'])
def test_cuda_relevance_equals_cpu(family, attention):
    '''Tiny LLaMA (grouped-query attention, causal mask, left padding) and ViT in float64: the relevance computed on
    the GPU is on the GPU and equals the CPU's (both with the exact attention rule and the fused-backward fast path).'''
    import conformance
    from test_conformance import attribute as attribute_model
    from zennit_attn.composites import AttnLRP, AttnLRPViT

    if family == 'llama':
        build, wrap, composite = conformance.decoder('llama'), conformance.wrap_decoder, AttnLRP
    else:
        build, wrap, composite = conformance.hf_vit, conformance.wrap_hf_vit, AttnLRPViT
    cpu = attribute_model(*wrap(build()), composite(attention=attention))[1]
    cuda = attribute_model(*on_device(wrap(build()), 'cuda'), composite(attention=attention))[1]
    assert cuda.device.type == 'cuda'
    assert float((cuda.cpu() - cpu).abs().max() / cpu.abs().max()) <= 1e-8


def test_meta_device_catches_a_tensor_created_on_the_cpu():
    '''The meta run is not vacuous: a rule that creates a tensor without the input's device fails there.'''
    class CPUZeros(rules.IdentityRule):
        def relevance(self, module, inputs, output, relevance, variable):
            return (relevance + torch.zeros(relevance.shape),)

    args = (meta(2, 5, 8),)
    with pytest.raises(RuntimeError, match='device'):
        attribute(layers.Scale(0.5), CPUZeros(), args, torch.empty_like(args[0]))
