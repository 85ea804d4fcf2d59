'''Model-randomisation sanity check: cascading randomisation (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

An explanation that explains the model must change when the model's weights are destroyed. On a deep copy of the
model, the blocks are re-initialised one at a time from the top (the classifier head) down to the input embedding,
cumulatively; after each step every method explains the same samples for the same classes as on the original model,
and the similarity of each explanation to the original one is recorded:

- ``'spearman'``: Spearman rank correlation of ``|R|`` (images: of the channel-summed relevance per pixel), average
  ranks for ties. Two constant maps count as identical (1.0), one constant map against a varying one as 0.0.
- ``'ssim'`` (images only): structural similarity of the two ``|R|`` maps, each divided by its maximum (so the data
  range is 1), with a uniform 7 × 7 window and sample covariances, the defaults of
  ``skimage.metrics.structural_similarity``.

A method passes when its similarity decays towards 0 as more blocks are randomised; a method whose explanation
ignores the model (e.g. an edge detector, or the input itself) stays at 1.0.

Blocks. :py:func:`model_blocks` splits a model into blocks along its repeated containers (``nn.ModuleList`` /
``nn.Sequential`` with at least two parametrised children, e.g. the transformer layers): every element of such a
container is a block, every sibling module outside them is a block, and a parameter owned directly by a module that
holds such a container (e.g. a ViT's class token and position embedding) is a block of its own. For a torchvision ViT,
top first: ``heads``, ``encoder.ln``, ``encoder.layers.encoder_layer_{L-1}`` ... ``_0``, ``encoder.pos_embedding``,
``conv_proj``, ``class_token``. Registration order is taken as the order from input to output; pass ``blocks``
explicitly where it is not.

Re-initialisation. Every module of a block whose own parameters all belong to the block and which has
``reset_parameters`` (or ``_reset_parameters``, e.g. ``nn.MultiheadAttention``) is reset with it (torch's own
initialisers: random for linear, convolution and embedding layers; layer norms go back to weight 1, bias 0). Other
parameters are drawn from a normal distribution with mean 0 and the standard deviation of the trained values (0.02 if
those are constant). Random draws are seeded (``seed + step``) inside ``torch.random.fork_rng``, so the caller's
random state is untouched and the check is reproducible.
'''
import copy
import csv
import dataclasses
import json
import math
import os

import torch

from .evaluation import _batches, _method_table, explained_classes


__all__ = [
    'model_blocks', 'randomize_block', 'rank_correlation', 'ssim', 'SanityResults', 'cascading_randomization',
    'save_sanity', 'plot_sanity',
]

MEASURES = ('spearman', 'ssim')
MEASURE_NAMES = {'spearman': 'Spearman rank correlation of |R|', 'ssim': 'SSIM of |R|'}
MEASURE_SHORT = {'spearman': 'Spearman', 'ssim': 'SSIM'}


# ------------------------------------------------------------------------------------------------------ blocks
def _join(prefix, name):
    return f'{prefix}.{name}' if prefix else name


def _is_repeated(module):
    '''A container of at least two parametrised modules, e.g. the layers of a transformer.'''
    if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
        return False
    return sum(1 for child in module.children() if any(True for _ in child.parameters())) >= 2


def model_blocks(model):
    '''The blocks of ``model`` from the input to the output: a list of ``(name, [parameter names])``.

    See the module docstring for how the model is split; the cascade randomises them in reverse order.
    '''
    blocks = []

    def whole(module, prefix):
        names = [_join(prefix, name) for name, _ in module.named_parameters()]
        if names:
            blocks.append((prefix or '(model)', names))

    def visit(module, prefix):
        if not any(_is_repeated(sub) for sub in module.modules()):
            whole(module, prefix)
            return
        for name, _ in module.named_parameters(recurse=False):
            blocks.append((_join(prefix, name), [_join(prefix, name)]))
        for name, child in module.named_children():
            if _is_repeated(child):
                for index, element in child.named_children():
                    whole(element, _join(_join(prefix, name), index))
            else:
                visit(child, _join(prefix, name))

    visit(model, '')
    return blocks


def _resolve_blocks(model, blocks):
    '''``[(name, [parameter names])]`` top first, from ``None`` (all of :py:func:`model_blocks`, reversed) or a list
    of module / parameter names (top first).'''
    if blocks is None:
        return list(reversed(model_blocks(model)))
    names = [name for name, _ in model.named_parameters()]
    resolved = []
    for block in blocks:
        members = [name for name in names if name == block or name.startswith(f'{block}.')]
        if not members:
            available = ', '.join(name for name, _ in reversed(model_blocks(model)))
            raise ValueError(f'block {block!r} has no parameters in the model; blocks (top first): {available}')
        resolved.append((block, members))
    return resolved


