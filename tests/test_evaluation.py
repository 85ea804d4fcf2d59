'''zennit_attn.evaluation: perturbation curves and ABPC on cases with a known answer.'''
import csv
import json
import math

import pytest
import torch
from torchvision.models import VisionTransformer

from zennit_attn.composites import AttnLRPViT
from zennit_attn.evaluation import (
    FaithfulnessResults, GammaTuning, abpc, evaluate, evaluate_tokens, fractions_for, perturb_tokens,
    perturbation_curves, plot_results, rank_features, save_results, tune_gamma,
)
from zennit_attn.methods import attribute

pytestmark = pytest.mark.usefixtures('single_thread')


def linear_model(features=12, classes=3, seed=0):
    '''``y = W x`` (no bias): the contribution of feature i to logit t is exactly ``W[t, i] * x_i``.'''
    torch.manual_seed(seed)
    return torch.nn.Linear(features, classes, bias=False).double().eval()


def data(batch=5, features=12, seed=1):
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- the metric
def test_fractions_include_both_ends():
    assert fractions_for(4).tolist() == [0., .25, .5, .75, 1.]
    with pytest.raises(ValueError):
        fractions_for(0)


def test_trapezoid_against_hand_computation():
    fractions = torch.tensor([0., .25, .5, .75, 1.])
    morf = torch.tensor([[4., 2., 1., 0., -1.]])
    lerf = torch.tensor([[4., 5., 5., 3., -1.]])
    # differences 0, 3, 4, 3, 0; trapezoids of width 1/4: (0+3)/8 + (3+4)/8 + (4+3)/8 + (3+0)/8 = 20/8
    assert abpc(morf, lerf, fractions).tolist() == [pytest.approx(2.5)]
    # non-uniform fractions: widths .1, .9 over differences 1, 3, 5: .1 * 2 + .9 * 4 = 3.8
    assert abpc(torch.zeros(3), torch.tensor([1., 3., 5.]), torch.tensor([0., .1, 1.])).item() == pytest.approx(3.8)


def test_morf_and_lerf_curves_of_linear_model_equal_hand_computation():
    '''MoRF removes the largest contributions w_i x_i first: curve[k] = Σ c − (sum of the k largest c).'''
    model = linear_model()
    x = data()
    target = torch.tensor([0, 1, 2, 1, 0])
    relevance = attribute(model, x, target, 'input_x_gradient')
    contributions = model.weight[target].detach() * x
    assert torch.allclose(relevance, contributions)
    steps = 4  # 12 features: 0, 3, 6, 9, 12 removed
    for order, descending in (('morf', True), ('lerf', False)):
        curves, fractions = perturbation_curves(model, x, target, relevance, order=order, steps=steps)
        for sample in range(5):
            ranked = contributions[sample].sort(descending=descending).values
            expected = [contributions[sample].sum() - ranked[:count].sum() for count in (0, 3, 6, 9, 12)]
            assert curves[sample].tolist() == pytest.approx([value.item() for value in expected], abs=1e-12)
    assert fractions.tolist() == [0., .25, .5, .75, 1.]


def test_input_x_gradient_has_the_best_abpc_on_a_linear_model():
    '''On y = w·x with baseline 0, removing the k largest contributions minimises the logit for every k, so the
    input × gradient ranking maximises ABPC over all rankings (other methods and random permutations).'''
    model = linear_model(features=16)
    x = data(batch=6, features=16)
    target = torch.tensor([0, 1, 2, 0, 1, 2])

    def score(relevance):
        morf, fractions = perturbation_curves(model, x, target, relevance, 'morf', steps=16)
        lerf, _ = perturbation_curves(model, x, target, relevance, 'lerf', steps=16)
        return abpc(morf, lerf, fractions)

    best = score(attribute(model, x, target, 'input_x_gradient'))
    others = [
        attribute(model, x, target, name) for name in ('gradient', 'smoothgrad', 'attnlrp')
    ] + [attribute(model, x, target, 'random', seed=seed) for seed in range(30)] + [x, -x, x.abs()]
    for relevance in others:
        assert (best >= score(relevance) - 1e-10).all()
    assert (best > score(attribute(model, x, target, 'random'))).any()


