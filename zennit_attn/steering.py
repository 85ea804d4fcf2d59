'''Steering: scale or set chosen units (neurons, channels, heads) of a module during a forward or ``generate()``, and
measure what it does to a target's probability.

:py:func:`steer` attaches removable forward hooks that edit the output (or the input) of named modules; it works for a
plain forward, for ``model.generate()`` and with the key/value cache (the hook runs at every forward, so every generated
step is edited, and the cached keys/values of earlier steps were computed from edited activations). After removal,
nothing of the model is changed: no parameter or buffer is touched, only hooks are added and removed.

:py:func:`relevant_units` ranks the units of a module by their relevance for a target (the relevance at the module's
output, recorded with :py:func:`zennit_attn.latent.record_relevance` during an AttnLRP attribution), and
:py:func:`steering_effect` measures how much amplifying chosen units raises the target's probability compared with
amplifying as many random units of the same module.

How units are addressed
-----------------------
A unit is an index along the **last dimension** of the edited tensor (the module's output, or its first positional
input with ``on='input'``), at every position (token, patch) and sample. With ``num_heads=H`` the last dimension is
read as ``(H, head_dim)`` and a unit is a whole **head**. Heads are addressed at the merged per-head context that
enters the attention output projection: the **input** of ``o_proj`` / ``out_proj`` / ``dense`` (Llama, Gemma, GPT-NeoX,
CLIP ...: ``'model.layers.3.self_attn.o_proj'`` with ``on='input'``), or the output of BERT's
``attention.self`` module, whose first output already is that context. Heads are contiguous blocks of ``head_dim``
features there (head ``h`` is features ``h * head_dim ... (h + 1) * head_dim - 1``) in all of these models.

Example
-------
>>> layer = 'model.layers.6.mlp'
>>> units = relevant_units(model, inputs, target=paris, module=layer, k=20).indices
>>> with steer(model, {layer: UnitEdit(units, scale=4.)}):
...     generated = model.generate(**inputs, max_new_tokens=5)
>>> print(steering_effect(model, inputs, paris, layer, units, scale=4., trials=10))
'''
import difflib
import functools
import math
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .attribution import _accepts, _declares, last_positions, logits_of, per_sample, token_relevance
from .latent import _first_tensor, per_head, per_neuron, record_relevance, top_k


__all__ = [
    'UnitEdit', 'steer', 'SteeringHandle', 'relevant_units', 'RelevantUnits', 'steering_effect', 'SteeringEffect',
    'target_probability',
]


RelevantUnits = namedtuple('RelevantUnits', ['indices', 'values', 'relevance'])
RelevantUnits.__doc__ = '''The top units: ``indices`` and their ``values`` (largest first), and the ``relevance`` of
every unit of the module (shape ``(units,)``).'''


def _units_tensor(units, what='units'):
    '''``units`` as a 1-d long tensor of distinct non-negative indices, or a clear error.'''
    if isinstance(units, int):
        units = [units]
    try:
        tensor = torch.as_tensor(units)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f'{what} must be an int or a sequence/tensor of ints, got {type(units).__name__}') from error
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f'{what} must be integer indices, got dtype {tensor.dtype}')
    tensor = tensor.reshape(-1).long().cpu()
    if tensor.numel() == 0:
        raise ValueError(f'{what} is empty: choose at least one unit')
    if bool((tensor < 0).any()):
        raise ValueError(f'{what} must be non-negative indices, got {tensor[tensor < 0].tolist()}')
    if tensor.unique().numel() != tensor.numel():
        raise ValueError(f'{what} contains duplicates: {tensor.tolist()}')
    return tensor


