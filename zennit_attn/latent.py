'''Latent relevance: the relevance at the outputs of chosen modules during an attribution.

Under a composite, the gradient that arrives at a module's output *is* the relevance of that output: for a hooked module
it is exactly what its rule receives, and for any other module it is the relevance its output tensor carries (summed
over all consumers, e.g. the residual stream feeding both the next block and its norm). :py:func:`record_relevance`
records it for every module whose qualified name matches one of the given :py:mod:`fnmatch` patterns, and for every
operation that the interception engine attributes inside a matching *operation site*: ``'<module>.<op>'``, numbered
within the module's forward (``'encoder.layers.encoder_layer_0.self_attention.attention'`` is the fused attention of
that layer; with ``fused_attention=False`` its parts are ``matmul``, ``mul``, ``add``, ``softmax``, ``matmul_1``).

Example
-------
>>> with record_relevance(model, ['encoder.layers.*.mlp.1']) as recorded:
...     with Gradient(model, AttnLRP()) as attributor:
...         output, relevance = attributor(images, lambda y: y * onehot)
>>> neurons = per_neuron(recorded['encoder.layers.encoder_layer_0.mlp.1'])
>>> top_k(neurons, 5)
'''
from collections import namedtuple
from collections.abc import Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase

import torch

from .engine import op_listeners


__all__ = ['record_relevance', 'watch_outputs', 'Recorder', 'per_neuron', 'per_head', 'per_token', 'top_k', 'TopK']


TopK = namedtuple('TopK', ['indices', 'values'])


class Recorder(Mapping):
    '''Read-only mapping ``qualified module name -> relevance at the module's output`` filled by
    :py:func:`record_relevance`.

    Relevance is recorded per attribution: it is reset at the start of every forward of the model. If a module is
    called more than once in one forward, the relevance of its calls is **summed** (``calls[name]`` tells how often it
    was called); calls with different output shapes cannot be summed and raise an error. The output of a module that
    returns a tuple (e.g. Hugging Face attention, ``nn.MultiheadAttention``) is its first tensor. Modules that matched
    but whose output received no relevance (e.g. the attention scores under CP-LRP) are absent; ``matched`` lists all
    matched names.

    Attributes
    ----------
    patterns: list[str]
        The fnmatch patterns.
    matched: list[str]
        Qualified names of the modules matched at the last forward.
    calls: dict[str, int]
        Number of calls whose relevance was recorded, per name.
    '''
    def __init__(self, patterns):
        self.patterns = list(patterns)
        self.matched = []
        self.calls = {}
        self._relevance = {}

    def __getitem__(self, name):
        if name not in self._relevance:
            known = ', '.join(self._relevance) or 'nothing recorded yet'
            raise KeyError(
                f'{name!r}: no relevance recorded for this module (recorded: {known}; matched: {self.matched}).'
            )
        return self._relevance[name]

    def __iter__(self):
        return iter(self._relevance)

    def __len__(self):
        return len(self._relevance)

    def reset(self):
        '''Forget all recorded relevance.'''
        self._relevance = {}
        self.calls = {}

    def _add(self, name, relevance):
        if relevance is None:  # nothing reached this output (e.g. a branch stopped by CP-LRP)
            return
        relevance = relevance.detach().clone()
        if name in self._relevance:
            previous = self._relevance[name]
            if previous.shape != relevance.shape:
                raise ValueError(
                    f'record_relevance: {name!r} was called with output shapes {tuple(previous.shape)} and '
                    f'{tuple(relevance.shape)} in one forward; its relevance cannot be summed over calls.'
                )
            relevance = previous + relevance
        self._relevance[name] = relevance
        self.calls[name] = self.calls.get(name, 0) + 1

    def __repr__(self):
        items = ', '.join(f'{name}: {tuple(value.shape)}' for name, value in self._relevance.items())
        return f'{type(self).__name__}({{{items}}})'


