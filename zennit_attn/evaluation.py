'''Perturbation faithfulness of attributions (ATTNLRP.md §5): MoRF / LeRF curves and the area between them (ABPC).

Protocol. Features are ranked by their relevance; in fractional steps ``0, 1/S, ..., 1`` the top ``round(f · N)``
features of the ranking are set to ``baseline_value`` (in the model's normalized input space) and the target logit is
recorded. MoRF removes the most relevant (largest signed relevance) features first, LeRF the least relevant first.
``ABPC = ∫₀¹ (LeRF − MoRF) df`` by the trapezoid rule, in raw logit units; higher is better and a random ranking gives
≈ 0 in expectation. Ties in the relevance (e.g. patch-constant rollout maps at pixel granularity) are broken by a fixed
random permutation, identical for MoRF and LeRF.

Insertion and deletion. The deletion curve is the MoRF curve. The insertion curve starts from the baseline (every
feature perturbed) and puts the most relevant features back first: at fraction ``f`` the top ``round(f · N)`` features
of the MoRF ranking keep their values, all others are at the baseline. Without ties (and without rounding at ½),
``insertion(f) = LeRF(1 − f)``, so ABPC is the insertion AUC minus the deletion AUC: the two halves of ABPC.

Which class. :py:func:`evaluate` explains the model's predicted class by default (``target='predicted'``) and the
given labels with ``target='label'``; the results record which (``metadata['target']``), the explained classes and
the accuracy on the samples.

Which method is better. The methods are compared on the same samples, so per-sample (paired) ABPC differences are
the right statistic: :py:func:`paired_difference` gives their mean, paired standard error, a confidence interval (a
percentile bootstrap over the samples with a fixed seed by default, or a Student t interval) and the win rate (share
of samples on which the first method has the higher ABPC, ties counted ½). The table and the ABPC plot show every
method against a reference (by default the method with the highest mean ABPC).

Granularity for images ``(B, C, H, W)``: ``'pixel'`` ranks the ``H·W`` pixels by their channel-summed relevance and
perturbs all channels of a pixel; ``'patch'`` ranks ``patch_size × patch_size`` blocks by their summed relevance;
``'feature'`` ranks every element. For inputs ``(B, D)`` every element is a feature. Text: :py:func:`perturb_tokens`
sets whole token embeddings ``(B, T, H)`` to 0 and ranks only the real tokens of the attention mask.

Data parallelism. :py:func:`evaluate`, :py:func:`evaluate_tokens` and :py:func:`tune_gamma` run unchanged under
``torchrun --nproc_per_node N script.py`` or ``accelerate launch --multi_gpu --num_processes N script.py`` (and
``torchrun --nnodes M ...`` across nodes): every process passes the same full sample set, process ``r`` of ``W``
computes the batches ``r, r + W, r + 2W, ...``, and the curves of all batches are gathered on every process in batch
order. A batch is computed exactly as in one process (same samples, same batch number, hence the same random-method and
tie-breaking seeds), so the results equal the single-process results bit for bit on the same device and kernels. See
:py:func:`process_group`.
'''
import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import warnings

import torch

from .attribution import logits_of, per_sample
from .methods import _resolve, target_logits


__all__ = [
    'fractions_for', 'rank_features', 'perturbation_curves', 'perturb_tokens', 'abpc', 'MethodResult',
    'FaithfulnessResults', 'results_table', 'PairedDifference', 'paired_difference', 'explained_classes', 'evaluate',
    'evaluate_tokens', 'save_results', 'plot_results', 'tune_gamma', 'GammaTuning', 'process_group',
]

#: perturbation orders of :py:func:`perturbation_curves`
ORDERS = ('morf', 'lerf', 'insertion')
#: which class :py:func:`evaluate` explains
TARGETS = ('predicted', 'label')
#: confidence intervals of :py:func:`paired_difference`
INTERVALS = ('bootstrap', 't')


def fractions_for(steps):
    '''``steps + 1`` fractions from 0 to 1 (both included).'''
    if int(steps) < 1:
        raise ValueError(f'steps must be >= 1, got {steps}')
    return torch.linspace(0., 1., int(steps) + 1, dtype=torch.float64)


def abpc(morf, lerf, fractions):
    '''Area between the perturbation curves, ``∫ (LeRF − MoRF) d fraction`` by the trapezoid rule.

    ``morf`` and ``lerf`` have the fractions on their last axis (per-sample curves ``(B, S+1)`` give ``(B,)``).
    '''
    morf, lerf = torch.as_tensor(morf, dtype=torch.float64), torch.as_tensor(lerf, dtype=torch.float64)
    return torch.trapezoid(lerf - morf, torch.as_tensor(fractions, dtype=torch.float64), dim=-1)


def rank_features(scores, order='morf', mask=None, seed=0):
    '''Feature indices ``(B, N)`` in perturbation order.

    ``scores`` ``(B, N)``: MoRF sorts by descending score, LeRF ascending; ties are broken by a fixed random
    permutation (seeded), the same for both orders. Features with ``mask == 0`` are placed last (never perturbed
    before all real features).
    '''
    if order not in ('morf', 'lerf'):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    scores = scores.detach().to(torch.float64)
    batch, count = scores.shape
    key = -scores if order == 'morf' else scores.clone()
    if mask is not None:
        key = key.masked_fill(~mask.bool(), float('inf'))
    permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).to(scores.device)
    ranked = torch.argsort(key[:, permutation], dim=1, stable=True)
    return permutation[ranked]


