'''Hugging Face decoder families (LLaMA, Mistral, Qwen2, Qwen3, Gemma3 text, GPT-2) end to end: canonizers,
composites, and agreement with the independent oracle (tests/oracle_decoders.py).
'''
import pytest
import torch
from zennit.attribution import Gradient
from zennit.core import Composite

transformers = pytest.importorskip('transformers')

from transformers import (  # noqa: E402
    Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)
from transformers.cache_utils import DynamicCache  # noqa: E402

from zennit_attn import layers, types  # noqa: E402
from zennit_attn.canonizers import detect_canonizers  # noqa: E402
from zennit_attn.canonizers.transformers.common import cache_keyword  # noqa: E402
from zennit_attn.composites import AttentionComposite, AttnLRP, AttnLRPViT, CPLRP  # noqa: E402
from zennit_attn.rules import Epsilon, Gamma  # noqa: E402

from helpers import expected_calls, hooked_call_counts  # noqa: E402
from oracle_decoders import decoder_logits, decoder_oracle, gpt2_oracle  # noqa: E402
from restoration import assert_restored, relative_difference, snapshot  # noqa: E402


VOCAB = 100
LENGTH = 7
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, use_cache=False, rms_norm_eps=1e-6,
)
# sliding windows (3) are shorter than the sequence (7) in Mistral, Qwen2 (second layer) and Gemma3 (first layer)
FAMILIES = {
    'llama': (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True)),
    'mistral': (MistralConfig, MistralForCausalLM, dict(sliding_window=3, head_dim=8)),
    'qwen2': (Qwen2Config, Qwen2ForCausalLM, dict(use_sliding_window=True, max_window_layers=1, sliding_window=3)),
    'qwen3': (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=8, tie_word_embeddings=False)),
    'gemma3': (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        head_dim=8, sliding_window=3, query_pre_attn_scalar=10, final_logit_softcapping=3.0, tie_word_embeddings=True,
        layer_types=['sliding_attention', 'full_attention'],
    )),
}
GPT2_CONFIG = dict(
    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64, use_cache=False, bos_token_id=0,
    eos_token_id=0,
)
FAMILIES['gpt2'] = (GPT2Config, GPT2LMHeadModel, {})
FAMILY_NAMES = sorted(FAMILIES)
LLAMA_LIKE = [family for family in FAMILY_NAMES if family != 'gpt2']
TARGET = torch.tensor([3, 5])