def _first_tensor(output):
    '''The output tensor of a module call (the first tensor of a tuple/list output), or None.'''
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((item for item in output if isinstance(item, torch.Tensor)), None)
    return None


class _Session:
    '''The hooks of one :py:func:`watch_outputs` context: ``callback(name, tensor)`` for the output of every module and
    operation site that matches a pattern.

    A forward pre-hook on the model resolves the patterns at every forward and (re-)registers the per-module forward
    hooks then, so that the hooks run after the composite's hooks (whose rules replace the output; the callback sees
    the replaced output, whose gradient is the relevance).
    '''
    def __init__(self, model, patterns, callback, on_start=None):
        self.model = model
        self.patterns = list(patterns)
        self.callback = callback
        self.on_start = on_start
        self.matched = []
        self.module_handles = []
        self.root_handle = model.register_forward_pre_hook(self._start)
        self.token = op_listeners.set(op_listeners.get() + (self._operation,))

    def _operation(self, site, output):
        '''Pass on the output of an operation attributed by the engine, if its site matches a pattern.'''
        if any(fnmatchcase(site, pattern) for pattern in self.patterns):
            if site not in self.matched:
                self.matched.append(site)
            self.callback(site, output)

    def _start(self, module, args):
        self._remove_module_hooks()
        # in place: the list yielded by watch_outputs stays current
        self.matched[:] = [
            name for name, _ in self.model.named_modules()
            if any(fnmatchcase(name, pattern) for pattern in self.patterns)
        ]
        if self.on_start is not None:
            self.on_start(list(self.matched))
        matched = set(self.matched)
        for name, child in self.model.named_modules():
            if name in matched:
                self.module_handles.append(child.register_forward_hook(self._forwarding(name)))

    def _forwarding(self, name):
        def forward_hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                self.callback(name, tensor)
        return forward_hook

    def _remove_module_hooks(self):
        for handle in self.module_handles:
            handle.remove()
        self.module_handles = []

    def remove(self):
        '''Remove every hook.'''
        self._remove_module_hooks()
        self.root_handle.remove()
        op_listeners.reset(self.token)


@contextmanager
def watch_outputs(model, patterns, callback, on_start=None):
    '''Call ``callback(name, tensor)`` with the output of every module of ``model`` whose qualified name matches a
    pattern, and of every matching operation site of the engine, at every forward; the building block of
    :py:func:`record_relevance`, :py:func:`zennit_attn.concepts.conditional_relevance` and
    :py:func:`zennit_attn.reference.collect_references`.

    The callback may register a tensor hook on the output (``tensor.register_hook``) to read or change the relevance
    that arrives there during the backward pass of an attribution: it sees the output after the composite's rules.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (names are relative to it); its forward must run (it may be wrapped, e.g. by
        :py:class:`~zennit_attn.attribution.EmbeddingsForward`).
    patterns: str or list[str]
        :py:func:`fnmatch.fnmatchcase` patterns on qualified module names and operation sites.
    callback: callable
        ``callback(name, tensor)``; for a module with a tuple output, ``tensor`` is its first tensor.
    on_start: callable, optional
        ``on_start(matched_names)`` at the start of every forward of ``model``.

    Yields
    ------
    list[str]
        The names matched at the last forward (updated in place).
    '''
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    session = _Session(model, patterns, callback, on_start)
    try:
        yield session.matched
    finally:
        session.remove()


@contextmanager
def record_relevance(model, patterns):
    '''Record the relevance at the output of every module of ``model`` whose qualified name matches a pattern.

    Works with Zennit's attributors (e.g. :py:class:`zennit.attribution.Gradient`) and any composite, entered inside
    or outside this context: the modules are matched at each forward, after the composite has registered.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model that is attributed (the root whose forward is called).
    patterns: str or list[str]
        :py:func:`fnmatch.fnmatchcase` patterns on qualified module names, e.g. ``'encoder.layers.*.mlp.1'``.

    Yields
    ------
    :py:class:`Recorder`
        Mapping from module name to relevance, filled during the backward pass and reset at every forward.
    '''
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    recorder = Recorder(patterns)

    def start(matched):
        recorder.reset()
        recorder.matched = list(matched)

    def output(name, tensor):
        if name not in recorder.matched:  # an operation site, matched during the forward
            recorder.matched.append(name)
        if tensor.requires_grad:
            tensor.register_hook(lambda grad: recorder._add(name, grad))

    with watch_outputs(model, patterns, output, on_start=start):
        yield recorder