def _feature_view(inputs, relevance, granularity, patch_size):
    '''Per-feature scores ``(B, N)`` and a function turning a feature mask ``(B, N)`` into an input mask.'''
    batch = inputs.shape[0]
    if relevance.shape != inputs.shape:
        raise ValueError(f'relevance shape {tuple(relevance.shape)} differs from inputs {tuple(inputs.shape)}')
    if granularity == 'feature' or inputs.ndim == 2:
        return relevance.reshape(batch, -1), lambda mask: mask.reshape(inputs.shape)
    if inputs.ndim != 4:
        raise ValueError(f"granularity {granularity!r} needs image inputs (B, C, H, W), got {tuple(inputs.shape)}")
    _, channels, height, width = inputs.shape
    if granularity == 'pixel':
        scores = relevance.sum(1).reshape(batch, -1)
        return scores, lambda mask: mask.reshape(batch, 1, height, width).expand_as(inputs)
    if granularity == 'patch':
        if not patch_size or height % patch_size or width % patch_size:
            raise ValueError(f'patch_size {patch_size} must divide the image size {height} x {width}')
        rows, cols = height // patch_size, width // patch_size
        scores = relevance.sum(1).reshape(batch, rows, patch_size, cols, patch_size).sum((2, 4)).reshape(batch, -1)

        def expand(mask):
            mask = mask.reshape(batch, 1, rows, 1, cols, 1).expand(batch, 1, rows, patch_size, cols, patch_size)
            return mask.reshape(batch, 1, height, width).expand_as(inputs)
        return scores, expand
    raise ValueError(f"granularity must be 'pixel', 'patch' or 'feature', got {granularity!r}")


def _counts(fractions, totals):
    '''Number of features perturbed per fraction and sample: ``round(f · N_b)``, ``(S+1, B)``.'''
    return torch.round(fractions[:, None] * totals[None].to(torch.float64)).long()


@torch.no_grad()
def _curves(forward, inputs, order_index, counts, expand, baseline_value, targets, insertion=False, seen=None):
    '''The target logit per step: the first ``counts[s]`` features of ``order_index`` are set to the baseline (or,
    with ``insertion``, all features but those). ``seen``, a list shared by calls on the same inputs, targets and
    baseline, holds ``(feature mask, logits)`` of evaluated steps: a step with an equal mask perturbs the input
    identically and is not run again (MoRF and LeRF share their first and last step; without ties insertion is LeRF
    mirrored).'''
    batch, count = order_index.shape
    positions = torch.empty_like(order_index)
    positions.scatter_(1, order_index, torch.arange(count, device=order_index.device).expand(batch, count))
    curve = []
    for step_counts in counts:
        feature_mask = positions < step_counts[:, None].to(positions.device)
        if insertion:
            feature_mask = ~feature_mask
        logits = next((value for mask, value in seen or () if torch.equal(mask, feature_mask)), None)
        if logits is None:
            perturbed = torch.where(expand(feature_mask), torch.as_tensor(baseline_value, dtype=inputs.dtype), inputs)
            logits = target_logits(forward(perturbed), targets).to(torch.float64)
            if seen is not None:
                seen.append((feature_mask, logits))
        curve.append(logits)
    return torch.stack(curve, 1)


def perturbation_curves(
    model, inputs, targets, relevance, order='morf', steps=20, granularity='pixel', patch_size=None,
    baseline_value=0., seed=0, reuse=None,
):
    '''Target logit while the most (``'morf'``) or least (``'lerf'``) relevant features are set to ``baseline_value``,
    or while the most relevant features are put back into an input at the baseline (``'insertion'``).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        Returns logits ``(batch, classes)``.
    inputs, relevance: :py:obj:`torch.Tensor`
        The (normalized) inputs and their attribution, same shape.
    targets: int, sequence or :py:obj:`torch.Tensor`
        The explained class per sample.
    order: str
        ``'morf'`` (deletion), ``'lerf'`` or ``'insertion'`` (at fraction ``f`` only the top ``round(f · N)``
        features of the MoRF ranking keep their values).
    steps: int
        Number of steps; the curve has ``steps + 1`` points at fractions ``linspace(0, 1, steps + 1)``.
    granularity: str
        ``'pixel'``, ``'patch'`` (with ``patch_size``) or ``'feature'`` (see the module docstring).
    baseline_value: float
        Value of a perturbed feature in the model's input space (0 = the data mean for standardized inputs).
    seed: int
        Seed of the tie-breaking permutation.
    reuse: list, optional
        A list (initially empty) shared by calls with the same model, inputs, targets, relevance, granularity,
        baseline and seed, e.g. one per order: a perturbed input that an earlier call evaluated is not run again.

    Returns
    -------
    curves: :py:obj:`torch.Tensor`
        float64 ``(batch, steps + 1)``; ``curves[:, 0]`` is the unperturbed logit (MoRF, LeRF) or the logit at the
        baseline (insertion).
    fractions: :py:obj:`torch.Tensor`
        float64 ``(steps + 1,)``.
    '''
    _check_order(order)
    fractions = fractions_for(steps)
    targets = per_sample(targets, inputs.shape[0], 'targets', inputs.device)
    scores, expand = _feature_view(inputs, relevance, granularity, patch_size)
    order_index = rank_features(scores, 'lerf' if order == 'lerf' else 'morf', seed=seed)
    totals = torch.full((inputs.shape[0],), scores.shape[1])
    counts = _counts(fractions, totals)
    curves = _curves(
        lambda x: model(x), inputs.detach(), order_index, counts, expand, baseline_value, targets,
        insertion=order == 'insertion', seen=reuse,
    )
    return curves, fractions


def _check_order(order):
    if order not in ORDERS:
        raise ValueError(f'order must be one of {", ".join(map(repr, ORDERS))}, got {order!r}')


