'''Reference samples of neurons and heads: activation and relevance maximization over a corpus.

:py:func:`collect_references` streams a dataset through the model once (in batches, with a progress bar), attributes
every batch under a composite and keeps, for every chosen unit of a layer, the ``k`` contexts (sample and position)
where the unit is most *active* (activation maximization) and where it is most *relevant* for the prediction (relevance
maximization, Achtibat et al., 2023). Memory is bounded: per unit only the current top-k are kept and merged with each
new batch. The state can be saved to a file every few batches; ``resume=True`` continues from it with the same result
as an uninterrupted run. Ties are broken by the sample index (earlier first), so the result is deterministic.

Contexts
--------
A layer's output is read as ``(batch, positions..., units, within...)``: neurons are the last dimension
(:py:class:`Neurons`), heads are blocks of it (``Heads(num_heads)``: merged ``heads * head_dim`` layout) or the
second dimension of an attention context ``(batch, heads, tokens, head_dim)`` (``Heads()``). For every sample and unit
the score is the maximum over the positions (tokens, patches) of the unit's activation (its value; the norm over
``head_dim`` for a head) or relevance (summed over ``head_dim``), and the position of that maximum is the context: the
token of a text (:py:meth:`ReferenceSamples.text_snippets` shows it within its window) or, for images, the crop around
where the unit's conditional relevance is largest at the input (:py:meth:`ReferenceSamples.image_crops`, with
:py:func:`zennit_attn.concepts.conditional_relevance`).

Example
-------
>>> references = collect_references(model, images, {'encoder.layers.encoder_layer_2.mlp.1': None}, k=8,
...                                 composite=AttnLRPViT())
>>> references.references('encoder.layers.encoder_layer_2.mlp.1', unit=5, mode='relevance')
'''
import math
import os
from collections import namedtuple
from pathlib import Path

import torch
from zennit.attribution import Gradient

from .attribution import EmbeddingsForward, _position_ids
from .latent import watch_outputs


__all__ = ['collect_references', 'ReferenceSamples', 'Neurons', 'Heads', 'TextInputs', 'ImageInputs', 'Reference',
           'merge_top_k', 'crop_box']


MODES = ('activation', 'relevance')
STATE_VERSION = 1

#: one reference: the sample index in the dataset, the position in the layer's output (flattened over the position
#: dimensions; tokens for text, counted from the first non-padding token) and the score
Reference = namedtuple('Reference', ['sample', 'position', 'value'])


# ------------------------------------------------------------------------------------------------------- units
class Neurons:
    '''The neurons (channels) of a layer: dimension ``dim`` of its output; ``indices`` selects some (default: all).'''
    def __init__(self, indices=None, dim=-1):
        self.indices = None if indices is None else [int(index) for index in indices]
        self.dim = dim
        self.num_heads = None
        self.within = ()

    def key(self):
        '''What identifies the selection in a saved state.'''
        return (type(self).__name__, self.indices, self.dim, self.num_heads, tuple(self.within))

    def __repr__(self):
        return f'{type(self).__name__}(indices={self.indices}, dim={self.dim})'


class Heads(Neurons):
    '''The attention heads of a layer: with ``num_heads``, the last dimension of a merged ``(batch, tokens, heads *
    head_dim)`` output (e.g. Hugging Face ``...attention.self``); without, dimension 1 of a ``(batch, heads, tokens,
    head_dim)`` attention context (the engine's ``'...self_attention.attention'`` site).'''
    def __init__(self, num_heads=None, indices=None):
        super().__init__(indices, dim=-1 if num_heads else 1)
        self.num_heads = num_heads
        self.within = () if num_heads else (-1,)

    def __repr__(self):
        return f'{type(self).__name__}(num_heads={self.num_heads}, indices={self.indices})'


def _spec(value):
    if value is None:
        return Neurons()
    if isinstance(value, Neurons):
        return value
    return Neurons(value)


