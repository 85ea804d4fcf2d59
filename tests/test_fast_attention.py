'''The fast path of the attention rules: PyTorch's fused attention backward with the input gradients scaled
(zennit_attn.rules.fast_attention, the composites' ``attention='sdpa'``).

The identity (ATTNLRP.md §3): with ε -> 0, AttnLRP through ``softmax(c q k^T + mask) v`` gives ``q * g_q / 4``,
``k * g_k / 4`` and ``v * g_v / 2`` for the gradient ``g`` of the attention with upstream ``R / stab(O)``; CP-LRP gives
``v * g_v`` exactly. The rule is compared with the composed float64 reference twins of the separate rules (independent
of both attention rules) and, on tiny LLaMA (grouped-query, causal, left padding), GPT-2 and ViT models, with the exact
rule. The difference is the ε of the scores: it shrinks in proportion to ε.
'''
import pytest
import torch

from zennit_attn import layers, rules
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, UnsupportedModelError
from zennit_attn.engine import UnsupportedOperationError
from zennit_attn.rules import SDPAAttentionRule, SDPACPAttentionRule

from references import attribute, randn
from test_attention_core import SHAPES, additive_mask, output_shape, ref_attention

pytestmark = pytest.mark.usefixtures('single_thread')


def relative(actual, expected):
    '''Largest absolute difference relative to the largest reference value.'''
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max()) if actual.numel() else 0.


def blank_mask(query_shape, key_shape, dtype=torch.float64):
    '''Padding of the last two keys in sample 1, and queries 1 and 2 of sample 0 with every key masked by float32's
    minimum (left padding: uniform probabilities, and no relevance through their scores).'''
    rows, cols = query_shape[-2], key_shape[-2]
    masked = torch.zeros(query_shape[0], 1, rows, cols, dtype=torch.bool)
    masked[1, ..., -2:] = True
    masked[0, :, 1:3] = True
    return torch.zeros(masked.shape, dtype=dtype).masked_fill(masked, torch.finfo(torch.float32).min), masked


def core_call(generator, shapes, mask_kind, variable=(1, 1, 1)):
    tensors = [randn(generator, *shape).requires_grad_(bool(var)) for shape, var in zip(shapes, variable)]
    if mask_kind == 'blank':
        mask, masked = blank_mask(shapes[0], shapes[1])
    elif mask_kind == 'blank-sample':
        # every key of sample 1 masked, by a mask that broadcasts over the queries
        masked = torch.zeros(shapes[0][0], 1, 1, shapes[1][-2], dtype=torch.bool)
        masked[1] = True
        mask = torch.zeros(masked.shape, dtype=torch.float64).masked_fill(masked, torch.finfo(torch.float32).min)
    else:
        mask, masked = additive_mask(mask_kind, shapes[0], shapes[1], torch.float64)
    return tensors + ([] if mask is None else [mask]), mask, masked


def assert_relevances(actual, expected, rtol):
    for rel, ref in zip(actual, expected):
        if ref is None:
            assert rel is None
        else:
            assert torch.isfinite(rel).all()
            assert relative(rel, ref) <= rtol


# --------------------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize('shapes', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('mask_kind', ['none', 'causal-inf', 'causal-min', 'padding-min', 'blank', 'blank-sample'])
@pytest.mark.parametrize('cp_lrp', [False, True], ids=['attnlrp', 'cp_lrp'])
def test_rule_matches_reference(generator, shapes, mask_kind, cp_lrp):
    '''With ε = 1e-12 the fast rule equals the composed reference rules; CP-LRP's value path to rounding.'''
    args, mask, masked = core_call(generator, shapes, mask_kind)
    relevance = randn(generator, *output_shape(shapes))
    rule = (SDPACPAttentionRule if cp_lrp else SDPAAttentionRule)(epsilon=1e-12)
    _, actual = attribute(layers.AttentionCore(scale=0.6), rule, args, relevance)
    expected = ref_attention(*args[:3], mask, masked, relevance, 1e-12, 0.6, cp_lrp=cp_lrp)
    assert_relevances(actual[:3], expected, 1e-9)
    assert relative(actual[2], expected[2]) <= 1e-12
    if mask is not None:
        assert actual[3] is None


