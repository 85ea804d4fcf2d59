'''Conservation report (zennit_attn.conservation): the books balance on ViTs, and a planted leak shows up.'''
import pytest
import torch

from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP
from zennit_attn.conservation import ConservationReport, conservation_report

from helpers import Twice
from toys import HalfScale, Toy, hook_count, toy_input
from tiny_vit import attribute, image, make_vit


TARGET = torch.tensor([1, 3])


def perturbed_vit(seed=0):
    '''The tiny ViT with random class token, position embedding and LayerNorm parameters (torchvision zeroes them), so
    that every absorbing term is non-zero.'''
    model = make_vit('tiny')
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'class_token' in name or 'pos_embedding' in name or 'ln' in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def seed_fn(model):
    onehot = torch.nn.functional.one_hot(TARGET, model.heads.head.out_features).double()
    return lambda y: y * onehot


def bound(report):
    '''Rounding scale of the balance: the largest magnitude that entered it.'''
    terms = [report.seed, report.input_relevance, report.parameter_relevance]
    terms += [value for row in report.modules for value in (row.relevance_in, row.relevance_out)]
    return max(abs(value) for value in terms)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP, AttnLRPViT])
def test_books_balance_on_a_vit(composite_type):
    '''seed = absorbed by the rules + input relevance + relevance at parameters (the class token), in float64.'''
    model = perturbed_vit()
    x = image(model)
    before = hook_count(model)
    report = conservation_report(model, composite_type(epsilon=1e-12), x, seed_fn(model))
    assert isinstance(report, ConservationReport)
    assert report.seed == pytest.approx(report.output[torch.arange(2), TARGET].sum().item(), rel=1e-12)
    assert abs(report.unaccounted) <= 1e-10 * bound(report)
    assert abs(report.absorbed + report.input_relevance + report.parameter_relevance - report.seed) <= 1e-10 * bound(
        report)
    assert abs(report.parameter_relevance) > 1e-6  # the class token's share leaves through cat
    # the recorded attribution is the attributor's
    _, relevance = attribute(model, composite_type(epsilon=1e-12), x, TARGET)
    assert torch.allclose(report.relevance, relevance, rtol=1e-10, atol=1e-12)
    assert report.input_relevance == pytest.approx(relevance.sum().item(), rel=1e-10)
    assert hook_count(model) == before


def test_rows_show_where_relevance_is_absorbed():
    model = perturbed_vit()
    report = conservation_report(model, AttnLRP(epsilon=1e-12, fused_attention=False), image(model), seed_fn(model))
    rows = {row.name: row for row in report.modules}
    # backward order: the head first, the patch embedding last; each module called once
    assert report.modules[0].name == 'heads.head' and report.modules[-1].name == 'conv_proj'
    assert all(row.calls == 1 for row in report.modules)
    # the softmax absorbs by design (Prop. 3.1), the position embedding keeps its share, identity/matmul conserve
    softmax = rows['encoder.layers.encoder_layer_0.self_attention.softmax']
    assert softmax.rule == 'SoftmaxRule' and abs(softmax.absorbed) > 1e-3
    assert abs(rows['encoder.add'].absorbed) > 1e-3
    block = 'encoder.layers.encoder_layer_0'
    for name in (f'{block}.mlp.1', f'{block}.self_attention.matmul_1'):
        assert abs(rows[name].absorbed) <= 1e-10 * abs(rows[name].relevance_in)
    # relevance into the head is the seed
    assert rows['heads.head'].relevance_in == pytest.approx(report.seed, rel=1e-12)
    table = str(report)
    for text in ('seed', 'encoder.add', 'SoftmaxRule', 'total absorbed', 'unaccounted'):
        assert text in table
    top = report.format(sort='absorbed', limit=3)
    assert '... ' in top and len(top.splitlines()) == 2 + 1 + 3 + 1 + 4
    with pytest.raises(ValueError, match='sort'):
        report.format(sort='name')


def test_fused_attention_absorbs_what_the_unfolded_chain_absorbs():
    '''The fused attention core's row sums the rows of the unfolded scores, softmax and context (the only absorber among
    them is the softmax), and every other row is unchanged.
    '''
    model = perturbed_vit()
    reports = {
        fused: conservation_report(model, AttnLRP(epsilon=1e-12, fused_attention=fused), image(model), seed_fn(model))
        for fused in (True, False)
    }
    fused, unfolded = ({row.name: row for row in reports[key].modules} for key in (True, False))
    attention = 'encoder.layers.encoder_layer_0.self_attention'
    core = fused[f'{attention}.attention']
    assert core.rule == 'AttentionRule' and abs(core.absorbed) > 1e-3
    chain = [unfolded[f'{attention}.{name}'] for name in ('matmul', 'softmax', 'matmul_1')]
    assert core.relevance_in == pytest.approx(chain[-1].relevance_in, rel=1e-9)
    assert core.absorbed == pytest.approx(sum(row.absorbed for row in chain), rel=1e-8, abs=1e-12)
    shared = fused.keys() & unfolded.keys()
    assert set(fused) - shared == {f'encoder.layers.encoder_layer_{i}.self_attention.attention' for i in range(2)}
    for name in shared:
        assert fused[name].relevance_in == pytest.approx(unfolded[name].relevance_in, rel=1e-8, abs=1e-12)
    assert reports[True].input_relevance == pytest.approx(reports[False].input_relevance, rel=1e-8)


def test_cp_lrp_is_conservative_on_a_bias_free_vit():
    '''CP-LRP on a ViT without biases, position embedding and class token: nothing is absorbed (ATTNLRP.md §2).'''
    model = make_vit('tiny')
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or 'pos_embedding' in name or 'class_token' in name:
                param.zero_()
    report = conservation_report(model, CPLRP(epsilon=1e-12), image(model), seed_fn(model))
    assert all(abs(row.absorbed) <= 1e-9 * bound(report) for row in report.modules), str(report)
    assert report.input_relevance == pytest.approx(report.seed, rel=1e-9)


def test_absorbing_zennit_rule_shows_up_as_unaccounted():
    '''A plain Zennit rule (not itemised) that absorbs relevance (ε with a bias) leaves a remainder; an inline
    ``x * 0.5`` gets the identity rule from the engine and its row balances.'''
    import zennit.rules
    torch.manual_seed(0)
    model = Toy(HalfScale()).double().eval()
    with torch.no_grad():
        model.head.bias.add_(1.)
    x = toy_input().double()
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
    fixed = conservation_report(model, AttnLRP(epsilon=1e-12), x, lambda y: y * onehot)
    assert abs(fixed.unaccounted) <= 1e-10 * bound(fixed), str(fixed)
    scale = {row.name: row for row in fixed.modules}['body.mul']
    assert scale.rule == 'IdentityRule' and abs(scale.absorbed) <= 1e-12 * abs(scale.relevance_in)
    leaky = conservation_report(
        model, AttnLRP(epsilon=1e-12, layer_map=[(torch.nn.Linear, zennit.rules.Epsilon(1e-12))]), x,
        lambda y: y * onehot)
    assert abs(leaky.unaccounted) > 1e-3 * abs(leaky.seed), str(leaky)


def test_module_called_twice_and_bad_output():
    model = Toy(Twice()).double().eval()
    report = conservation_report(model, AttnLRP(), toy_input().double(), lambda y: y)
    assert {row.name: row.calls for row in report.modules}['body.act'] == 2

    class Tupled(torch.nn.Module):
        def forward(self, x):
            return (x,)

    with pytest.raises(TypeError, match='wrap'):
        conservation_report(Tupled(), AttnLRP(), toy_input(), lambda y: y)
