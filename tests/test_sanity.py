'''zennit_attn.sanity: cascading model randomisation (Adebayo et al. 2018) on cases with a known answer.'''
import copy
import json

import pytest
import torch
from torchvision.models import VisionTransformer

from zennit_attn.methods import attribute
from zennit_attn.sanity import (
    SanityResults, cascading_randomization, model_blocks, plot_sanity, randomize_block, rank_correlation, save_sanity,
    ssim,
)

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5,
    ).eval()


def spearman_without_ties(first, second):
    '''1 − 6 Σ d² / (n (n² − 1)) with d the rank differences (valid without ties).'''
    rank = lambda values: values.argsort().argsort().double()  # noqa: E731
    difference = rank(first) - rank(second)
    count = first.numel()
    return 1 - 6 * (difference ** 2).sum().item() / (count * (count ** 2 - 1))


# ------------------------------------------------------------------------------------------------ similarity
def test_rank_correlation_equals_the_textbook_formula():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(3, 50, dtype=torch.float64, generator=generator)
    second = first + torch.randn(3, 50, dtype=torch.float64, generator=generator)
    values = rank_correlation(first, second, absolute=False)
    for sample in range(3):
        assert values[sample].item() == pytest.approx(spearman_without_ties(first[sample], second[sample]))
    # absolute: the ranking of |R|; images are summed over channels first
    assert rank_correlation(first, -first).tolist() == pytest.approx([1.] * 3)
    assert rank_correlation(first, -first, absolute=False).tolist() == pytest.approx([-1.] * 3)
    image = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=generator)
    other = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=generator)
    expected = [spearman_without_ties(image[b].sum(0).abs().flatten(), other[b].sum(0).abs().flatten())
                for b in range(2)]
    assert rank_correlation(image, other).tolist() == pytest.approx(expected)


def test_rank_correlation_ties_and_constants():
    # two constant maps count as identical, a constant against a varying one as unrelated; NaN stays NaN
    constant, varying = torch.ones(1, 10), torch.arange(10.)[None]
    assert rank_correlation(constant, 2 * constant).item() == 1.
    assert rank_correlation(constant, varying).item() == 0.
    assert torch.isnan(rank_correlation(varying.clone().index_fill_(1, torch.tensor([0]), float('nan')), varying))
    stats = pytest.importorskip('scipy.stats')
    generator = torch.Generator().manual_seed(1)
    tied = torch.randint(0, 4, (2, 40), generator=generator).double()  # many ties: average ranks
    other = torch.randint(0, 6, (2, 40), generator=generator).double()
    expected = [stats.spearmanr(tied[b].numpy(), other[b].numpy()).statistic for b in range(2)]
    assert rank_correlation(tied, other).tolist() == pytest.approx(expected)


def test_ssim_equals_scikit_image():
    metrics = pytest.importorskip('skimage.metrics')
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(2, 1, 12, 10, dtype=torch.float64, generator=generator)
    second = first + 0.5 * torch.randn(2, 1, 12, 10, dtype=torch.float64, generator=generator)
    values = ssim(first, second)
    for sample in range(2):
        one, other = first[sample, 0].abs(), second[sample, 0].abs()
        expected = metrics.structural_similarity((one / one.max()).numpy(), (other / other.max()).numpy(),
                                                 data_range=1.)
        assert values[sample].item() == pytest.approx(expected)
    assert ssim(first, first).tolist() == pytest.approx([1., 1.])
    assert ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)).item() == pytest.approx(1.)
    with pytest.raises(ValueError, match='at least 7 x 7'):
        ssim(torch.ones(1, 5, 5), torch.ones(1, 5, 5))


# ---------------------------------------------------------------------------------------------------- blocks
def test_blocks_of_a_vit_from_the_head_down():
    blocks = model_blocks(tiny_vit())
    assert [name for name, _ in reversed(blocks)] == [
        'heads', 'encoder.ln', 'encoder.layers.encoder_layer_1', 'encoder.layers.encoder_layer_0',
        'encoder.pos_embedding', 'conv_proj', 'class_token',
    ]
    names = [name for _, members in blocks for name in members]
    assert sorted(names) == sorted(name for name, _ in tiny_vit().named_parameters())  # every parameter, once