def randomize_block(model, parameter_names, seed=0):
    '''Re-initialise the parameters ``parameter_names`` of ``model`` in place (see the module docstring); returns
    ``model``.'''
    parameters = dict(model.named_parameters())
    missing = [name for name in parameter_names if name not in parameters]
    if missing:
        raise ValueError(f'the model has no parameters {", ".join(missing)}')
    chosen = {id(parameters[name]) for name in parameter_names}
    done = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            reset = getattr(module, 'reset_parameters', None) or getattr(module, '_reset_parameters', None)
            # a module whose parameters are only partly in the block is not reset: it would change the others
            if own and callable(reset) and all(id(parameter) in chosen for parameter in own):
                reset()
                done.update(id(parameter) for parameter in own)
        for name in parameter_names:
            parameter = parameters[name]
            if id(parameter) in done:
                continue
            std = parameter.detach().double().std().item() if parameter.numel() > 1 else 0.
            parameter.normal_(0., std if math.isfinite(std) and std > 0 else 0.02)
            done.add(id(parameter))
    return model


# -------------------------------------------------------------------------------------------------- similarity
def _maps(relevance):
    '''``(B, H, W)`` channel-summed maps of images ``(B, C, H, W)``; ``(B, N)`` flattened for anything else.'''
    relevance = relevance.detach().to(torch.float64).cpu()
    if relevance.ndim == 4:
        return relevance.sum(1)
    return relevance.reshape(relevance.shape[0], -1)


def _average_ranks(values):
    '''Ranks 1..N of ``values`` (N,), tied values getting the mean of their ranks.'''
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = (ends - (counts.double() - 1) / 2)[inverse]
    return ranks


def rank_correlation(first, second, absolute=True):
    '''Per-sample Spearman rank correlation ``(B,)`` of two explanations ``(B, ...)`` (of ``|R|`` if ``absolute``;
    images are summed over channels first). Two constant maps give 1.0, one constant map 0.0, non-finite values NaN.
    '''
    first, second = _maps(first), _maps(second)
    if first.shape != second.shape:
        raise ValueError(f'explanations of different shapes {tuple(first.shape)} and {tuple(second.shape)}')
    values = []
    for one, other in zip(first.reshape(len(first), -1), second.reshape(len(second), -1)):
        if not (torch.isfinite(one).all() and torch.isfinite(other).all()):
            values.append(math.nan)
            continue
        if absolute:
            one, other = one.abs(), other.abs()
        one, other = _average_ranks(one), _average_ranks(other)
        one, other = one - one.mean(), other - other.mean()
        norms = one.norm() * other.norm()
        if norms == 0:
            values.append(1. if one.norm() == other.norm() else 0.)  # both constant: identical rankings
        else:
            values.append(((one * other).sum() / norms).item())
    return torch.tensor(values, dtype=torch.float64)


def ssim(first, second, absolute=True, window=7):
    '''Per-sample structural similarity ``(B,)`` of two image explanations ``(B, C, H, W)`` or maps ``(B, H, W)``.

    Each (channel-summed, absolute if ``absolute``) map is divided by its largest absolute value, so the data range
    is 1; then the mean SSIM over all full ``window × window`` windows with uniform weights, sample covariances and
    ``K1 = 0.01``, ``K2 = 0.03`` (``skimage.metrics.structural_similarity(a, b, data_range=1)``). Non-finite maps
    give NaN.
    '''
    first, second = (_maps(value) if value.ndim == 4 else value.detach().to(torch.float64).cpu()
                     for value in (first, second))
    if first.ndim != 3 or first.shape != second.shape:
        raise ValueError(f'ssim needs image maps (B, H, W) or (B, C, H, W) of equal shape, got {tuple(first.shape)} '
                         f'and {tuple(second.shape)}')
    if min(first.shape[1:]) < window:
        raise ValueError(f'ssim needs maps of at least {window} x {window} pixels, got {tuple(first.shape[1:])}')
    finite = torch.isfinite(first).flatten(1).all(1) & torch.isfinite(second).flatten(1).all(1)
    first, second = first.nan_to_num(0., 0., 0.), second.nan_to_num(0., 0., 0.)
    if absolute:
        first, second = first.abs(), second.abs()

    def scaled(maps):
        largest = maps.abs().flatten(1).max(1).values.clamp_min(1e-300)
        return (maps / largest[:, None, None])[:, None]

    first, second = scaled(first), scaled(second)
    mean = lambda value: torch.nn.functional.avg_pool2d(value, window, stride=1)  # noqa: E731
    count = window * window
    norm = count / (count - 1)  # sample covariance, as skimage's use_sample_covariance
    mean_x, mean_y = mean(first), mean(second)
    var_x = norm * (mean(first * first) - mean_x ** 2)
    var_y = norm * (mean(second * second) - mean_y ** 2)
    cov = norm * (mean(first * second) - mean_x * mean_y)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return torch.where(finite, index.flatten(1).mean(1), torch.tensor(math.nan, dtype=torch.float64))


