'''The γ vision preset on full-size timm models (random weights): ``vit_small_patch16_224`` and
``deit_tiny_distilled_patch16_224`` (two heads) give a finite heatmap whose sum is the logit minus what the rules
absorb (the books balance), the lint is clean, and on the bias-free model CP-LRP with the preset conserves exactly.'''
import pytest
import torch

import zennit_attn
from zennit_attn.composites import AttnLRPViT, CPLRPViT
from zennit_attn.conservation import conservation_report

from conformance import bias_free

timm = pytest.importorskip('timm')
pytestmark = pytest.mark.usefixtures('single_thread')


def build(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).double().eval()


def explain_top_class(model, x):
    with torch.no_grad():
        target = model(x).argmax(1)
    return lambda output: output * torch.nn.functional.one_hot(target, output.shape[-1]).to(output.dtype)


@pytest.mark.parametrize('name', ['vit_small_patch16_224', 'deit_tiny_distilled_patch16_224'])
def test_vision_preset_on_a_full_size_timm_model(name):
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = build(name)
    target_fn = explain_top_class(model, x)
    report = conservation_report(model, AttnLRPViT(), x, target_fn)
    assert torch.isfinite(report.relevance).all()
    # input relevance + what the rules absorb (position embedding, softmax, biases) + what reaches the class and
    # distillation tokens = the logit
    assert abs(report.unaccounted) <= 1e-10 * abs(report.seed), str(report)
    assert abs(report.input_relevance) > 1e-3 * abs(report.seed)
    assert zennit_attn.check(model, AttnLRPViT(), x).ok

    # without biases, position embeddings and class tokens nothing is absorbed: the heatmap sums to the logit
    free = bias_free(build(name))
    exact = conservation_report(free, CPLRPViT(epsilon=1e-12, stabilizer=1e-12), x, target_fn)
    assert exact.input_relevance == pytest.approx(exact.seed, rel=1e-8)