class UnitEdit:
    '''An edit of chosen units of a tensor: multiply them by ``scale`` or set them to ``value``.

    Parameters
    ----------
    units: int, sequence of int or :py:obj:`torch.Tensor`
        Indices along the last dimension of the edited tensor (or head indices, with ``num_heads``); distinct.
    scale: float or sequence/tensor, optional
        Multiply the chosen units by this factor (one for all, or one per unit). ``scale=1`` is an exact no-op.
    value: float or sequence/tensor, optional
        Set the chosen units to this value (one for all, or one per unit; for heads also ``(units, head_dim)``).
        Exactly one of ``scale`` and ``value`` must be given.
    num_heads: int, optional
        Read the last dimension as ``(num_heads, head_dim)``: ``units`` are then heads (see the module docstring for
        where heads are addressed).
    on: str, optional
        ``'output'`` (default): edit the module's output (the first tensor of a tuple output); ``'input'``: edit the
        module's first positional input (e.g. the merged heads entering an attention output projection, or the
        neurons entering an MLP's down projection).
    '''
    def __init__(self, units, scale=None, value=None, num_heads=None, on='output'):
        if (scale is None) == (value is None):
            raise ValueError('UnitEdit: give exactly one of scale= (multiply the units) and value= (set the units)')
        if on not in ('output', 'input'):
            raise ValueError(f"UnitEdit: on must be 'output' or 'input', got {on!r}")
        if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f'UnitEdit: num_heads must be a positive int, got {num_heads!r}')
        self.units = _units_tensor(units, 'UnitEdit units')
        self.scale = None if scale is None else self._amount(scale, 'scale')
        self.value = None if value is None else self._amount(value, 'value')
        self.num_heads = num_heads
        self.on = on

    def _amount(self, amount, name):
        try:
            tensor = torch.as_tensor(amount, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f'UnitEdit: {name} must be a number or a sequence/tensor of numbers') from error
        if tensor.ndim > 0 and tensor.shape[0] != self.units.numel() and tensor.numel() != 1:
            raise ValueError(
                f'UnitEdit: {name} has {tensor.shape[0]} entries along its first dimension but {self.units.numel()} '
                'units are edited; give one number for all or one per unit.'
            )
        return tensor

    def __repr__(self):
        amount = f'scale={self.scale.tolist()}' if self.scale is not None else f'value={self.value.tolist()}'
        heads = f', num_heads={self.num_heads}' if self.num_heads is not None else ''
        return f'UnitEdit(units={self.units.tolist()}, {amount}{heads}, on={self.on!r})'

    def width(self, tensor):
        '''The number of addressable units of ``tensor`` (features of the last dimension, or heads).'''
        return tensor.shape[-1] if self.num_heads is None else self.num_heads

    def apply(self, tensor, name='tensor'):
        '''Return a copy of ``tensor`` with the edit applied (``tensor`` itself is not modified).

        Parameters
        ----------
        tensor: :py:obj:`torch.Tensor`
            The module's output (or input), ``(..., features)``.
        name: str, optional
            The edited module's name, for error messages.

        Returns
        -------
        :py:obj:`torch.Tensor`
        '''
        if not isinstance(tensor, torch.Tensor) or tensor.ndim == 0:
            raise TypeError(f'steer: the {self.on} of {name!r} is not a tensor with a unit dimension; cannot edit it')
        features = tensor.shape[-1]
        if self.num_heads is not None and features % self.num_heads:
            raise ValueError(
                f'steer: the {self.on} of {name!r} has {features} features, not divisible by num_heads='
                f'{self.num_heads}; pass the right number of heads, or address heads where they are merged (e.g. the '
                "input of the attention output projection, on='input')."
            )
        count = self.width(tensor)
        if int(self.units.max()) >= count:
            kind = 'heads' if self.num_heads is not None else f'features in its last dimension {tuple(tensor.shape)}'
            raise IndexError(
                f'steer: unit(s) {self.units[self.units >= count].tolist()} out of range: the {self.on} of {name!r} '
                f'has {count} {kind}.'
            )
        # a contiguous copy, so that heads can be addressed through a view and the caller's tensor stays untouched
        edited = tensor.clone(memory_format=torch.contiguous_format)
        units = self.units.to(tensor.device)
        if self.num_heads is None:
            selected = edited[..., units]
        else:
            edited_heads = edited.view(*edited.shape[:-1], self.num_heads, features // self.num_heads)
            selected = edited_heads[..., units, :]
        amount = self.scale if self.scale is not None else self.value
        amount = amount.to(device=tensor.device, dtype=tensor.dtype)
        if self.num_heads is not None and amount.ndim == 1:
            amount = amount[:, None]  # one number per head, broadcast over head_dim
        new = selected * amount if self.scale is not None else amount.expand_as(selected)
        if self.num_heads is None:
            edited[..., units] = new
        else:
            edited_heads[..., units, :] = new
        return edited


class SteeringHandle:
    '''The hooks of :py:func:`steer`: :py:meth:`remove` them, or use the handle as a context manager (they are removed
    on leaving it, also after an exception).'''
    def __init__(self, handles, edits):
        self._handles = list(handles)
        self.edits = edits

    @property
    def active(self):
        '''Whether the hooks are still attached.'''
        return bool(self._handles)

    def remove(self):
        '''Remove all hooks (idempotent).'''
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()
        return False

    def __repr__(self):
        state = 'active' if self.active else 'removed'
        return f'{type(self).__name__}({state}, {self.edits!r})'


def _first_tensor_index(output):
    '''Index of the first tensor in a tuple/list output, or None.'''
    return next((index for index, item in enumerate(output) if isinstance(item, torch.Tensor)), None)


def _output_hook(name, edits):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            for edit in edits:
                output = edit.apply(output, name)
            return output
        if isinstance(output, (tuple, list)):
            index = _first_tensor_index(output)
            if index is not None:
                tensor = output[index]
                for edit in edits:
                    tensor = edit.apply(tensor, name)
                items = list(output)
                items[index] = tensor
                return type(output)(items)
        raise TypeError(
            f'steer: the output of {name!r} is a {type(output).__name__}, not a tensor or a tuple with a tensor; '
            "edit one of its submodules instead, or its input with on='input'."
        )
    return hook


def _input_hook(name, edits):
    def hook(module, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(
                f"steer: {name!r} was called without a positional tensor input; on='input' edits the first positional "
                'argument. Edit the output of the module that produces it instead.'
            )
        tensor = args[0]
        for edit in edits:
            tensor = edit.apply(tensor, name)
        return (tensor,) + tuple(args[1:])
    return hook


def _named_module(model, name, caller):
    '''The submodule ``name`` of ``model`` (``''`` is the model), or an error suggesting close names.'''
    modules = dict(model.named_modules())
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.6)
        hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
        raise KeyError(f'{caller}: {type(model).__name__} has no submodule {name!r} (see model.named_modules()).{hint}')
    return modules[name]


def steer(model, edits):
    '''Edit chosen units of named modules of ``model`` in every forward, until the returned handle is removed.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (the names are relative to it).
    edits: dict
        ``{qualified module name: UnitEdit or list of UnitEdit}``; several edits of one module apply in order.

    Returns
    -------
    :py:class:`SteeringHandle`
        Removable; also a context manager: ``with steer(model, {...}): model.generate(...)``.
    '''
    if not isinstance(edits, Mapping):
        raise TypeError(f'steer: edits must be a dict {{module name: UnitEdit}}, got {type(edits).__name__}')
    if not edits:
        raise ValueError('steer: no edits given')
    plan = []
    for name, module_edits in edits.items():  # check everything before a single hook is attached
        module = _named_module(model, name, 'steer')
        if isinstance(module_edits, UnitEdit):
            module_edits = [module_edits]
        elif isinstance(module_edits, (list, tuple)):
            module_edits = list(module_edits)
        if not isinstance(module_edits, list) or not module_edits or not all(
            isinstance(edit, UnitEdit) for edit in module_edits
        ):
            raise TypeError(f'steer: the edits of {name!r} must be a UnitEdit or a non-empty list of UnitEdit')
        plan.append((name, module, module_edits))
    handles = []
    for name, module, module_edits in plan:
        outputs = [edit for edit in module_edits if edit.on == 'output']
        inputs = [edit for edit in module_edits if edit.on == 'input']
        if inputs:
            handles.append(module.register_forward_pre_hook(_input_hook(name, inputs)))
        if outputs:
            handles.append(module.register_forward_hook(_output_hook(name, outputs)))
    return SteeringHandle(handles, {name: module_edits for name, _, module_edits in plan})


# ------------------------------------------------------------------------------------------------ measurement
def _keyword_inputs(model, inputs):
    '''A tokenizer's output without ``token_type_ids`` if the model does not take them (BERT tokenizers always return
    them; all zeros for one segment).'''
    inputs = dict(inputs)
    if 'token_type_ids' in inputs and not _accepts(model, 'token_type_ids'):
        del inputs['token_type_ids']
    return inputs


def _call(model, inputs):
    '''``model(**inputs)`` for a dict / BatchEncoding, else ``model(inputs)``.'''
    return model(**_keyword_inputs(model, inputs)) if isinstance(inputs, Mapping) else model(inputs)


def _batch_of(inputs):
    tensor = inputs['input_ids'] if isinstance(inputs, Mapping) and 'input_ids' in inputs else inputs
    if isinstance(inputs, Mapping) and 'input_ids' not in inputs:
        tensor = next(value for value in inputs.values() if isinstance(value, torch.Tensor))
    return tensor.shape[0], tensor.device


def target_probability(model, inputs, target):
    '''The probability of ``target`` per sample: softmax over classes ``(batch, classes)``, or over the vocabulary at
    the last non-padding position for per-token logits ``(batch, tokens, vocabulary)``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
    inputs: dict or :py:obj:`torch.Tensor`
        Keyword arguments of the model (e.g. a tokenizer's output) or its single positional input.
    target: int, sequence or :py:obj:`torch.Tensor`
        The class or token id, per sample or for all.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(batch,)``, float64.
    '''
    mask = inputs.get('attention_mask') if isinstance(inputs, Mapping) else None
    # without right padding, a causal LM needs the last position's logits only (vocabulary-sized rows are big)
    last_only = (
        isinstance(inputs, Mapping) and 'logits_to_keep' not in inputs and _declares(model, 'logits_to_keep')
        and (mask is None or bool(mask[:, -1].all()))
    )
    with torch.no_grad():
        logits = logits_of(_call(model, dict(inputs, logits_to_keep=1) if last_only else inputs))
    batch = logits.shape[0]
    if logits.ndim == 3 and last_only:
        logits = logits[:, -1]
    elif logits.ndim == 3:
        positions = last_positions(mask, batch, logits.shape[1], logits.device)
        logits = logits[torch.arange(batch, device=logits.device), positions]
    elif logits.ndim != 2:
        raise ValueError(f'expected logits of shape (batch, classes) or (batch, tokens, vocabulary), got '
                         f'{tuple(logits.shape)}')
    target = per_sample(target, batch, 'target', logits.device)
    if bool(((target < 0) | (target >= logits.shape[-1])).any()):
        raise ValueError(f'target {target.tolist()} is not in [0, {logits.shape[-1]}) (the logits have '
                         f'{logits.shape[-1]} entries)')
    probabilities = logits.double().softmax(-1)
    return probabilities[torch.arange(batch, device=logits.device), target]


def _probe_width(model, name, edit):
    '''A temporary hook on ``name`` that records the unit count of the tensor ``edit`` would edit (in ``seen``).'''
    module = _named_module(model, name, 'steering_effect')
    seen = {}

    def record(tensor):
        if isinstance(tensor, torch.Tensor) and 'width' not in seen:
            seen['width'] = edit.width(tensor)

    if edit.on == 'output':
        handle = module.register_forward_hook(lambda mod, args, output: record(_first_tensor(output)))
    else:
        handle = module.register_forward_pre_hook(lambda mod, args: record(args[0] if args else None))
    return handle, seen


@dataclass
class SteeringEffect:
    '''The result of :py:func:`steering_effect`: mean target probabilities (over the batch) before steering, after
    amplifying the chosen units, and after amplifying random units (one value per random draw).'''
    module: str
    units: list
    scale: float
    target: list
    width: int
    before: float
    after: float
    random: list = field(default_factory=list)
    random_units: list = field(default_factory=list)
    seed: int = 0

    @property
    def k(self):
        '''Number of chosen units.'''
        return len(self.units)

    @property
    def random_mean(self):
        '''Mean probability over the random draws.'''
        return sum(self.random) / len(self.random) if self.random else math.nan

    @property
    def random_std(self):
        '''Sample standard deviation (n - 1) of the probability over the random draws.'''
        if len(self.random) < 2:
            return math.nan
        mean = self.random_mean
        return math.sqrt(sum((value - mean) ** 2 for value in self.random) / (len(self.random) - 1))

    @property
    def gain(self):
        '''Probability change from amplifying the chosen units.'''
        return self.after - self.before

    @property
    def random_gain(self):
        '''Mean probability change from amplifying random units.'''
        return self.random_mean - self.before

    def as_dict(self):
        '''JSON-ready summary (without the random unit sets).'''
        return dict(
            module=self.module, units=self.units, k=self.k, scale=self.scale, target=self.target, width=self.width,
            before=self.before, after=self.after, random=self.random, random_mean=self.random_mean,
            random_std=self.random_std, gain=self.gain, random_gain=self.random_gain, seed=self.seed,
        )

    def markdown(self, label=None):
        '''A one-row markdown table (with header).'''
        head = '| | p before | p top-k | p random-k (mean ± std) | k | scale |\n|---|---|---|---|---|---|\n'
        return head + self.markdown_row(label) + '\n'

    def markdown_row(self, label=None):
        '''One markdown table row (columns as in :py:meth:`markdown`).'''
        return (f'| {label or self.module} | {self.before:.4f} | {self.after:.4f} | {self.random_mean:.4f} ± '
                f'{self.random_std:.4f} ({len(self.random)} draws) | {self.k} | {self.scale:g} |')

    def __str__(self):
        return (f'{self.module}: p(target) {self.before:.4f} -> top-{self.k} x{self.scale:g}: {self.after:.4f} '
                f'({self.gain:+.4f}); random-{self.k}: {self.random_mean:.4f} ± {self.random_std:.4f} '
                f'({self.random_gain:+.4f}, {len(self.random)} draws)')


def steering_effect(model, inputs, target_token, module, units, scale, baseline='random', k=None, trials=10, seed=0,
                    num_heads=None, on='output'):
    '''Measure the change of the target's probability when the chosen units are multiplied by ``scale``, against
    multiplying ``k`` random units of the same module by ``scale``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A classifier (logits ``(batch, classes)``) or a language model (``(batch, tokens, vocabulary)``: the
        probability of the next token after the last non-padding position).
    inputs: dict or :py:obj:`torch.Tensor`
        Keyword arguments of the model (a tokenizer's output) or its positional input.
    target_token: int, sequence or :py:obj:`torch.Tensor`
        The class or token id, per sample or for all.
    module: str
        Qualified name of the edited module.
    units: sequence of int or :py:obj:`torch.Tensor`
        The chosen units (e.g. ``relevant_units(...).indices``).
    scale: float
        The amplification factor.
    baseline: str, optional
        ``'random'``: ``k`` units drawn uniformly without replacement from all units of the module, per trial.
    k: int, optional
        Size of the random sets; default ``len(units)``.
    trials: int, optional
        Number of random sets.
    seed: int, optional
        Seed of the random draws (a private generator; the global RNG is untouched).
    num_heads, on:
        As in :py:class:`UnitEdit`.

    Returns
    -------
    :py:class:`SteeringEffect`
        Printable (``str``), with :py:meth:`~SteeringEffect.markdown` and :py:meth:`~SteeringEffect.as_dict`.
    '''
    if baseline != 'random':
        raise ValueError(f"steering_effect: baseline must be 'random', got {baseline!r}")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f'steering_effect: trials must be a positive int, got {trials!r}')
    chosen = UnitEdit(units, scale=scale, num_heads=num_heads, on=on)
    k = chosen.units.numel() if k is None else k
    handle, seen = _probe_width(model, module, chosen)
    try:
        before = target_probability(model, inputs, target_token)
    finally:
        handle.remove()
    if 'width' not in seen:
        raise RuntimeError(f'steering_effect: {module!r} was not called in the forward of {type(model).__name__}')
    width = seen['width']
    if not isinstance(k, int) or not 1 <= k <= width:
        raise ValueError(f'steering_effect: k must be an int in [1, {width}] (the units of {module!r}), got {k!r}')
    with steer(model, {module: chosen}):
        after = target_probability(model, inputs, target_token)
    generator = torch.Generator().manual_seed(seed)
    random, random_units = [], []
    for _ in range(trials):
        drawn = torch.randperm(width, generator=generator)[:k]
        with steer(model, {module: UnitEdit(drawn, scale=scale, num_heads=num_heads, on=on)}):
            random.append(target_probability(model, inputs, target_token).mean().item())
        random_units.append(drawn.tolist())
    batch, device = _batch_of(inputs)
    return SteeringEffect(
        module=module, units=chosen.units.tolist(), scale=float(scale),
        target=per_sample(target_token, batch, 'target', device).tolist(), width=width,
        before=before.mean().item(), after=after.mean().item(), random=random, random_units=random_units, seed=seed,
    )


