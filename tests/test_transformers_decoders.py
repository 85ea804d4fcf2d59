'''Hugging Face decoder families (LLaMA, Mistral, Qwen2, Qwen3, Gemma3 text, GPT-2) end to end through the
interception engine (the model's own forward, glue operations routed to rules): composites, the unchanged forward, and
agreement with the independent oracle (tests/oracle_decoders.py).
'''
import inspect

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

from zennit_attn import check, types  # noqa: E402
from zennit_attn.composites import AttentionComposite, AttnLRP, AttnLRPViT, CPLRP  # noqa: E402
from zennit_attn.engine import UnsupportedOperationError  # noqa: E402
from zennit_attn.families import detect_families  # noqa: E402
from zennit_attn.rules import Epsilon, Gamma, IdentityRule  # noqa: E402

from helpers import input_relevance, recorded_sites, rule_runs  # noqa: E402
from oracle_decoders import decoder_logits, decoder_oracle, gpt2_oracle  # noqa: E402
from restoration import assert_restored, relative_difference, snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')


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


def make_model(family, dtype=torch.float64, attn_implementation='sdpa', seed=0, **overrides):
    '''A tiny random model; norm weights and biases are perturbed so that no parameter is trivially 0 or 1.

    sdpa by default: transformers' own eager attention turns the rows of float64 models that left padding masks
    completely into NaN (see test_float64_eager_left_padding_raises_the_nan_error), and the engine runs the model's
    own forward unchanged.
    '''
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


def real_rows_close(actual, expected, mask, tolerance=1e-6):
    '''Whether the outputs of the real (unpadded) positions agree to ``tolerance`` relative to the output scale.'''
    real = mask.bool()
    scale = max(1., expected.abs().max().item())
    return (actual[real] - expected[real]).abs().max().item() <= tolerance * scale