def test_random_ranking_abpc_is_zero_on_average():
    '''For a random ranking of N features on a linear model, ABPC = Σ_j c_π(j) a_j with position weights
    a_j = Σ_s w_s ([j < k_s] − [j ≥ N − k_s]) (w_s the trapezoid weights, k_s the removed counts), so Σ_j a_j = 0 and
    E[ABPC] = 0 exactly; the variance of such a permutation statistic is Σ(c − c̄)² Σ a² / (N − 1). The mean of M
    random rankings must lie within 4 standard errors of 0, and the sample variance must match the formula.'''
    features, rankings, steps = 64, 2000, 16
    model = linear_model(features=features, classes=1)
    x = data(batch=1, features=features).expand(rankings, -1)
    scores = torch.rand(rankings, features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    morf, fractions = perturbation_curves(model, x, 0, scores, 'morf', steps=steps, granularity='feature')
    lerf, _ = perturbation_curves(model, x, 0, scores, 'lerf', steps=steps, granularity='feature')
    values = abpc(morf, lerf, fractions)

    contributions = (model.weight[0].detach() * x[0])
    counts = torch.round(fractions * features).long()
    widths = torch.zeros(steps + 1, dtype=torch.float64)
    widths[:-1] += (fractions[1:] - fractions[:-1]) / 2
    widths[1:] += (fractions[1:] - fractions[:-1]) / 2
    positions = torch.arange(features)
    weights = sum(
        width * ((positions < count).double() - (positions >= features - count).double())
        for width, count in zip(widths, counts)
    )
    assert weights.sum().abs() < 1e-12
    variance = ((contributions - contributions.mean()) ** 2).sum() * (weights ** 2).sum() / (features - 1)
    standard_error = math.sqrt(variance / rankings)
    assert abs(values.mean().item()) < 4 * standard_error
    # sample variance of 2000 draws: relative s.e. ≈ sqrt(2 / M) ≈ 3 %; allow 5 of those
    assert values.var().item() == pytest.approx(variance.item(), rel=5 * math.sqrt(2 / rankings))


def test_ties_are_broken_by_a_fixed_permutation_shared_by_both_orders():
    scores = torch.tensor([[1., 1., 1., 1., 0., 2.]])
    morf, lerf = rank_features(scores, 'morf', seed=3), rank_features(scores, 'lerf', seed=3)
    assert morf[0, 0] == 5 and morf[0, -1] == 4
    assert lerf[0, 0] == 4 and lerf[0, -1] == 5
    assert torch.equal(morf, rank_features(scores, 'morf', seed=3))
    tied = rank_features(torch.zeros(1, 50), 'morf', seed=0)
    assert sorted(tied[0].tolist()) == list(range(50)) and tied[0].tolist() != list(range(50))
    with pytest.raises(ValueError, match="order must be 'morf' or 'lerf'"):
        rank_features(scores, 'best')


class SumModel(torch.nn.Module):
    '''One logit: the sum of all inputs (per class the same), so the curve shows exactly which values were removed.'''
    def forward(self, x):
        total = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([total, -total], 1)


def test_patch_granularity_on_constructed_image():
    '''A 2-channel 4x4 image with 2x2 patches of value 10**p (p = patch index, raster order): the logit shows which
    patches were removed. Relevance ranks patches by their summed relevance (2, 0, 3, 1), not by their largest pixel.'''
    image = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    relevance = torch.zeros_like(image)
    patch_sums = {0: 3., 1: 0.5, 2: 4., 3: 2.}
    for patch, value in patch_sums.items():
        row, col = divmod(patch, 2)
        image[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2] = 10. ** patch
        relevance[0, 0, 2 * row, 2 * col] = value  # one pixel of the patch carries its relevance...
    relevance[0, 1, 3, 3] = 1.9                      # ...but patch 3 also has a large single pixel
    relevance[0, 1, 2, 3] = -1.9                     # that its own sum cancels
    per_patch = 8  # 2 channels x 2 x 2 pixels
    total = per_patch * (1 + 10 + 100 + 1000)
    morf, _ = perturbation_curves(SumModel(), image, 0, relevance, 'morf', steps=4, granularity='patch', patch_size=2)
    expected = [total, total - 800, total - 808, total - 8808, 0.]
    assert morf[0].tolist() == pytest.approx(expected)
    lerf, _ = perturbation_curves(SumModel(), image, 0, relevance, 'lerf', steps=4, granularity='patch', patch_size=2)
    assert lerf[0].tolist() == pytest.approx([total, total - 80, total - 8080, total - 8088, 0.])
    # pixel granularity removes all channels of a pixel: the largest-relevance pixel (patch 2) first
    pixel, _ = perturbation_curves(SumModel(), image, 0, relevance, 'morf', steps=16, granularity='pixel')
    assert pixel[0, 1].item() == pytest.approx(total - 200)
    with pytest.raises(ValueError, match='patch_size 3 must divide'):
        perturbation_curves(SumModel(), image, 0, relevance, granularity='patch', patch_size=3)


class TokenModel(torch.nn.Module):
    '''Logit = Σ_t Σ_h e_th · (1 if the token is real else 1000): perturbing padding would show up enormously.'''
    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, inputs_embeds, attention_mask):
        self.masks.append(attention_mask.clone())
        weight = torch.where(attention_mask.bool(), 1., 1000.).to(inputs_embeds)
        total = (inputs_embeds.sum(-1) * weight).sum(1, keepdim=True)
        return torch.cat([total, -total], 1)