SIMILARITIES = {'spearman': rank_correlation, 'ssim': ssim}


# ----------------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class SanityResults:
    '''Result of :py:func:`cascading_randomization`.

    ``blocks``: the randomised blocks in cascade order (top first); ``similarity[measure][method]``: float64
    ``(len(blocks) + 1, N)``, row 0 the original model (1.0), row ``k`` after randomising the first ``k`` blocks;
    ``metadata``: the settings.
    '''
    blocks: list
    similarity: dict
    metadata: dict = dataclasses.field(default_factory=dict)

    def steps(self):
        '''Labels of the rows: ``'none'`` and then the blocks.'''
        return ['none'] + list(self.blocks)

    def mean(self, measure='spearman'):
        '''``{method: [mean similarity per step]}`` (NaN samples ignored).'''
        return {name: values.nanmean(1).tolist() for name, values in self._measure(measure).items()}

    def _measure(self, measure):
        if measure not in self.similarity:
            raise KeyError(f'measure {measure!r} was not computed; computed: {", ".join(self.similarity)}')
        return self.similarity[measure]

    def markdown(self, measure='spearman', title=None):
        '''Table: one row per step (blocks randomised from the top, cumulatively), one column per method.'''
        means = self.mean(measure)
        names = list(means)
        lines = [f'### {title}', ''] if title else []
        lines += ['| randomised down to | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
        for step, label in enumerate(self.steps()):
            label = 'nothing (original model)' if step == 0 else f'{step}: {label}'
            lines.append(f'| {label} | ' + ' | '.join(f'{means[name][step]:.3f}' for name in names) + ' |')
        lines += ['', (
            f'{MEASURE_NAMES[measure]} between the explanation of the model with its top blocks re-initialised '
            f'(cumulatively, head first) and the original explanation, mean over {self.metadata.get("samples")} '
            'samples, same explained classes. A method that explains the model decays towards 0 (cascading '
            'randomisation, Adebayo et al. 2018).'
        )]
        return '\n'.join(lines)

    def to_dict(self):
        return {
            'metadata': self.metadata,
            'blocks': list(self.blocks),
            'mean': {measure: self.mean(measure) for measure in self.similarity},
            'per_sample': {measure: {name: values.tolist() for name, values in methods.items()}
                           for measure, methods in self.similarity.items()},
        }


# -------------------------------------------------------------------------------------------------------- check
def _explain_all(explain, model, samples, targets, batch_size):
    return torch.cat([explain(model, samples[index], targets[index]).detach()
                      for index in _batches(samples.shape[0], batch_size)])


def cascading_randomization(
    model, samples, targets, methods, blocks=None, measures=None, absolute=True, batch_size=16, seed=0,
    target='predicted', progress=True,
):
    '''Cascading model randomisation (Adebayo et al. 2018) of several attribution methods.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        In eval mode; left unchanged (a deep copy is randomised).
    samples: :py:obj:`torch.Tensor`
        ``(N, ...)`` inputs.
    targets: int, :py:obj:`torch.Tensor` or None
        Labels, explained with ``target='label'``; with ``'predicted'`` the original model's predictions are
        explained (at every step the same classes).
    methods: list[str] or dict
        As for :py:func:`zennit_attn.evaluation.evaluate` (names, ``{label: name | (name, options) | Composite |
        callable(model, inputs, target)}``).
    blocks: list[str], optional
        Module or parameter names to randomise, top first; default: all of :py:func:`model_blocks`, top first.
    measures: sequence of str, optional
        ``'spearman'`` and / or ``'ssim'``; default both for images ``(N, C, H, W)``, else ``'spearman'``.
    absolute: bool
        Compare ``|R|`` (default, as Adebayo et al.) or the signed relevance.
    seed: int
        Step ``k`` draws with seed ``seed + k``.

    Returns
    -------
    :py:class:`SanityResults`
    '''
    if measures is None:
        measures = MEASURES if samples.ndim == 4 else MEASURES[:1]
    unknown = [measure for measure in measures if measure not in SIMILARITIES]
    if unknown:
        raise ValueError(f'unknown measures {unknown}; available: {", ".join(SIMILARITIES)}')
    if 'ssim' in measures and samples.ndim != 4:
        raise ValueError(f"measure 'ssim' needs image samples (N, C, H, W), got {tuple(samples.shape)}; use "
                         "measures=('spearman',)")
    table = _method_table(methods)
    schedule = _resolve_blocks(model, blocks)
    targets, _ = explained_classes(model, samples, targets, target, batch_size)
    originals = {label: _explain_all(explain, model, samples, targets, batch_size) for label, explain in table.items()}
    similarity = {measure: {label: [torch.ones(samples.shape[0], dtype=torch.float64)] for label in table}
                  for measure in measures}
    randomized = copy.deepcopy(model)
    from tqdm.auto import tqdm
    with tqdm(total=len(schedule) * len(table), disable=not progress, desc='cascading randomisation',
              leave=False) as bar:
        for step, (name, parameter_names) in enumerate(schedule, 1):
            randomize_block(randomized, parameter_names, seed=seed + step)
            for label, explain in table.items():
                bar.set_postfix_str(f'{name}: {label}')
                relevance = _explain_all(explain, randomized, samples, targets, batch_size)
                for measure in measures:
                    similarity[measure][label].append(
                        SIMILARITIES[measure](relevance, originals[label], absolute=absolute))
                bar.update(1)
    metadata = dict(
        samples=samples.shape[0], target=target, explained=targets.tolist(), absolute=absolute, seed=seed,
        measures=list(measures), parameters={name: names for name, names in schedule},
    )
    return SanityResults(
        blocks=[name for name, _ in schedule],
        similarity={measure: {label: torch.stack(rows) for label, rows in methods.items()}
                    for measure, methods in similarity.items()},
        metadata=metadata,
    )


# ------------------------------------------------------------------------------------------------ saving, plots
def save_sanity(results, directory, prefix='sanity'):
    '''Write ``<prefix>.json`` (metadata, blocks, mean and per-sample similarities) and ``<prefix>.csv`` (measure,
    method, step, block, mean similarity) into ``directory``; returns the paths.'''
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f'{prefix}.json'), os.path.join(directory, f'{prefix}.csv')]
    with open(paths[0], 'w') as fd:
        json.dump(results.to_dict(), fd, indent=1)
    with open(paths[1], 'w', newline='') as fd:
        writer = csv.writer(fd)
        writer.writerow(['measure', 'method', 'step', 'block', 'mean_similarity'])
        for measure in results.similarity:
            for name, values in results.mean(measure).items():
                for step, (label, value) in enumerate(zip(results.steps(), values)):
                    writer.writerow([measure, name, step, label, value])
    return paths