def test_rule_differs_from_the_exact_rule_by_the_scores_epsilon(generator):
    '''The difference to the exact rule is the ε of the scores (and the mask sum): proportional to ε.'''
    args, _, _ = core_call(generator, SHAPES['self'], 'blank')
    relevance = randn(generator, *output_shape(SHAPES['self']))
    core = layers.AttentionCore(scale=0.6)
    differences = []
    for epsilon in (1e-4, 1e-6, 1e-8):
        exact = attribute(core, rules.AttentionRule(epsilon=epsilon), args, relevance)[1]
        fast = attribute(core, SDPAAttentionRule(epsilon=epsilon), args, relevance)[1]
        differences.append(max(relative(fast[index], exact[index]) for index in range(2)))
        assert relative(fast[2], exact[2]) <= 1e-12
    assert 1e-10 < differences[-1] < differences[1] / 30 < differences[0] / 900


@pytest.mark.parametrize('mask_kind', ['none', 'causal-min', 'blank'])
@pytest.mark.parametrize('per_head_mask', [False, True], ids=['shared-mask', 'head-mask'])
def test_rule_grouped_query_attention(generator, mask_kind, per_head_mask):
    '''4 query heads on 2 key/value heads equal the reference on keys and values repeated per query head.'''
    shapes = ((2, 4, 6, 4), (2, 2, 6, 4), (2, 2, 6, 5))
    args, mask, masked = core_call(generator, shapes, mask_kind)
    if per_head_mask and mask is not None:
        bias = randn(generator, 1, 4, 6, 6)
        mask, masked = torch.where(masked, mask, bias), masked.expand(2, 4, 6, 6)
        args[3] = mask
    relevance = randn(generator, 2, 4, 6, 5)
    _, actual = attribute(layers.AttentionCore(scale=0.6), SDPAAttentionRule(epsilon=1e-12), args, relevance)
    query, key, value = args[:3]
    repeated = [layers.repeat_heads(tensor.detach(), 2).requires_grad_() for tensor in (key, value)]
    expected = ref_attention(query, *repeated, mask, masked, relevance, 1e-12, 0.6)
    expected = expected[:1] + tuple(rel.unflatten(-3, (-1, 2)).sum(-3) for rel in expected[1:])
    assert_relevances(actual[:3], expected, 1e-9)


@pytest.mark.parametrize('variable', [(0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1)], ids=str)
def test_rule_constant_operands(generator, variable):
    '''A constant operand gets nothing and its partner the unhalved share, as in the exact rule.'''
    args, mask, masked = core_call(generator, SHAPES['cross'], 'causal-min', variable)
    relevance = randn(generator, *output_shape(SHAPES['cross']))
    _, actual = attribute(layers.AttentionCore(scale=0.6), SDPAAttentionRule(epsilon=1e-12), args, relevance)
    expected = ref_attention(*args[:3], mask, masked, relevance, 1e-12, 0.6, variable=variable)
    assert_relevances(actual[:3], expected, 1e-9)


def test_cp_rule_with_a_constant_value_attributes_nothing(generator):
    '''Under CP-LRP only v receives relevance: a constant v leaves nothing to attribute, as in the exact rule.'''
    args, _, _ = core_call(generator, SHAPES['self'], 'causal-min', (1, 1, 0))
    relevance = randn(generator, *output_shape(SHAPES['self']))
    core = layers.AttentionCore(scale=0.6)
    exact = attribute(core, rules.CPAttentionRule(), args, relevance)[1]
    fast = attribute(core, SDPACPAttentionRule(), args, relevance)[1]
    assert all(rel is None for rel in exact[:3]) and all(rel is None for rel in fast[:3])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_rule_half_precision(generator, dtype):
    '''Half-precision calls are computed in float32 and give the exact rule's relevance to half-precision rounding.'''
    args, _, masked = core_call(generator, SHAPES['self'], 'blank')
    args = [arg.detach().to(dtype).requires_grad_(arg.requires_grad) for arg in args[:3]]
    # masks of half-precision models are filled with the dtype's own minimum (float32's would be -inf in float16)
    args.append(torch.zeros(masked.shape, dtype=dtype).masked_fill(masked, torch.finfo(dtype).min))
    relevance = randn(generator, *output_shape(SHAPES['self'])).to(dtype)
    core = layers.AttentionCore(scale=0.6)
    exact = attribute(core, rules.AttentionRule(), args, relevance)[1]
    fast = attribute(core, SDPAAttentionRule(), args, relevance)[1]
    for rel, ref in zip(fast[:3], exact[:3]):
        assert rel.dtype == dtype and torch.isfinite(rel).all()
        assert relative(rel.double(), ref.double()) <= 2e-2