# ------------------------------------------------------------------------------------------------ relevance
def _composite(composite):
    return composite() if isinstance(composite, type) else composite


class _InputRelevance:
    '''Record the relevance at the first positional input of a module: a forward pre-hook placed *before* the
    composite's hooks attaches a gradient hook to the input tensor as it arrives, i.e. before the rule's identity
    wraps it. The gradient it receives sums what every consumer of that tensor returns, so it is the module's
    relevance only if the module is the tensor's sole consumer: other modules given the same tensor (q/k/v
    projections of one normalised hidden state, gate and up projections) are watched for and refused by
    :py:meth:`check_sole_consumer`. A functional consumer (a residual ``+`` of a norm's input) cannot be watched.'''
    def __init__(self, model, name):
        self.name, self.relevance, self.input, self.seen = name, None, None, []
        target = _named_module(model, name, 'relevant_units')
        self.handles = [target.register_forward_pre_hook(self._hook, prepend=True)]
        # modules that consume the input as a part of this one (its children) or through it (its ancestors) are not
        # further consumers
        self.handles += [
            module.register_forward_pre_hook(functools.partial(self._watch, other), with_kwargs=True)
            for other, module in model.named_modules()
            if other and other != name and not other.startswith(name + '.') and not name.startswith(other + '.')
        ]

    def _hook(self, module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            self.input = args[0]
            args[0].register_hook(self._add)

    def _watch(self, name, module, args, kwargs):
        # references, not ids (an id may be reused once a tensor is freed); only tensors that can carry relevance
        self.seen += [
            (name, tensor) for tensor in list(args) + list(kwargs.values())
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad
        ]

    def check_sole_consumer(self):
        '''Raise if another module was called with the recorded input tensor.'''
        shared = list(dict.fromkeys(name for name, tensor in self.seen if tensor is self.input))
        if shared:
            raise ValueError(
                f'relevant_units: the input of {self.name!r} is also the input of {", ".join(map(repr, shared[:3]))}; '
                "its gradient sums what all of them return, not the relevance of this module's units. Use on='input' "
                "with a module that is its input's only consumer (e.g. down_proj, o_proj), or on='output' with the "
                'module that produces the input.'
            )

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.seen = []

    def _add(self, grad):
        grad = grad.detach().clone()
        self.relevance = grad if self.relevance is None else self.relevance + grad


def relevant_units(model, inputs, target, module, k, composite=None, contrast=None, num_heads=None, absolute=False,
                   position=None, on='output'):
    '''The ``k`` units of ``module``'s output with the highest relevance for ``target`` (summed over the batch and
    all positions), from one attribution with ``composite``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A text model (see :py:func:`zennit_attn.token_relevance`) or a classifier of float inputs (images).
    inputs: dict, :py:obj:`torch.Tensor`
        Text: a tokenizer's output (``input_ids``, optional ``attention_mask``, ``token_type_ids``) or ``input_ids``;
        otherwise a float tensor (e.g. images), attributed with :py:func:`zennit_attn.methods.attribute`.
    target: int, sequence or :py:obj:`torch.Tensor`
        The class / token id, per sample or for all.
    module: str
        A module name or an operation site of :py:func:`~zennit_attn.latent.record_relevance` (its output's last
        dimension are the units).
    k: int
        Number of units.
    composite: :py:class:`zennit.core.Composite` or its class, optional
        Default :py:class:`zennit_attn.AttnLRP`.
    contrast: int, sequence or :py:obj:`torch.Tensor`, optional
        Text only: a class / token id whose logit is subtracted (e.g. the other class of a binary classifier).
    num_heads: int, optional
        Rank heads (:py:func:`~zennit_attn.latent.per_head` of a merged ``(batch, tokens, heads * head_dim)`` output).
    absolute: bool, optional
        Rank by absolute relevance.
    position: int, optional
        Language models: the explained position (default: the last non-padding one).
    on: str, optional
        ``'output'`` (default) or ``'input'``: rank the units of the module's first positional input (as
        :py:class:`UnitEdit` with ``on='input'``; e.g. the neurons entering an MLP's down projection, or the heads
        entering an attention output projection), from the relevance that the module's rule assigns to its input.
        The module must be its input's only consumer: an input shared with other modules (q/k/v or gate/up
        projections) is refused; one also added to a residual (a pre-norm's input) cannot be detected.

    Returns
    -------
    :py:class:`RelevantUnits`
        ``(indices, values, relevance)``.
    '''
    from .composites import AttnLRP
    from .methods import attribute
    if not isinstance(k, int) or k < 1:
        raise ValueError(f'relevant_units: k must be a positive int, got {k!r}')
    composite = _composite(AttnLRP if composite is None else composite)
    text = isinstance(inputs, Mapping) or (isinstance(inputs, torch.Tensor) and not inputs.is_floating_point())
    if not text and (contrast is not None or position is not None):
        raise ValueError('relevant_units: contrast and position apply to text inputs (token ids) only')
    if on not in ('output', 'input'):
        raise ValueError(f"relevant_units: on must be 'output' or 'input', got {on!r}")
    at_input = _InputRelevance(model, module) if on == 'input' else None
    try:
        with record_relevance(model, [module] if at_input is None else []) as recorded:
            if text:
                if isinstance(inputs, Mapping):
                    if 'input_ids' not in inputs:
                        raise ValueError('relevant_units: text inputs need input_ids (e.g. a tokenizer output)')
                    accepted = _keyword_inputs(model, inputs)
                    extra = {key: accepted.get(key) for key in ('attention_mask', 'token_type_ids')}
                    input_ids = inputs['input_ids']
                else:
                    extra, input_ids = {}, inputs
                token_relevance(
                    model, composite, input_ids, target=target, contrast=contrast, position=position, **extra,
                )
            else:
                attribute(model, inputs, target, composite)
            if at_input is not None:
                if at_input.relevance is None:
                    raise ValueError(f'relevant_units: no relevance reached the input of {module!r}; the target does '
                                     'not depend on it, or the module was not called with a positional tensor.')
                at_input.check_sole_consumer()
                relevance = at_input.relevance
            elif module not in recorded:
                raise ValueError(
                    f'relevant_units: no relevance reached {module!r} (matched: {recorded.matched or "nothing"}); '
                    "pass a module name of model.named_modules() or an operation site ('<module>.<op>') "
                    'that the target depends on.'
                )
            else:
                relevance = recorded[module]
    finally:
        if at_input is not None:
            at_input.remove()
    scores = per_neuron(relevance) if num_heads is None else per_head(relevance, num_heads)
    best = top_k(scores, k, absolute=absolute)
    return RelevantUnits(best.indices, best.values, scores)
