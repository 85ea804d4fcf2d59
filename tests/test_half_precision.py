'''Half precision (issue 15): float16 and bfloat16 give finite relevance on every registered family (padding masks
included), close to the float32 relevance of the same model; a float16 forward that overflows is refused.

"The same model": the float64 entry rounded to the half type, then run either in that type or in float32 (the same
weights and input, exactly), so the comparison sees what half-precision arithmetic does to relevance, not what
rounding the weights does to the model. The rules compute in float32 (``AttnHook.backward_relevance``); what remains is
the forward's rounding, which ε-ratios ``R / z`` amplify where ``z`` is small, and relevance stored in the half type
between rules. The seed is ``onehot`` (the target logit's relevance divided by the logit; relevance is linear in the
seed): trained models' logits are O(1-10), these tiny random models' 1e-3-1e-1, and float16's smallest normal number
is 6e-5, so relevance seeded with such a logit is stored largely as float16 subnormals (timm's DeiT: cosine 0.974 with
the logit seed, 0.9945 with the unit seed, whose relevance is still partly subnormal).

Thresholds, per sample, below the measured minimum over the registry: cosine similarity to float32 >= 0.99 for
float16 (measured min 0.9945, DeiT; 0.998 for most) and >= 0.97 for bfloat16 (8 mantissa bits; measured min 0.984,
CLIP's zero-shot image side, Qwen2, Qwen3-MoE). NaN/inf anywhere, a refused op (T5's float16 clamp was one) or a
sample without relevance fails.
'''
import copy

import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.engine import UnsupportedOperationError

from registry import ENTRIES

pytestmark = pytest.mark.usefixtures('single_thread')

pytest.importorskip('transformers')

#: minimum per-sample cosine similarity to the float32 relevance of the same model
MIN_COSINE = {torch.float16: 0.99, torch.bfloat16: 0.97}


def unit_relevance(wrapper, composite, x, target):
    '''Relevance seeded with ``onehot(target)`` (in the output's dtype), and the output.'''
    with Gradient(wrapper, composite) as attributor:
        output, relevance = attributor(x, lambda y: torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype))
    return output.detach(), relevance


def cosine(actual, expected):
    '''Per-sample cosine similarity, in float64.'''
    return torch.nn.functional.cosine_similarity(actual.double().flatten(1), expected.double().flatten(1), dim=1)


def half_and_float(entry, dtype):
    '''``(half wrapper, half input, float32 wrapper, float32 input, target)`` of the same (rounded) model.'''
    model = entry.build()
    wrapper, x, target = entry.wrap(model)
    half = copy.deepcopy(wrapper).to(dtype)
    full = copy.deepcopy(half).float()
    return half, x.to(dtype), full, x.to(dtype).float(), target


def measure(entry, dtype):
    '''``{composite name: (half relevance, float32 relevance)}`` for AttnLRP and CP-LRP.'''
    half, x_half, full, x_full, target = half_and_float(entry, dtype)
    results = {}
    for composite_type in (AttnLRP, CPLRP):
        _, relevance = unit_relevance(half, composite_type(), x_half, target)
        _, expected = unit_relevance(full, composite_type(), x_full, target)
        results[composite_type.__name__] = (relevance, expected)
    return results


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('entry', ENTRIES, ids=[entry.name for entry in ENTRIES])
def test_half_precision_relevance_is_finite_and_close_to_float32(entry, dtype):
    for name, (relevance, expected) in measure(entry, dtype).items():
        assert relevance.dtype == dtype
        assert torch.isfinite(relevance).all(), f'{name}: non-finite relevance'
        assert (relevance.flatten(1).abs().sum(1) > 0).all(), f'{name}: a sample got no relevance'
        similarity = cosine(relevance, expected)
        assert (similarity >= MIN_COSINE[dtype]).all(), f'{name}: cosine to float32 {similarity.tolist()}'


# ------------------------------------------------------------------------------------------------ float16 masks
def bert(scale, implementation):
    '''A tiny BERT (float64) whose query and key weights are multiplied by ``scale``.'''
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=24, initializer_range=0.2, attn_implementation=implementation,
    )
    model = BertModel(config).double().eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(scale)
            layer.attention.self.key.weight.mul_(scale)
    return model


