'''Agreement with the authors' reference library ``lxt`` 2.1 (efficient mode, see ``lxt_reference.py``) on every family
it patches that runs on transformers 5: LLaMA, Qwen2, Qwen3, Gemma 3, GPT-2 and torchvision's ViT.

lxt computes AttnLRP as a modified gradient × input with ε = 0 and shares no code with this library (nor with the
hand-written oracles of the conformance suite). Tolerance 1e-6 relative (float64, our ε = 1e-12): the residual, up to
2.4e-7, is float32 rounding of lxt's gradient where transformers' forward casts to float32 (RMSNorm, eager softmax;
with those casts removed LLaMA agrees to 1e-10); GPT-2 and the ViT, without such casts, agree to ~1e-9. The one
systematic difference, Gemma's tanh soft-capping of the final logits (lxt leaves it on the plain gradient), has its
own test.

``lxt`` is installed by ``make install`` (``--no-deps``: its declared dependencies bitsandbytes, open_clip_torch,
accelerate and tabulate are not used by the efficient mode); when it is missing these tests fail, they are never
skipped.
'''
import pytest
import torch
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.rules import Gamma

from zennit_attn.composites import AttnLRP, CPLRP, CPLRPViT

import lxt_reference
from conformance import decoder, gpt2, torchvision_vit, wrap_decoder, wrap_torchvision_vit
from restoration import relative_difference

pytestmark = pytest.mark.usefixtures('single_thread')

#: ours vs lxt's patch map of the same variant
VARIANTS = {'attnlrp': (AttnLRP, 'attnLRP'), 'cp_lrp': (CPLRP, 'cp_LRP')}


def attribute(wrapper, composite, x, target):
    with Gradient(wrapper, composite) as attributor:
        _, relevance = attributor(x, lambda y: y * torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype))
    return relevance


def build_decoder(family, attention):
    '''The conformance suite's tiny decoder; eager attention without padding (transformers' eager attention turns
    fully masked rows into NaN in float64), sdpa with the suite's left padding.'''
    model = gpt2() if family == 'gpt2' else decoder(family)()
    if family == 'gemma3':
        # real Gemma 3 configs have no final soft-capping; lxt does not patch it (see the test below)
        model.config.final_logit_softcapping = None
    model.set_attn_implementation(attention)
    wrapper, x, target = wrap_decoder(model)
    if attention == 'eager':
        wrapper.kwargs['attention_mask'] = torch.ones_like(wrapper.kwargs['attention_mask'])
        wrapper.kwargs['position_ids'] = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    return wrapper, x, target


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('attention', ['eager', 'sdpa'])
@pytest.mark.parametrize('family', ['llama', 'qwen2', 'qwen3', 'gemma3', 'gpt2'])
def test_decoders_agree_with_lxt(family, attention, variant):
    composite_type, lxt_variant = VARIANTS[variant]
    wrapper, x, target = build_decoder(family, attention)
    expected = lxt_reference.relevance(family, lxt_variant, wrapper, x, target)
    relevance = attribute(wrapper, composite_type(epsilon=1e-12), x, target)
    assert relative_difference(relevance, expected) < 1e-6


@pytest.mark.parametrize('preset', ['epsilon', 'gamma'])
def test_torchvision_vit_agrees_with_lxt(preset):
    '''lxt's ViT map is CP-LRP inside attention; its γ preset is stock Zennit ``Gamma`` on Conv2d and Linear through
    lxt's Zennit patch (the Linear inside ``nn.MultiheadAttention`` never runs as a module there, so it keeps ε = 0,
    as our preset keeps ε on attention projections). Ours: closed-form γ in ``CPLRPViT``.'''
    wrapper, x, target = wrap_torchvision_vit(torchvision_vit())
    if preset == 'gamma':
        composite = LayerMapComposite([(torch.nn.Conv2d, Gamma(0.25)), (torch.nn.Linear, Gamma(0.05))])
        expected = lxt_reference.relevance('vit_torch', 'cp_LRP', wrapper, x, target, composite=composite)
        relevance = attribute(wrapper, CPLRPViT(epsilon=1e-12, conv_gamma=0.25, linear_gamma=0.05), x, target)
    else:
        expected = lxt_reference.relevance('vit_torch', 'cp_LRP', wrapper, x, target)
        relevance = attribute(wrapper, CPLRP(epsilon=1e-12), x, target)
    assert relative_difference(relevance, expected) < 1e-6


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_gemma_final_softcapping_is_the_only_difference(variant):
    '''With ``y = c tanh(z / c)`` on the final logits, lxt propagates the plain gradient ``1 - (y / c)^2`` (relevance
    ``z (1 - (y / c)^2)`` at ``z``) where we apply the identity rule (relevance ``y`` at ``z``); everything below is
    linear in that relevance, so lxt = ours * z (1 - (y / c)^2) / y per sample.'''
    composite_type, lxt_variant = VARIANTS[variant]
    model = decoder('gemma3')()
    cap = model.config.final_logit_softcapping
    wrapper, x, target = wrap_decoder(model)
    expected = lxt_reference.relevance('gemma3', lxt_variant, wrapper, x, target)
    relevance = attribute(wrapper, composite_type(epsilon=1e-12), x, target)
    with torch.no_grad():
        capped = wrapper(x)[torch.arange(len(target)), target]
    logit = cap * torch.atanh(capped / cap)
    factor = (logit * (1 - (capped / cap) ** 2) / capped).view(-1, 1, 1)
    assert relative_difference(relevance, expected) > 1e-4
    assert relative_difference(relevance * factor, expected) < 1e-6


def test_lxt_patches_are_undone():
    '''lxt patches classes and modules for the whole process; the helper must leave no trace (other tests share it).'''
    import transformers.models.llama.modeling_llama as modeling_llama
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from zennit.core import BasicHook

    def attributes():
        return [(target, list(vars(target).items())) for target in targets]

    def same(first, second):
        return all(
            a is b and [key for key, _ in x] == [key for key, _ in y] and all(u is v for (_, u), (_, v) in zip(x, y))
            for (a, x), (b, y) in zip(first, second)
        )

    targets = [*lxt_reference.patch_map('llama', 'attnLRP'), *lxt_reference.patch_map('gpt2', 'cp_LRP'), BasicHook]
    before = attributes()
    shared = dict(ALL_ATTENTION_FUNCTIONS.items())
    wrapper, x, _ = build_decoder('llama', 'sdpa')
    plain = wrapper(x).detach()
    for family, variant in (('llama', 'attnLRP'), ('gpt2', 'cp_LRP')):
        with lxt_reference.patched(family, variant, zennit=True):
            assert not same(attributes(), before)
    assert same(attributes(), before)
    assert modeling_llama.ALL_ATTENTION_FUNCTIONS is ALL_ATTENTION_FUNCTIONS
    assert dict(ALL_ATTENTION_FUNCTIONS.items()) == shared
    assert torch.equal(wrapper(x).detach(), plain)