def test_token_perturbation_respects_the_attention_mask():
    embeddings = torch.ones(2, 6, 3, dtype=torch.float64)
    embeddings[:, :, 0] = torch.arange(1., 7.)  # token t contributes 2 + (t + 1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    relevance = torch.tensor([[1., 2., 3., 4., 100., 100.], [6., 5., 4., 3., 2., 1.]])  # padding rated highest
    model = TokenModel()
    curves, fractions = perturb_tokens(model, embeddings, mask, 0, relevance, 'morf', steps=2)
    contribution = embeddings.sum(-1)
    padding = 1000 * contribution[0, 4:].sum()
    # sample 0: 4 real tokens, 2 removed at f = 1/2 (tokens 3, 2), all 4 at f = 1; padding is never touched
    assert curves[0].tolist() == pytest.approx([
        float(contribution[0, :4].sum() + padding), float(contribution[0, :2].sum() + padding), float(padding),
    ])
    # sample 1: 6 real tokens, 3 removed at f = 1/2 (tokens 0, 1, 2)
    assert curves[1].tolist() == pytest.approx([float(contribution[1].sum()), float(contribution[1, 3:].sum()), 0.])
    assert all(torch.equal(seen, mask) for seen in model.masks)
    # embedding relevance (B, T, H) is summed over H; LeRF also ranks only real tokens
    lerf, _ = perturb_tokens(model, embeddings, mask, 0, relevance[..., None].expand(-1, -1, 3) / 3, 'lerf', steps=2)
    assert lerf[0].tolist() == pytest.approx([
        float(contribution[0, :4].sum() + padding), float(contribution[0, 2:4].sum() + padding), float(padding),
    ])


# --------------------------------------------------------------------------------------- evaluate and friends
def tiny_vit():
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7,
    )
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 32 ** -0.5)
        model.heads.head.bias.normal_(0, 0.1)
    return model.eval()