def perturb_tokens(
    model, embeddings, attention_mask, targets, relevance, order='morf', steps=20, baseline_value=0., seed=0,
    forward=None,
):
    '''Perturbation curves for text: whole token embeddings are set to ``baseline_value`` (0).

    Only real tokens (``attention_mask == 1``) are ranked and perturbed; sample ``b`` with ``n_b`` real tokens has
    ``round(f · n_b)`` of them perturbed at fraction ``f`` (``order='insertion'``: all real tokens but the
    ``round(f · n_b)`` most relevant). The attention mask itself is never changed.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        Called as ``model(inputs_embeds=..., attention_mask=...)`` unless ``forward`` is given.
    embeddings: :py:obj:`torch.Tensor`
        Input embeddings ``(B, T, H)``.
    attention_mask: :py:obj:`torch.Tensor`
        ``(B, T)``, 1 for real tokens.
    relevance: :py:obj:`torch.Tensor`
        Token relevance ``(B, T)``, or embedding relevance ``(B, T, H)`` (summed over ``H``).
    forward: callable, optional
        ``forward(embeddings, attention_mask) -> logits``, replacing the default model call.

    Returns
    -------
    curves, fractions: as :py:func:`perturbation_curves`.
    '''
    if forward is None:
        def forward(embeds, mask):
            return logits_of(model(inputs_embeds=embeds, attention_mask=mask))
    batch, length, _ = embeddings.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=embeddings.device)
    if relevance.ndim == 3:
        relevance = relevance.sum(-1)
    if relevance.shape != (batch, length):
        raise ValueError(f'token relevance must be ({batch}, {length}), got {tuple(relevance.shape)}')
    _check_order(order)
    fractions = fractions_for(steps)
    targets = per_sample(targets, batch, 'targets', embeddings.device)
    real = attention_mask.bool()
    order_index = rank_features(relevance, 'lerf' if order == 'lerf' else 'morf', mask=real, seed=seed)
    counts = _counts(fractions, real.sum(1).cpu())
    expand = lambda mask: (mask & real)[..., None].expand_as(embeddings)  # noqa: E731
    curves = _curves(
        lambda x: forward(x, attention_mask), embeddings.detach(), order_index, counts, expand, baseline_value, targets,
        insertion=order == 'insertion',
    )
    return curves, fractions


# ----------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class MethodResult:
    '''Per-sample MoRF (deletion) / LeRF curves ``(N, S+1)``, ABPC ``(N,)`` and, if computed, insertion curves of one
    method.'''
    morf: torch.Tensor
    lerf: torch.Tensor
    abpc: torch.Tensor
    insertion: torch.Tensor = None

    @property
    def abpc_mean(self):
        return self.abpc.mean().item()

    @property
    def abpc_se(self):
        '''Standard error of the mean ABPC (sample standard deviation / √N; 0 for one sample).'''
        count = self.abpc.numel()
        return self.abpc.std().item() / math.sqrt(count) if count > 1 else 0.

    def auc(self, fractions, order):
        '''Area under the mean ``order`` curve (``'morf'``, ``'lerf'`` or ``'insertion'``); None if not computed.'''
        curves = getattr(self, order)
        return None if curves is None else torch.trapezoid(curves.mean(0), fractions).item()


@dataclasses.dataclass
class PairedDifference:
    '''The per-sample ABPC difference ``first − second`` over the same samples (:py:func:`paired_difference`).

    ``mean`` and ``se`` (paired standard error), the ``confidence`` interval ``[low, high]`` of the mean difference
    (``interval``: ``'bootstrap'`` or ``'t'``), ``win_rate`` (share of samples with ``first`` better, ties ½) and the
    number of samples ``n``.
    '''
    first: str
    second: str
    mean: float
    se: float
    low: float
    high: float
    win_rate: float
    n: int
    confidence: float
    interval: str


def _bootstrap_means(values, resamples, seed):
    '''Means of ``resamples`` bootstrap resamples (drawn with replacement, seeded) of the last axis of ``values``.'''
    generator = torch.Generator().manual_seed(seed)
    count, means = values.shape[-1], []
    for start in range(0, resamples, 1000):  # chunks keep the index tensor small for large N
        index = torch.randint(count, (min(1000, resamples - start), count), generator=generator)
        means.append(values[index].mean(-1))
    return torch.cat(means)


def paired_difference(results, first, second, confidence=0.95, interval='bootstrap', resamples=10000, seed=0):
    '''Compare two methods on the same samples by their per-sample ABPC difference ``d = first − second``.

    Parameters
    ----------
    results: :py:class:`FaithfulnessResults`
    first, second: str
        Method labels in ``results``.
    confidence: float
        Coverage of the interval, in (0, 1).
    interval: str
        ``'bootstrap'``: percentile interval of the means of ``resamples`` resamples of the samples (paired: a
        resample draws whole samples, with both methods' ABPC), with a fixed ``seed``, so the same results give the
        same interval. ``'t'``: ``mean ± t_{n−1} · se`` (Student t, needs scipy), which assumes a roughly normal mean.

    Returns
    -------
    :py:class:`PairedDifference`
        The paired standard error is much smaller than the two unpaired ones combined when the methods' ABPC vary
        together over the samples, which is typical: some images are easy for every method.
    '''
    for name in (first, second):
        if name not in results.methods:
            raise KeyError(f'no method {name!r} in the results; methods: {", ".join(results.methods)}')
    if not 0 < confidence < 1:
        raise ValueError(f'confidence must be in (0, 1), e.g. 0.95, got {confidence}')
    if interval not in INTERVALS:
        raise ValueError(f"interval must be 'bootstrap' or 't', got {interval!r}")
    difference = (results.methods[first].abpc - results.methods[second].abpc).to(torch.float64).cpu()
    count = difference.numel()
    mean = difference.mean().item()
    se = difference.std().item() / math.sqrt(count) if count > 1 else 0.
    alpha = 1 - confidence
    if count < 2:
        low = high = mean  # no spread to estimate from one sample
    elif interval == 'bootstrap':
        means = _bootstrap_means(difference, int(resamples), seed)
        low, high = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    else:
        half = _student_t().ppf(1 - alpha / 2, count - 1) * se
        low, high = mean - half, mean + half
    win_rate = ((difference > 0).double().mean() + (difference == 0).double().mean() / 2).item()
    return PairedDifference(
        first=first, second=second, mean=mean, se=se, low=low, high=high, win_rate=win_rate, n=count,
        confidence=confidence, interval=interval,
    )


def _student_t():
    '''scipy's Student t distribution (scipy is optional: only the t interval needs it).'''
    try:
        from scipy.stats import t as student_t
    except ImportError:
        raise ImportError("interval='t' needs scipy (pip install scipy); or use interval='bootstrap'") from None
    return student_t


#: default options of the paired comparison in :py:class:`FaithfulnessResults` (see :py:func:`paired_difference`)
PAIRED_DEFAULTS = dict(reference=None, confidence=0.95, interval='bootstrap', resamples=10000, seed=0)


