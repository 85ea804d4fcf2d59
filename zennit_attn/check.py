'''Coverage lint: find the operations of a model that run with their plain gradient under a composite.

Under an AttnLRP composite every hooked module's output graph is replaced by one autograd node whose backward is the
rule (``_RelevanceFunctionBackward``, see :py:mod:`zennit_attn.rules`). Every other node that remains between the
output and the input is an operation whose plain gradient moves the relevance. That is only correct for re-arrangements
(view, permute, cat, select, expand, ...; ATTNLRP.md §1); anything else (``a + b``, ``c * x``, ``a @ b``, softmax,
normalisations, activations written inline) silently gives a wrong heatmap. :py:func:`check` runs one forward, walks the
graph and reports each such operation with the module it was created in and a hint how to cover it.

Example
-------
>>> from zennit_attn.check import check
>>> report = check(model, AttnLRP(), images)
>>> print(report)          # a table, or "no uncovered operations"
>>> check(model, AttnLRP(), images, strict=True)   # raises CoverageError if anything is uncovered
'''
import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from zennit.core import Hook

from . import types
from .engine import _tensors, lenient
from .rules.machinery import _mask_threshold


__all__ = ['check', 'CoverageReport', 'CoverageError', 'Finding', 'hooked_modules', 'op_name', 'PRESERVING_OPS']


#: operations (normalised autograd node names, see :py:func:`op_name`) whose plain gradient moves relevance correctly:
#: re-arrangements, selections, copies that sum (expand, repeat, gather), dtype casts and constant padding
PRESERVING_OPS = frozenset({
    'view', 'unsafe_view', 'reshape_alias', 'alias', 'as_strided', 'permute', 'transpose', 't', 'expand', 'repeat',
    'cat', 'stack', 'split', 'split_with_sizes', 'unsafe_split', 'unsafe_split_with_sizes', 'unbind', 'select', 'slice',
    'index', 'index_select', 'gather', 'masked_select', 'take', 'clone', 'to_copy', 'copy', 'copy_slices', 'squeeze',
    'unsqueeze', 'constant_pad_nd', 'flip', 'roll', 'narrow', 'unfold', 'diagonal', 'movedim', 'identity',
    'lift_fresh', 'view_as_real', 'view_as_complex', 'repeat_interleave', 'topk', 'sort',
})

#: display names of ops whose autograd node is named differently
_ALIASES = {
    'native_layer_norm': 'layer_norm', 'native_dropout': 'dropout', 'native_group_norm': 'group_norm',
    'native_batch_norm': 'batch_norm', 'cudnn_batch_norm': 'batch_norm', 'softmax_backward_data': 'softmax',
    'linalg_vector_norm': 'norm',
}

_ACTIVATIONS = frozenset({
    'gelu', 'silu', 'tanh', 'relu', 'sigmoid', 'elu', 'leaky_relu', 'hardtanh', 'softplus', 'mish', 'hardswish',
    'hardsigmoid', 'erf', 'threshold', 'prelu', 'glu', 'celu', 'selu', 'log_sigmoid', 'relu6', 'clamp', 'clamp_min',
    'clamp_max',
})