def test_evaluate_save_and_plot(tmp_path):
    model = tiny_vit()
    samples = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = model(samples).argmax(1)
    results = evaluate(
        model, samples, targets, ['input_x_gradient', 'attention_rollout'], batch_size=4, steps=4, progress=False,
    )
    assert isinstance(results, FaithfulnessResults)
    assert list(results.methods) == ['input_x_gradient', 'attention_rollout', 'random']
    result = results.methods['input_x_gradient']
    assert result.morf.shape == result.lerf.shape == (6, 5) and result.abpc.shape == (6,)
    # batching does not change the curves: the first batch equals a direct call
    relevance = attribute(model, samples[:4], targets[:4], 'input_x_gradient')
    direct, _ = perturbation_curves(model, samples[:4], targets[:4], relevance, 'morf', steps=4, seed=0)
    assert torch.allclose(result.morf[:4], direct)
    # both curves start at the unperturbed logit
    logits = model(samples)[torch.arange(6), targets].double()
    assert torch.allclose(result.morf[:, 0], logits, atol=1e-5) and torch.allclose(result.lerf[:, 0], logits, atol=1e-5)
    row = {row['method']: row for row in results.summary()}['input_x_gradient']
    assert row['abpc_mean'] == pytest.approx(result.abpc.mean().item())
    assert row['abpc_se'] == pytest.approx(result.abpc.std().item() / math.sqrt(6))
    assert row['morf_auc'] - row['lerf_auc'] == pytest.approx(-row['abpc_mean'])
    assert '| input_x_gradient |' in results.markdown()

    paths = save_results(results, tmp_path)
    saved = json.loads(open(paths[0]).read())
    assert saved['per_sample_abpc']['random'] == pytest.approx(results.methods['random'].abpc.tolist())
    assert len(list(csv.DictReader(open(paths[1])))) == 3
    assert len(list(csv.DictReader(open(paths[2])))) == 3 * 3 * 5  # methods x (morf, lerf, insertion) x steps
    import matplotlib
    backend = matplotlib.get_backend()
    matplotlib.use('svg')
    try:
        for path in plot_results(results, tmp_path):
            assert open(path, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
        # drawn on an Agg canvas of its own: the caller's backend is left alone
        assert matplotlib.get_backend() == 'svg'
    finally:
        matplotlib.use(backend)


def test_evaluate_accepts_labels_options_and_callables():
    model = linear_model()
    x = data()
    results = evaluate(
        model, x, 0, {'ig5': ('integrated_gradients', {'n_iter': 5}), 'own': lambda m, i, t: i.abs()},
        steps=3, include_random=False, progress=False,
    )
    assert list(results.methods) == ['ig5', 'own']


def test_evaluate_tokens():
    embeddings = torch.randn(5, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[:2, 4:] = 0
    model = TokenModel()
    exact = lambda embeds, attention_mask, target: embeds.sum(-1)  # noqa: E731 (the exact token contributions)
    results = evaluate_tokens(model, embeddings, mask, 0, {'exact': exact}, batch_size=2, steps=4, progress=False)
    assert list(results.methods) == ['exact', 'random']
    assert (results.methods['exact'].abpc >= results.methods['random'].abpc - 1e-10).all()


def test_tune_gamma_returns_best_setting_table_and_composite():
    model = tiny_vit()
    samples = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = model(samples).argmax(1)
    tuning = tune_gamma(model, samples, targets, conv_gammas=[0., 0.25], linear_gammas=[0., 0.05], steps=3,
                        progress=False)
    assert isinstance(tuning, GammaTuning)
    assert len(tuning.table) == 4
    assert tuning.best_score == max(row['abpc_mean'] for row in tuning.table)
    best = next(row for row in tuning.table if row['abpc_mean'] == tuning.best_score)
    assert tuning.best == (best['conv_gamma'], best['linear_gamma'])
    assert isinstance(tuning.composite, AttnLRPViT)
    assert (tuning.composite.conv_gamma, tuning.composite.linear_gamma) == tuning.best
    # the score of a setting is the evaluate() ABPC of that composite
    again = evaluate(model, samples, targets, {'c': AttnLRPViT(conv_gamma=0.25, linear_gamma=0.05)}, steps=3,
                     include_random=False, progress=False).methods['c'].abpc_mean
    row = next(row for row in tuning.table if (row['conv_gamma'], row['linear_gamma']) == (0.25, 0.05))
    assert row['abpc_mean'] == pytest.approx(again)
    assert '**' in tuning.markdown()


def test_results_table_is_the_markdown_summary():
    model = linear_model()
    results = evaluate(model, data(), 0, ['input_x_gradient'], steps=2, progress=False)
    from zennit_attn.evaluation import results_table
    assert results_table(results) == results.markdown()
    assert results.summary()[0]['method'] == 'input_x_gradient'


def test_benchmark_quick_smoke_run(tmp_path, capsys):
    '''benchmarks/faithfulness.py --quick on a random ViT (real Fashion-MNIST test images), images only.'''
    import importlib.util
    import pathlib
    from zennit_attn.data import load_fashion_mnist
    try:
        load_fashion_mnist('test')
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = pathlib.Path(__file__).parents[1] / 'benchmarks' / 'faithfulness.py'
    spec = importlib.util.spec_from_file_location('faithfulness_benchmark', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        code = module.main([
            '--quick', '--random-model', '--skip-text', '--no-progress', '--granularities', 'pixel',
            '--output', str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    printed = capsys.readouterr().out
    assert '| random |' in printed and 'paper preset' in printed and 'tuned γ' in printed
    assert (tmp_path / 'summary.md').is_file() and (tmp_path / 'gamma_tuning.csv').is_file()
    assert {p.name for p in (tmp_path / 'image_pixel').iterdir()} >= {
        'faithfulness.json', 'faithfulness_summary.csv', 'faithfulness_abpc.png', 'faithfulness_curves.png',
    }


def test_paired_difference():
    from zennit_attn.evaluation import MethodResult, paired_difference
    fractions = fractions_for(1)
    make = lambda values: MethodResult(  # noqa: E731
        morf=torch.zeros(3, 2), lerf=torch.zeros(3, 2), abpc=torch.tensor(values, dtype=torch.float64),
    )
    results = FaithfulnessResults(fractions=fractions, methods={'a': make([1., 2., 6.]), 'b': make([0., 0., 3.])})
    paired = paired_difference(results, 'a', 'b')  # differences 1, 2, 3: mean 2, std 1
    assert paired.mean == pytest.approx(2.) and paired.se == pytest.approx(1 / math.sqrt(3))


# ------------------------------------------------------------------------ which class, insertion, paired CIs
def results_with(abpcs):
    '''FaithfulnessResults with the given per-sample ABPC per method (curves irrelevant here).'''
    from zennit_attn.evaluation import MethodResult
    methods = {
        name: MethodResult(morf=torch.zeros(len(values), 2, dtype=torch.float64),
                           lerf=torch.zeros(len(values), 2, dtype=torch.float64),
                           abpc=torch.tensor(values, dtype=torch.float64))
        for name, values in abpcs.items()
    }
    return FaithfulnessResults(fractions=fractions_for(1), methods=methods)


def test_paired_difference_equals_hand_computation():
    from zennit_attn.evaluation import paired_difference
    results = results_with({'a': [3., 1., 4., 1., 5.], 'b': [2., 1., 1., 3., 0.]})
    # d = 1, 0, 3, -2, 5: mean 7/5, sample variance (0.16 + 1.96 + 2.56 + 11.56 + 12.96) / 4 = 7.3
    paired = paired_difference(results, 'a', 'b', interval='bootstrap')
    assert paired.mean == pytest.approx(1.4) and paired.se == pytest.approx(math.sqrt(7.3 / 5))
    assert paired.win_rate == pytest.approx((3 + 0.5) / 5)  # three wins, one tie counted half
    assert (paired.first, paired.second, paired.n, paired.confidence) == ('a', 'b', 5, 0.95)
    assert paired.low < paired.mean < paired.high
    reverse = paired_difference(results, 'b', 'a')
    assert reverse.mean == pytest.approx(-1.4) and reverse.win_rate == pytest.approx(1.5 / 5)
    pytest.importorskip('scipy')
    t = paired_difference(results, 'a', 'b', interval='t')
    quantile = 2.7764451051977987  # Student t, 4 degrees of freedom, 97.5 % (a table value)
    assert (t.low, t.high) == pytest.approx((1.4 - quantile * math.sqrt(7.3 / 5), 1.4 + quantile * math.sqrt(7.3 / 5)))
    with pytest.raises(ValueError, match="interval must be 'bootstrap' or 't'"):
        paired_difference(results, 'a', 'b', interval='normal')
    with pytest.raises(KeyError, match="no method 'c'"):
        paired_difference(results, 'a', 'c')


def test_bootstrap_interval_equals_the_exact_bootstrap_quantiles():
    '''For 4 samples the bootstrap distribution of the mean difference is known exactly: the 4**4 equally likely
    resamples. With many resamples the percentile bounds must be exactly the values where the exact distribution
    function crosses 2.5 % and 97.5 % (chosen so that it jumps across them with a margin).'''
    import itertools
    from zennit_attn.evaluation import paired_difference
    first, second = [5., 1., 9., 2.], [1., 1., 2., 4.]  # d = 4, 0, 7, -2
    difference = [a - b for a, b in zip(first, second)]
    means = sorted(sum(draw) / 4 for draw in itertools.product(difference, repeat=4))
    cdf = lambda value: sum(mean <= value for mean in means) / len(means)  # noqa: E731
    below = lambda value: sum(mean < value for mean in means) / len(means)  # noqa: E731
    low = next(mean for mean in means if cdf(mean) >= 0.025)
    high = next(mean for mean in means if cdf(mean) >= 0.975)
    assert below(low) < 0.02 and cdf(low) > 0.03 and below(high) < 0.97 and cdf(high) > 0.98  # margins
    paired = paired_difference(results_with({'a': first, 'b': second}), 'a', 'b', resamples=200000, seed=3)
    assert (paired.low, paired.high) == (pytest.approx(low), pytest.approx(high))
    # the seed fixes the interval
    again = paired_difference(results_with({'a': first, 'b': second}), 'a', 'b', resamples=200000, seed=3)
    assert (again.low, again.high) == (paired.low, paired.high)


def test_table_compares_every_method_with_the_reference():
    results = results_with({'a': [1., 2., 3.], 'b': [2., 4., 3.], 'c': [0., 0., 0.]})
    rows = {row['method']: row for row in results.summary()}
    assert [row['method'] for row in results.summary()] == ['b', 'a', 'c']
    assert all(row['reference'] == 'b' for row in rows.values())  # default: the best mean ABPC
    assert rows['a']['diff_mean'] == pytest.approx(-1.) and rows['a']['win_rate'] == pytest.approx(0.5 / 3)
    assert rows['b']['diff_mean'] == 0 and rows['b']['diff_low'] == rows['b']['diff_high'] == 0
    assert rows['c']['diff_low'] <= -3 <= rows['c']['diff_high']
    table = results.markdown()
    assert '| b | 3.000 ± 0.577 | (reference) | — |' in table
    assert '| a | 2.000 ± 0.577 | -1.000 [' in table and 'Δ ABPC vs b [95 % CI]' in table
    assert 'percentile bootstrap interval (10000 resamples of the samples, seed 0)' in table
    results.paired['reference'] = 'c'
    assert {row['method']: row for row in results.summary()}['a']['diff_mean'] == pytest.approx(2.)
    assert '| c | 0.000 ± 0.000 | (reference) | — |' in results.markdown()
    results.paired['reference'] = 'd'
    with pytest.raises(KeyError, match="reference method 'd' is not in the results"):
        results.summary()


def test_insertion_curve_of_a_linear_model_is_the_partial_sums():
    '''y = W x, baseline 0: inserting the k features with the largest contribution gives their sum; without ties and
    with steps dividing N, insertion(f) = LeRF(1 − f), so insertion AUC = LeRF AUC and ABPC = insertion − deletion.'''
    model = linear_model()
    x = data()
    target = torch.tensor([0, 1, 2, 1, 0])
    contributions = model.weight[target].detach() * x
    curves, _ = perturbation_curves(model, x, target, contributions, order='insertion', steps=4)
    for sample in range(5):
        ranked = contributions[sample].sort(descending=True).values
        partial_sums = [ranked[:count].sum().item() for count in (0, 3, 6, 9, 12)]
        assert curves[sample].tolist() == pytest.approx(partial_sums, abs=1e-12)
    results = evaluate(model, x, target, ['input_x_gradient'], steps=4, progress=False, target='label')
    result = results.methods['input_x_gradient']
    assert torch.allclose(result.insertion, curves)
    assert torch.allclose(result.insertion, result.lerf.flip(1))
    row = results.summary()[0]
    assert row['insertion_auc'] == pytest.approx(row['lerf_auc'])
    assert row['abpc_mean'] == pytest.approx(row['insertion_auc'] - row['morf_auc'])
    with pytest.raises(ValueError, match="order must be one of 'morf', 'lerf', 'insertion'"):
        perturbation_curves(model, x, target, contributions, order='deletion')
    without = evaluate(model, x, target, ['input_x_gradient'], steps=4, progress=False, insertion=False)
    assert without.methods['input_x_gradient'].insertion is None and '| — |' in without.markdown()


class CountingModel(torch.nn.Module):
    '''Counts the samples put through the wrapped model.'''
    def __init__(self, model):
        super().__init__()
        self.model, self.samples = model, 0

    def forward(self, x):
        self.samples += len(x)
        return self.model(x)


@pytest.mark.parametrize('tied', [False, True], ids=['distinct', 'tied'])
def test_shared_steps_are_evaluated_once_with_the_same_curves(tied):
    '''Orders sharing a list evaluate a perturbed input once: MoRF and LeRF share their first and last step, and
    without ties insertion is LeRF mirrored; with ties (a tie-breaking permutation per order) insertion still differs
    and is computed. The curves equal those of separate calls.'''
    model = CountingModel(linear_model())
    x, target = data(), torch.tensor([0, 1, 2, 1, 0])
    relevance = model.model.weight[target].detach() * x
    if tied:
        relevance = relevance.round(decimals=0)
    orders = ('morf', 'lerf', 'insertion')
    separate = [perturbation_curves(model, x, target, relevance, order=order, steps=4, seed=3)[0] for order in orders]
    assert model.samples == 3 * 5 * 5
    model.samples, reuse = 0, []
    shared = [perturbation_curves(model, x, target, relevance, order=order, steps=4, seed=3, reuse=reuse)[0]
              for order in orders]
    for first, second in zip(separate, shared):
        assert torch.equal(first, second)
    # distinct relevance: MoRF 5 steps, LeRF 3 new (its ends are MoRF's), insertion none (LeRF mirrored)
    if not tied:
        assert model.samples == 8 * 5
    else:
        assert 8 * 5 < model.samples < 3 * 5 * 5


def test_predicted_and_label_targets_differ_when_the_model_mispredicts():
    model = linear_model(features=12, classes=3)
    x = data(batch=8)
    predicted = (x @ model.weight.detach().T).argmax(1)
    labels = (predicted + 1) % 3  # every label wrong
    by_prediction = evaluate(model, x, labels, ['gradient'], steps=2, progress=False)  # the default
    by_label = evaluate(model, x, labels, ['gradient'], steps=2, progress=False, target='label')
    logits = (x @ model.weight.detach().T)
    # the curves start at the logit of the explained class
    assert torch.allclose(by_prediction.methods['gradient'].morf[:, 0], logits[torch.arange(8), predicted])
    assert torch.allclose(by_label.methods['gradient'].morf[:, 0], logits[torch.arange(8), labels])
    assert by_prediction.metadata['target'] == 'predicted' and by_label.metadata['target'] == 'label'
    assert by_prediction.metadata['explained'] == predicted.tolist()
    assert by_label.metadata['explained'] == labels.tolist()
    assert by_prediction.metadata['accuracy'] == by_label.metadata['accuracy'] == 0.
    assert 'Explained: the predicted class.' in by_prediction.markdown()
    assert 'Explained: the label.' in by_label.markdown()
    # labels are optional when the predictions are explained
    assert evaluate(model, x, None, ['gradient'], steps=2, progress=False).metadata['explained'] == predicted.tolist()
    with pytest.raises(ValueError, match="target='label' needs the labels"):
        evaluate(model, x, None, ['gradient'], steps=2, progress=False, target='label')
    with pytest.raises(ValueError, match="target must be 'predicted'"):
        evaluate(model, x, labels, ['gradient'], steps=2, progress=False, target='class')
    with pytest.raises(ValueError, match="reference 'nope' is not one of the methods"):
        evaluate(model, x, labels, ['gradient'], steps=2, progress=False, reference='nope')


def test_cli_evaluate_target_reference_and_sanity(tmp_path, capsys):
    '''``zennit-attn evaluate --target label --reference gradient --sanity``: the table compares with the reference,
    the results record the label as explained, and the sanity check writes its table and files.'''
    from zennit_attn.cli import main
    from zennit_attn.models import load_fashion_mnist_samples
    code = main(['evaluate', '--samples', '4', '--steps', '2', '--batch-size', '4', '--methods', 'gradient',
                 '--target', 'label', '--reference', 'gradient', '--sanity', '--sanity-samples', '1',
                 '-o', str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert 'Δ ABPC vs gradient [95 % CI]' in printed and '| gradient |' in printed and '(reference)' in printed
    assert 'Sanity check: cascading model randomisation' in printed and '| 1: heads |' in printed
    saved = json.loads((tmp_path / 'faithfulness.json').read_text())
    _, labels, _ = load_fashion_mnist_samples()
    assert saved['metadata']['target'] == 'label' and saved['metadata']['explained'] == labels[:4].tolist()
    assert saved['paired']['reference'] == 'gradient' and 'insertion' in saved['mean_curves']['gradient']
    sanity = json.loads((tmp_path / 'sanity.json').read_text())
    assert list(sanity['mean']['spearman']) == ['gradient'] and sanity['metadata']['samples'] == 1  # not 'random'
    assert (tmp_path / 'sanity.png').is_file() and (tmp_path / 'sanity.csv').is_file()
    assert main(['evaluate', '--methods', 'gradient', '--reference', 'attnlrp', '-o', str(tmp_path)]) == 2
    assert '--reference attnlrp: not one of the evaluated methods' in capsys.readouterr().err
