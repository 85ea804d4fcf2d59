'''What the text encoders MPNet and DeBERTa-v2 need beyond the conformance suite: masking by filling right before a
softmax (exact, accepted by the lint; other fills are still reported), in-place sums on the scores (MPNet's position
bias), sums of several score terms (DeBERTa's disentangled attention), and the family declarations.'''
import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.check import check, op_name
from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.families import detect_families

from restoration import relative_difference

pytestmark = pytest.mark.usefixtures('single_thread')

MIN = torch.finfo(torch.float64).min
LENGTH, WIDTH = 5, 4


class ToyAttention(torch.nn.Module):
    '''``x -> head((softmax(masked q k^T / 2) @ v)[:, 0])`` without biases (relevance is conserved under CP-LRP).

    ``masking``: ``'fill'`` (``scores.masked_fill(~keep, fill)`` right before the softmax), ``'additive'`` (``scores +
    mask``), ``'fill_then_scale'`` (the fill, then ``scores * 0.5``, then the softmax). ``position``: add scores of q
    against a constant position table (DeBERTa's content-to-position term); ``bias``: add a constant bias in place
    (MPNet's ``scores += position_bias``).
    '''
    def __init__(self, masking='fill', fill=MIN, position=False, bias=False):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.q, self.k, self.v = (torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(3))
        self.head = torch.nn.Linear(WIDTH, 3, bias=False)
        for layer in (self.q, self.k, self.v, self.head):
            layer.weight.data = 0.5 * torch.randn(layer.weight.shape, generator=generator)
        self.table = torch.nn.Parameter(torch.randn(LENGTH, WIDTH, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(LENGTH, LENGTH, generator=generator))
        keep = torch.ones(2, LENGTH, LENGTH, dtype=torch.bool)
        keep[1, :, -2:] = False
        self.register_buffer('keep', keep)
        self.masking, self.fill, self.position, self.with_bias = masking, fill, position, bias

    def forward(self, x):
        q = self.q(x)
        scores = q @ self.k(x).transpose(-1, -2) / 2
        if self.position:
            scores = scores + q @ self.table.transpose(-1, -2)
        if self.with_bias:
            scores += self.bias
        if self.masking == 'additive':
            scores = scores + torch.zeros(self.keep.shape, dtype=x.dtype).masked_fill(~self.keep, MIN)
        else:
            scores = scores.masked_fill(~self.keep, self.fill)
        if self.masking == 'fill_then_scale':
            scores = scores * 0.5
        context = torch.softmax(scores, -1) @ self.v(x)
        return self.head(context[:, 0])


def toy_input():
    return torch.randn(2, LENGTH, WIDTH, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def relevance(model, composite, x, target=torch.tensor([0, 2])):
    with Gradient(model, composite) as attributor:
        output, result = attributor(x, lambda y: y * torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype))
    return output[torch.arange(len(target)), target], result


@pytest.mark.parametrize('fill', [MIN, float('-inf'), torch.tensor(MIN)], ids=['finfo_min', 'inf', 'tensor'])
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_lint_accepts_a_mask_fill_right_before_the_softmax(fill, composite_type):
    report = check(ToyAttention(fill=fill).double(), composite_type(), toy_input())
    assert report.ok, str(report)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_mask_fill_before_the_softmax_equals_an_additive_mask(composite_type):
    '''The reason the lint accepts it: the same relevance as the additive mask through the ε-sum rule (masked inputs of
    the softmax get none either way), here with a padded key in every row of the second sample.'''
    x = toy_input()
    _, filled = relevance(ToyAttention('fill').double(), composite_type(epsilon=1e-12), x)
    _, additive = relevance(ToyAttention('additive').double(), composite_type(epsilon=1e-12), x)
    assert relative_difference(filled, additive) < 1e-10
    # the mask matters: the comparison is not between two unmasked models
    unmasked = ToyAttention('fill').double()
    unmasked.keep.fill_(True)
    assert relative_difference(filled, relevance(unmasked, composite_type(epsilon=1e-12), x)[1]) > 1e-2


@pytest.mark.parametrize('masking,fill', [('fill', 0.), ('fill', -1e3), ('fill_then_scale', MIN)],
                         ids=['zero', 'finite', 'not_before_softmax'])
def test_lint_reports_other_fills(masking, fill):
    '''Fills with a value the softmax rule does not treat as masked, or not consumed by a softmax, drop relevance.'''
    report = check(ToyAttention(masking, fill=fill).double(), AttnLRP(), toy_input())
    assert [finding.op for finding in report.findings] == ['masked_fill'], str(report)
    assert report.findings[0].module == '' and report.findings[0].module_type == 'ToyAttention'


def test_in_place_sum_on_the_scores_is_covered():
    '''``scores += bias`` on the (not kept) output of a rule is rebuilt out of place and copied back: the ``copy_``
    node (``CopyBackwards``, plural) is a re-arrangement.'''
    assert op_name('CopyBackwards') == 'copy'
    model = ToyAttention(bias=True).double()
    report = check(model, AttnLRP(), toy_input())
    assert report.ok, str(report)
    # the bias absorbs its share: without it (zeroed) CP-LRP conserves
    with torch.no_grad():
        model.bias.zero_()
    logits, result = relevance(model, CPLRP(epsilon=1e-12), toy_input())
    assert torch.allclose(result.flatten(1).sum(1), logits, rtol=1e-10)


def test_a_sum_of_score_terms_stays_attention_scores():
    '''DeBERTa adds content-to-position scores ``q @ table^T`` to ``q @ k^T``: the sum is still the attention's
    scores, so CP-LRP holds its softmax constant and conserves relevance (it would leak through the softmax rule
    otherwise).'''
    model = ToyAttention(position=True).double()
    logits, result = relevance(model, CPLRP(epsilon=1e-12), toy_input())
    assert torch.allclose(result.flatten(1).sum(1), logits, rtol=1e-10), (result.flatten(1).sum(1), logits)
    assert check(model, CPLRP(), toy_input()).ok


def test_families_are_declared():
    from conformance_encoders import deberta, mpnet
    assert [family.name for family in detect_families(mpnet())] == ['MPNet']
    for variant in ('deberta_v2', 'deberta_v3'):
        assert [family.name for family in detect_families(deberta(variant)())] == ['DeBERTa-v2']