def zero_biases(model, also=()):
    '''Zero every bias (and the parameters named in ``also``) in place.'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or name in also:
                param.zero_()


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_relevance_matches_oracle(family, composite_type, cp_lrp, fused):
    '''AttnLRP / CP-LRP relevance at the input embeddings equals the hand-written modified gradient × input (float64
    sdpa model, left-padded batch, sliding windows shorter than the sequence where the family has them), with the fused
    attention core and with the unfolded chain. The fused forward is the model's own, bit for bit; the oracle mimics
    eager attention (float32 softmax), so its logits agree to ~1e-8.
    '''
    model = make_model(family)
    embeds, mask, positions = inputs(model)
    oracle = gpt2_oracle if family == 'gpt2' else decoder_oracle
    expected, logits = oracle(model, embeds, mask, positions, TARGET, cp_lrp=cp_lrp)
    with torch.no_grad():
        own = NextToken(model, mask, positions)(embeds)
    output, relevance = attribute(
        model, composite_type(epsilon=1e-12, fused_attention=fused), embeds, mask, positions
    )
    if fused:
        assert torch.equal(output, own)
    else:
        # the unfolded chain replaces the sdpa kernel by its matmuls and softmax
        assert torch.allclose(output, own, rtol=1e-10, atol=1e-10)
    assert torch.allclose(output, logits, rtol=1e-6, atol=1e-6)
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
    '''The oracle's logits equal the model's (eager, whose float32 softmax the oracle mimics) only with the right
    window: the sliding-window tests are meaningful.
    '''
    model = make_model('mistral', attn_implementation='eager')
    embeds, mask, positions = inputs(model, batch=1)
    with AttnLRP().context(model):
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert torch.allclose(decoder_logits(model, embeds, mask, positions), logits, rtol=1e-10, atol=1e-10)
    model.config.sliding_window = None
    assert not torch.allclose(decoder_logits(model, embeds, mask, positions), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_forward_unchanged_while_registered(family, attn_implementation):
    '''With a composite registered and an input that requires a gradient (so that every glue operation gets its rule
    node), the model's own forward runs: the output is bit-identical to the unregistered one (float32, left-padded
    batch). Only the unfolded chain replaces an operation (the sdpa kernel) and agrees to ≤1e-6 on the real tokens.
    '''
    model = make_model(family, dtype=torch.float32, attn_implementation=attn_implementation)
    embeds, mask, positions = inputs(model)
    embeds.requires_grad_(True)

    def forward():
        return model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits

    expected = forward()
    for composite in (AttnLRP(), CPLRP(), AttnLRP(fused_attention=False)):
        with composite.context(model), recorded_sites() as sites:
            actual = forward()
        assert sites, 'the engine attributed no operation'
        if attn_implementation == 'eager' or composite.fused_attention:
            assert torch.equal(actual, expected)
        else:
            assert real_rows_close(actual, expected, mask)


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_removal_restores_model_bit_identically(family):
    '''After an attribution, and after an exception inside the context, the model has the same modules, forwards,
    parameter objects (tied embeddings stay tied), state_dict, hooks and attention implementation.
    '''
    model = make_model(family, dtype=torch.float32)
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


def run_attribution(wrapper, embeds, target=TARGET):
    '''A forward and a backward pass of ``wrapper`` (inside a composite context) seeded with ``logit * onehot``.'''
    x = embeds.detach().clone().requires_grad_(True)
    output = wrapper(x)
    onehot = torch.nn.functional.one_hot(target[:len(x)], VOCAB).to(x.dtype)
    torch.autograd.grad(output, x, output.detach() * onehot)


def attention_sites(sites):
    '''The operation sites of attention (fused attention cores and softmaxes), without the op counter.'''
    return [site for site in sites if site.rsplit('.', 1)[-1].split('_')[0] in ('attention', 'softmax')]


def sites_of_unchanged_forward(wrapper, embeds):
    '''The operation sites AttnLRP attributes in ``wrapper(embeds)``, asserting that the forward is bit-identical.'''
    x = embeds.clone().requires_grad_(True)
    expected = wrapper(x)
    with AttnLRP().context(wrapper), recorded_sites() as sites:
        actual = wrapper(x)
    assert torch.equal(actual, expected)
    return sites


@pytest.mark.parametrize('family', LLAMA_LIKE)
@pytest.mark.parametrize('attn_implementation,fused', [('sdpa', True), ('sdpa', False), ('eager', True)],
                         ids=['sdpa-fused', 'sdpa-unfolded', 'eager'])
def test_registered_model_structure(family, attn_implementation, fused):
    '''While registered nothing is added to the model (same modules, no forward replaced), the config keeps its
    attention implementation, tied embeddings stay tied and the projections carry the attention role. One attribution
    runs every ruled module's rule once (forward and backward) and attributes, per layer, one fused attention core
    (sdpa, fused) or one matmul-softmax-matmul chain (unfolded, or the eager model's own code), the rotary sums, the
    gated product and both residual sums.
    '''
    model = make_model(family, dtype=torch.float32, attn_implementation=attn_implementation)
    tied = model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    embeds, mask, positions = inputs(model)
    wrapper = NextToken(model, mask, positions)
    modules = list(wrapper.named_modules())
    composite = AttnLRP(fused_attention=fused)
    with composite.context(wrapper):
        assert [(name, id(module)) for name, module in wrapper.named_modules()] == [
            (name, id(module)) for name, module in modules]
        assert not any('forward' in vars(module) for _, module in modules)
        assert model.config._attn_implementation == attn_implementation
        assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
        for layer in model.model.layers:
            for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
                assert composite.roles[getattr(layer.self_attn, name)] == 'attention_projection'
            for name in ('gate_proj', 'up_proj', 'down_proj'):
                assert getattr(layer.mlp, name) not in composite.roles
        with recorded_sites() as sites:
            runs = rule_runs(wrapper, lambda: run_attribution(wrapper, embeds))
    assert set(runs) == {
        name for name, module in wrapper.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__.endswith('RMSNorm') or name.endswith('act_fn')
    }
    assert {name: calls for name, calls in runs.items() if calls != (1, 1)} == {}
    unfolded = attn_implementation == 'eager' or not fused
    expected = []
    for index in range(len(model.model.layers)):
        prefix = f'model.model.layers.{index}'
        expected.append(f'{prefix}.self_attn.softmax' if unfolded else f'{prefix}.self_attn.attention')
        if unfolded:
            assert {f'{prefix}.self_attn.matmul', f'{prefix}.self_attn.matmul_1'} <= set(sites)
        # rotary embeddings (x * cos + rotate(x) * sin for queries and keys), gated MLP product, residual sums
        assert {f'{prefix}.self_attn.add', f'{prefix}.self_attn.add_1', f'{prefix}.self_attn.neg',
                f'{prefix}.mlp.mul', f'{prefix}.add', f'{prefix}.add_1'} <= set(sites)
        assert f'{prefix}.add_2' not in sites
    assert attention_sites(sites) == expected
    assert len(sites) == len(set(sites))  # site names are unique per forward
    assert model.config._attn_implementation == attn_implementation


def test_cp_lrp_stops_at_queries_and_keys():
    '''Under CP-LRP (attention probabilities constant) the query and key projections receive no relevance, the value
    and output projections do; under AttnLRP all four do.
    '''
    from zennit_attn.latent import record_relevance

    model = make_model('llama', dtype=torch.float32)
    embeds, mask, positions = inputs(model)
    wrapper = NextToken(model, mask, positions)
    for composite_type, stopped in ((CPLRP, ('q_proj', 'k_proj')), (AttnLRP, ())):
        with record_relevance(wrapper, ['model.model.layers.*.self_attn.?_proj']) as recorded:
            with Gradient(wrapper, composite_type()) as attributor:
                attributor(embeds, lambda y: y * torch.nn.functional.one_hot(TARGET, VOCAB))
        for index in range(len(model.model.layers)):
            for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
                site = f'model.model.layers.{index}.self_attn.{name}'
                assert site in recorded.matched
                total = recorded[site].abs().sum().item() if site in recorded else 0.
                assert (total == 0) == (name in stopped), (composite_type.__name__, site, total)


def test_family_detection():
    '''Each model is detected as exactly its own family declaration.'''
    detected = {
        family: [declared.name for declared in detect_families(make_model(family, dtype=torch.float32))]
        for family in FAMILY_NAMES
    }
    assert detected == {
        'gemma3': ['LLaMA family'], 'llama': ['LLaMA family'], 'mistral': ['LLaMA family'],
        'qwen2': ['LLaMA family'], 'qwen3': ['LLaMA family'], 'gpt2': ['GPT-2'],
    }


@pytest.mark.parametrize('family', FAMILY_NAMES)
def test_eager_and_sdpa_models_give_the_same_relevance(family):
    '''Copies of the same weights loaded with eager and sdpa attention give the same relevance (float64 without
    padding, float32 with a left-padded batch): eager attention runs the model's own matmul-softmax-matmul code, sdpa
    one fused attention core or the engine's unfolded chain. Eager's softmax is float32, so 1e-6 relative, not exact.
    '''
    # ε tiny: the fused rule and the engine's unfolded chain stabilise the scaled scores c * q @ k^T, the eager code's
    # matmul the unscaled q @ k^T (at ε = 1e-6 they differ by up to ~2e-5 relative in float32)
    for dtype, pad, epsilon, fused in ((torch.float64, 0, 1e-12, True), (torch.float32, 2, 1e-12, False)):
        eager = make_model(family, dtype=dtype, attn_implementation='eager')
        sdpa = make_model(family, dtype=dtype, seed=5)
        sdpa.load_state_dict(eager.state_dict())
        embeds, mask, positions = inputs(eager, pad=pad)
        _, expected = attribute(eager, AttnLRP(epsilon=epsilon), embeds, mask, positions)
        _, actual = attribute(sdpa, AttnLRP(epsilon=epsilon, fused_attention=fused), embeds, mask, positions)
        assert relative_difference(actual, expected) < 1e-6
        assert sdpa.config._attn_implementation == 'sdpa' and eager.config._attn_implementation == 'eager'


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
@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_bfloat16_with_padding_is_finite(family, attn_implementation):
    '''bfloat16 models with padding masks give finite, non-zero relevance.'''
    model = make_model(family, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    embeds, mask, positions = inputs(model)
    output, relevance = attribute(model, AttnLRP(), embeds, mask, positions)
    assert relevance.dtype == torch.bfloat16
    assert torch.isfinite(output).all() and torch.isfinite(relevance).all()
    assert (relevance[:, -3:].abs().sum((1, 2)) > 0).all()
    _, cp_lrp = attribute(model, CPLRP(), embeds, mask, positions)
    assert torch.isfinite(cp_lrp).all()


@pytest.mark.parametrize('family', ['llama', 'gemma3', 'gpt2'])
@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_key_value_cache(family, attn_implementation):
    '''With ``use_cache=True`` (a cache the model creates itself) relevance is unchanged; with a prefilled cache (keys
    and values computed without gradient: constants) the engine's forward equals the model's own output bit for bit
    and relevance is finite (the cached keys/values absorb their share).
    '''
    model = make_model(family, attn_implementation=attn_implementation)
    embeds, mask, positions = inputs(model, batch=1)
    _, expected = attribute(model, AttnLRP(), embeds, mask, positions)
    _, cached = attribute(model, AttnLRP(), embeds, mask, positions, use_cache=True)
    assert torch.equal(cached, expected)

    def continuation(cache, new, keyword='past_key_values', position_ids=True):
        extra = {'position_ids': positions[:, 4:]} if position_ids else {}
        return model(inputs_embeds=new, attention_mask=mask, use_cache=True, **extra, **{keyword: cache}).logits

    def prefill():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(inputs_embeds=embeds[:, :4], attention_mask=mask[:, :4], position_ids=positions[:, :4],
                  past_key_values=cache, use_cache=True)
        return cache

    # the deprecated keyword and the model's own (``cache`` from transformers 5.24 on), with and without position ids
    # (without them, the positions are counted from the cache's length): the model's own forward handles them all
    keywords = {'past_key_values'} | ({'cache'} & set(inspect.signature(type(model).forward).parameters))
    for keyword in sorted(keywords):
        for position_ids in (True, False):
            original = continuation(prefill(), embeds[:, 4:], keyword, position_ids)
            with AttnLRP().context(model), recorded_sites() as sites:
                engine = continuation(prefill(), embeds[:, 4:].clone().requires_grad_(True), keyword, position_ids)
            assert attention_sites(sites)  # the continuation's attention was attributed
            assert torch.equal(engine, original), (keyword, position_ids)
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
    zero_biases(model)
    embeds, mask, positions = inputs(model)
    output, relevance = attribute(model, CPLRP(epsilon=1e-12), embeds, mask, positions)
    logits = output[torch.arange(2), TARGET]
    assert torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-6)


def test_gpt2_registered_model_structure():
    '''GPT-2 while registered: nothing added, the config keeps sdpa, embeddings stay tied, the attention Conv1D layers
    carry the attention role (ε), the MLP's Conv1D and NewGELU get ε / identity; one attribution runs every ruled
    module once and attributes exactly the position-embedding sum, one attention core and two residual sums per block.
    The forward is the model's own, bit for bit.
    '''
    model = make_model('gpt2', dtype=torch.float32)
    transformer = model.transformer
    composite = AttnLRP()
    embeds, mask, positions = inputs(model)
    wrapper = NextToken(model, mask, positions)
    modules = list(wrapper.named_modules())
    with composite.context(wrapper):
        assert [(name, id(module)) for name, module in wrapper.named_modules()] == [
            (name, id(module)) for name, module in modules]
        assert not any('forward' in vars(module) for _, module in modules)
        assert model.config._attn_implementation == 'sdpa'
        assert model.lm_head.weight is transformer.wte.weight
        for block in transformer.h:
            assert composite.roles[block.attn.c_attn] == composite.roles[block.attn.c_proj] == 'attention_projection'
            assert block.mlp.c_fc not in composite.roles
            assert isinstance(composite.mapping(None, '', block.mlp.c_fc), Epsilon)
            assert isinstance(composite.mapping(None, '', block.mlp.act), IdentityRule)
        with recorded_sites() as sites:
            runs = rule_runs(wrapper, lambda: run_attribution(wrapper, embeds))
    assert set(runs) == {
        name for name, module in wrapper.named_modules()
        if type(module).__name__ in ('Conv1D', 'LayerNorm', 'Linear') or name.endswith('mlp.act')
    }
    assert {name: calls for name, calls in runs.items() if calls != (1, 1)} == {}
    assert sites == ['model.transformer.add'] + [
        f'model.transformer.h.{index}.{op}' for index in range(len(transformer.h))
        for op in ('attn.attention', 'add', 'add_1')
    ]
    ids = torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(4))
    expected = model(input_ids=ids).logits
    with AttnLRP().context(model):
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_gpt2_token_type_ids_run_through_the_engine():
    '''GPT-2's token-type embeddings (looked up in wte and added like the position embeddings) are a second constant
    summand: the forward is unchanged, check() finds nothing, and the relevance equals the oracle's with the token-type
    embeddings folded into its position-embedding table.
    '''
    from types import SimpleNamespace

    model = make_model('gpt2')
    transformer = model.transformer
    embeds, mask, positions = inputs(model)
    token_types = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(6))
    wrapper = NextToken(model, mask, positions, token_type_ids=token_types)
    sites = sites_of_unchanged_forward(wrapper, embeds)
    assert sites[:2] == ['model.transformer.add', 'model.transformer.add_1']  # position and token-type sums
    # the oracle adds wpe.weight[position_ids]: give it a table whose rows are position + token-type embeddings
    with torch.no_grad():
        table = (transformer.wpe.weight[positions] + transformer.wte.weight[token_types]).flatten(0, 1)
    proxy = SimpleNamespace(
        config=model.config, lm_head=model.lm_head,
        transformer=SimpleNamespace(wpe=SimpleNamespace(weight=table), h=transformer.h, ln_f=transformer.ln_f),
    )
    table_positions = torch.arange(table.shape[0]).reshape(positions.shape)
    for composite_type, cp_lrp in ((AttnLRP, False), (CPLRP, True)):
        oracle, logits = gpt2_oracle(proxy, embeds, mask, table_positions, TARGET, cp_lrp=cp_lrp)
        output, relevance = attribute(model, composite_type(epsilon=1e-12), embeds, mask, positions,
                                      token_type_ids=token_types)
        assert torch.allclose(output, logits, rtol=1e-10, atol=1e-10)
        assert relative_difference(relevance, oracle) < 1e-6
        assert torch.isfinite(relevance).all() and (relevance[1, :2] == 0).all()
    _, without = attribute(model, AttnLRP(epsilon=1e-12), embeds, mask, positions)
    assert relative_difference(relevance, without) > 1e-3  # the token types matter
    report = check(wrapper, AttnLRP(), embeds)
    assert report.ok, str(report)


@pytest.mark.parametrize('attn_implementation', ['eager', 'sdpa'])
def test_gpt2_cross_attention_runs_and_conserves(attn_implementation):
    '''GPT-2 with ``add_cross_attention`` runs through the engine: the forward is unchanged, every block attributes a
    self- and a cross-attention core (or softmax), check() finds nothing, relevance is finite. Independent check: with
    zero biases and position embeddings, CP-LRP conserves the target logit over the input embeddings and the encoder
    states together (the LayerNorm, GELU and sum rules conserve, the softmax is bypassed).
    '''
    model = make_model('gpt2', attn_implementation=attn_implementation, add_cross_attention=True)
    embeds, mask, positions = inputs(model, batch=1 if attn_implementation == 'eager' else 2)
    encoder = torch.randn(len(embeds), 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    wrapper = NextToken(model, mask, positions, encoder_hidden_states=encoder)
    sites = sites_of_unchanged_forward(wrapper, embeds)
    core = 'softmax' if attn_implementation == 'eager' else 'attention'
    assert attention_sites(sites) == [
        f'model.transformer.h.{index}.{part}.{core}' for index in range(2) for part in ('attn', 'crossattention')
    ]
    _, relevance = attribute(model, AttnLRP(), embeds, mask, positions, encoder_hidden_states=encoder)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    report = check(wrapper, AttnLRP(), embeds)
    assert report.ok, str(report)

    zero_biases(model, also=('transformer.wpe.weight',))
    onehot = torch.nn.functional.one_hot(TARGET[:len(embeds)], VOCAB).to(embeds.dtype)

    def call(model, inputs_embeds, encoder_hidden_states):
        return model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                     encoder_hidden_states=encoder_hidden_states).logits[:, -1]

    output, relevances = input_relevance(model, CPLRP(epsilon=1e-12), call, lambda y: y * onehot,
                                         inputs_embeds=embeds, encoder_hidden_states=encoder)
    total = relevances['inputs_embeds'].sum((1, 2)) + relevances['encoder_hidden_states'].sum((1, 2))
    assert relevances['encoder_hidden_states'].abs().sum() > 0
    assert torch.allclose(total, output[torch.arange(len(embeds)), TARGET[:len(embeds)]], rtol=1e-6)


def test_gpt2_reorder_and_upcast_attn_raises_and_restores():
    '''GPT-2's ``reorder_and_upcast_attn`` (eager only) computes the scores with ``torch.baddbmm``, which has no rule:
    attributing raises UnsupportedOperationError naming the op and the module, and the model is restored.
    '''
    model = make_model('gpt2', dtype=torch.float32, attn_implementation='eager', reorder_and_upcast_attn=True)
    before = snapshot(model)
    embeds, mask, positions = inputs(model)
    expected = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    with pytest.raises(UnsupportedOperationError, match=r"'baddbmm'") as error:
        attribute(model, AttnLRP(), embeds, mask, positions)
    assert "'model.transformer.h.0.attn' (GPT2Attention)" in str(error.value)
    assert_restored(model, before)
    assert torch.equal(model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits, expected)


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
    conv1d = torch.nn.Conv1d(2, 2, 1)
    assert not isinstance(conv1d, types.LinearLike) or isinstance(conv1d, torch.nn.Conv1d)
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


def test_float64_eager_left_padding_raises_the_nan_error():
    '''transformers' eager attention turns float64 models with left padding into NaN (float64's mask minimum becomes
    -inf in its float32 softmax); the engine runs that forward unchanged and refuses its NaN output while attributing
    with a clear ValueError, after which the model is restored. sdpa, or the unpadded batch, stay finite.
    '''
    model = make_model('llama', attn_implementation='eager')
    embeds, mask, positions = inputs(model)
    original = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    assert torch.isnan(original).any()  # documents the upstream behaviour
    before = snapshot(model)
    with pytest.raises(ValueError, match='produced NaN.*attn_implementation="sdpa"'):
        attribute(model, AttnLRP(), embeds, mask, positions)
    assert_restored(model, before)
    with pytest.raises(ValueError, match='produced NaN'):
        with AttnLRP().context(model):
            model(inputs_embeds=embeds.clone().requires_grad_(True), attention_mask=mask, position_ids=positions)
    assert_restored(model, before)
    _, unpadded = attribute(model, AttnLRP(), embeds[:1], mask[:1], positions[:1], target=TARGET[:1])
    assert torch.isfinite(unpadded).all()
    sdpa = make_model('llama', seed=5)
    sdpa.load_state_dict(model.state_dict())
    _, relevance = attribute(sdpa, AttnLRP(), embeds, mask, positions)
    assert torch.isfinite(relevance).all()
    assert relative_difference(relevance[:1], unpadded) < 1e-6


@pytest.mark.parametrize('family', FAMILY_NAMES)
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('attn_implementation,fused', [('sdpa', True), ('sdpa', False), ('eager', True)],
                         ids=['sdpa-fused', 'sdpa-unfolded', 'eager'])
def test_coverage_lint_finds_no_unhooked_op(family, composite_type, attn_implementation, fused):
    '''zennit_attn.check reports nothing on every supported decoder family (padded batch, sliding windows), with the
    fused attention core, the unfolded chain and the eager model's own attention code (float32: float64 eager with left
    padding is NaN).
    '''
    dtype = torch.float32 if attn_implementation == 'eager' else torch.float64
    model = make_model(family, dtype=dtype, attn_implementation=attn_implementation)
    embeds, mask, positions = inputs(model)
    report = check(NextToken(model, mask, positions), composite_type(fused_attention=fused), embeds)
    assert report.ok, str(report)