_HINTS = {
    'add': 'use zennit_attn.layers.Sum with SumRule (one instance per call site); a constant operand absorbs its share',
    'sub': 'write it as a sum: zennit_attn.layers.Sum with SumRule (negate the constant operand)',
    'rsub': 'write it as a sum: zennit_attn.layers.Sum with SumRule (negate the constant operand)',
    'div': 'division by a constant: zennit_attn.layers.Scale(factor, divide=True) with IdentityRule',
    'neg': 'negation: zennit_attn.layers.Scale(-1) with IdentityRule',
    'bmm': 'matrix product: zennit_attn.layers.MatMul (AttentionScores/AttentionContext in attention) with MatMulRule',
    'mm': 'matrix product: zennit_attn.layers.MatMul (AttentionScores/AttentionContext in attention) with MatMulRule',
    'matmul': 'matrix product: zennit_attn.layers.MatMul (AttentionScores/AttentionContext in attention) with '
              'MatMulRule',
    'baddbmm': 'matrix product plus a sum: zennit_attn.layers.MatMul with MatMulRule and layers.Sum with SumRule',
    'addmm': 'linear layer without a rule: map its type to zennit_attn.rules.Epsilon (or Gamma) in the layer map',
    'linear': 'linear layer without a rule: map its type to zennit_attn.rules.Epsilon (or Gamma) in the layer map',
    'convolution': 'convolution without a rule: map its type to zennit_attn.rules.Epsilon (or Gamma) in the layer map',
    'softmax': 'use zennit_attn.layers.Softmax (AttentionSoftmax in attention) with SoftmaxRule',
    'log_softmax': 'log-softmax has no AttnLRP rule; attribute the logits (or use layers.Softmax with SoftmaxRule)',
    'layer_norm': 'LayerNorm without a rule: give the module LayerNormRule in the layer map (the AttnLRP composites '
                  'cover torch.nn.LayerNorm and *LayerNorm classes)',
    'group_norm': 'normalisation without an AttnLRP rule: merge it into a linear layer or add a rule',
    'batch_norm': 'batch norm without a rule: merge it into the preceding linear layer (zennit MergeBatchNorm)',
    'mean': 'mean pooling / reduction: use zennit_attn.layers.Mean with MeanRule (an RMSNorm written inline: '
            'give the module RMSNormRule)',
    'sum': 'reduction: its gradient copies relevance to every summand; use zennit_attn.layers.Mean with MeanRule',
    'pow': 'part of a normalisation written inline? give the module RMSNormRule/LayerNormRule; otherwise add a rule',
    'rsqrt': 'part of a normalisation written inline? give the module RMSNormRule/LayerNormRule',
    'sqrt': 'part of a normalisation written inline? give the module RMSNormRule/LayerNormRule',
    'var': 'part of a normalisation written inline? give the module LayerNormRule',
    'std': 'part of a normalisation written inline? give the module LayerNormRule',
    'norm': 'part of a normalisation written inline? give the module RMSNormRule/LayerNormRule',
    'exp': 'exponential has no AttnLRP rule; if it is part of a softmax, use zennit_attn.layers.Softmax/SoftmaxRule',
    'scaled_dot_product_attention': 'fused attention outside a registered composite\'s forward: register the '
                                    'composite on the module whose forward calls it',
    'masked_fill': 'masking by filling drops the relevance of the filled positions: add the mask through '
                   'zennit_attn.layers.Sum (SumRule) before a softmax instead (filling the scores with a very '
                   'negative value, e.g. torch.finfo(dtype).min, right before a softmax rule is exact and accepted)',
    'where': 'torch.where drops the relevance of the unselected positions: use an additive mask through '
             'zennit_attn.layers.Sum',
    'dropout': 'dropout in training mode: call model.eval()',
    'embedding': 'embedding lookup of a float input: attribute the embeddings instead (inputs_embeds)',
}

_ACTIVATION_HINT = (
    'element-wise activation: use an activation module (e.g. torch.nn.GELU, a types.Activation) with IdentityRule '
    '(zennit.rules.Pass also works)'
)
_DEFAULT_HINT = 'not relevance-preserving: wrap it in a module with an AttnLRP rule (ATTNLRP.md §1)'
_RELEVANCE_NODE = '_RelevanceFunctionBackward'
_LEAF_NODE = 'AccumulateGrad'


def op_name(node):
    '''Normalised name of an autograd node: ``'AddBackward0'`` -> ``'add'``, ``'NativeLayerNormBackward0'`` ->
    ``'layer_norm'``, ``'ScaledDotProductFlashAttentionForCpuBackward0'`` -> ``'scaled_dot_product_attention'``.

    Parameters
    ----------
    node: :py:obj:`torch.autograd.graph.Node` or str
        The node (or its class name).

    Returns
    -------
    str
        The snake-case op name.
    '''
    name = node if isinstance(node, str) else type(node).__name__
    # 'CopyBackwards' (the node of an in-place copy_) is the one node named with a plural
    name = re.sub(r'Backwards?\d*$', '', name)
    name = re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', name).lower()
    if name.startswith('scaled_dot_product'):
        return 'scaled_dot_product_attention'
    return _ALIASES.get(name, name)


def hooked_modules(model):
    '''Modules of ``model`` with a registered Zennit hook (any :py:class:`zennit.core.Hook`, e.g. the AttnLRP rules).

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model, usually inside a composite context.

    Returns
    -------
    list[tuple[str, :py:obj:`torch.nn.Module`, :py:obj:`zennit.core.Hook`]]
        ``(qualified name, module, hook)`` in :py:meth:`~torch.nn.Module.named_modules` order.
    '''
    found = []
    for name, module in model.named_modules():
        hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
        owners = (getattr(hook, '__self__', None) for hook in hooks)
        owner = next((owner for owner in owners if isinstance(owner, Hook)), None)
        if owner is not None:
            found.append((name, module, owner))
    return found