def make_model(family, dtype=torch.float64, attn_implementation='eager', seed=0, **overrides):
    '''A tiny random model; norm weights and biases are perturbed so that no parameter is trivially 0 or 1.'''
    config_type, model_type, extra = FAMILIES[family]
    common = GPT2_CONFIG if family == 'gpt2' else COMMON
    config = config_type(**{**common, **extra, **overrides}, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = model_type(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name or '.ln_' in name or name.endswith('bias'):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.to(dtype).eval()


def inputs(model, batch=2, pad=2, seed=2):
    '''Token embeddings, a left-padded attention mask (the second row has ``pad`` padding tokens) and the matching
    position ids (as ``generate`` computes them).
    '''
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=generator)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    if batch > 1:
        mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    return embeds, mask, positions


class NextToken(torch.nn.Module):
    '''``inputs_embeds -> next-token logits at the last position`` for Zennit's attributors.'''
    def __init__(self, model, mask, positions, **kwargs):
        super().__init__()
        self.model = model
        self.mask = mask
        self.positions = positions
        self.kwargs = kwargs

    def forward(self, inputs_embeds):
        return self.model(
            inputs_embeds=inputs_embeds, attention_mask=self.mask, position_ids=self.positions, **self.kwargs
        ).logits[:, -1]


def attribute(model, composite, embeds, mask, positions, target=TARGET, **kwargs):
    '''Zennit's Gradient attributor seeded with ``logit * onehot(target)``.'''
    wrapper = NextToken(model, mask, positions, **kwargs)
    onehot = torch.nn.functional.one_hot(target[:len(embeds)], VOCAB).to(embeds.dtype)
    with Gradient(wrapper, composite) as attributor:
        output, relevance = attributor(embeds, lambda y: y * onehot)
    return output, relevance


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_relevance_matches_oracle(family, composite_type, cp_lrp, fused):
    '''AttnLRP / CP-LRP relevance at the input embeddings equals the hand-written modified gradient × input (float64,
    left-padded batch, sliding windows shorter than the sequence where the family has them), with the fused attention
    core and with the unfolded chain.
    '''
    model = make_model(family)
    embeds, mask, positions = inputs(model)
    oracle = gpt2_oracle if family == 'gpt2' else decoder_oracle
    expected, logits = oracle(model, embeds, mask, positions, TARGET, cp_lrp=cp_lrp)
    output, relevance = attribute(
        model, composite_type(epsilon=1e-12, fused_attention=fused), embeds, mask, positions
    )
    assert torch.allclose(output, logits, rtol=1e-10, atol=1e-10)
    assert relative_difference(relevance, expected) < 1e-6
    assert (relevance[1, :2] == 0).all()  # padding tokens


def test_oracle_detects_wrong_rules():
    '''Sanity checks of the oracle comparison: plain gradient × input, and AttnLRP vs CP-LRP, differ from it.'''
    model = make_model('llama')
    embeds, mask, positions = inputs(model, batch=1)
    expected, _ = decoder_oracle(model, embeds, mask, positions, TARGET[:1])
    _, gradient = attribute(model, Composite(), embeds, mask, positions)
    assert relative_difference(gradient * embeds, expected) > 1e-2
    _, cp_lrp = attribute(model, CPLRP(epsilon=1e-12), embeds, mask, positions)
    assert relative_difference(cp_lrp, expected) > 1e-2


def test_oracle_follows_the_sliding_window():
    '''The oracle's logits equal the model's only with the right window: the sliding-window tests are meaningful.'''
    model = make_model('mistral')
    embeds, mask, positions = inputs(model, batch=1)
    with AttnLRP().context(model):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(decoder_logits(model, embeds, mask, positions), logits, rtol=1e-10, atol=1e-10)
    model.config.sliding_window = None
    assert not torch.allclose(decoder_logits(model, embeds, mask, positions), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_forward_unchanged_while_registered(family, attn_implementation):
    '''The canonized model computes the original output (float32, ≤1e-6 relative to the output scale), also for a
    model loaded with sdpa (whose masks the canonizer switches to the eager format).
    '''
    model = make_model(family, dtype=torch.float32, attn_implementation=attn_implementation)
    embeds, mask, positions = inputs(model)
    expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    for composite in (AttnLRP(), CPLRP()):
        with composite.context(model):
            actual = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        scale = max(1., expected.abs().max().item())
        assert (actual[real] - expected[real]).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_removal_restores_model_bit_identically(family):
    '''After an attribution, and after an exception inside the context, the model has the same modules, forwards,
    parameter objects (tied embeddings stay tied), state_dict, hooks and attention implementation.
    '''
    model = make_model(family, dtype=torch.float32, attn_implementation='sdpa')
    before = snapshot(model)
    embeds, mask, positions = inputs(model)
    expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    attribute(model, AttnLRP(), embeds, mask, positions)
    assert_restored(model, before)
    with pytest.raises(RuntimeError, match='boom'):
        with CPLRP().context(model):
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
            raise RuntimeError('boom')
    assert_restored(model, before)
    assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits, expected)


@pytest.mark.parametrize('family', LLAMA_LIKE)
def test_registered_model_structure(family):
    '''While registered: every attention is unfolded (one op instance per call site, each called once per forward),
    projections carry the attention role, the config says eager, and tied embeddings stay tied.
    '''
    model = make_model(family, dtype=torch.float32, attn_implementation='sdpa')
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    composite = AttnLRP()
    embeds, mask, positions = inputs(model)
    with composite.context(model):
        assert model.config._attn_implementation == 'eager'
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
        for layer in model.model.layers:
            attention = layer.self_attn
            assert isinstance(attention.attnlrp_scores, layers.AttentionScores)
            assert attention.attnlrp_scores.scale == attention.scaling
            assert isinstance(attention.attnlrp_softmax, layers.AttentionSoftmax)
            assert attention.attnlrp_softmax.dtype == torch.float32
            assert isinstance(attention.attnlrp_attention, layers.AttentionCore)
            assert attention.attnlrp_attention.softmax_dtype == torch.float32
            assert attention.attnlrp_attention.scale == attention.scaling
            assert attention.attnlrp_rope_query is not attention.attnlrp_rope_key
            assert isinstance(layer.mlp.attnlrp_product, layers.GatedProduct)
            assert isinstance(layer.attnlrp_residual_attention, layers.Sum)
            for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
                assert composite.roles[getattr(attention, name)] == 'attention_projection'
        counts = hooked_call_counts(
            model, lambda: model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        )
    assert len(counts) > 30
    assert {name: value for name, value in counts.items() if value != expected_calls(name, fused=True)} == {}
    assert model.config._attn_implementation == 'sdpa'


def test_family_detection():
    '''Each model is detected as exactly its own family.'''
    detected = {}
    for family in FAMILY_NAMES:
        model = make_model(family, dtype=torch.float32)
        detected[family] = [type(canonizer).__name__ for canonizer in detect_canonizers(model)]
    assert detected == {
        'gemma3': ['Gemma3TextCanonizer'], 'llama': ['LlamaCanonizer'], 'mistral': ['MistralCanonizer'],
        'qwen2': ['Qwen2Canonizer'], 'qwen3': ['Qwen3Canonizer'], 'gpt2': ['GPT2Canonizer'],
    }


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_eager_and_sdpa_models_give_the_same_relevance(family):
    '''Copies of the same weights loaded with eager and sdpa attention give the same relevance.'''
    eager = make_model(family)
    sdpa = make_model(family, attn_implementation='sdpa', seed=5)
    sdpa.load_state_dict(eager.state_dict())
    embeds, mask, positions = inputs(eager)
    _, expected = attribute(eager, AttnLRP(), embeds, mask, positions)
    _, actual = attribute(sdpa, AttnLRP(), embeds, mask, positions)
    assert torch.equal(actual, expected)
    assert sdpa.config._attn_implementation == 'sdpa'


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_left_padded_batch_equals_single_runs(family):
    '''The relevance of the real tokens of a left-padded batch equals that of unpadded single runs; padding tokens get
    none.
    '''
    model = make_model(family)
    embeds, mask, positions = inputs(model, pad=3)
    _, batched = attribute(model, AttnLRP(), embeds, mask, positions)
    assert (batched[1, :3] == 0).all()
    for row in range(2):
        real = mask[row].bool()
        single_embeds = embeds[row:row + 1, real]
        single_mask = torch.ones(1, int(real.sum()), dtype=torch.long)
        _, single = attribute(
            model, AttnLRP(), single_embeds, single_mask, None, target=TARGET[row:row + 1]
        )
        assert relative_difference(batched[row:row + 1, real], single) < 1e-5


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_bfloat16_with_padding_is_finite(family):
    '''bfloat16 models with padding masks give finite, non-zero relevance.'''
    model = make_model(family, dtype=torch.bfloat16)
    embeds, mask, positions = inputs(model)
    output, relevance = attribute(model, AttnLRP(), embeds, mask, positions)
    assert relevance.dtype == torch.bfloat16
    assert torch.isfinite(output).all() and torch.isfinite(relevance).all()
    assert (relevance[:, -3:].abs().sum((1, 2)) > 0).all()
    _, cp_lrp = attribute(model, CPLRP(), embeds, mask, positions)
    assert torch.isfinite(cp_lrp).all()


@pytest.mark.parametrize('family', ['llama', 'gemma3', 'gpt2'])
def test_key_value_cache(family):
    '''With ``use_cache=True`` (a cache the model creates itself) relevance is unchanged; with a prefilled cache the
    canonized forward equals the original and relevance is finite (the cached keys/values absorb their share).
    '''
    model = make_model(family)
    embeds, mask, positions = inputs(model, batch=1)
    _, expected = attribute(model, AttnLRP(), embeds, mask, positions)
    _, cached = attribute(model, AttnLRP(), embeds, mask, positions, use_cache=True)
    assert torch.equal(cached, expected)

    def continuation(cache, keyword='past_key_values', position_ids=True):
        extra = {'position_ids': positions[:, 4:]} if position_ids else {}
        return model(
            inputs_embeds=embeds[:, 4:], attention_mask=mask, use_cache=True, **extra, **{keyword: cache},
        ).logits

    def prefill():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(inputs_embeds=embeds[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4],
                  past_key_values=cache, use_cache=True)
        return cache

    # the deprecated keyword and the model's own (``cache`` from transformers 5.24 on), with and without position ids
    # (without them, the positions are counted from the cache's length)
    for keyword in sorted({'past_key_values', cache_keyword(type(model).forward)}):
        for position_ids in (True, False):
            original = continuation(prefill(), keyword, position_ids)
            with AttnLRP().context(model):
                canonized = continuation(prefill(), keyword, position_ids)
            assert torch.allclose(canonized, original, rtol=1e-12, atol=1e-12), (keyword, position_ids)
    _, relevance = attribute(
        model, AttnLRP(), embeds[:, 4:], mask, positions[:, 4:], past_key_values=prefill(), use_cache=True
    )
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


@pytest.mark.parametrize('family', ['llama', 'gemma3'])
def test_cp_lrp_conserves_on_bias_free_decoder(family):
    '''CP-LRP on a decoder without biases conserves the target logit (the softmax, the only absorbing rule, is
    bypassed; RMSNorm, soft-capping and the gate are identity / constant).
    '''
    model = make_model(family)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias'):
                param.zero_()
    embeds, mask, positions = inputs(model)
    output, relevance = attribute(model, CPLRP(epsilon=1e-12), embeds, mask, positions)
    logits = output[torch.arange(2), TARGET]
    assert torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-6)