@dataclasses.dataclass
class FaithfulnessResults:
    '''Results of :py:func:`evaluate`: the fractions, one :py:class:`MethodResult` per method, and metadata.

    ``paired`` holds the options of the paired comparison shown by :py:meth:`summary`, :py:meth:`markdown` and
    :py:func:`plot_results` (keys of :py:data:`PAIRED_DEFAULTS`): every method is compared with ``reference`` (None:
    the method with the highest mean ABPC).
    '''
    fractions: torch.Tensor
    methods: dict
    metadata: dict = dataclasses.field(default_factory=dict)
    paired: dict = dataclasses.field(default_factory=dict)

    def reference(self):
        '''The label all methods are compared with: ``paired['reference']`` or the best mean ABPC.'''
        reference = self.paired.get('reference')
        if reference is None:
            return max(self.methods, key=lambda name: self.methods[name].abpc_mean)
        if reference not in self.methods:
            raise KeyError(f'reference method {reference!r} is not in the results; methods: {", ".join(self.methods)}')
        return reference

    def comparisons(self):
        '''``{method: PairedDifference(method − reference)}`` with the options in ``paired``.'''
        options = {**PAIRED_DEFAULTS, **self.paired}
        options.pop('reference')
        reference = self.reference()
        return {name: paired_difference(self, name, reference, **options) for name in self.methods}

    def summary(self):
        '''One row per method, by descending ABPC: ``method, abpc_mean, abpc_se`` (the ABPC of the method),
        ``reference, diff_mean, diff_low, diff_high, win_rate`` (the paired comparison with the reference, see
        :py:func:`paired_difference`), ``morf_auc`` (deletion), ``insertion_auc`` (None if not computed),
        ``lerf_auc`` (areas under the mean curves), ``n``.'''
        comparisons = self.comparisons()
        rows = [
            {
                'method': name, 'abpc_mean': result.abpc_mean, 'abpc_se': result.abpc_se,
                'reference': comparisons[name].second, 'diff_mean': comparisons[name].mean,
                'diff_low': comparisons[name].low, 'diff_high': comparisons[name].high,
                'win_rate': comparisons[name].win_rate,
                'morf_auc': result.auc(self.fractions, 'morf'),
                'insertion_auc': result.auc(self.fractions, 'insertion'),
                'lerf_auc': result.auc(self.fractions, 'lerf'), 'n': result.abpc.numel(),
            }
            for name, result in self.methods.items()
        ]
        return sorted(rows, key=lambda row: -row['abpc_mean'])

    def mean_curves(self):
        '''``{method: {'morf': [...], 'lerf': [...], 'insertion': [...]}}`` averaged over the samples (insertion only
        if computed).'''
        return {
            name: {
                order: getattr(result, order).mean(0).tolist() for order in ORDERS
                if getattr(result, order) is not None
            }
            for name, result in self.methods.items()
        }

    def interval_text(self):
        '''How the intervals of the table were computed, in words.'''
        options = {**PAIRED_DEFAULTS, **self.paired}
        level = f'{100 * options["confidence"]:g} %'
        if options['interval'] == 't':
            return f'{level} Student t interval'
        return f'{level} percentile bootstrap interval ({options["resamples"]} resamples of the samples, seed ' \
               f'{options["seed"]})'

    def markdown(self, title=None):
        '''The summary as a Markdown table, followed by a line saying what the columns mean.'''
        rows = self.summary()
        reference = rows[0]['reference'] if rows else None
        level = f'{100 * {**PAIRED_DEFAULTS, **self.paired}["confidence"]:g} %'
        lines = [f'### {title}', ''] if title else []
        lines += [
            f'| method | ABPC ± s.e. | Δ ABPC vs {reference} [{level} CI] | win rate | deletion AUC | insertion AUC | '
            'LeRF AUC | n |',
            '|---|---|---|---|---|---|---|---|',
        ]
        for row in rows:
            if row['method'] == row['reference']:
                paired = '(reference) | —'
            else:
                paired = f"{row['diff_mean']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}] | " \
                         f"{row['win_rate']:.2f}"
            insertion = '—' if row['insertion_auc'] is None else f"{row['insertion_auc']:.3f}"
            lines.append(
                f"| {row['method']} | {row['abpc_mean']:.3f} ± {row['abpc_se']:.3f} | {paired} | "
                f"{row['morf_auc']:.3f} | {insertion} | {row['lerf_auc']:.3f} | {row['n']} |"
            )
        target = self.metadata.get('target')
        explained = {'predicted': 'the predicted class', 'label': 'the label'}.get(target, 'the given targets')
        lines += ['', (
            f'ABPC = area between the LeRF and MoRF curves (logit units, higher is better); Δ: mean paired per-sample '
            f'ABPC difference to {reference} with its {self.interval_text()}; win rate: share of samples on which '
            f'the method beats {reference} (ties ½); AUC: areas under the mean deletion (= MoRF), insertion (most '
            'relevant put back first, from the baseline) and LeRF curves; without tied relevance insertion(f) = '
            f'LeRF(1 − f), so ABPC = insertion AUC − deletion AUC. Explained: {explained}.'
        )]
        return '\n'.join(lines)

    def to_dict(self):
        return {
            'metadata': self.metadata,
            'paired': {**PAIRED_DEFAULTS, **self.paired, 'reference': self.reference(),
                       'description': self.interval_text()},
            'fractions': self.fractions.tolist(),
            'summary': self.summary(),
            'mean_curves': self.mean_curves(),
            'per_sample_abpc': {name: result.abpc.tolist() for name, result in self.methods.items()},
        }


def results_table(results, title=None):
    '''Markdown table (method, ABPC ± s.e., paired Δ vs the reference with CI, win rate, deletion / insertion / LeRF
    AUC, n) of a :py:class:`FaithfulnessResults`.'''
    return results.markdown(title)


def explained_classes(model, samples, labels=None, target='predicted', batch_size=16):
    '''The classes :py:func:`evaluate` explains: ``(explained (N,), labels (N,) or None)``.

    ``target='predicted'``: the argmax of the model's logits (computed in batches of ``batch_size`` without
    gradients); ``'label'``: ``labels`` (an int or ``(N,)``), which must then be given.
    '''
    if target not in TARGETS:
        raise ValueError(f"target must be 'predicted' (explain the model's prediction) or 'label', got {target!r}")
    count = samples.shape[0]
    if labels is not None:
        labels = per_sample(labels, count, 'targets', samples.device)
    if target == 'label':
        if labels is None:
            raise ValueError("target='label' needs the labels: pass targets, or use target='predicted'")
        return labels, labels
    with torch.no_grad():
        predicted = [logits_of(model(samples[index])).argmax(-1) for index in _batches(count, batch_size)]
    return torch.cat(predicted).to(samples.device), labels