@dataclass
class Finding:
    '''One uncovered operation (aggregated over all its occurrences in one module).

    Attributes
    ----------
    op: str
        Normalised op name (see :py:func:`op_name`), e.g. ``'add'``.
    module: str
        Qualified name of the innermost module running when the op was created (``''`` is the model itself).
    module_type: str
        Class name of that module.
    hint: str
        How to cover the op.
    count: int
        Number of graph nodes of this op in this module.
    node: str
        Class name of the autograd node, e.g. ``'AddBackward0'``.
    '''
    op: str
    module: str
    module_type: str
    hint: str
    count: int = 1
    node: str = ''


def _table(rows, header):
    '''Format ``rows`` (lists of str) under ``header`` as a left-aligned text table.'''
    widths = [max(len(str(row[col])) for row in [header] + rows) for col in range(len(header))]
    lines = ['  '.join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, '  '.join('-' * width for width in widths))
    return '\n'.join(lines)


@dataclass
class CoverageReport:
    '''Result of :py:func:`check`.

    Attributes
    ----------
    findings: list[:py:class:`Finding`]
        Uncovered operations in backward order (from the output towards the input).
    nodes: int
        Number of autograd nodes between the output(s) and the input(s).
    rule_nodes: int
        Number of those nodes that are rules (hooked module calls).
    '''
    findings: list = field(default_factory=list)
    nodes: int = 0
    rule_nodes: int = 0

    @property
    def ok(self):
        '''Whether no uncovered operation was found.'''
        return not self.findings

    def __str__(self):
        summary = f'{self.nodes} input-dependent autograd nodes, {self.rule_nodes} of them AttnLRP rule calls'
        if self.ok:
            return f'Coverage check passed: {summary}; no operation runs with its plain gradient.'
        rows = [
            [finding.op, finding.module or '<model>', finding.module_type, finding.count, finding.hint]
            for finding in self.findings
        ]
        table = _table(rows, ['op', 'module', 'type', 'n', 'hint'])
        return (
            f'Coverage check FAILED: {len(self.findings)} uncovered operation(s) run with their plain gradient '
            f'({summary}); the relevance is wrong.\n{table}'
        )


class CoverageError(ValueError):
    '''Raised by :py:func:`check` with ``strict=True`` if some operation is not covered; ``report`` holds the
    :py:class:`CoverageReport`.
    '''
    def __init__(self, report):
        super().__init__(str(report))
        self.report = report


class _ModuleTracker:
    '''Forward pre/post hooks on every module that maintain the stack of running modules.

    The pre-hook is prepended, so that nodes created by other hooks of the module (e.g. Zennit's) count as created
    inside the module; the post-hook runs even if the forward raises.
    '''
    def __init__(self, model):
        self.stack = []
        self.handles = []
        self.hooked = {id(module) for _, module, _ in hooked_modules(model)}
        try:
            for name, module in model.named_modules():
                self.handles.append(module.register_forward_pre_hook(self._pre(name, module), prepend=True))
                self.handles.append(module.register_forward_hook(self._post, always_call=True))
        except BaseException:
            self.remove()
            raise

    def _pre(self, name, module):
        covered = id(module) in self.hooked

        def pre_hook(module, args):
            parent_covered = self.stack[-1][1] if self.stack else False
            self.stack.append((name, covered or parent_covered, type(module).__name__))
        return pre_hook

    def _post(self, module, args, output):
        if self.stack:
            self.stack.pop()

    @property
    def current(self):
        '''``(name, covered, type name)`` of the innermost running module, or None outside the model.'''
        return self.stack[-1] if self.stack else None

    def remove(self):
        '''Remove all hooks.'''
        for handle in self.handles:
            handle.remove()
        self.handles = []