def test_rule_refuses_an_input_dependent_mask(generator):
    args, _, _ = core_call(generator, SHAPES['self'], 'causal-min')
    args[3] = args[3].clamp(min=-1e4) + 0. * args[0].sum()
    with pytest.raises(ValueError, match='mask depends on the model input'):
        attribute(layers.AttentionCore(), SDPAAttentionRule(), args, randn(generator, *output_shape(SHAPES['self'])))


# ------------------------------------------------------------------------------------------------------- the models
@pytest.fixture(scope='module')
def llama():
    from conformance import decoder, wrap_decoder
    return wrap_decoder(decoder('llama')())


def relevance_of(setting, composite):
    from test_conformance import attribute as attribute_model
    wrapper, x, target = setting
    return attribute_model(wrapper, composite, x, target)[1]


def test_llama_fast_path_equals_exact_rule(llama):
    '''Tiny LLaMA (4 query heads on 2 key/value heads, causal mask, left padding with fully masked queries, float64):
    the difference is the ε of the scores, proportional to ε (measured: 8e-14 at ε = 1e-12, 8e-8 at the default 1e-6).
    '''
    tight = relative(relevance_of(llama, AttnLRP(epsilon=1e-12, attention='sdpa')),
                     relevance_of(llama, AttnLRP(epsilon=1e-12)))
    default = relative(relevance_of(llama, AttnLRP(attention='sdpa')), relevance_of(llama, AttnLRP()))
    assert tight <= 1e-11
    assert tight * 1e4 < default <= 1e-6


def test_llama_cp_lrp_fast_path_is_exact(llama):
    assert relative(relevance_of(llama, CPLRP(attention='sdpa')), relevance_of(llama, CPLRP())) <= 1e-12


@pytest.mark.parametrize('family', ['gpt2', 'vit'])
def test_gpt2_and_vit_fast_path_equal_exact_rule(family):
    '''GPT-2 (causal mask, left padding) and a ViT (no mask; with the vision preset), float64, ε = 1e-12.'''
    import conformance
    if family == 'gpt2':
        setting, composite = conformance.wrap_decoder(conformance.gpt2()), AttnLRP
    else:
        setting, composite = conformance.wrap_hf_vit(conformance.hf_vit()), AttnLRPViT
    fast = relevance_of(setting, composite(epsilon=1e-12, attention='sdpa'))
    assert relative(fast, relevance_of(setting, composite(epsilon=1e-12))) <= 1e-10


# ---------------------------------------------------------------------------------------------------- the refusals
def test_refuses_unknown_option_and_unfolded_attention():
    with pytest.raises(ValueError, match="attention='flash'"):
        AttnLRP(attention='flash')
    with pytest.raises(ValueError, match='fused_attention=False'):
        CPLRP(attention='sdpa', fused_attention=False)


def test_refuses_soft_capped_and_eager_attention():
    '''Soft-capping (Gemma 2) transforms the scores before the softmax, and eager attention computes them inline:
    no fused attention call whose backward could run, so the option refuses instead of running the exact rule.'''
    import conformance
    import conformance_decoders
    gemma2 = conformance_decoders.wrap_decoder(conformance_decoders.decoder('gemma2')())
    with pytest.raises(UnsupportedOperationError, match='soft-capping'):
        relevance_of(gemma2, AttnLRP(attention='sdpa'))
    model = conformance.decoder('llama')()
    model.set_attn_implementation('eager')
    with pytest.raises(UnsupportedOperationError, match="attn_implementation='sdpa'"):
        relevance_of(conformance.wrap_decoder(model), CPLRP(attention='sdpa'))


def test_refuses_attention_dropout_in_training():
    '''Attention dropout (training mode) makes the forward random: refused (at registration) before any backward.'''
    import conformance
    model = conformance.decoder('llama')()
    for module in model.modules():
        if hasattr(module, 'attention_dropout'):
            module.attention_dropout = 0.5
    model.train()
    with pytest.raises((UnsupportedModelError, UnsupportedOperationError), match='dropout'):
        relevance_of(conformance.wrap_decoder(model), AttnLRP(attention='sdpa'))