def plot_sanity(results, directory, prefix='sanity', title=None):
    '''Save ``<prefix>.png``: per measure, the mean similarity (± s.e. band) against the number of blocks randomised,
    one line per method; returns the path. Drawn on an Agg canvas (the caller's backend is left alone).'''
    from .evaluation import _method_styles
    from .image import mpl

    classes = mpl()
    os.makedirs(directory, exist_ok=True)
    measures = list(results.similarity)
    steps = results.steps()
    figure = classes.Figure(figsize=(max(6.5, 0.55 * len(steps) + 3) * len(measures), 5.))
    classes.FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(measures), squeeze=False)[0]
    for axis, measure in zip(axes, measures):
        methods = results.similarity[measure]
        styles = _method_styles(list(methods))
        positions = list(range(len(steps)))
        for name, values in methods.items():
            mean = values.nanmean(1)
            counts = torch.isfinite(values).sum(1).clamp_min(1)
            deviations = torch.nansum((values - mean[:, None]) ** 2, 1)
            spread = torch.sqrt(deviations / (counts - 1).clamp_min(1)) / counts.sqrt()
            axis.plot(positions, mean.numpy(), marker='o', markersize=3, label=name, **styles[name])
            axis.fill_between(positions, (mean - spread).numpy(), (mean + spread).numpy(), alpha=.15,
                              color=styles[name]['color'])
        axis.axhline(0, color='black', linewidth=.8)
        axis.set_xticks(positions)
        axis.set_xticklabels(steps, rotation=45, ha='right', fontsize=8)
        axis.set_xlabel('randomised down to (cumulative, from the head)')
        axis.set_ylabel(f'{MEASURE_SHORT[measure]} similarity to the original (mean ± s.e.)')
        axis.set_ylim(min(-0.1, axis.get_ylim()[0]), 1.05)
        axis.grid(alpha=.3)
        axis.legend(fontsize=8, loc='best')
        axis.set_title(f'{MEASURE_NAMES[measure]}', fontsize=10)
    figure.suptitle(title or f'Cascading model randomisation (Adebayo et al. 2018), {results.metadata.get("samples")} '
                    'samples: a method that explains the model decays towards 0')
    figure.tight_layout()
    path = os.path.join(directory, f'{prefix}.png')
    figure.savefig(path, dpi=150)
    return path