class _NodeRecorder(TorchFunctionMode):
    '''Map every autograd node created under this mode to the module that was running when it was created.

    Ops called inside a torch function (e.g. the ``bmm`` inside ``torch.matmul``) are not seen; their nodes inherit the
    module of the node that consumes them when the graph is walked.
    '''
    _ADDITIONS = {'add', '__add__', '__radd__', 'sub', '__sub__', '__rsub__'}

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.origin = {}
        self.neutral = set()
        self.fills = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        current = self.tracker.current
        if current is not None:
            self._record(result, current)
            if getattr(func, '__name__', None) in self._ADDITIONS and self._adds_zero(args):
                self.neutral.add(result.grad_fn)
            if getattr(func, '__name__', None) in ('masked_fill', 'masked_fill_') and \
                    self._is_mask_fill(args, kwargs, result):
                self.fills.add(result.grad_fn)
        return result

    @staticmethod
    def _is_mask_fill(args, kwargs, result):
        '''Whether a ``masked_fill`` fills with a masking value (at most the softmax rule's threshold, e.g.
        ``torch.finfo(dtype).min`` or ``-inf``).'''
        value = args[2] if len(args) > 2 else (kwargs or {}).get('value')
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.requires_grad:
                return False
            value = value.item()
        return isinstance(result, torch.Tensor) and result.is_floating_point() and \
            isinstance(value, (int, float)) and value <= _mask_threshold(result.dtype)

    @staticmethod
    def _adds_zero(args):
        '''Whether an addition only adds constant zeros to one input-dependent tensor: the identity, which passes
        relevance unchanged (e.g. a zero bias).
        '''
        tensors = [arg for arg in args if isinstance(arg, torch.Tensor)]
        others = [arg for arg in args if not isinstance(arg, torch.Tensor)]
        variable = [tensor for tensor in tensors if tensor.requires_grad]
        constant = [tensor for tensor in tensors if not tensor.requires_grad]
        return (
            len(variable) == 1 and all(not tensor.any() for tensor in constant)
            and all(isinstance(other, (int, float)) and other == 0 for other in others)
        )

    def _record(self, result, current):
        if isinstance(result, torch.Tensor):
            node = result.grad_fn
            if node is not None and node not in self.origin:
                self.origin[node] = current
        elif isinstance(result, (tuple, list)):
            for item in result:
                self._record(item, current)


def _prepare(value):
    '''A leaf copy of a floating-point tensor that requires a gradient; anything else unchanged.'''
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
        return value.detach().requires_grad_(True)
    return value


class _Graph:
    '''The autograd graph below the output nodes: children, input dependence and creating modules.'''
    def __init__(self, roots, inputs, origin):
        self.children = {}
        stack = list(roots)
        while stack:
            node = stack.pop()
            if node in self.children:
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            self.children[node] = children
            stack.extend(children)
        self.order = self._topological(roots)
        self.reaches = self._reachability(inputs)
        self.origin = self._origins(recorded=origin)
        self.consumers = {node: [] for node in self.children}
        for node, children in self.children.items():
            for child in children:
                self.consumers[child].append(node)

    def feeds_softmax(self, node):
        '''Whether every consumer of ``node`` (through re-arrangements) is a softmax rule node.'''
        consumers = self.consumers.get(node, [])
        for consumer in consumers:
            kind = type(consumer).__name__
            if kind == _RELEVANCE_NODE:
                if not isinstance(getattr(consumer, 'module', None), types.Softmax):
                    return False
            elif op_name(kind) not in PRESERVING_OPS or not self.feeds_softmax(consumer):
                return False
        return bool(consumers)

    def _topological(self, roots):
        '''Nodes in backward order: every node after all nodes that consume it.'''
        consumers = dict.fromkeys(self.children, 0)
        for children in self.children.values():
            for child in children:
                consumers[child] += 1
        ready = [root for root in reversed(roots) if consumers[root] == 0]
        order = []
        while ready:
            node = ready.pop()
            order.append(node)
            for child in reversed(self.children[node]):
                consumers[child] -= 1
                if consumers[child] == 0:
                    ready.append(child)
        return order

    def _reachability(self, inputs):
        '''Whether each node depends on one of the ``inputs`` (leaf tensors).'''
        input_ids = {id(tensor) for tensor in inputs}
        reaches = {}
        for node in reversed(self.order):
            own = type(node).__name__ == _LEAF_NODE and id(getattr(node, 'variable', None)) in input_ids
            reaches[node] = own or any(reaches[child] for child in self.children[node])
        return reaches

    def _origins(self, recorded):
        '''Creating module of each node; nodes created inside a torch function (e.g. the ``bmm`` of ``torch.matmul``)
        inherit the module of their first consumer.
        '''
        origin = {}
        for node in self.order:
            if node in recorded:
                origin[node] = recorded[node]
            else:
                origin.setdefault(node, ('', False, '?'))
            for child in self.children[node]:
                if child not in recorded:
                    origin.setdefault(child, origin[node])
        return origin