def first_scores(model, x):
    '''The attention scores of the first layer of a BERT (float64).'''
    attention = model.encoder.layer[0].attention.self
    with torch.no_grad():
        hidden = model.embeddings(inputs_embeds=x).double()
        heads = attention.num_attention_heads

        def split(tensor):
            return tensor.unflatten(-1, (heads, -1)).transpose(1, 2)
        query, key = split(attention.query.double()(hidden)), split(attention.key.double()(hidden))
    return query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5


class Pooled(torch.nn.Module):
    '''``inputs_embeds -> first token's hidden state`` (16 "classes") of a BERT, with a padding mask.'''
    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, x):
        return self.model(inputs_embeds=x, attention_mask=self.mask).last_hidden_state[:, 0]


@pytest.mark.parametrize('implementation', ['eager', 'sdpa'])
def test_float16_scores_plus_mask_overflow_gives_finite_relevance(implementation):
    '''Eager attention adds float16's minimum (-65504) as mask: scores below -16 make the sum -inf in float16. The
    sum rule, which recovers the scores as ``sum - mask``, gave NaN there (the shipped MiniLM in float16: NaN for every
    token of padded sentences); the masked positions get no relevance, like a -inf mask. (The fused attention rule of
    sdpa adds the mask in float32.)'''
    model = bert(scale=6., implementation=implementation)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, -3:] = 0
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = first_scores(copy.deepcopy(model), x)
    assert scores[1, :, :, -3:].min() < -20, 'no masked score overflows'
    half = Pooled(copy.deepcopy(model).half(), mask)
    full = Pooled(copy.deepcopy(model).half().float(), mask)
    target = torch.tensor([3, 5])
    for composite_type in (AttnLRP, CPLRP):
        _, relevance = unit_relevance(half, composite_type(), x.half(), target)
        _, expected = unit_relevance(full, composite_type(), x.half().float(), target)
        assert torch.isfinite(relevance).all(), composite_type.__name__
        assert (cosine(relevance, expected) >= MIN_COSINE[torch.float16]).all()


def test_float16_overflow_in_the_forward_is_refused():
    '''A model whose own float16 forward overflows (logits beyond ±65504) is refused with a clear error, instead of
    relevance NaN everywhere (the seed ``logit * onehot`` holds ``inf * 0``).'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.)
        model[2].weight.fill_(300.)
    model = model.half()
    x = torch.full((2, 8), 20., dtype=torch.float16)
    with torch.no_grad():
        assert torch.isinf(model(x)).any()
    with pytest.raises(ValueError, match='float16 output overflows.*bfloat16'):
        unit_relevance(model, AttnLRP(), x, torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------------------ clamping
class Clamped(torch.nn.Module):
    '''A linear map, a clamp written as ``clamp`` (T5's float16 guard) and a head.'''
    def __init__(self, clamp):
        super().__init__()
        self.first, self.head, self.clamp = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3), clamp

    def forward(self, x):
        return self.head(self.clamp(self.first(x)))


@pytest.mark.parametrize('clamp', [
    lambda h: torch.clamp(h, min=-0.4, max=0.5),
    lambda h: h.clamp(torch.tensor(-0.4, dtype=h.dtype), torch.tensor(0.5, dtype=h.dtype)),
    lambda h: h.clamp_max(0.5).clamp_min(-0.4),
    lambda h: h.clone().clamp_(-0.4, 0.5),
], ids=['function', 'tensor_bounds', 'min_max', 'inplace'])
def test_clamp_gets_the_identity_rule(clamp):
    '''A clamp with constant bounds is Hardtanh, an activation: identity rule (AttnLRP Eq. 9), as ``F.hardtanh``.'''
    torch.manual_seed(0)
    model = Clamped(clamp).double().eval()
    reference = Clamped(lambda h: torch.nn.functional.hardtanh(h, -0.4, 0.5)).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    output, relevance = unit_relevance(model, AttnLRP(), x, target)
    expected_output, expected = unit_relevance(reference, AttnLRP(), x, target)
    with torch.no_grad():
        saturated = model.first(x)
    assert ((saturated > 0.5) | (saturated < -0.4)).any(), 'the clamp does not act'
    assert torch.equal(output, expected_output)
    assert torch.allclose(relevance, expected, rtol=1e-12, atol=1e-15)


def test_clamp_with_input_dependent_bounds_is_refused():
    model = Clamped(lambda h: torch.clamp(h, max=h.mean(-1, keepdim=True).detach() + h[..., :1])).double().eval()
    x = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(UnsupportedOperationError, match='clamp.*input-dependent bounds'):
        unit_relevance(model, AttnLRP(), x, torch.tensor([0, 1]))
