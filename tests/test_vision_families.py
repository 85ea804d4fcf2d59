'''What the vision families added to the engine: average pooling (adaptive and fixed windows) with the ε-rule of its
linear map, softmax modules inside attention (timm's Swin), torchvision's functional Swin attention, and the size of the
ε residual that the conformance builds (tests/conformance_vision.py) avoid.'''
import math

import pytest
import torch
import torch.nn.functional as F
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, UnsupportedModelError
from zennit_attn.rules import Epsilon

from conformance import bias_free, generator, perturbed
from conformance_vision import TIMM_VIT
from test_conformance import attribute

pytestmark = pytest.mark.usefixtures('single_thread')

EPSILON = 1e-9


class Pool(torch.nn.Module):
    '''``function(x, *args, **kwargs)`` in its forward (what the engine intercepts), or a pooling module.'''
    def __init__(self, function, *args, **kwargs):
        super().__init__()
        self.function, self.args, self.kwargs = function, args, kwargs

    def forward(self, x):
        return self.function(x, *self.args, **self.kwargs)


def adaptive_matrix(size, out):
    '''The averaging matrix ``(out, size)`` of adaptive pooling along one dimension, from its window definition:
    output ``i`` is the mean of ``x[floor(i * size / out) : ceil((i + 1) * size / out)]`` (windows may overlap).'''
    matrix = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        matrix[i, start:end] = 1 / (end - start)
    return matrix


def adaptive_reference(x, output_size):
    '''Adaptive average pooling as a matrix ``P`` per spatial dimension: ``(y, apply_transposed)``.'''
    dims = x.ndim - 2
    sizes = output_size if isinstance(output_size, tuple) else (output_size,) * dims
    matrices = [adaptive_matrix(x.shape[2 + d], out) for d, out in enumerate(sizes)]

    def apply(tensor, transposed):
        for d, matrix in enumerate(matrices):
            tensor = torch.movedim(torch.movedim(tensor, 2 + d, -1) @ (matrix if transposed else matrix.T), -1, 2 + d)
        return tensor
    return apply(x, False), lambda ratio: apply(ratio, True)


def fixed_reference(function, x, *args, **kwargs):
    '''Average pooling with fixed windows as a matrix built column by column from its definition (the pooling of unit
    impulses): ``(y, apply_transposed)``.'''
    spatial = x.shape[2:]
    impulses = torch.eye(math.prod(spatial), dtype=torch.float64).reshape(-1, 1, *spatial)
    with torch.no_grad():
        columns = function(impulses, *args, **kwargs)
    out_spatial = columns.shape[2:]
    matrix = columns.reshape(math.prod(spatial), -1).T

    def apply_transposed(ratio):
        return (ratio.flatten(2) @ matrix).reshape(x.shape)
    return (x.flatten(2) @ matrix.T).reshape(*x.shape[:2], *out_spatial), apply_transposed


def stabilize(z):
    return z + EPSILON * torch.where(z >= 0, 1., -1.).to(z.dtype)