def _method_table(methods):
    '''Normalise ``methods`` to ``{label: explain(model, inputs, target)}``.

    Accepts a list of names, or a dict ``label -> name | (name, options) | Composite | callable``.
    '''
    if isinstance(methods, (list, tuple)):
        methods = {name: name for name in methods}
    table = {}
    for label, spec in methods.items():
        if callable(spec) and not isinstance(spec, str) and not hasattr(spec, 'register'):
            table[label] = spec
        elif isinstance(spec, tuple):
            name, options = spec
            table[label] = _resolve(name, dict(options))
        else:
            table[label] = _resolve(spec, {})
    return table


def _batches(count, batch_size):
    for start in range(0, count, batch_size):
        yield slice(start, min(start + batch_size, count))


def _progress(total, enabled, description):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=not enabled, desc=description, leave=False)


def _method_results(collected, fractions):
    '''``{label: MethodResult}`` from ``{label: (morf, lerf[, insertion])}`` (all samples), with the ABPC of every
    sample.'''
    return {label: MethodResult(morf=curves[0], lerf=curves[1], abpc=abpc(curves[0], curves[1], fractions),
                                insertion=curves[2] if len(curves) > 2 else None)
            for label, curves in collected.items()}


# ------------------------------------------------------------------------------------------- data parallelism
#: set by ``torchrun`` and ``accelerate launch`` for every process; all four are needed to join a process group
LAUNCHER_VARIABLES = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


@contextlib.contextmanager
def process_group(distributed=None):
    '''Context of a data-parallel evaluation; yields ``(rank, world_size)``.

    Parameters
    ----------
    distributed: bool, optional
        ``None`` (default): use torch.distributed's default process group if one is initialised; otherwise, if the
        launcher variables of ``torchrun`` / ``accelerate launch`` are set (``RANK``, ``WORLD_SIZE`` > 1,
        ``MASTER_ADDR``, ``MASTER_PORT``), initialise a gloo group from them (``init_method='env://'``) and destroy it
        on exit; otherwise a single process ``(0, 1)``. ``False``: always ``(0, 1)`` (each process evaluates what it
        is given). ``True``: like ``None``, but a single process is an error.

    The group created here is gloo even on GPUs: it only carries the small CPU result tensors; the model stays where
    the caller put it. A group the caller initialised (e.g. NCCL) is used as it is and left open; for NCCL, set each
    process's device (``torch.cuda.set_device(local_rank)``) as torch.distributed's object collectives require.
    Nesting is cheap: an inner call finds the group of the outer one.
    '''
    if distributed is False:
        yield 0, 1
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    world = int(os.environ.get('WORLD_SIZE') or 1)
    if world > 1:
        missing = [name for name in LAUNCHER_VARIABLES if not os.environ.get(name)]
        if missing:
            raise RuntimeError(
                f'WORLD_SIZE={world} is set but {", ".join(missing)} {"is" if len(missing) == 1 else "are"} not: start '
                'the processes with torchrun or accelerate launch, or pass distributed=False to evaluate each '
                'process on its own'
            )
        if not dist.is_available():
            raise RuntimeError(f'WORLD_SIZE={world} is set, but this torch build has no torch.distributed')
        dist.init_process_group('gloo', init_method='env://')
        try:
            yield dist.get_rank(), dist.get_world_size()
        finally:
            dist.destroy_process_group()
        return
    if distributed:
        raise RuntimeError(
            'distributed=True, but torch.distributed is not initialised and the variables torchrun / accelerate '
            f'launch set ({", ".join(LAUNCHER_VARIABLES)}, with WORLD_SIZE > 1) are not in the environment'
        )
    yield 0, 1


def _digest(*tensors):
    '''SHA-256 of the dtype, shape and bytes of ``tensors`` (exact: identical inputs on every process).'''
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        digest.update(f'{tensor.dtype} {tuple(tensor.shape)}'.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _weight_sums(model):
    '''float64 sum of every materialised parameter and buffer (meta tensors of offloaded models and torch's quantized
    tensors, which have no sum, are skipped).'''
    if not isinstance(model, torch.nn.Module):
        return []
    tensors = [
        tensor for tensor in (*model.parameters(), *model.buffers())
        if tensor.device.type != 'meta' and not tensor.is_quantized
    ]
    if not tensors:
        return []
    return torch.stack([tensor.detach().sum(dtype=torch.float64) for tensor in tensors]).cpu().tolist()


def _check_agreement(rank_state):
    '''Raise on every process if the processes were given different samples, targets, model or settings: their
    shards would silently come from different problems.'''
    import torch.distributed as dist
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rank_state)
    first = states[0]
    for rank, state in enumerate(states[1:], 1):
        differing = [key for key in first if key != 'model' and state[key] != first[key]]
        sums = state['model']
        if len(sums) != len(first['model']) or any(
            not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(sums, first['model'])
        ):
            differing.append('model weights')
        if differing:
            raise ValueError(
                f'data-parallel evaluation: process {rank} differs from process 0 in {", ".join(differing)}; every '
                'process must get the same full sample set, targets, model and settings (each evaluates its own '
                'share of the batches)'
            )


def _gather(done, failure):
    '''All ``(batch number, {label: (morf, lerf)})`` of all processes, in batch order; if any process failed, every
    process raises (the failing one its own exception), so none waits forever in a later collective.'''
    import torch.distributed as dist
    everything = [None] * dist.get_world_size()
    message = None if failure is None else f'{type(failure).__name__}: {failure}'
    dist.all_gather_object(everything, (done, message))
    if failure is not None:
        raise failure
    for rank, (_, message) in enumerate(everything):
        if message is not None:
            raise RuntimeError(f'data-parallel evaluation failed on process {rank}: {message}')
    return sorted((item for items, _ in everything for item in items), key=lambda item: item[0])


