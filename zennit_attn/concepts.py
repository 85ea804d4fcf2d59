'''Concept-conditional heatmaps (CRP-style): the input relevance that flows through chosen units of a layer.

Under a composite, the relevance that reaches the input is a *linear* function of the relevance at any layer's output
(every rule is a modified gradient of a fixed forward pass). Masking the relevance at the output of a layer to some
units (a forward hook registers a tensor hook that zeroes the other units' gradient) therefore yields the part of the
input relevance that passes through those units: the *conditional* heatmap of Concept Relevance Propagation (Achtibat
et al., 2023). :py:func:`conditional_relevance` computes the maps of many units in one call, as one batch of copies of
the inputs (one copy per unit).

Which layers qualify
--------------------
The conditional maps of all units of a layer sum to the unconditional map only if **every path from the output to the
input passes through that layer**. In a transformer this holds for the residual stream: the output of a whole block
(``encoder.layers.encoder_layer_1`` of a torchvision ViT, ``encoder.encoder.layer.3`` of a Hugging Face BERT,
``model.layers.5`` of a Llama/Gemma decoder), or the patch embedding. It does **not** hold inside a block: the
relevance of an MLP neuron (``...mlp.1``, ``...intermediate``) or of an attention head leaves the residual connection
aside. For such layers the relevance that bypasses the layer (computed with every unit masked) is subtracted from each
map, so every map is the relevance through its units only, and they sum to the full map minus the bypass
(``result.bypass``); ``bypass='warn'`` (default) says so once, ``'raise'`` refuses, ``'ignore'`` stays silent.

Example
-------
>>> result = conditional_relevance(model, images, target, AttnLRPViT(), 'encoder.layers.encoder_layer_2', [3, 17])
>>> result.relevance.shape  # (units, batch, 3, H, W)
'''
import contextlib
import warnings
from collections import namedtuple

import torch
from zennit.attribution import Gradient

from .attribution import EmbeddingsForward, _position_ids, logits_of
from .latent import watch_outputs


__all__ = ['conditional_relevance', 'conditional_token_relevance', 'ConditionalRelevance', 'BypassWarning',
           'layer_width']


ConditionalRelevance = namedtuple('ConditionalRelevance', ['relevance', 'full', 'bypass', 'units'])
ConditionalRelevance.__doc__ = '''Result of :py:func:`conditional_relevance`.

Attributes
----------
relevance: :py:obj:`torch.Tensor`
    The conditional maps, ``(len(units), batch, *input shape)``: the input relevance through each unit (or set).
full: :py:obj:`torch.Tensor`
    The unconditional map, ``(batch, *input shape)``.
bypass: :py:obj:`torch.Tensor`
    The input relevance that does not pass through the layer (zero for a layer every path passes), ``(batch, *input
    shape)``; ``relevance.sum(0) + bypass == full`` when the units cover the layer.
units: list[list[int]]
    The unit indices of every map.
'''


class BypassWarning(UserWarning):
    '''Part of the relevance reaches the input without passing through the conditioned layer (e.g. by a residual
    connection): the conditional maps do not sum to the full map.'''


BYPASS_CHOICES = ('warn', 'raise', 'ignore')
# relative size of the bypass (|bypass| / |full|, summed) below which a layer counts as passed by every path
BYPASS_TOLERANCE = 1e-9


def _unit_sets(units):
    '''``units`` as a list of index lists: an int is one unit, a sequence of ints a set summed into one map.'''
    if isinstance(units, int) or (isinstance(units, torch.Tensor) and units.ndim == 0):
        units = [units]
    sets = []
    for unit in units:
        indices = [int(unit)] if isinstance(unit, int) or (isinstance(unit, torch.Tensor) and unit.ndim == 0) else [
            int(index) for index in unit
        ]
        if not indices:
            raise ValueError('conditional_relevance: an empty unit set; give at least one unit index per map.')
        sets.append(indices)
    if not sets:
        raise ValueError('conditional_relevance: no units given.')
    return sets