def per_neuron(relevance, dim=-1):
    '''Relevance per neuron (channel): sum over every dimension except ``dim``.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        E.g. the relevance at an MLP activation, shape ``(batch, tokens, neurons)``.
    dim: int, optional
        The neuron dimension.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(relevance.shape[dim],)``.
    '''
    return relevance.movedim(dim, -1).reshape(-1, relevance.shape[dim]).sum(0)


def per_head(context_relevance, num_heads=None, keep_batch=False):
    '''Relevance per attention head.

    Parameters
    ----------
    context_relevance: :py:obj:`torch.Tensor`
        Relevance of the attention output per head, either ``(batch, heads, tokens, head_dim)`` (the ``attention``
        operation site of a layer, e.g. ``'encoder.layers.encoder_layer_0.self_attention.attention'``) or
        ``(batch, tokens, heads * head_dim)`` (heads merged, before the output projection), which needs ``num_heads``.
    num_heads: int, optional
        Number of heads for the merged layout.
    keep_batch: bool, optional
        Return ``(batch, heads)`` instead of summing over the batch.

    Returns
    -------
    :py:obj:`torch.Tensor`
        Shape ``(heads,)`` or ``(batch, heads)``.
    '''
    if context_relevance.ndim == 4:
        if num_heads is not None and context_relevance.shape[1] != num_heads:
            raise ValueError(
                f'per_head: expected (batch, heads={num_heads}, tokens, head_dim), got {tuple(context_relevance.shape)}'
            )
        heads = context_relevance.sum((2, 3))
    elif context_relevance.ndim == 3:
        if num_heads is None:
            raise ValueError('per_head: a (batch, tokens, heads * head_dim) relevance needs num_heads.')
        batch, tokens, width = context_relevance.shape
        if width % num_heads:
            raise ValueError(f'per_head: the last dimension {width} is not divisible by num_heads={num_heads}.')
        heads = context_relevance.reshape(batch, tokens, num_heads, width // num_heads).sum((1, 3))
    else:
        raise ValueError(
            f'per_head: expected a 3- or 4-dimensional relevance, got shape {tuple(context_relevance.shape)}'
        )
    return heads if keep_batch else heads.sum(0)


def per_token(relevance, dim=-1):
    '''Relevance per token: sum over the hidden dimension ``dim``, e.g. ``(batch, tokens, hidden) -> (batch, tokens)``.

    Parameters
    ----------
    relevance: :py:obj:`torch.Tensor`
        The relevance.
    dim: int, optional
        The hidden dimension.

    Returns
    -------
    :py:obj:`torch.Tensor`
        The relevance without ``dim``.
    '''
    return relevance.sum(dim)


def top_k(values, k, absolute=False):
    '''The ``k`` largest entries of a 1-d tensor (e.g. from :py:func:`per_neuron` or :py:func:`per_head`).

    Parameters
    ----------
    values: :py:obj:`torch.Tensor`
        A 1-d tensor (higher dimensional tensors are flattened; indices then refer to the flattened tensor).
    k: int
        Number of entries; at most ``values.numel()``.
    absolute: bool, optional
        Rank by absolute value (most relevant in either direction); the signed values are returned.

    Returns
    -------
    :py:class:`TopK`
        ``(indices, values)``, largest first.
    '''
    flat = values.reshape(-1)
    k = min(k, flat.numel())
    indices = torch.topk(flat.abs() if absolute else flat, k).indices
    return TopK(indices, flat[indices])