def _run_batches(batches, labels, curves_of, progress, description, distributed, rank_state):
    '''``{label: curves}`` over all samples; ``curves_of(number, index, label) -> (morf, lerf[, insertion])`` of one
    batch.

    With ``W`` processes (:py:func:`process_group`), process ``r`` computes the batches ``r, r + W, ...`` and the
    curves are gathered on every process; ``rank_state()`` (samples, targets, model, settings) is checked to agree.
    Curves are float64 on the CPU.
    '''
    with process_group(distributed) as (rank, world):
        if world > 1:
            _check_agreement(rank_state())
            if rank == 0 and len(batches) < world:
                warnings.warn(
                    f'{len(batches)} batches for {world} processes: {world - len(batches)} processes idle; use a '
                    'smaller batch_size', stacklevel=3,
                )
        mine = range(rank, len(batches), world)
        done, failure = [], None
        with _progress(len(mine) * len(labels), progress and rank == 0, description) as bar:
            try:
                for number in mine:
                    curves = {}
                    for label in labels:
                        bar.set_postfix_str(label)
                        curves[label] = tuple(curve.cpu() for curve in curves_of(number, batches[number], label))
                        bar.update(1)
                    done.append((number, curves))
            except Exception as error:  # pylint: disable=broad-except
                if world == 1:
                    raise
                failure = error
        if world > 1:
            done = _gather(done, failure)
    return {label: tuple(torch.cat([curves[label][order] for _, curves in done])
                         for order in range(len(done[0][1][label]) if done else 0))
            for label in labels}


def evaluate(
    model, samples, targets, methods, batch_size=16, steps=20, granularity='pixel', patch_size=None,
    baseline_value=0., include_random=True, random_seed=0, progress=True, description='faithfulness',
    distributed=None, target='predicted', insertion=True, reference=None, confidence=0.95, interval='bootstrap',
):
    '''Perturbation faithfulness of several attribution methods on one fixed sample set shared by all methods.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        Returns logits ``(batch, classes)``; in eval mode.
    samples: :py:obj:`torch.Tensor`
        ``(N, ...)`` inputs.
    targets: int, :py:obj:`torch.Tensor` or None
        ``(N,)`` labels: explained with ``target='label'``; with ``target='predicted'`` only recorded (the accuracy
        in the metadata), and may be None.
    methods: list[str] or dict
        Names for :py:func:`zennit_attn.methods.attribute`, or ``{label: name | (name, options) | Composite |
        callable(model, inputs, target)}``.
    include_random: bool
        Add the label ``'random'`` (uniform noise, seeded per batch from ``random_seed``) unless already present.
    progress: bool
        Show a progress bar (on the first process only).
    distributed: bool, optional
        Data parallelism, see :py:func:`process_group`: by default on when torch.distributed is initialised or the
        script was started by ``torchrun`` / ``accelerate launch``.
    target: str
        ``'predicted'`` (default): explain the class the model predicts for each sample; ``'label'``: explain
        ``targets``. Recorded in ``metadata['target']``, with the explained classes in ``metadata['explained']``.
    insertion: bool
        Also compute the insertion curves (their steps reuse the forward passes of MoRF/LeRF steps with the same
        perturbed input: without ties in the relevance they cost none).
    reference, confidence, interval:
        The paired comparison shown in the table and plot (:py:attr:`FaithfulnessResults.paired`, see
        :py:func:`paired_difference`): every method against ``reference`` (default: the best mean ABPC).

    Other parameters are those of :py:func:`perturbation_curves`.

    Returns
    -------
    :py:class:`FaithfulnessResults`
        Curves and ABPC are float64 on the CPU.

    Notes
    -----
    Several GPUs or nodes: start the same script once per device, e.g. ``torchrun --nproc_per_node 8 script.py``,
    ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 script.py`` or
    ``accelerate launch --multi_gpu --num_processes 8 script.py``; each process moves the model and ``samples`` to its
    device (``cuda:LOCAL_RANK``) and calls ``evaluate`` with the same full sample set. Process ``r`` of ``W`` computes
    the batches ``r, r + W, ...``, and every process returns the full, identical result (write files on rank 0 only);
    use at least ``W`` batches. Since each batch is computed exactly as in one process (same samples, batch number and
    seeds), the result equals the single-process one bit for bit given the same device and kernels. Processes given
    different samples, targets, model weights or settings raise ``ValueError``; an exception on one process is raised
    on all of them.
    '''
    table = _method_table(methods)
    if include_random and 'random' not in table:
        table['random'] = None
    if interval not in INTERVALS:
        raise ValueError(f"interval must be 'bootstrap' or 't', got {interval!r}")
    if interval == 't':
        _student_t()  # fail before the work, not after it
    if reference is not None and reference not in table:
        raise ValueError(f'reference {reference!r} is not one of the methods ({", ".join(table)})')
    targets, labels = explained_classes(model, samples, targets, target, batch_size)
    count = samples.shape[0]
    fractions = fractions_for(steps)
    metadata = dict(
        samples=count, steps=steps, granularity=granularity, patch_size=patch_size, baseline_value=baseline_value,
        random_seed=random_seed, input_shape=list(samples.shape[1:]), target=target,
    )
    orders = ORDERS if insertion else ORDERS[:2]

    def curves_of(number, index, label):
        inputs, batch_targets = samples[index], targets[index]
        explain = table[label]
        if explain is None:
            explain = _resolve('random', {'seed': random_seed + number})
        relevance = explain(model, inputs, batch_targets)
        reuse = []
        return tuple(
            perturbation_curves(
                model, inputs, batch_targets, relevance, order=order, steps=steps, granularity=granularity,
                patch_size=patch_size, baseline_value=baseline_value, seed=random_seed + number, reuse=reuse,
            )[0]
            for order in orders
        )

    def rank_state():
        # the given labels, not the predictions: those follow from the samples and weights, which are compared too
        return dict(settings=dict(metadata, batch_size=batch_size, methods=list(table)), samples=_digest(samples),
                    targets=_digest(torch.empty(0) if labels is None else labels), model=_weight_sums(model))

    collected = _run_batches(
        list(_batches(count, batch_size)), list(table), curves_of, progress, description, distributed, rank_state,
    )
    metadata['explained'] = targets.tolist()
    if labels is not None:
        predicted = _predicted(model, samples, batch_size, targets, target)
        metadata.update(labels=labels.tolist(), accuracy=(predicted == labels).double().mean().item())
    return FaithfulnessResults(
        fractions=fractions, methods=_method_results(collected, fractions), metadata=metadata,
        paired=dict(reference=reference, confidence=confidence, interval=interval),
    )