def _unit_count(tensor, dim, num_heads):
    size = tensor.shape[dim]
    if num_heads is None:
        return size
    if size % num_heads:
        raise ValueError(f'conditional_relevance: the unit dimension {dim} has size {size}, which is not divisible by '
                         f'num_heads={num_heads}.')
    return num_heads


def _mask(sets, count, batch, tensor, dim, num_heads):
    '''The gradient mask of the copies: ``(len(sets) * batch, 1, .., width, .., 1)`` with ``width`` at ``dim``.'''
    width = tensor.shape[dim]
    per_unit = width // count
    mask = torch.zeros(len(sets), width, dtype=tensor.dtype, device=tensor.device)
    for row, indices in enumerate(sets):
        for index in indices:
            mask[row, index * per_unit:(index + 1) * per_unit] = 1.
    mask = mask.repeat_interleave(batch, 0)
    shape = [1] * tensor.ndim
    shape[0], shape[dim] = mask.shape[0], width
    return mask.reshape(shape)


def layer_width(model, inputs, layer, dim=-1, num_heads=None, root=None, composite=None):
    '''The number of units of ``layer`` of ``model`` (size of its output along ``dim``, or ``num_heads``), from one
    forward pass of ``root`` (default: ``model``; e.g. a wrapper that calls ``model``) on ``inputs``, under
    ``composite`` if given (operation sites exist only under a composite).'''
    shapes = {}
    root = root or model
    context = composite.context(root) if composite is not None else contextlib.nullcontext()
    with watch_outputs(model, [layer], lambda name, tensor: shapes.setdefault(name, tensor.shape)), context:
        # with gradients: the engine attributes (and names) only operations on the relevance path
        with torch.enable_grad():
            root(inputs.detach().requires_grad_())
    if layer not in shapes:
        raise ValueError(_unmatched(model, layer))
    return num_heads or shapes[layer][dim]


def _unmatched(model, layer):
    names = [name for name, _ in model.named_modules() if name][:8]
    return (f'conditional_relevance: the layer {layer!r} produced no output in the forward pass; give the qualified '
            f'name of a module (e.g. {", ".join(names)}, ...) or an operation site of the engine (\'<module>.<op>\').')


def _class_seed(target):
    '''A seed function ``output -> output * onehot(target)`` for ``(batch, classes)`` logits, target per copy.'''
    def seed(output):
        if output.ndim != 2:
            raise ValueError(f'conditional_relevance: class targets need (batch, classes) logits, got shape '
                             f'{tuple(output.shape)}; pass target as a callable output -> seed for other outputs.')
        onehot = torch.zeros_like(output)
        onehot[torch.arange(len(output)), target.to(output.device)] = 1.
        return output * onehot
    return seed


def _targets(target, output, batch):
    '''Class indices per sample: the argmax for None, an int for all, or one per sample.'''
    if target is None:
        return output.argmax(-1)
    target = torch.as_tensor(target).reshape(-1)
    if target.numel() == 1:
        target = target.expand(batch)
    if target.numel() != batch:
        raise ValueError(f'conditional_relevance: target has {target.numel()} entries for a batch of {batch}.')
    return target.long()