POOLS = {
    'adaptive1d_overlapping': (F.adaptive_avg_pool1d, (2, 3, 7), (3,), {}),
    'adaptive1d_global': (F.adaptive_avg_pool1d, (2, 4, 5), (1,), {}),
    'adaptive2d': (F.adaptive_avg_pool2d, (2, 3, 5, 7), ((2, 3),), {}),
    'adaptive2d_global': (F.adaptive_avg_pool2d, (2, 3, 4, 4), (1,), {}),
    'adaptive3d': (F.adaptive_avg_pool3d, (1, 2, 3, 5, 4), ((2, 2, 3),), {}),
    'avg1d_ceil_uncounted_padding': (F.avg_pool1d, (2, 3, 8), (3,),
                                     dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    'avg2d_overlapping_padded': (F.avg_pool2d, (2, 3, 6, 5), (3,), dict(stride=2, padding=1)),
    'avg2d_divisor': (F.avg_pool2d, (2, 3, 6, 7), ((2, 3),), dict(stride=(1, 2), divisor_override=5)),
    'avg3d': (F.avg_pool3d, (1, 2, 4, 4, 6), (2,), {}),
}


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('case', sorted(POOLS))
def test_average_pooling_is_the_epsilon_rule_of_its_linear_map(case, composite_type):
    '''``R_x = x * P^T (R / stab(P x))`` for the averaging matrix ``P`` of each pooling (float64), and conservation:
    the input relevance sums to the output relevance (the pooling has no bias).'''
    function, shape, args, kwargs = POOLS[case]
    x = torch.randn(shape, generator=generator(1), dtype=torch.float64)
    if function.__name__.startswith('adaptive'):
        expected_output, transposed = adaptive_reference(x, *args)
    else:
        expected_output, transposed = fixed_reference(function, x, *args, **kwargs)
    relevance_out = torch.randn(expected_output.shape, generator=generator(2), dtype=torch.float64)
    with Gradient(Pool(function, *args, **kwargs), composite_type(epsilon=EPSILON)) as attributor:
        output, relevance = attributor(x, lambda y: relevance_out)
    assert torch.allclose(output, expected_output, rtol=1e-12, atol=1e-14)
    expected = x * transposed(relevance_out / stabilize(expected_output))
    assert torch.allclose(relevance, expected, rtol=1e-10, atol=1e-12)
    assert relevance.sum().item() == pytest.approx(relevance_out.sum().item(), rel=1e-6)


@pytest.mark.parametrize('module,reference', [
    (torch.nn.AdaptiveAvgPool1d(1), lambda x: adaptive_reference(x, 1)),
    (torch.nn.AdaptiveAvgPool2d((2, 3)), lambda x: adaptive_reference(x, (2, 3))),
    (torch.nn.AvgPool2d(3, stride=2, padding=1), lambda x: fixed_reference(F.avg_pool2d, x, 3, stride=2, padding=1)),
], ids=['AdaptiveAvgPool1d', 'AdaptiveAvgPool2d', 'AvgPool2d'])
def test_pooling_modules_get_the_rule_of_their_call(module, reference):
    '''A pooling module has no module rule: the engine attributes the pooling call inside it (HF Swin's pooler is an
    ``nn.AdaptiveAvgPool1d``, torchvision's Swin an ``nn.AdaptiveAvgPool2d``).'''
    shape = (2, 3, 7) if isinstance(module, torch.nn.AdaptiveAvgPool1d) else (2, 3, 6, 7)
    x = torch.randn(shape, generator=generator(1), dtype=torch.float64)
    expected_output, transposed = reference(x)
    relevance_out = torch.randn(expected_output.shape, generator=generator(2), dtype=torch.float64)
    with Gradient(torch.nn.Sequential(module), CPLRP(epsilon=EPSILON)) as attributor:
        output, relevance = attributor(x, lambda y: relevance_out)
    assert torch.allclose(output, expected_output, rtol=1e-12, atol=1e-14)
    expected = x * transposed(relevance_out / stabilize(expected_output))
    assert torch.allclose(relevance, expected, rtol=1e-10, atol=1e-12)


def test_max_pooling_is_refused():
    '''Max pooling is not linear and has no rule here: an error naming the op, not a plain gradient.'''
    x = torch.randn(2, 3, 6, 6, generator=generator(1), dtype=torch.float64)
    with pytest.raises(RuntimeError, match='max_pool2d'):
        with Gradient(Pool(F.max_pool2d, 2), AttnLRP()) as attributor:
            attributor(x, lambda y: y)


class ToyAttention(torch.nn.Module):
    '''Single-head self-attention and a mean-pooled head; the softmax is an ``nn.Softmax`` module (as timm's Swin) or
    ``Tensor.softmax``.'''
    def __init__(self, softmax_module):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 8)
        self.softmax = torch.nn.Softmax(dim=-1) if softmax_module else None
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5
        probabilities = self.softmax(scores) if self.softmax is not None else scores.softmax(-1)
        return self.head((x + self.proj(probabilities @ v)).mean(1))