def test_gpt2_registered_model_structure():
    '''GPT-2 while registered: attention, residual and position-embedding sums unfolded, Conv1D projections carry the
    attention role and get ε, the MLP's Conv1D and NewGELU get ε / identity, embeddings stay tied, every hooked module
    runs once per forward; wpe is restored afterwards.
    '''
    model = make_model('gpt2', dtype=torch.float32, attn_implementation='sdpa')
    transformer = model.transformer
    composite = AttnLRP()
    embeds, mask, positions = inputs(model)
    with composite.context(model):
        assert model.config._attn_implementation == 'eager'
        assert model.lm_head.weight is transformer.wte.weight
        assert isinstance(transformer.attnlrp_position_embedding, layers.Sum)
        assert 'forward' in vars(transformer.wpe)
        for block in transformer.h:
            assert isinstance(block.attn.attnlrp_scores, layers.AttentionScores)
            assert block.attn.attnlrp_scores.scale == block.attn.scaling
            assert isinstance(block.attn.attnlrp_attention, layers.AttentionCore)
            assert isinstance(block.attnlrp_residual_mlp, layers.Sum)
            assert composite.roles[block.attn.c_attn] == composite.roles[block.attn.c_proj] == 'attention_projection'
            assert isinstance(composite.mapping(None, '', block.mlp.c_fc), Epsilon)
            assert type(composite.mapping(None, '', block.mlp.act)).__name__ == 'IdentityRule'
        counts = hooked_call_counts(
            model, lambda: model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        )
    assert len(counts) > 20
    assert {name: value for name, value in counts.items() if value != expected_calls(name, fused=True)} == {}
    assert 'forward' not in vars(transformer.wpe)
    ids = torch.randint(0, VOCAB, (1, LENGTH))
    expected = model(input_ids=ids).logits
    with AttnLRP().context(model):
        # sdpa-loaded original vs. the eager canonical forward
        assert torch.allclose(model(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match='token_type_ids'):
        with AttnLRP().context(model):
            model(input_ids=ids, token_type_ids=ids)


@pytest.mark.parametrize('rule_type', [Epsilon, Gamma])
def test_conv1d_rules_equal_linear_rules(rule_type):
    '''transformers' Conv1D (y = x @ W + b) gets the same ε/γ relevance as the equivalent nn.Linear (weight W^T), and
    is matched by the Linear-like type of the layer maps.
    '''
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = Conv1D(5, 6).double()
    with torch.no_grad():
        conv.bias.normal_()
    linear = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    assert isinstance(conv, types.LinearLike) and isinstance(linear, types.LinearLike)
    assert not isinstance(torch.nn.Conv1d(2, 2, 1), types.LinearLike) or isinstance(torch.nn.Conv1d(2, 2, 1),
                                                                                       torch.nn.Conv1d)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    relevances = []
    for module in (conv, linear):
        composite = AttentionComposite([(types.LinearLike, rule_type())])
        with Gradient(module, composite) as attributor:
            _, relevance = attributor(x, torch.ones_like)
        relevances.append(relevance)
    assert torch.allclose(relevances[0], relevances[1], rtol=1e-12, atol=1e-12)
    assert relevances[0].abs().sum() > 0


def test_gpt2_vision_preset_uses_gamma_on_conv1d():
    '''The vision preset maps GPT-2's MLP Conv1D layers to Gamma and keeps ε on the attention projections (roles).'''
    model = make_model('gpt2', dtype=torch.float32)
    composite = AttnLRPViT()
    with composite.context(model):
        block = model.transformer.h[0]
        assert isinstance(composite.mapping(None, '', block.mlp.c_fc), Gamma)
        assert type(composite.mapping(None, '', block.attn.c_attn)) is Epsilon


def test_float64_padding_stays_finite():
    '''transformers' eager attention turns float64 models with left padding into NaN (float64's mask minimum becomes
    -inf in the float32 softmax); the canonical forward floors the mask at float32's minimum, which keeps it finite and
    leaves unpadded outputs bit-identical.
    '''
    model = make_model('llama')
    embeds, mask, positions = inputs(model)
    original = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    unpadded = model(inputs_embeds=embeds[:1], attention_mask=mask[:1], position_ids=positions[:1]).logits
    with AttnLRP().context(model):
        canonized = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        canonized_unpadded = model(inputs_embeds=embeds[:1], attention_mask=mask[:1], position_ids=positions[:1]).logits
    assert torch.isnan(original).any()  # documents the upstream behaviour this works around
    assert torch.isfinite(canonized).all()
    assert torch.equal(canonized_unpadded, unpadded)


@pytest.mark.parametrize('overrides,message', [
    (dict(reorder_and_upcast_attn=True), 'reorder_and_upcast_attn'),
    (dict(add_cross_attention=True), 'cross-attention'),
])
def test_gpt2_unsupported_variants_raise_and_restore(overrides, message):
    '''Unsupported GPT-2 variants raise a clear error at registration and leave the model untouched.'''
    model = make_model('gpt2', dtype=torch.float32, attn_implementation='sdpa', **overrides)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=message):
        AttnLRP().register(model)
    assert_restored(model, before)


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_coverage_lint_finds_no_unhooked_op(family, composite_type, fused):
    '''zennit_attn.check reports nothing on every supported decoder family (padded batch, sliding windows), with the
    fused attention core and with the unfolded chain.
    '''
    from zennit_attn import check

    model = make_model(family)
    embeds, mask, positions = inputs(model)
    report = check(NextToken(model, mask, positions), composite_type(fused_attention=fused), embeds)
    assert report.ok, str(report)