def _run(root, named, inputs, seed, layer, sets, dim, num_heads, composite, batch_size):
    '''Relevance of every copy of ``inputs`` (one per unit set in ``sets``), masked at ``layer``: ``(len(sets), batch,
    ...)``.'''
    batch = inputs.shape[0]
    per_pass = max(1, batch_size // batch) if batch_size else len(sets)
    results = []
    for start in range(0, len(sets), per_pass):
        chunk = sets[start:start + per_pass]
        state = {'seen': False}

        def output(name, tensor, chunk=chunk, state=state):
            if name != layer:
                return
            state['seen'] = True
            count = _unit_count(tensor, dim, num_heads)
            bad = sorted({index for indices in chunk for index in indices if not 0 <= index < count})
            if bad:
                raise IndexError(f'conditional_relevance: unit(s) {bad[:5]} out of range: {layer!r} has {count} '
                                 f'units along dim {dim}' + (' (heads)' if num_heads else '') + '.')
            if tensor.shape[0] != len(chunk) * batch:
                raise ValueError(f'conditional_relevance: the output of {layer!r} has batch size {tensor.shape[0]}, '
                                 f'expected {len(chunk) * batch}: the units need the batch as the first dimension.')
            if tensor.requires_grad:
                mask = _mask(chunk, count, batch, tensor, dim, num_heads)
                tensor.register_hook(lambda grad: grad * mask)

        copies = inputs.repeat(len(chunk), *([1] * (inputs.ndim - 1)))
        with watch_outputs(named, [layer], output):
            with Gradient(root, composite) as attributor:
                _, relevance = attributor(copies, seed(len(chunk)))
        if not state['seen']:
            raise ValueError(_unmatched(named, layer))
        results.append(relevance.detach().reshape(len(chunk), batch, *relevance.shape[1:]))
    return torch.cat(results, 0)


def _copy_sets(units, width):
    '''The unit sets of the copies: every unit masked (the bypass), none masked (the full map), then the maps.'''
    sets = [[index] for index in range(width)] if units is None else _unit_sets(units)
    return [[], list(range(width))] + sets


def conditional_relevance(model, inputs, target, composite, layer, units=None, dim=-1, num_heads=None,
                          batch_size=64, bypass='warn'):
    '''Input relevance through chosen units of ``layer`` (concept-conditional heatmaps), all units in one call.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model taking one input tensor (e.g. an image classifier); for text see
        :py:func:`conditional_token_relevance`.
    inputs: :py:obj:`torch.Tensor`
        The inputs, ``(batch, ...)``.
    target: int, :py:obj:`torch.Tensor`, callable or None
        The explained class (one for all or one per sample; None: the prediction) of ``(batch, classes)`` logits, or a
        callable ``output -> seed`` (the gradient seeded at the output, e.g. ``lambda y: y * onehot``) that is called
        on the output of the *repeated* batch (``copies * batch`` rows, copy-major) and must not assume its size.
    composite: :py:obj:`zennit.core.Composite` or None
        The rules (e.g. :py:class:`~zennit_attn.AttnLRPViT`); None for the plain gradient.
    layer: str
        Qualified name of a module of ``model`` or an operation site (see :py:mod:`zennit_attn.latent`), whose output
        (first tensor of a tuple) has the batch first.
    units: int, sequence of int or of sequences of int, optional
        The units, one map each; a sequence of indices is one set, one map. None: every unit, one map each.
    dim: int, optional
        The unit dimension of the layer's output (``-1``: neurons/channels last; ``1`` for ``(batch, heads, tokens,
        head_dim)`` attention contexts or ``(batch, channels, H, W)`` maps).
    num_heads: int, optional
        Treat ``dim`` as ``num_heads`` equal blocks (heads merged as ``heads * head_dim``): units are heads.
    batch_size: int, optional
        Samples per backward pass (copies of the inputs, one per map; at least one copy per pass).
    bypass: str, optional
        What to do if part of the relevance does not pass through ``layer`` (see the module doc): ``'warn'``,
        ``'raise'`` or ``'ignore'``; the maps are always the relevance through the units only.

    Returns
    -------
    :py:class:`ConditionalRelevance`
    '''
    if bypass not in BYPASS_CHOICES:
        raise ValueError(f'conditional_relevance: bypass must be one of {BYPASS_CHOICES}, got {bypass!r}.')
    inputs = inputs.detach()
    width = layer_width(model, inputs, layer, dim, num_heads, composite=composite)
    if callable(target):
        def seed(copies):
            return target
    else:
        # the model's own prediction is needed only when no target is given
        output = None
        if target is None:
            with torch.no_grad():
                output = logits_of(model(inputs))
        classes = _targets(target, output, len(inputs))

        def seed(copies):
            return _class_seed(classes.repeat(copies))
    sets = _copy_sets(units, width)
    relevance = _run(model, model, inputs, seed, layer, sets, dim, num_heads, composite, batch_size)
    return _split(relevance, layer, bypass, sets[2:])


def conditional_token_relevance(model, composite, input_ids, layer, units=None, attention_mask=None, target=None,
                                dim=-1, num_heads=None, batch_size=64, bypass='warn', token_type_ids=None):
    '''Token relevance through chosen units of ``layer`` of a text model (see :py:func:`conditional_relevance`).

    The model runs on its input embeddings (as :py:func:`zennit_attn.token_relevance`); a classifier's class
    ``target`` (None: the prediction) is explained, or for a language model (logits ``(batch, tokens, vocabulary)``)
    the token ``target`` (None: the argmax) at the last non-padding position.

    Returns
    -------
    :py:class:`ConditionalRelevance`
        With ``relevance`` per token, ``(len(units), batch, tokens)`` (summed over the embedding), and likewise
        ``full`` and ``bypass``.
    '''
    if bypass not in BYPASS_CHOICES:
        raise ValueError(f'conditional_relevance: bypass must be one of {BYPASS_CHOICES}, got {bypass!r}.')
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        logits = logits_of(model(input_ids=input_ids, attention_mask=attention_mask,
                                 **({} if token_type_ids is None else {'token_type_ids': token_type_ids})))
    batch = len(input_ids)
    rows = torch.arange(batch)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1) if logits.ndim == 3 else None
    selected = logits if last is None else logits[rows, last]
    classes = _targets(target, selected, batch)

    def seed(copies):
        def weights(output):
            weight = torch.zeros_like(output)
            index = torch.arange(len(output))
            if output.ndim == 3:
                weight[index, last.repeat(copies), classes.repeat(copies)] = 1.
            else:
                weight[index, classes.repeat(copies)] = 1.
            return output * weight
        return weights

    positions = _position_ids(model, input_ids)  # RoBERTa-style positions, which inputs_embeds would not give

    def wrapper(copies):
        kwargs = dict(attention_mask=attention_mask.repeat(copies, 1))
        for name, value in (('token_type_ids', token_type_ids), ('position_ids', positions)):
            if value is not None:
                kwargs[name] = value.repeat(copies, 1)
        return EmbeddingsForward(model, **kwargs)

    width = layer_width(model, embeds, layer, dim, num_heads, root=wrapper(1), composite=composite)
    # the wrapper's batch changes with the number of copies per pass: run the passes with a wrapper each
    sets = _copy_sets(units, width)
    per_pass = max(1, batch_size // batch) if batch_size else len(sets)
    pieces = []
    for start in range(0, len(sets), per_pass):
        chunk = sets[start:start + per_pass]
        pieces.append(_run(wrapper(len(chunk)), model, embeds, seed, layer, chunk, dim, num_heads, composite, None))
    return _split(torch.cat(pieces, 0).sum(-1), layer, bypass, sets[2:])


def _split(relevance, layer, bypass, sets):
    '''A :py:class:`ConditionalRelevance` from the relevance of the copies [bypass, full, *sets].'''
    passing, full, maps = relevance[0], relevance[1], relevance[2:]
    share = (passing.abs().sum() / full.abs().sum().clamp_min(torch.finfo(full.dtype).tiny)).item()
    if share > BYPASS_TOLERANCE:
        message = (f'{share:.1%} of the input relevance (|bypass| / |full|) does not pass through {layer!r} (e.g. a '
                   'residual connection): the conditional maps are the relevance through the units only and do not '
                   'sum to the full map. Condition on the residual stream (a whole block\'s output) for maps that '
                   'do; see zennit_attn.concepts.')
        if bypass == 'raise':
            raise ValueError(f'conditional_relevance: {message}')
        if bypass == 'warn':
            warnings.warn(message, BypassWarning, stacklevel=3)
    return ConditionalRelevance(maps - passing, full, passing, sets)