def canonical(tensor, spec):
    '''``tensor`` as ``(batch, positions, units, within)`` and the shape of its position dimensions.'''
    dim = spec.dim % tensor.ndim
    within = [axis % tensor.ndim for axis in spec.within]
    if spec.num_heads:
        if tensor.shape[dim] % spec.num_heads:
            raise ValueError(f'{tensor.shape[dim]} features are not divisible into num_heads={spec.num_heads}')
        tensor = tensor.unflatten(dim, (spec.num_heads, -1))
        within = [dim + 1]
    positions = [axis for axis in range(1, tensor.ndim) if axis != dim and axis not in within]
    shape = [tensor.shape[axis] for axis in positions]
    units = tensor.shape[dim]
    tensor = tensor.permute(0, *positions, dim, *within)
    return tensor.reshape(tensor.shape[0], math.prod(shape), units, -1), shape


# ------------------------------------------------------------------------------------------------------ top-k
def merge_top_k(values, samples, positions, new_values, new_samples, new_positions, k):
    '''Merge the current top-k of every unit with new candidates: ``(units, k)`` tensors and ``(units, n)`` ones.

    Order: larger value first; ties by smaller sample index (empty slots, sample -1 with value -inf, last).
    '''
    values = torch.cat([values, new_values], 1)
    samples = torch.cat([samples, new_samples], 1)
    positions = torch.cat([positions, new_positions], 1)
    # two stable sorts: by sample index (empty slots last), then by value, descending
    order = torch.sort(torch.where(samples < 0, torch.iinfo(torch.int64).max, samples), dim=1, stable=True).indices
    values, samples, positions = values.gather(1, order), samples.gather(1, order), positions.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), samples.gather(1, order), positions.gather(1, order)