def toy_attention(softmax_module, seed=0):
    torch.manual_seed(seed)
    return perturbed(ToyAttention(softmax_module).double().eval())


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_softmax_module_in_attention_is_the_attention_softmax(composite_type):
    '''An ``nn.Softmax`` module of attention scores is attributed as the attention's softmax: the same relevance as
    ``Tensor.softmax`` (CP-LRP stops it and passes everything to the values), and CP-LRP conserves on the bias-free
    model (with the plain softmax rule under CP-LRP, it leaked a few percent in timm's Swin).'''
    x = torch.randn(2, 5, 8, generator=generator(1), dtype=torch.float64)
    target = torch.tensor([0, 2])
    results = [attribute(toy_attention(module), composite_type(epsilon=1e-12), x, target) for module in (True, False)]
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)
    if composite_type is CPLRP:
        output, relevance = attribute(bias_free(toy_attention(True)), CPLRP(epsilon=1e-12), x, target)
        logits = output[torch.arange(2), target]
        assert torch.allclose(relevance.flatten(1).sum(1), logits, rtol=1e-8)


def test_epsilon_residual_is_proportional_to_epsilon():
    '''At timm's DINOv2 defaults (LayerScale 1e-5, small head) bias_free zeroes the class and register tokens, the class
    token's activations are tiny and the ε-rules visibly absorb (~ε R / |z|); that residual scales with ε (a leak would
    not), which is why the conformance builds use order-1 LayerScales and heads instead of a looser tolerance.'''
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=False, num_classes=5, **TIMM_VIT)
    model = bias_free(perturbed(model.double().eval()))
    x = torch.randn(2, 3, 16, 16, generator=generator(2), dtype=torch.float64)
    target = torch.tensor([1, 3])
    residuals = []
    for epsilon in (1e-12, 1e-14):
        output, relevance = attribute(model, CPLRP(epsilon=epsilon), x, target)
        logits = output[torch.arange(2), target]
        residuals.append(((relevance.flatten(1).sum(1) - logits) / logits).abs())
    assert (residuals[0] > 1e-8).all()
    ratio = residuals[0] / residuals[1]
    assert ((ratio > 80) & (ratio < 120)).all(), ratio


def torchvision_swin(v2=False):
    import torchvision
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    torch.manual_seed(0)
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=5, **extra,
    ).double().eval()


def test_torchvision_swin_functional_projections_get_epsilon_in_the_vision_preset():
    '''torchvision's ``shifted_window_attention`` calls ``F.linear`` with the weights of ``qkv`` and ``proj`` (their
    modules never run): those calls are attention projections (ε) under the vision preset; the other linear layers are
    modules (γ).'''
    from zennit_attn.engine import _LinearCall
    model = torchvision_swin()
    x = torch.randn(1, 3, 16, 16, generator=generator(2), dtype=torch.float64)
    composite = AttnLRPViT()
    with composite.context(model):
        model(x.requires_grad_(True))
        rules = {key: type(rule) for key, rule in composite._op_rules.items() if key[0] is _LinearCall}
    assert rules == {(_LinearCall, 'attention_projection'): Epsilon}


def test_torchvision_swin_v2_is_refused():
    with pytest.raises(UnsupportedModelError, match='ShiftedWindowAttentionV2.*cosine attention'):
        with AttnLRP().context(torchvision_swin(v2=True)):
            pass


@pytest.mark.parametrize('build', [
    lambda: __import__('timm').create_model(
        'vit_small_patch16_224', pretrained=False, num_classes=5, drop_path_rate=0.2, **TIMM_VIT),
    lambda: __import__('torchvision').models.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=5,
        stochastic_depth_prob=0.2),
], ids=['timm_drop_path', 'torchvision_stochastic_depth'])
def test_stochastic_depth_in_training_mode_is_refused(build):
    '''Stochastic depth drops residual branches at random in training mode (silently random heatmaps): refused, and
    accepted in eval mode.'''
    torch.manual_seed(0)
    model = build().double()
    with pytest.raises(UnsupportedModelError, match='stochastic depth.*model.eval'):
        with AttnLRP().context(model.train()):
            pass
    with AttnLRP().context(model.eval()):
        pass