def trained(model):
    '''``model`` with every parameter moved off its initial value (layer norms start at their reset values).'''
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def test_randomize_block_changes_exactly_the_block():
    model = trained(tiny_vit())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = torch.random.get_rng_state()
    block = dict(model_blocks(model))
    members = block['encoder.layers.encoder_layer_1'] + block['class_token']
    randomize_block(model, members, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is untouched
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) == (name not in members), name
    # seeded: the same draw again
    again = trained(tiny_vit())
    randomize_block(again, members, seed=5)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in again.state_dict().items())
    with pytest.raises(ValueError, match='no parameters nope'):
        randomize_block(model, ['nope'])


# ----------------------------------------------------------------------------------------------------- check
def test_gradient_of_a_linear_model_loses_its_ranking_when_the_weight_is_randomised():
    '''The gradient of y = W x is W[t] for every input: its correlation to the original after re-initialising W is
    the rank correlation of |W[t]| and |W'[t]|, for W' the re-initialised weight.'''
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 3, bias=False).double().eval()
    x = torch.randn(4, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 0])
    results = cascading_randomization(model, x, target, ['gradient'], seed=10, target='label', progress=False)
    assert results.blocks == ['(model)'] and results.metadata['measures'] == ['spearman']
    values = results.similarity['spearman']['gradient']
    assert values.shape == (2, 4) and values[0].tolist() == [1.] * 4
    randomized = randomize_block(copy.deepcopy(model), ['weight'], seed=11)  # step 1 draws with seed + 1
    for sample in range(4):
        expected = spearman_without_ties(model.weight[target[sample]].detach().abs(),
                                         randomized.weight[target[sample]].detach().abs())
        assert values[1, sample].item() == pytest.approx(expected)
    assert values[1].abs().max() < 0.5  # the new weight is unrelated to the old one


def test_a_model_independent_explanation_stays_at_one():
    '''Controls that fail the check by construction: a constant map and the input itself (an "edge detector").'''
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    methods = {'constant': lambda m, inputs, t: torch.ones_like(inputs), 'input': lambda m, inputs, t: inputs.abs()}
    results = cascading_randomization(model, x, None, methods, progress=False)
    for measure in ('spearman', 'ssim'):
        for name in methods:
            assert results.similarity[measure][name].flatten().tolist() == pytest.approx([1.] * 24), (measure, name)


def test_vit_check_leaves_the_model_unchanged_and_reports(tmp_path):
    model = tiny_vit()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    results = cascading_randomization(model, x, None, ['attnlrp_vit', 'gradient'], progress=False)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert isinstance(results, SanityResults) and len(results.blocks) == 7
    predicted = model(x).argmax(1)
    assert results.metadata['explained'] == predicted.tolist()
    for measure in ('spearman', 'ssim'):
        values = results.similarity[measure]['attnlrp_vit']
        assert values.shape == (8, 2) and values[0].tolist() == pytest.approx([1., 1.])
    # the first step's similarity is that of the explanation of the model with a re-initialised head
    head = randomize_block(copy.deepcopy(model), dict(model_blocks(model))['heads'], seed=1)
    expected = rank_correlation(attribute(head, x, predicted, 'gradient'), attribute(model, x, predicted, 'gradient'))
    assert results.similarity['spearman']['gradient'][1].tolist() == pytest.approx(expected.tolist())
    table = results.markdown()
    assert '| nothing (original model) | 1.000 | 1.000 |' in table and '| 1: heads |' in table
    paths = save_sanity(results, tmp_path)
    saved = json.loads(open(paths[0]).read())
    assert saved['blocks'] == results.blocks and len(saved['mean']['ssim']['gradient']) == 8
    assert open(plot_sanity(results, tmp_path), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    # explicit blocks, top first; bad names and measures are refused
    two = cascading_randomization(model, x, None, ['gradient'], blocks=['heads', 'encoder.layers'],
                                  measures=('spearman',), progress=False)
    assert two.blocks == ['heads', 'encoder.layers'] and list(two.similarity) == ['spearman']
    with pytest.raises(ValueError, match="block 'encoder.nope' has no parameters"):
        cascading_randomization(model, x, None, ['gradient'], blocks=['encoder.nope'], progress=False)
    with pytest.raises(ValueError, match="measure 'ssim' needs image samples"):
        cascading_randomization(torch.nn.Linear(4, 2), torch.randn(2, 4), 0, ['gradient'], measures=('ssim',),
                                progress=False)