def _predicted(model, samples, batch_size, explained, target):
    '''The predictions (the explained classes already are the predictions with ``target='predicted'``).'''
    if target == 'predicted':
        return explained
    return explained_classes(model, samples, None, 'predicted', batch_size)[0]


def evaluate_tokens(
    model, embeddings, attention_mask, targets, methods, batch_size=16, steps=20, include_random=True, random_seed=0,
    progress=True, description='token faithfulness', forward=None, distributed=None,
):
    ''':py:func:`evaluate` for text: token relevance from ``methods`` ``{label: explain(embeddings, mask, targets) ->
    (B, T) or (B, T, H)}``, curves from :py:func:`perturb_tokens` (whole token embeddings set to 0, only real tokens
    ranked). ``'random'`` (uniform token scores) is always added unless present. Data parallel like
    :py:func:`evaluate` (``distributed``).
    '''
    table = dict(methods)
    if include_random and 'random' not in table:
        table['random'] = None
    count = embeddings.shape[0]
    targets = per_sample(targets, count, 'targets', embeddings.device)
    fractions = fractions_for(steps)
    metadata = dict(samples=count, steps=steps, granularity='token', baseline_value=0., random_seed=random_seed)

    def curves_of(number, index, label):
        embeds, mask, batch_targets = embeddings[index], attention_mask[index], targets[index]
        explain = table[label]
        if explain is None:
            generator = torch.Generator().manual_seed(random_seed + number)
            relevance = torch.rand(mask.shape, generator=generator, dtype=torch.float64).to(mask.device)
        else:
            relevance = explain(embeds, mask, batch_targets)
        return tuple(
            perturb_tokens(
                model, embeds, mask, batch_targets, relevance, order=order, steps=steps, seed=random_seed + number,
                forward=forward,
            )[0]
            for order in ('morf', 'lerf')
        )

    def rank_state():
        return dict(settings=dict(metadata, batch_size=batch_size, methods=list(table)),
                    samples=_digest(embeddings, attention_mask), targets=_digest(targets), model=_weight_sums(model))

    collected = _run_batches(
        list(_batches(count, batch_size)), list(table), curves_of, progress, description, distributed, rank_state,
    )
    return FaithfulnessResults(fractions=fractions, methods=_method_results(collected, fractions), metadata=metadata)


