'''The canonizer of torch.nn.MultiheadAttention on its own: every call signature computes what the module computes,
and self-attention (one packed projection) and distinct query/key/value (three projections) give the same relevance.
'''
import pytest
import torch

from zennit_attn.canonizers import MultiheadAttentionCanonizer
from zennit_attn.composites import AttnLRP, CPLRP

from helpers import hooked_call_counts, single_thread  # noqa: F401
from restoration import assert_restored, snapshot


class Attend(torch.nn.Module):
    '''Calls its MultiheadAttention with fixed keyword arguments; ``self_attention`` passes one tensor three times.'''
    def __init__(self, attention, self_attention=True, **kwargs):
        super().__init__()
        self.attention = attention
        self.self_attention = self_attention
        self.kwargs = kwargs

    def forward(self, x):
        query, key, value = (x, x, x) if self.self_attention else (x, x * 1., x * 1.)
        return self.attention(query, key, value, **self.kwargs)


def make_attention(batch_first=True, kdim=None, dropout=0.):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(
        8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout
    ).double().eval()


TOKENS, BATCH = 5, 3
CAUSAL = torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1)
PADDING = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
PADDING[-1, -2:] = True
CALLS = {
    'plain': dict(),
    'weights-averaged': dict(need_weights=True),
    'weights-per-head': dict(need_weights=True, average_attn_weights=False),
    'bool-mask': dict(attn_mask=CAUSAL, need_weights=False),
    'float-mask': dict(attn_mask=torch.zeros(TOKENS, TOKENS, dtype=torch.float64).masked_fill(CAUSAL, -1e9)),
    'padding': dict(key_padding_mask=PADDING, need_weights=False),
    'causal-and-padding': dict(attn_mask=CAUSAL, is_causal=True, key_padding_mask=PADDING, need_weights=False),
}


@pytest.mark.parametrize('call', CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize('batch_first', [True, False], ids=['batch-first', 'sequence-first'])
@pytest.mark.parametrize('self_attention', [True, False], ids=['self', 'distinct'])
def test_forward_unchanged_while_registered_and_restored_after(call, batch_first, self_attention):
    model = Attend(make_attention(batch_first), self_attention, **call)
    x = torch.randn(BATCH, TOKENS, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if not batch_first:
        x = x.transpose(0, 1)
    before = snapshot(model)
    expected, expected_weights = model(x)
    canonizers = MultiheadAttentionCanonizer().apply(model)
    try:
        actual, weights = model(x)
    finally:
        for canonizer in canonizers:
            canonizer.remove()
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert torch.allclose(weights, expected_weights, rtol=1e-10, atol=1e-12)
    assert_restored(model, before)


def test_unbatched_and_separate_key_value_dimensions():
    '''Unbatched inputs and kdim/vdim != embed_dim (separate projection weights) compute the module's output.'''
    attention = make_attention(kdim=6)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(TOKENS, 8, dtype=torch.float64, generator=generator)
    key = torch.randn(TOKENS + 2, 6, dtype=torch.float64, generator=generator)
    expected, _ = attention(query, key, key)
    canonizers = MultiheadAttentionCanonizer().apply(attention)
    try:
        actual, _ = attention(query, key, key)
    finally:
        for canonizer in canonizers:
            canonizer.remove()
    assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_packed_self_attention_gives_the_relevance_of_three_projections(composite_type, fused):
    '''The packed q/k/v projection of self-attention (one ε-rule over all outputs) distributes exactly what three
    separate ε-rules do: the ε-rule is a sum over output neurons.
    '''
    x = torch.randn(BATCH, TOKENS, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    relevances = []
    for self_attention in (True, False):
        model = Attend(make_attention(), self_attention, attn_mask=CAUSAL, need_weights=False)
        composite = composite_type(epsilon=1e-9, canonizers=[MultiheadAttentionCanonizer(fused)])
        with composite.context(model):
            inputs = x.clone().requires_grad_()
            calls = hooked_call_counts(model, lambda: model(inputs))
            output, _ = model(inputs)
            (relevance,) = torch.autograd.grad(output, inputs, output)
        relevances.append(relevance)
        packed = calls['attention.attnlrp_in_proj'], calls['attention.attnlrp_q_proj']
        assert packed == ((1, 0) if self_attention else (0, 1))
    assert torch.allclose(relevances[0], relevances[1], rtol=1e-10, atol=1e-12)
    assert relevances[0].abs().sum() > 0