def _hint(op, node, graph, module_type):
    '''The hint of an uncovered node.'''
    if op == 'mul':
        variable = [child is not None and graph.reaches.get(child, False) for child, _ in node.next_functions]
        if 'Dropout' in module_type:
            return _HINTS['dropout'] + ' (training-mode dropout multiplies by a random mask)'
        if sum(variable) >= 2:
            return 'product of two input-dependent tensors: use zennit_attn.layers.Product with ProductRule'
        return 'scaling by a constant: use zennit_attn.layers.Scale with IdentityRule'
    if op in _ACTIVATIONS:
        return _ACTIVATION_HINT
    return _HINTS.get(op, _DEFAULT_HINT)


def _findings(graph, neutral=()):
    '''Aggregate the uncovered, input-dependent nodes by (op, module), in backward order; ``neutral`` nodes (additions
    of constant zeros, mask fills before a softmax) pass relevance unchanged and are not findings.
    '''
    findings = {}
    nodes = rule_nodes = 0
    for node in graph.order:
        if not graph.reaches[node]:
            continue
        kind = type(node).__name__
        if kind == _LEAF_NODE:
            continue
        nodes += 1
        if kind == _RELEVANCE_NODE:
            rule_nodes += 1
            continue
        op = op_name(kind)
        name, covered, module_type = graph.origin[node]
        if covered or op in PRESERVING_OPS or node in neutral:
            continue
        key = (op, name)
        if key in findings:
            findings[key].count += 1
        else:
            findings[key] = Finding(op, name, module_type, _hint(op, node, graph, module_type), 1, kind)
    return list(findings.values()), nodes, rule_nodes


def check(model, composite, *inputs, strict=False, **kwargs):
    '''Find every operation of ``model`` that runs with its plain gradient under ``composite``.

    Registers the composite, runs one forward on ``inputs`` (floating-point tensors are made leaves that require a
    gradient; ``kwargs`` are passed to the model unchanged) while recording in which module each autograd node is
    created, and walks the graph from the output tensor(s) to the inputs. A node is a finding unless it is a rule (a
    hooked module call), was created inside a module that has a Zennit hook, or is a relevance-preserving
    re-arrangement (:py:data:`PRESERVING_OPS`). Only nodes that depend on an input count: ops on parameters alone
    (e.g. ``class_token.expand``) never carry input relevance. Everything registered is removed afterwards, also on
    errors.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (in eval mode).
    composite: :py:obj:`zennit.core.Composite` or None
        The composite to check; None checks the plain model.
    *inputs:
        Positional model inputs; at least one floating-point tensor (e.g. ``inputs_embeds`` through a wrapper).
    strict: bool, optional
        Raise :py:class:`CoverageError` if anything is uncovered.
    **kwargs:
        Keyword arguments of the model call.

    Returns
    -------
    :py:class:`CoverageReport`
        The findings; ``report.ok`` is True if everything is covered.

    Raises
    ------
    CoverageError
        With ``strict=True``, if some operation is uncovered.
    ValueError
        If no input is a floating-point tensor.
    '''
    inputs = tuple(_prepare(value) for value in inputs)
    leaves = [value for value in inputs if isinstance(value, torch.Tensor) and value.requires_grad]
    if not leaves:
        raise ValueError('check: no floating-point tensor input; pass e.g. inputs_embeds through a wrapper module.')
    context = nullcontext(model) if composite is None else composite.context(model)
    token = lenient.set(True)
    try:
        with context as modified:
            tracker = _ModuleTracker(modified)
            try:
                recorder = _NodeRecorder(tracker)
                with torch.enable_grad(), recorder:
                    output = modified(*inputs, **kwargs)
            finally:
                tracker.remove()
    finally:
        lenient.reset(token)
    roots = [tensor.grad_fn for tensor in _tensors(output) if tensor.grad_fn is not None]
    roots = list(dict.fromkeys(roots))
    graph = _Graph(roots, leaves, recorder.origin)
    # filling attention scores with the masking value right before a softmax is exact: the softmax rule gives filled
    # inputs zero relevance (they count as 0, AttnLRP Prop. 3.1), as it does through an additive mask and the ε-sum
    # rule, and the plain gradient of masked_fill passes the relevance of the other inputs unchanged
    fills = {node for node in recorder.fills if graph.feeds_softmax(node)}
    findings, nodes, rule_nodes = _findings(graph, recorder.neutral | fills)
    report = CoverageReport(findings=findings, nodes=nodes, rule_nodes=rule_nodes)
    if strict and not report.ok:
        raise CoverageError(report)
    return report