# ------------------------------------------------------------------------------------------------ saving, plots
def save_results(results, directory, prefix='faithfulness'):
    '''Write ``<prefix>.json`` (metadata, paired-comparison options, summary, mean curves, per-sample ABPC),
    ``<prefix>_summary.csv`` and ``<prefix>_curves.csv`` (method, order, fraction, mean logit; orders ``morf``,
    ``lerf`` and, if computed, ``insertion``) into ``directory``; returns the paths.'''
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f'{prefix}{suffix}') for suffix in ('.json', '_summary.csv', '_curves.csv')]
    with open(paths[0], 'w') as fd:
        json.dump(results.to_dict(), fd, indent=1)
    summary = results.summary()
    with open(paths[1], 'w', newline='') as fd:
        writer = csv.DictWriter(fd, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    with open(paths[2], 'w', newline='') as fd:
        writer = csv.writer(fd)
        writer.writerow(['method', 'order', 'fraction', 'mean_logit'])
        for name, curves in results.mean_curves().items():
            for order, values in curves.items():
                for fraction, value in zip(results.fractions.tolist(), values):
                    writer.writerow([name, order, fraction, value])
    return paths


def _method_styles(names):
    '''Line style per method: random dashed grey, the others tab10 colours without its grey (reserved for random),
    then the same colours dash-dotted and dotted.'''
    from matplotlib import colormaps
    colors = [color for number, color in enumerate(colormaps['tab10'].colors) if number != 7]
    others = [name for name in names if name != 'random']
    styles = {name: dict(color=colors[number % len(colors)], linestyle=('-', '-.', ':')[number // len(colors) % 3])
              for number, name in enumerate(others)}
    styles['random'] = dict(color='gray', linestyle='--')
    return styles


def plot_results(results, directory, prefix='faithfulness', title=None):
    '''Save ``<prefix>_curves.png`` (mean deletion (MoRF), insertion and LeRF curves per method, with the area under
    each mean curve in the legends) and ``<prefix>_abpc.png`` (left: mean ABPC ± s.e.; right: the paired ABPC
    difference of every method to the reference with its confidence interval as error bars and the win rate) into
    ``directory``; returns the paths. The figures are drawn on matplotlib's Agg canvas directly, not through pyplot,
    so the caller's backend and figures are left alone.'''
    from .image import mpl

    classes = mpl()
    os.makedirs(directory, exist_ok=True)
    fractions = results.fractions.numpy()
    rows = results.summary()
    names = [row['method'] for row in rows]
    styles = _method_styles(names)
    panels = [('morf', 'Deletion (MoRF): most relevant removed first'),
              ('insertion', 'Insertion: most relevant put back first'),
              ('lerf', 'LeRF: least relevant removed first')]
    panels = [panel for panel in panels if all(getattr(result, panel[0]) is not None
                                               for result in results.methods.values())]
    figure = classes.Figure(figsize=(5.2 * len(panels), 4.6))
    classes.FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), sharey=True)
    for axis, (order, label) in zip(axes, panels):
        for name in names:
            result = results.methods[name]
            axis.plot(fractions, getattr(result, order).mean(0).numpy(),
                      label=f'{name} (AUC {result.auc(results.fractions, order):.2f})', **styles[name])
        axis.set_title(label, fontsize=10)
        axis.set_xlabel('fraction of features ' + ('inserted' if order == 'insertion' else 'removed'))
        axis.grid(alpha=.3)
        axis.legend(fontsize=7, loc='best')
    axes[0].set_ylabel('mean target logit')
    explained = {'predicted': 'the predicted class', 'label': 'the label'}.get(results.metadata.get('target'),
                                                                               'the given targets')
    figure.suptitle(title or f'Perturbation curves (mean over {results.metadata.get("samples", "?")} samples, '
                    f'explained: {explained})')
    figure.tight_layout()
    curve_path = os.path.join(directory, f'{prefix}_curves.png')
    figure.savefig(curve_path, dpi=150)

    reference = rows[0]['reference']
    options = {**PAIRED_DEFAULTS, **results.paired}
    figure = classes.Figure(figsize=(max(9, 1.3 * len(rows) + 4), 4.6))
    classes.FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    positions = list(range(len(rows)))
    colors = ['gray' if name == 'random' else 'C0' for name in names]
    left.bar(positions, [row['abpc_mean'] for row in rows], yerr=[row['abpc_se'] for row in rows], color=colors,
             capsize=3)
    left.set_ylabel('ABPC (logit units), mean ± s.e.')
    left.set_title('Area between perturbation curves (higher is better)', fontsize=10)
    others = [row for row in rows if row['method'] != reference]
    places = list(range(len(others)))
    means = [row['diff_mean'] for row in others]
    errors = [[row['diff_mean'] - row['diff_low'] for row in others],
              [row['diff_high'] - row['diff_mean'] for row in others]]
    right.errorbar(places, means, yerr=errors, fmt='o', color='C3', ecolor='C3', capsize=4)
    right.margins(x=.08, y=.12)  # room for the win-rate labels
    for place, row in zip(places, others):
        right.annotate(f"win {row['win_rate']:.0%}", (place, row['diff_high']), textcoords='offset points',
                       xytext=(0, 4), ha='center', fontsize=8)
    right.set_ylabel(f'Δ ABPC vs {reference} (paired, {100 * options["confidence"]:g} % CI)')
    interval = 'bootstrap' if options['interval'] == 'bootstrap' else 'Student t'
    right.set_title(f'Paired difference to {reference} ({interval} CI; below 0: worse)', fontsize=10)
    for axis, labels, ticks in ((left, names, positions), (right, [row['method'] for row in others], places)):
        axis.axhline(0, color='black', linewidth=.8)
        axis.set_xticks(ticks)
        axis.set_xticklabels(labels, rotation=35, ha='right')
        axis.grid(alpha=.3, axis='y')
    if not others:
        right.set_axis_off()
    figure.suptitle(title or f'Faithfulness on {results.metadata.get("samples", "?")} samples (explained: '
                    f'{explained}); paired {results.interval_text()}', fontsize=10)
    figure.tight_layout()
    bar_path = os.path.join(directory, f'{prefix}_abpc.png')
    figure.savefig(bar_path, dpi=150)
    return [curve_path, bar_path]


# ------------------------------------------------------------------------------------------------- γ tuning
@dataclasses.dataclass
class GammaTuning:
    '''Result of :py:func:`tune_gamma`: the best ``(conv_gamma, linear_gamma)``, its composite instance, and a table
    (list of dicts ``conv_gamma, linear_gamma, abpc_mean, abpc_se``) of all settings.'''
    best: tuple
    composite: object
    table: list
    best_score: float

    def markdown(self):
        conv = sorted({row['conv_gamma'] for row in self.table})
        linear = sorted({row['linear_gamma'] for row in self.table})
        score = {(row['conv_gamma'], row['linear_gamma']): row['abpc_mean'] for row in self.table}
        lines = ['| conv γ \\ linear γ | ' + ' | '.join(f'{g:g}' for g in linear) + ' |',
                 '|---' * (len(linear) + 1) + '|']
        for c in conv:
            cells = [f'**{score[c, g]:.3f}**' if (c, g) == tuple(self.best) else f'{score[c, g]:.3f}' for g in linear]
            lines.append(f'| {c:g} | ' + ' | '.join(cells) + ' |')
        return '\n'.join(lines)


def tune_gamma(
    model, samples, targets, conv_gammas=(0., 0.1, 0.25, 0.5, 1.), linear_gammas=(0., 0.01, 0.05, 0.1, 0.25),
    composite='attnlrp_vit', batch_size=16, steps=20, granularity='pixel', patch_size=None, baseline_value=0.,
    progress=True, distributed=None, target='predicted', **composite_options,
):
    '''Choose ``(conv_gamma, linear_gamma)`` of a vision composite by ABPC on (held-out) ``samples``.

    Every setting is scored by the mean ABPC of :py:func:`evaluate` (same protocol parameters); ties go to the first
    setting in grid order. Use samples disjoint from the ones the tuned composite is finally evaluated on. Data
    parallel like :py:func:`evaluate` (``distributed``; one process group for the whole grid). ``target``: explain
    the predicted class (default) or ``targets`` (``'label'``), as in :py:func:`evaluate`.

    Returns
    -------
    :py:class:`GammaTuning`
    '''
    import zennit.composites
    composite_type = zennit.composites.COMPOSITES[composite] if isinstance(composite, str) else composite
    table = []
    settings = [(float(c), float(g)) for c in conv_gammas for g in linear_gammas]
    from tqdm.auto import tqdm
    with process_group(distributed) as (rank, _):
        for conv_gamma, linear_gamma in tqdm(settings, disable=not progress or rank != 0, desc='gamma grid'):
            instance = composite_type(conv_gamma=conv_gamma, linear_gamma=linear_gamma, **composite_options)
            result = evaluate(
                model, samples, targets, {'composite': instance}, batch_size=batch_size, steps=steps,
                granularity=granularity, patch_size=patch_size, baseline_value=baseline_value, include_random=False,
                progress=False, distributed=distributed, target=target, insertion=False,
            ).methods['composite']
            table.append(dict(
                conv_gamma=conv_gamma, linear_gamma=linear_gamma, abpc_mean=result.abpc_mean, abpc_se=result.abpc_se,
            ))
    best = max(table, key=lambda row: row['abpc_mean'])  # max keeps the first of equal scores
    setting = (best['conv_gamma'], best['linear_gamma'])
    return GammaTuning(
        best=setting, composite=composite_type(conv_gamma=setting[0], linear_gamma=setting[1], **composite_options),
        table=table, best_score=best['abpc_mean'],
    )