def _empty(units, k):
    return (torch.full((units, k), -math.inf, dtype=torch.float64), torch.full((units, k), -1, dtype=torch.int64),
            torch.full((units, k), -1, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------------ inputs
class ImageInputs:
    '''Dataset items are input tensors ``(channels, H, W)`` (or tuples whose first element is one); the model takes a
    batch of them.'''
    kind = 'image'

    def prepare(self, model, items):
        '''``(root module, input tensor, valid positions or None, extra)`` for a batch of items.'''
        tensors = [item[0] if isinstance(item, (tuple, list)) else item for item in items]
        return model, torch.stack([torch.as_tensor(tensor) for tensor in tensors]), None, {}


class TextInputs:
    '''Dataset items are strings, tokenized with ``tokenizer``; the model runs on its input embeddings (as
    :py:func:`zennit_attn.token_relevance`). Padding and (with ``skip_special``) special tokens are never contexts.'''
    kind = 'text'

    def __init__(self, tokenizer, max_length=64, skip_special=True):
        self.tokenizer, self.max_length, self.skip_special = tokenizer, max_length, skip_special

    def encode(self, texts):
        '''Tokenize with right padding: positions then count from the first token, as without padding.'''
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = 'right'
        try:
            return self.tokenizer(list(texts), return_tensors='pt', padding=True, truncation=True,
                                  max_length=self.max_length, return_special_tokens_mask=True)
        finally:
            self.tokenizer.padding_side = side

    def prepare(self, model, items):
        if not all(isinstance(item, str) for item in items):
            raise TypeError('collect_references: TextInputs needs a dataset of strings.')
        encoded = self.encode(items)
        mask = encoded['attention_mask']
        valid = mask.bool()
        if self.skip_special:
            valid &= ~encoded['special_tokens_mask'].bool()
        with torch.no_grad():
            embeds = model.get_input_embeddings()(encoded['input_ids'])
        root = EmbeddingsForward(model, attention_mask=mask, position_ids=_position_ids(model, encoded['input_ids']))
        # positions are counted from the first real token, so they do not depend on (left) padding
        return root, embeds, valid, {'offset': mask.argmax(1), 'last': mask.shape[1] - 1 - mask.flip(1).argmax(1)}


def _seed(target, extra):
    '''The output seed ``output * onehot(target)`` (target None: the argmax); for ``(batch, tokens, vocabulary)``
    logits at the last real token.'''
    if callable(target):
        return target

    def seed(output):
        logits = output.detach()
        rows = torch.arange(len(logits))
        last = extra.get('last')
        selected = logits if logits.ndim == 2 else logits[rows, last if last is not None else -1]
        goal = selected.argmax(-1) if target is None else torch.as_tensor(target).expand(len(logits))
        weight = torch.zeros_like(logits)
        if logits.ndim == 2:
            weight[rows, goal] = 1.
        else:
            weight[rows, last if last is not None else -1, goal] = 1.
        return output * weight
    return seed


# ------------------------------------------------------------------------------------------------------ result
class ReferenceSamples:
    '''The top-k contexts of every chosen unit, by activation and by relevance (see :py:func:`collect_references`).

    Attributes
    ----------
    units: dict[str, list[int]]
        The tracked unit indices per layer (row ``i`` of the top-k tensors is unit ``units[layer][i]``).
    top: dict[str, dict[str, tuple]]
        ``top[layer][mode] = (values, samples, positions)``, each ``(units, k)``; ``mode`` is ``'activation'`` or
        ``'relevance'``; empty slots have sample -1.
    position_shapes: dict[str, list[int]]
        The shape of the position dimensions of each layer's output (e.g. ``[tokens]``).
    batches: int
        Batches processed so far; ``complete`` is True once the whole dataset was.
    '''
    def __init__(self, specs, k, batch_size, size, kind):
        self.specs, self.k, self.batch_size, self.size, self.kind = specs, k, batch_size, size, kind
        self.units, self.top, self.position_shapes = {}, {}, {}
        self.batches = 0

    @property
    def complete(self):
        return self.batches * self.batch_size >= self.size

    def config(self):
        return {'layers': {name: spec.key() for name, spec in self.specs.items()}, 'k': self.k,
                'batch_size': self.batch_size, 'size': self.size, 'kind': self.kind}

    def state_dict(self):
        return {'version': STATE_VERSION, 'config': self.config(), 'batches': self.batches, 'units': self.units,
                'top': self.top, 'position_shapes': self.position_shapes}

    def load_state_dict(self, state, path='the state'):
        if state.get('version') != STATE_VERSION or state.get('config') != self.config():
            raise ValueError(f'collect_references: {path} was saved for another run (model layers, units, k, '
                             f'batch_size, dataset size or kind differ: {state.get("config")} vs {self.config()}); '
                             'delete it or pass resume=False.')
        self.batches, self.units, self.top = state['batches'], state['units'], state['top']
        self.position_shapes = state['position_shapes']

    def save(self, path):
        '''Write the state to ``path`` atomically (a temporary file renamed over it).'''
        path = Path(path)
        temporary = path.with_name(path.name + '.tmp')
        torch.save(self.state_dict(), temporary)
        os.replace(temporary, path)

    def _row(self, layer, unit):
        if layer not in self.units:
            raise KeyError(f'{layer!r}: not collected; layers: {list(self.units)}')
        try:
            return self.units[layer].index(int(unit))
        except ValueError:
            raise KeyError(f'unit {unit} of {layer!r} was not tracked') from None

    def references(self, layer, unit, mode='relevance'):
        '''The top-k :py:class:`Reference` of ``unit`` (its index in the layer), best first.'''
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        row = self._row(layer, unit)
        values, samples, positions = (tensor[row].tolist() for tensor in self.top[layer][mode])
        return [Reference(sample, position, value)
                for sample, position, value in zip(samples, positions, values) if sample >= 0]

    def text_snippets(self, dataset, tokenizer, layer, unit, mode='relevance', window=6, mark=('[[', ']]'),
                      max_length=64):
        '''The references of a text unit as snippets: the token at the context with ``window`` tokens on each side,
        marked with ``mark``; returns a list of ``(snippet, Reference)``.'''
        from .text import clean_tokens
        snippets = []
        for reference in self.references(layer, unit, mode):
            encoded = tokenizer(dataset[reference.sample], truncation=True, max_length=max_length)
            tokens = tokenizer.convert_ids_to_tokens(encoded['input_ids'])
            cleaned = clean_tokens(tokens)
            position = reference.position
            start, stop = max(0, position - window), min(len(cleaned), position + window + 1)
            parts = []
            for index in range(start, stop):
                token = cleaned[index]
                if token.special and index != position:
                    continue
                text = f'{mark[0]}{token.text}{mark[1]}' if index == position else token.text
                parts.append((' ' if token.new_word and parts else '') + text)
            before = any(not token.special for token in cleaned[:start])
            after = any(not token.special for token in cleaned[stop:])
            snippets.append(('… ' if before else '') + ''.join(parts) + (' …' if after else ''))
        return list(zip(snippets, self.references(layer, unit, mode)))

    def image_crops(self, model, dataset, layer, unit, composite, size=8, mode='relevance', target=None):
        '''For an image unit: the conditional relevance (through ``unit``) of each reference sample and the crop box
        around its maximum (:py:func:`crop_box`); returns a list of ``(box, conditional map, Reference)`` with ``box =
        (top, left, height, width)``.'''
        from .concepts import conditional_relevance
        references = self.references(layer, unit, mode)
        if not references:
            return []
        _, inputs, _, _ = ImageInputs().prepare(model, [dataset[reference.sample] for reference in references])
        spec = self.specs[layer]
        result = conditional_relevance(model, inputs, target, composite, layer, [unit], dim=spec.dim,
                                       num_heads=spec.num_heads, bypass='ignore')
        maps = result.relevance[0]
        return [(crop_box(relevance, size), relevance, reference) for relevance, reference in zip(maps, references)]


def crop_box(relevance, size):
    '''The ``size`` × ``size`` box (clamped into the image) whose summed relevance (over channels) is largest:
    ``(top, left, height, width)``; ties: the first in row-major order.'''
    heat = relevance.reshape(-1, *relevance.shape[-2:]).sum(0)[None, None].double()
    height, width = heat.shape[-2:]
    size_h, size_w = min(size, height), min(size, width)
    sums = torch.nn.functional.avg_pool2d(heat, (size_h, size_w), stride=1)[0, 0]
    index = int(sums.reshape(-1).argmax())
    top, left = divmod(index, sums.shape[1])
    return top, left, size_h, size_w


# ------------------------------------------------------------------------------------------------------ collect
def _scores(activation, relevance, spec, valid, offset):
    '''Per sample and unit: the max over positions of activation and relevance and their positions, ``(units,
    batch)`` each.'''
    act, shape = canonical(activation.detach(), spec)
    rel, _ = canonical(relevance.detach(), spec)
    act = act[..., 0] if act.shape[-1] == 1 else act.double().norm(dim=-1)
    rel = rel.double().sum(-1)
    act = act.double()
    if valid is not None:
        if act.shape[1] != valid.shape[1]:
            raise ValueError(f'the layer output has {act.shape[1]} positions (shape {shape}) but the text has '
                             f'{valid.shape[1]} tokens; choose units whose positions are the tokens.')
        act = act.masked_fill(~valid[..., None], -math.inf)
        rel = rel.masked_fill(~valid[..., None], -math.inf)
    if not (torch.isfinite(act) | (act == -math.inf)).all() or not (torch.isfinite(rel) | (rel == -math.inf)).all():
        raise ValueError('collect_references: non-finite activations or relevance (NaN/inf); use float32 or float64.')
    out = {}
    for mode, values in zip(MODES, (act, rel)):
        best, where = values.max(1)  # (batch, units); the first maximal position
        if offset is not None:
            where = where - offset[:, None]
        out[mode] = (best.T, where.T)
    return out, shape


def collect_references(model, dataset, units, k=8, composite=None, inputs=None, target=None, batch_size=16,
                       state_path=None, save_every=10, resume=False, max_batches=None, progress=True):
    '''Stream ``dataset`` through ``model`` once and keep the top-``k`` contexts of every unit by activation and by
    relevance.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model; layer names are relative to it.
    dataset: sequence
        Indexable items (``len``, ``[index]``): image tensors (or ``(tensor, label)`` tuples) or, with
        :py:class:`TextInputs`, strings.
    units: dict[str, None | sequence of int | Neurons | Heads]
        Per layer (a module name or an operation site, see :py:mod:`zennit_attn.latent`) the units: None for every
        neuron of the last dimension, a list of neuron indices, or a :py:class:`Neurons` / :py:class:`Heads`.
    k: int
        References per unit and mode.
    composite: :py:obj:`zennit.core.Composite`, optional
        The rules of the attribution (None: the plain gradient, i.e. relevance is gradient-based only).
    inputs: :py:class:`ImageInputs` or :py:class:`TextInputs`, optional
        How items become model inputs; default :py:class:`ImageInputs`.
    target: int or callable, optional
        The explained class (None: each sample's prediction), or a callable ``output -> seed``.
    batch_size: int
        Samples per batch.
    state_path: str or path, optional
        File to save the state to every ``save_every`` batches and at the end.
    resume: bool
        Continue from ``state_path`` if it exists (same configuration required); the result equals an uninterrupted
        run.
    max_batches: int, optional
        Process at most this many batches in this call (continue later with ``resume=True``).
    progress: bool
        Show a tqdm progress bar.

    Returns
    -------
    :py:class:`ReferenceSamples`
    '''
    if not isinstance(units, dict) or not units:
        raise TypeError('collect_references: units must be a non-empty dict {layer name: None | indices | Neurons | '
                        'Heads}.')
    if k < 1 or batch_size < 1:
        raise ValueError(f'collect_references: k and batch_size must be at least 1, got k={k}, '
                         f'batch_size={batch_size}.')
    if resume and state_path is None:
        raise ValueError('collect_references: resume=True needs a state_path.')
    inputs = inputs or ImageInputs()
    specs = {name: _spec(value) for name, value in units.items()}
    result = ReferenceSamples(specs, k, batch_size, len(dataset), inputs.kind)
    if resume and Path(state_path).is_file():
        result.load_state_dict(torch.load(state_path, weights_only=False), state_path)
    total = math.ceil(len(dataset) / batch_size)
    todo = range(result.batches, total if max_batches is None else min(total, result.batches + max_batches))
    from tqdm.auto import tqdm
    for number in tqdm(todo, desc='reference samples', disable=not progress, initial=result.batches, total=total):
        start = number * batch_size
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        _process(model, result, items, start, inputs, composite, target)
        result.batches = number + 1
        if state_path is not None and (result.batches % save_every == 0 or result.batches == total):
            result.save(state_path)
    if state_path is not None and len(todo):
        result.save(state_path)
    return result


def _process(model, result, items, start, inputs, composite, target):
    '''Attribute one batch and merge its scores into ``result``.'''
    root, tensor, valid, extra = inputs.prepare(model, items)
    seen = {}

    def output(name, value):
        if name not in result.specs or not value.requires_grad:
            return
        if name in seen:
            raise ValueError(f'collect_references: {name!r} was called twice in one forward; choose a layer that runs '
                             'once.')
        seen[name] = {'activation': value.detach()}
        value.register_hook(lambda grad: seen[name].update(relevance=grad.detach()))

    with watch_outputs(model, list(result.specs), output):
        with Gradient(root, composite) as attributor:
            attributor(tensor.detach(), _seed(target, extra))
    missing = [name for name in result.specs if 'relevance' not in seen.get(name, {})]
    if missing:
        raise ValueError(f'collect_references: no output (or no relevance) at {missing}; give module names or '
                         'operation sites of the model on the relevance path.')
    samples = torch.arange(start, start + len(items))
    for name, spec in result.specs.items():
        scores, shape = _scores(seen[name]['activation'], seen[name]['relevance'], spec, valid, extra.get('offset'))
        count = scores['activation'][0].shape[0]
        indices = list(range(count)) if spec.indices is None else spec.indices
        if any(not 0 <= index < count for index in indices):
            raise IndexError(f'collect_references: unit indices {spec.indices} out of range for {name!r} with {count} '
                             'units.')
        if name not in result.top:
            result.units[name] = indices
            result.top[name] = {mode: _empty(len(indices), result.k) for mode in MODES}
            result.position_shapes[name] = shape
        rows = torch.tensor(indices)
        for mode in MODES:
            values, where = scores[mode]
            values, where = values[rows], where[rows]
            # a sample without a valid position (e.g. only special tokens) is no candidate
            candidates = torch.where(values == -math.inf, -1, samples.expand(len(rows), -1))
            result.top[name][mode] = merge_top_k(*result.top[name][mode], values, candidates, where, result.k)
