'''The interception engine: the model's own forward runs unmodified, and every glue operation on the relevance path
is routed to an AttnLRP rule as it happens.

While a composite is registered, a :py:class:`torch.overrides.TorchFunctionMode` is active inside the model's forward
only (entered by the forward pre-hook of the outermost module call, left by its forward hook: the registered model's
forward, or that of any of its modules called directly). It sees every torch call that the forward makes between
modules: ``a + b``, ``a * b``, ``a @ b``, softmax, ``neg``, scalings, mask sums, rotary
arithmetic, in-place variants, ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``, functional
linear layers, ... (ATTNLRP.md §7). Inside modules that carry a module rule (Linear/Conv, norms, activations) it is
suspended: their rule covers what they compute.

Each intercepted call computes its result with the original function (so the forward is bit-identical) and, if an
operand depends on the model input, gets one autograd node whose backward is the rule: the composite's layer map is
asked for the rule of a small *carrier* module that describes the call (:py:class:`~zennit_attn.layers.Sum` for
``a + b``, :py:class:`~zennit_attn.layers.AttentionCore` for fused attention, ...), so that CP-LRP, the γ presets and a
user's ``layer_map`` apply to intercepted calls exactly as to modules. Which rule a call gets follows from the op and
from which operands depend on the input (ATTNLRP.md §2): constants (parameters, masks, ``cos``/``sin``, Python numbers)
absorb their share of sums and make products and matmuls linear in the other operand.

An operation on the relevance path that is neither a rule nor a re-arrangement (view, cat, select, expand, casts, ...)
raises :py:class:`UnsupportedOperationError` naming the op and the module, on every forward: no plain gradient ever
moves relevance silently.
'''
import contextvars
import dis
import math
import os
import sys
import weakref

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode

from . import layers, types
from .rules import _RelevanceFunction, _is_variable


__all__ = ['Engine', 'UnsupportedOperationError', 'SAFE_OPS', 'op_listeners', 'lenient', 'ProbabilityRecorder']


class UnsupportedOperationError(RuntimeError):
    '''Raised during a forward when an operation on the relevance path has no AttnLRP rule. (Not a TypeError: torch
    turns TypeErrors raised inside ``Tensor.__truediv__`` and friends into ``NotImplemented``.)'''


#: re-arrangements, selections, copies and casts: their plain gradient moves relevance correctly (ATTNLRP.md §1)
SAFE_OPS = frozenset({
    'view', 'view_as', 'reshape', 'reshape_as', 'permute', 'transpose', 'transpose_', 't', 'contiguous', 'clone',
    'to', 'type', 'type_as', 'float', 'double', 'half', 'bfloat16', 'cpu', 'cuda', 'detach', 'detach_',
    '__getitem__', '__setitem__', 'expand', 'expand_as', 'broadcast_to', 'repeat', 'repeat_interleave', 'tile',
    'cat', 'concat', 'concatenate', 'stack', 'hstack', 'vstack', 'split', 'split_with_sizes', 'tensor_split', 'chunk',
    'unbind', 'squeeze', 'squeeze_', 'unsqueeze', 'unsqueeze_', 'flatten', 'unflatten', 'narrow', 'select',
    'index_select', 'gather', 'take_along_dim', 'masked_fill', 'masked_fill_', 'where', 'roll', 'flip', 'movedim',
    'moveaxis', 'swapaxes', 'swapdims', 'mT', 'T', 'unfold', 'as_strided', 'index_put', 'index_put_', 'scatter',
    'scatter_', 'masked_scatter', 'tril', 'triu', 'requires_grad_', 'retain_grad', 'register_hook', 'identity',
    'copy_', 'new_zeros', 'new_ones', 'new_full', 'new_empty', 'zeros_like', 'ones_like', 'full_like', 'empty_like',
    'narrow_copy', 'diagonal', 'align_to', 'rename', 'refine_names', 'numpy', 'tolist', 'item', 'pin_memory',
    'data_ptr', 'storage_offset', 'stride', 'size', 'dim', 'numel', 'nelement', 'element_size', 'is_contiguous',
    '__len__', '__iter__', '__format__', '__repr__', '__bool__', '__hash__', '__eq__', '__ne__', '__lt__', '__le__',
    '__gt__', '__ge__', '__reduce_ex__', '__deepcopy__', 'dropout', 'dropout1d', 'dropout2d', 'dropout3d',
    'alpha_dropout', 'feature_alpha_dropout', 'pad', 'interpolate',
    # the values of topk / sort are a selection / permutation (mixture-of-experts routers pick the top-k weights)
    'topk', 'sort',
})

ADD = frozenset({'add', '__add__', '__radd__', '__iadd__', 'add_'})
SUB = frozenset({'sub', 'subtract', '__sub__', '__isub__', 'sub_'})
RSUB = frozenset({'rsub', '__rsub__'})
MUL = frozenset({'mul', 'multiply', '__mul__', '__rmul__', '__imul__', 'mul_'})
DIV = frozenset({'div', 'divide', 'true_divide', '__truediv__', '__itruediv__', 'div_', 'true_divide_'})
RDIV = frozenset({'__rtruediv__', '__rdiv__'})
NEG = frozenset({'neg', 'negative', '__neg__', 'neg_', 'negative_'})
POS = frozenset({'__pos__', 'positive'})
MATMUL = frozenset({'matmul', '__matmul__', 'bmm', 'mm'})
RMATMUL = frozenset({'__rmatmul__'})
SOFTMAX = frozenset({'softmax', '_softmax'})
REDUCE = frozenset({'sum', 'mean'})
#: average pooling, a linear map without bias (means over windows): the ε-rule of that map
POOL = frozenset({'avg_pool1d', 'avg_pool2d', 'avg_pool3d', 'adaptive_avg_pool1d', 'adaptive_avg_pool2d',
                  'adaptive_avg_pool3d'})
INPLACE = frozenset({'__iadd__', 'add_', '__isub__', 'sub_', '__imul__', 'mul_', '__itruediv__', 'div_',
                     'true_divide_', 'neg_', 'negative_', 'index_add_'})
#: element-wise activations called as functions: identity rule (AttnLRP Eq. 9), carried by their module class
ACTIVATIONS = {
    'gelu': torch.nn.GELU, 'silu': torch.nn.SiLU, 'relu': torch.nn.ReLU, 'relu_': torch.nn.ReLU,
    'tanh': torch.nn.Tanh, 'tanh_': torch.nn.Tanh, 'sigmoid': torch.nn.Sigmoid, 'sigmoid_': torch.nn.Sigmoid,
    'elu': torch.nn.ELU, 'leaky_relu': torch.nn.LeakyReLU, 'softplus': torch.nn.Softplus, 'mish': torch.nn.Mish,
    'hardswish': torch.nn.Hardswish, 'hardtanh': torch.nn.Hardtanh, 'relu6': torch.nn.ReLU6, 'selu': torch.nn.SELU,
    'celu': torch.nn.CELU, 'hardsigmoid': torch.nn.Hardsigmoid,
}

_HINTS = {
    'exp': 'an exponential on the relevance path (a softmax written by hand?): use torch.softmax',
    'log_softmax': 'log-softmax has no AttnLRP rule: explain the logits',
    'pow': 'part of a normalisation written inline: give the module a rule (declare it as a norm)',
    'rsqrt': 'part of a normalisation written inline: give the module a rule (declare it as a norm)',
    'sqrt': 'part of a normalisation written inline: give the module a rule (declare it as a norm)',
    'var': 'part of a normalisation written inline: give the module a rule (declare it as a norm)',
    'std': 'part of a normalisation written inline: give the module a rule (declare it as a norm)',
    'div': 'division by an input-dependent tensor has no AttnLRP rule (a normalisation written inline? declare the '
           'module as a norm)',
    'einsum': 'write the contraction with torch.matmul, which has the uniform-ε rule',
    'batch_norm': 'merge the batch norm into the preceding linear layer (zennit MergeBatchNorm canonizer)',
    'group_norm': 'group norm has no AttnLRP rule',
    'embedding': 'embedding of a float input: attribute the embeddings (inputs_embeds) instead',
    'cumsum': 'cumulative sums (state-space models, ...) have no AttnLRP rule',
    'grouped_mm': 'grouped expert products of a mixture-of-experts layer: load the model with '
                  'experts_implementation="eager" (per-expert Linear calls)',
}

#: callbacks ``(site name, output tensor)`` called for every intercepted operation with a rule node (used by
#: :py:func:`zennit_attn.latent.record_relevance` to record relevance at operations, not only at modules)
op_listeners = contextvars.ContextVar('zennit_attn_op_listeners', default=())

#: while True, operations without a rule keep their plain gradient instead of raising (for
#: :py:func:`zennit_attn.check.check`, which then reports every such operation with its module)
lenient = contextvars.ContextVar('zennit_attn_lenient', default=False)


def _name(func):
    '''The name of a torch function as seen by a TorchFunctionMode (``'add'``, ``'__iadd__'``, ``'softmax'``, ...).'''
    name = getattr(func, '__name__', None)
    if name is None:
        name = getattr(getattr(func, '__func__', None), '__name__', None) or type(func).__name__
    if name == '__get__':
        # properties such as Tensor.mT / Tensor.T / Tensor.shape
        owner = getattr(func, '__self__', None)
        name = getattr(owner, '__name__', name)
    return name


def _bind(names, args, kwargs, defaults=None):
    '''Bind ``args``/``kwargs`` of a call to ``names``: a dict with ``defaults`` for missing ones.'''
    bound = dict(defaults or {})
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _tensors(value):
    '''All tensors in a (nested) result.'''
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _augmented_assignment():
    '''Whether the running in-place op was written as an augmented assignment (``x += y``, which rebinds the name) in
    the first caller outside torch and this module, rather than as a method call (``x.add_(y)``): read from that
    frame's current bytecode instruction (torch dispatches both as ``add_``).'''
    frame = sys._getframe(1)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and (frame.f_code.co_filename == __file__ or
                                 frame.f_code.co_filename.startswith(torch_dir)):
        frame = frame.f_back
    if frame is None:
        return False
    code = frame.f_code
    offsets = _INSTRUCTIONS.get(code)
    if offsets is None:
        offsets = _INSTRUCTIONS[code] = {
            instruction.offset: instruction for instruction in dis.get_instructions(code)
        }
    instruction = offsets.get(frame.f_lasti)
    if instruction is None:
        return False
    if instruction.opname == 'BINARY_OP':  # Python >= 3.11: BINARY_OP with an in-place operator such as '+='
        return instruction.argrepr.endswith('=')
    return instruction.opname.startswith('INPLACE_')


_INSTRUCTIONS = weakref.WeakKeyDictionary()


def _scalar(value):
    '''Whether ``value`` is a number or a 0-d tensor that does not depend on the input (a constant scale).'''
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad and \
        value.is_floating_point() and not value.is_meta


def _differentiable(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad and (
        tensor.is_floating_point() or tensor.is_complex()
    )


class _LinearCall(torch.nn.Linear):
    '''Carrier of a functional ``F.linear(x, weight, bias)`` call for the ε/γ rules (a Linear without parameters of
    its own: ``weight`` and ``bias`` are the call's tensors).
    '''
    def __init__(self, weight, bias):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        vars(self)['weight'] = weight
        vars(self)['bias'] = bias


def _conv_call(weight, bias, stride, padding, dilation, groups):
    '''Carrier of a functional ``F.conv1d/2d/3d`` call for the ε/γ rules: a ``torch.nn.ConvNd`` without parameters of
    its own.'''
    dims = weight.ndim - 2
    carrier = _CONV_CALLS[dims].__new__(_CONV_CALLS[dims])
    torch.nn.Module.__init__(carrier)

    def tup(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    carrier.kernel_size = tuple(weight.shape[2:])
    carrier.stride, carrier.dilation = tup(stride), tup(dilation)
    carrier.padding = padding if isinstance(padding, str) else tup(padding)
    carrier.groups, carrier.transposed, carrier.padding_mode = groups, False, 'zeros'
    carrier.output_padding = (0,) * dims
    carrier.out_channels, carrier.in_channels = weight.shape[0], weight.shape[1] * groups
    vars(carrier)['weight'] = weight
    vars(carrier)['bias'] = bias
    return carrier


class _Conv1dCall(torch.nn.Conv1d):
    '''Carrier of ``F.conv1d``.'''


class _Conv2dCall(torch.nn.Conv2d):
    '''Carrier of ``F.conv2d``.'''


class _Conv3dCall(torch.nn.Conv3d):
    '''Carrier of ``F.conv3d``.'''


_CONV_CALLS = {1: _Conv1dCall, 2: _Conv2dCall, 3: _Conv3dCall}


class _LayerNormCall(torch.nn.LayerNorm):
    '''Carrier of a functional ``F.layer_norm`` call for the LayerNorm rule.'''
    def __init__(self, normalized_shape, weight, bias, eps):
        torch.nn.Module.__init__(self)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        vars(self)['weight'] = weight
        vars(self)['bias'] = bias


class _RMSNormCall(torch.nn.RMSNorm):
    '''Carrier of a functional ``F.rms_norm`` call (identity rule).'''
    def __init__(self):
        torch.nn.Module.__init__(self)


# torch.utils.checkpoint re-runs a region of the forward in the backward pass (to recompute the tensors it dropped),
# outside the window in which the mode is active. The recomputation must build exactly the rule nodes of the original
# forward: non-reentrant checkpointing matches the tensors saved by the recomputation one by one, in order, to those
# saved by the forward (a plain recomputation saves other tensors: an error at best, wrong relevance where shapes happen
# to match), and reentrant checkpointing runs the region without gradients in the forward and backpropagates through its
# recomputation. The engine finds the recompute function of each region while the region's forward runs and wraps it,
# so that it runs inside the mode again, with the module stack of the original forward (Engine._watch_checkpoint).
_REENTRANT_FORWARD = torch.utils.checkpoint.CheckpointFunction.forward.__code__


def _checkpoint_frame():
    '''The ``_CheckpointFrame`` of the innermost non-reentrant checkpoint region whose original forward is running (its
    saved-tensor hook is the innermost one), or None (also inside a recomputation).'''
    top = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    hooks = None if top is None else top(False)
    pack = None if hooks is None else hooks[0]
    if not getattr(pack, '_checkpoint_internal', False):
        return None
    while hasattr(pack, '__wrapped__'):
        pack = pack.__wrapped__
    code = getattr(pack, '__code__', None)
    names = () if code is None else code.co_freevars
    if 'frame' in names:
        return pack.__closure__[names.index('frame')].cell_contents
    if 'target_frame_ref' in names:
        # the hook of a recomputation (whose rule nodes are built by the wrapped recompute function)
        return None
    raise UnsupportedOperationError(
        f'gradient checkpointing of torch {torch.__version__} could not be recognised, so its recomputation in the '
        'backward pass would run without AttnLRP rules; disable gradient checkpointing to explain the model.'
    )


def _reentrant_checkpoint():
    '''The ``ctx`` of the innermost running ``CheckpointFunction.forward`` (reentrant checkpointing, which runs its
    region without gradients), or None.'''
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _REENTRANT_FORWARD:
            return frame.f_locals.get('ctx')
        frame = frame.f_back
    return None


class _Frame:
    '''One running module of the forward: its name, whether rules are suspended inside it, whether gradients were
    enabled when it started, the op counters that name its operation sites and, for a module with a module rule, the
    parameters and buffers its forward computed with (``tensors``, by name).'''
    __slots__ = ('name', 'module', 'suspended', 'attention', 'counts', 'snapshot', 'grad', 'tensors')

    def __init__(self, name, module, suspended, attention):
        self.name, self.module, self.suspended, self.attention = name, module, suspended, attention
        self.counts = {}
        self.snapshot = None
        self.grad = torch.is_grad_enabled()
        self.tensors = None

    def record(self, args, kwargs):
        '''Remember the module's own parameters and buffers among the tensors of a call of its forward: what it
        computes with. (accelerate's offloading hooks put them in place right before the forward and replace them by
        meta tensors right after it, before the module rule's forward hook runs.)'''
        module = self.module
        owned = {id(tensor): name for name, tensor in module._parameters.items() if tensor is not None}
        owned.update((id(tensor), name) for name, tensor in module._buffers.items() if tensor is not None)
        for tensor in _tensors((args, kwargs)):
            name = owned.get(id(tensor))
            if name is not None and not tensor.is_meta:
                self.tensors[name] = tensor

    def copy(self):
        '''A copy with the same counters (the frame of a recomputed forward).'''
        frame = _Frame(self.name, self.module, self.suspended, self.attention)
        frame.counts, frame.grad = dict(self.counts), self.grad
        return frame


class _Mode(TorchFunctionMode):
    '''The TorchFunctionMode of an :py:class:`Engine`: hands every torch call of the forward to the engine.'''
    def __init__(self, engine):
        super().__init__()
        self.engine = engine

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.engine.dispatch(func, args, kwargs or {})


class Engine:
    '''Route the glue operations of a model's own forward to the rules of a composite (see the module docstring).

    Parameters
    ----------
    rule_for: callable
        ``rule_for(carrier, role)`` returns the rule (a :py:class:`~zennit_attn.rules.AttnHook`) for a carrier module,
        or None. ``role`` is ``'attention_projection'`` for functional linear layers inside attention, else None.
    fused: bool, optional
        Attribute fused attention (``F.scaled_dot_product_attention``) with one
        :py:class:`~zennit_attn.rules.AttentionRule` node (default), or unfold it into its matmul, mask sum, softmax
        and matmul (the same relevance, observable at the probabilities, two ``T x T`` matrices per layer).
    ruled: callable, optional
        ``ruled(module)``: whether a module carries a module rule (the engine is suspended inside it).
    attention: callable, optional
        ``attention(module)``: whether a module is an attention module (its functional linear layers are attention
        projections, for the γ presets' roles).
    on_probabilities: callable, optional
        Recording mode (with ``rule_for=None``): attention calls run unfolded with plain operations, and this is
        called with the probabilities of each (part of the graph); used by attention rollout.
    '''
    def __init__(self, rule_for=None, fused=True, ruled=None, attention=None, on_probabilities=None):
        self.rule_for = rule_for
        self.fused = fused
        self.ruled = ruled or (lambda module: False)
        self.is_attention = attention or (lambda module: isinstance(module, types.Attention))
        self.on_probabilities = on_probabilities
        self.mode = _Mode(self)
        self.stack = []
        self.depth = 0
        self.handles = []
        self.names = {}
        self.guarded = set()
        self._carriers = {}
        # additive masks built in this forward, shared by all layers (kept once by their rules, not once per layer)
        self._masks = {}

    # ------------------------------------------------------------------------------------------------ registration
    def register(self, root):
        '''Install the hooks on ``root`` (the registered model) and its modules; returns self (a removable handle).'''
        try:
            self.names = {module: name for name, module in root.named_modules()}
            for name, module in root.named_modules():
                self.handles.append(module.register_forward_pre_hook(self._push, prepend=True, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._pop, always_call=True))
        except BaseException:
            self.remove()
            raise
        return self

    def guard(self, module):
        '''Hooks that detect another forward (pre-)hook changing the inputs or output of ``module``, whose rule would
        then attribute a computation that did not happen. Register right before the module's rule.'''
        self.guarded.add(module)
        self.handles.append(module.register_forward_pre_hook(self._check_inputs))
        self.handles.append(module.register_forward_hook(self._snapshot_output, prepend=True))
        self.handles.append(module.register_forward_hook(self._check_output))

    def remove(self):
        '''Remove every hook; leave the mode if a forward was interrupted.'''
        for handle in self.handles:
            handle.remove()
        self.handles = []
        while self.depth:
            self.depth -= 1
            self.mode.__exit__(None, None, None)
        self.stack = []

    # ---------------------------------------------------------------------------------------------------- scoping
    # The mode is active from the pre-hook of the outermost module call to its forward hook: the registered model's
    # forward, or the forward of any of its modules called directly.
    def _enter(self, module, args, kwargs):
        for tensor in list(_tensors(args)) + list(_tensors(kwargs)):
            if tensor.is_floating_point() and torch.is_grad_enabled() and tensor.requires_grad and \
                    not bool(torch.isfinite(tensor.detach()).all()):
                raise ValueError(
                    f'{type(module).__name__}: the input contains NaN or infinite values; every relevance would be '
                    'NaN. Clean the input first.'
                )
        self.mode.__enter__()
        self.depth += 1

    def _exit(self, module, output):
        self.depth -= 1
        self.mode.__exit__(None, None, None)
        self._masks = {}
        if self.rule_for is not None and torch.is_grad_enabled():
            self._check_finite(module, output)

    @staticmethod
    def _check_finite(module, output):
        '''Refuse an output with NaN computed from the input, or with infinite values in float16 (an overflow: the
        seed ``logit * onehot`` then holds ``inf * 0 = NaN``): every relevance would be NaN.'''
        for tensor in _tensors(output):
            if not (_differentiable(tensor) and tensor.is_floating_point()):
                continue
            if bool(torch.isnan(tensor).any()):
                raise ValueError(
                    f'{type(module).__name__}: the model\'s own forward produced NaN (e.g. a float16 overflow, or '
                    'transformers\' eager attention in float64 with left padding, which turns fully masked rows into '
                    'NaN); every relevance would be NaN. Use bfloat16/float32, or attn_implementation="sdpa".'
                )
            if tensor.dtype == torch.float16 and bool(torch.isinf(tensor).any()):
                raise ValueError(
                    f'{type(module).__name__}: the model\'s own forward produced NaN or infinite values: its float16 '
                    'output overflows (beyond ±65504); every relevance would be NaN. Use bfloat16 (float32\'s range) '
                    'or float32.'
                )

    def _push(self, module, args, kwargs):
        self._watch_checkpoint()
        if not self.stack:
            self._enter(module, args, kwargs)
        parent = self.stack[-1] if self.stack else None
        ruled = self.ruled(module)
        suspended = ruled or (parent is not None and parent.suspended)
        attention = self.is_attention(module) or (parent is not None and parent.attention)
        frame = _Frame(self.names.get(module, type(module).__name__), module, suspended, attention)
        if ruled:
            frame.tensors = {}
        if module in self.guarded:
            frame.snapshot = self._versions(args)
        self.stack.append(frame)

    def _pop(self, module, args, output):
        if not self.stack:
            return
        self.stack.pop()
        if isinstance(module, types.Activation) and not (self.stack and self.stack[-1].suspended):
            for tensor in _tensors(output):
                self._tag(tensor, 'gate')
        if not self.stack and self.depth:
            self._exit(module, output)

    def forward_tensors(self, module):
        '''``(name, tensors)`` of the running call of ``module`` (a module with a module rule, called from its forward
        hook): its qualified name and the parameters and buffers (by name) that its forward computed with.'''
        frame = self.stack[-1] if self.stack else None
        if frame is None or frame.module is not module or frame.tensors is None:
            return self.names.get(module), {}
        return frame.name, frame.tensors

    def _watch_checkpoint(self):
        '''Wrap the recompute function of a gradient checkpointing region whose forward runs now, once, so that its
        recomputation in the backward pass runs inside the mode with the current module stack (called before a module
        is pushed and before an operation runs: the first call in a region sees the stack of the region's start).'''
        if torch.is_grad_enabled():
            record, attribute, reentrant = _checkpoint_frame(), 'recompute_fn', False
        elif not self.stack or self.stack[-1].grad:
            # reentrant checkpointing runs its region without gradients (a region starts where they are switched off)
            record, attribute, reentrant = _reentrant_checkpoint(), 'run_function', True
        else:
            return
        # (CheckpointFunction.forward sets ctx.run_function after its first torch calls)
        function = getattr(record, attribute, None)
        if function is None or getattr(record, '_zennit_attn_engine', None) is self:
            return
        stack = [frame.copy() for frame in self.stack]

        def recompute(*args, **kwargs):
            return self._recompute(function, stack, reentrant, args, kwargs)
        setattr(record, attribute, recompute)
        record._zennit_attn_engine = self

    def _recompute(self, function, stack, reentrant, args, kwargs):
        '''Run ``function``, a checkpointed region of the forward recomputed in the backward pass, inside the mode with
        the module stack ``stack`` of the original forward, so that it builds the same rule nodes.'''
        if not self.handles:
            raise UnsupportedOperationError(
                'gradient checkpointing recomputes part of the forward in the backward pass, but the composite was '
                'removed after the forward; compute the relevance while the composite is registered.'
            )
        saved = self.stack, self._masks, self.on_probabilities
        self.stack, self._masks = [frame.copy() for frame in stack], {}
        listeners = None
        if not reentrant:
            # only the saved tensors of a non-reentrant recomputation are used, its graph never sees relevance: nothing
            # may be recorded twice
            listeners = op_listeners.set(())
            if self.on_probabilities is not None:
                self.on_probabilities = lambda probabilities: None
        if stack:
            self.mode.__enter__()
            self.depth += 1
        try:
            return function(*args, **kwargs)
        finally:
            if stack:
                self.depth -= 1
                self.mode.__exit__(None, None, None)
            self.stack, self._masks, self.on_probabilities = saved
            if listeners is not None:
                op_listeners.reset(listeners)

    @staticmethod
    def _versions(value):
        return [(id(tensor), tensor._version) for tensor in _tensors(value)]

    def _check_inputs(self, module, args):
        frame = self.stack[-1] if self.stack and self.stack[-1].module is module else None
        if frame is not None and frame.snapshot is not None:
            if frame.snapshot != self._versions(args):
                raise UnsupportedOperationError(
                    f'{self._where(frame)}: a forward pre-hook changed the input of this module; its rule would '
                    'attribute a computation that did not happen. Remove the hook while explaining.'
                )
            frame.snapshot = None

    def _snapshot_output(self, module, args, output):
        frame = self.stack[-1] if self.stack and self.stack[-1].module is module else None
        if frame is not None:
            frame.snapshot = (output, self._versions(output))

    def _check_output(self, module, args, output):
        frame = self.stack[-1] if self.stack and self.stack[-1].module is module else None
        if frame is None or frame.snapshot is None:
            return
        original, versions = frame.snapshot
        frame.snapshot = None
        if output is not original or self._versions(output) != versions:
            raise UnsupportedOperationError(
                f'{self._where(frame)}: a forward hook changed the output of this module; its rule would attribute '
                'a computation that did not happen (steering or patching tools). Remove the hook while explaining, '
                'or register it on a module without a rule.'
            )

    @staticmethod
    def _where(frame):
        return f'module {frame.name!r} ({type(frame.module).__name__})' if frame.name else \
            f'the model ({type(frame.module).__name__})'

    def _site(self, op):
        '''The qualified name of an operation site (``'<module>.<op>'``, numbered within the module's forward).'''
        frame = self.stack[-1] if self.stack else None
        if frame is None:
            return op
        count = frame.counts.get(op, 0)
        frame.counts[op] = count + 1
        name = op if count == 0 else f'{op}_{count}'
        return f'{frame.name}.{name}' if frame.name else name

    @staticmethod
    def _tag(tensor, role):
        '''Mark ``tensor`` as attention ``'scores'``, ``'probabilities'`` or a ``'gate'`` (for CP-LRP's carriers).'''
        if isinstance(tensor, torch.Tensor):
            tensor._zennit_attn_role = role
        return tensor

    def _inherit(self, result, *operands):
        '''Give ``result`` the role of its only input-dependent operand (scores stay scores when scaled or masked), or
        the role ``'scores'`` if all its input-dependent operands are scores (DeBERTa sums content-to-content,
        content-to-position and position-to-content scores: without the role its softmax would not be the attention's,
        and CP-LRP would propagate through it).'''
        roles = [self._role(operand) for operand in operands if _differentiable(operand) and _is_variable(operand)]
        if len(roles) == 1 and roles[0] is not None:
            self._tag(result, roles[0])
        elif len(roles) > 1 and all(role == 'scores' for role in roles):
            self._tag(result, 'scores')
        return result

    @staticmethod
    def _role(tensor):
        return getattr(tensor, '_zennit_attn_role', None) if isinstance(tensor, torch.Tensor) else None

    # --------------------------------------------------------------------------------------------------- dispatch
    def dispatch(self, func, args, kwargs):
        '''Run one torch call of the forward: with a rule node if it is a glue op on the relevance path.'''
        frame = self.stack[-1] if self.stack else None
        if frame is not None and frame.suspended:
            if frame.tensors is not None:
                frame.record(args, kwargs)
            return func(*args, **kwargs)
        name = _name(func)
        self._watch_checkpoint()
        if self.rule_for is None:
            return self._record(name, func, args, kwargs, frame)
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        handler = self._handlers.get(name)
        if handler is None:
            if name in ACTIVATIONS:
                handler = Engine._activation
            elif name in SAFE_OPS:
                return self._safe(name, func, args, kwargs)
            else:
                return self._unknown(name, func, args, kwargs)
        return handler(self, name, func, args, kwargs)

    def _safe(self, name, func, args, kwargs):
        if name.startswith('dropout') or name in ('alpha_dropout', 'feature_alpha_dropout'):
            bound = _bind(('input', 'p', 'training'), args, kwargs, {'p': 0.5, 'training': True})
            if bound['training'] and bound['p'] and _differentiable(bound['input']) and _is_variable(bound['input']):
                raise UnsupportedOperationError(
                    f'{self._location()}: dropout is active (training mode), which makes every heatmap random; call '
                    'model.eval() first.'
                )
        if name == 'pad':
            bound = _bind(('input', 'pad', 'mode', 'value'), args, kwargs, {'mode': 'constant'})
            if bound['mode'] != 'constant' and _differentiable(bound['input']) and _is_variable(bound['input']):
                return self._unknown(f'pad(mode={bound["mode"]!r})', func, args, kwargs, force=True)
        result = func(*args, **kwargs)
        if name in ('cat', 'concat', 'concatenate') and isinstance(result, torch.Tensor):
            parts = args[0] if args else kwargs.get('tensors')
            if isinstance(parts, (tuple, list)) and len(parts) == 2 and hasattr(parts[0], '_zennit_attn_negated'):
                # cat(-x2, x1): the rotate_half of a rotary embedding, if x1 and x2 are the halves of one tensor
                result._zennit_attn_halves = (parts[0]._zennit_attn_negated, parts[1])
        # roles (probabilities, gates) survive re-arrangements and casts
        role = next((self._role(arg) for arg in args if self._role(arg) is not None), None)
        if role is not None and isinstance(result, torch.Tensor):
            self._tag(result, role)
        elif role is not None and name in ('topk', 'sort'):
            # (values, indices): the selected routing weights stay gates
            self._tag(result[0], role)
        return result

    def _location(self):
        frame = self.stack[-1] if self.stack else None
        return 'the model' if frame is None else self._where(frame)

    def _unknown(self, name, func, args, kwargs, force=False):
        result = func(*args, **kwargs)
        if lenient.get():
            return result
        if force or any(_differentiable(tensor) and _is_variable(tensor) for tensor in _tensors(result)):
            hint = _HINTS.get(name.strip('_'), 'it has no AttnLRP rule; see ATTNLRP.md §2 for the supported ops')
            raise UnsupportedOperationError(
                f'{self._location()}: operation {name!r} on an input-dependent tensor has no AttnLRP rule, so its '
                f'plain gradient would silently corrupt the relevance ({hint}).'
            )
        return result

    # ---------------------------------------------------------------------------------------------------- helpers
    def _refuse(self, name, output):
        '''Refuse operation ``name`` (whose ``output`` is already computed) as having no rule (unless lenient).'''
        return self._unknown(name, lambda: output, (), {}, force=True)

    def _attach(self, op, carrier, inputs, output, role=None):
        '''Connect ``output`` (computed by the original function) to ``inputs`` through one node whose backward is the
        rule of ``carrier``; returns ``output`` unchanged if no input depends on the model input.'''
        variable = tuple(_differentiable(tensor) and _is_variable(tensor) for tensor in inputs)
        if not any(variable):
            return output
        rule = None if self.rule_for is None else self.rule_for(carrier, role)
        if rule is not None and not rule.active:
            # the composite is inactive (Composite.inactive): the plain graph of the original call stays
            return output
        if rule is None:
            if self.rule_for is None:
                return output
            raise UnsupportedOperationError(
                f'{self._location()}: the composite has no rule for {type(carrier).__name__} (operation {op!r}); add '
                'one to its layer map.'
            )
        if not isinstance(output, torch.Tensor):
            raise UnsupportedOperationError(f'{self._location()}: operation {op!r} returned {type(output).__name__}.')
        result = _RelevanceFunction.apply(rule, carrier, variable, [output.detach()], *inputs)
        site = self._site(op)
        for listener in op_listeners.get():
            listener(site, result)
        return result

    def _constant(self, value, like):
        '''A Python number as a 0-d constant tensor of ``like``'s dtype and device.'''
        if isinstance(value, torch.Tensor):
            return value
        return torch.tensor(value, dtype=like.dtype if like.is_floating_point() else torch.float32,
                            device=like.device)

    def _carrier(self, key, factory):
        carrier = self._carriers.get(key)
        if carrier is None:
            carrier = self._carriers[key] = factory()
        return carrier

    def _inplace(self, name, func, args, kwargs, compute):
        '''Run an in-place op ``target op= other``: the rule node is built out of place on a copy of the target, then
        copied back into the target, so that the target (and its aliases) hold the result, with the rule as history.
        '''
        target = args[0]
        if not any(_differentiable(tensor) and _is_variable(tensor) for tensor in _tensors((args, kwargs))):
            return func(*args, **kwargs)
        base = target._base if target._is_view() else target
        if any(getattr(tensor.grad_fn, 'keeps_output', False) for tensor in (target, base) if tensor is not None):
            # the target is kept by a rule for the backward pass and may not change
            if name.startswith('__i') or _augmented_assignment():
                # augmented assignment (x += y): Python rebinds the name to the result, so the result can be a new
                # tensor (only other references to the old tensor, if any, keep the old values)
                return self._inherit(compute(target), target)
            raise UnsupportedOperationError(
                f'{self._location()}: in-place {name!r} on the output of an operation whose rule keeps that output '
                'for the backward pass; write it out of place (x = x * c, or x *= c).'
            )
        original = target.clone()
        result = compute(original)
        target.copy_(result)
        return self._inherit(target, result)

    # ---------------------------------------------------------------------------------------------------- op rules
    def _add(self, name, func, args, kwargs, sign=1.0, reverse=False):
        if name in INPLACE:
            plain = {'__iadd__': 'add', 'add_': 'add', '__isub__': 'sub', 'sub_': 'sub'}[name]
            return self._inplace(name, func, args, kwargs, lambda copy: self._add(
                plain, getattr(torch, plain), (copy,) + tuple(args[1:]), kwargs, sign))
        bound = _bind(('input', 'other', 'alpha'), args, kwargs, {'alpha': 1})
        a, b, alpha = bound['input'], bound['other'], bound['alpha']
        output = func(*args, **kwargs)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        a, b = self._constant(a, output), self._constant(b, output)
        if reverse:
            # rsub(a, b) = b - alpha * a
            a, b, factor = b, a, -alpha
        else:
            factor = sign * alpha
        if factor == 1:
            rotary = self._rotary(a, b, output)
            if rotary is not None:
                return rotary
        if factor != 1:
            b = self._scale(b, factor, 'neg' if factor == -1 else 'mul')
        return self._inherit(self._attach(name, self._carrier('sum', layers.Sum), (a, b), output), a, b)

    def _rotary(self, a, b, output):
        '''``x * cos + rotate_half(x) * sin`` (rotate_half = ``cat(-x2, x1)`` of x's halves) as one rotary-embedding
        node (the RoPE rule, which keeps x, usually kept by its projection anyway, instead of both products); None if
        the operands are not of that form. The relevance equals that of the separate products, negation and sum.'''
        x, cos = getattr(a, '_zennit_attn_factor', (None, None))
        rotated, sin = getattr(b, '_zennit_attn_factor', (None, None))
        halves = getattr(rotated, '_zennit_attn_halves', None)
        if x is None or halves is None or cos.shape != sin.shape or rotated.shape != x.shape or x.shape[-1] % 2:
            return None
        second, first = halves
        half = x.shape[-1] // 2
        for part, expected in ((first, x[..., :half]), (second, x[..., half:])):
            if part.shape != expected.shape or part.stride() != expected.stride() or \
                    part.data_ptr() != expected.data_ptr():
                return None
        if cos.shape[-1] != x.shape[-1]:
            return None
        return self._attach('add', self._carrier('rotary', layers.RotaryEmbedding), (x, cos, sin), output)

    def _scale(self, tensor, factor, op, output=None):
        '''``factor * tensor`` (or its given ``output``) through the identity rule (constant scaling, negation).'''
        output = tensor * factor if output is None else output
        return self._attach(op, self._carrier(('scale', factor), lambda: layers.Scale(factor)), (tensor,), output)

    def _sub(self, name, func, args, kwargs):
        return self._add(name, func, args, kwargs, sign=-1.0)

    def _rsub(self, name, func, args, kwargs):
        return self._add(name, func, args, kwargs, reverse=True)

    def _mul(self, name, func, args, kwargs):
        if name in INPLACE:
            return self._inplace(name, func, args, kwargs, lambda copy: self._mul(
                'mul', torch.mul, (copy,) + tuple(args[1:]), kwargs))
        bound = _bind(('input', 'other'), args, kwargs)
        output = func(*args, **kwargs)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        a, b = bound['input'], bound['other']
        scalar = next((value for value in (b, a) if _scalar(value)), None)
        if scalar is not None:
            # scaling by a number: the identity rule
            x = a if scalar is b else b
            return self._inherit(self._scale(x, float(scalar), name, output), x)
        a, b = self._constant(a, output), self._constant(b, output)
        gate_a, gate_b = self._role(a) == 'gate', self._role(b) == 'gate'
        if gate_a != gate_b and not all(_differentiable(tensor) and _is_variable(tensor) for tensor in (a, b)):
            # a gate times a constant is a scaling, not a gated product
            gate_a = gate_b = False
        if gate_b and not gate_a:
            # the gate first (CP-LRP treats it as constant)
            return self._attach(name, self._carrier('gated', layers.GatedProduct), (b, a), output)
        if gate_a and not gate_b:
            return self._attach(name, self._carrier('gated', layers.GatedProduct), (a, b), output)
        result = self._inherit(self._attach(name, self._carrier('product', layers.Product), (a, b), output), a, b)
        variable = [_differentiable(tensor) and _is_variable(tensor) for tensor in (a, b)]
        if sum(variable) == 1 and result is not output:
            # remember ``x * c`` (c constant): a sum of two such products may be a rotary embedding
            result._zennit_attn_factor = (a, b) if variable[0] else (b, a)
        return result

    def _div(self, name, func, args, kwargs, dividend=None):
        if name in INPLACE:
            return self._inplace(name, func, args, kwargs, lambda copy: self._div(
                'div', torch.div, (copy,) + tuple(args[1:]), kwargs, dividend=args[0]))
        bound = _bind(('input', 'other'), args, kwargs, {'rounding_mode': None})
        output = func(*args, **kwargs)
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        a, b = bound['input'], bound['other']
        if isinstance(b, torch.Tensor) and _differentiable(b) and _is_variable(b):
            # x / x.sum(dim, keepdim=True) (``dividend``: the tensor an in-place division modifies, of which ``a`` is
            # a copy), neither changed in place since the sum: a re-normalisation, e.g. of a router's top-k weights;
            # any other divisor has no rule
            summed, dim, versions = getattr(b, '_zennit_attn_sum_of', (None, None, None))
            if summed is not None and summed is (a if dividend is None else dividend) and \
                    versions == (summed._version, b._version) and bound['rounding_mode'] is None:
                return self._inherit(self._attach(name, layers.Renormalize(dim), (a,), output), a)
            return self._refuse('div', output)
        if bound['rounding_mode'] is not None and _differentiable(a) and _is_variable(a):
            return self._refuse(f'div(rounding_mode={bound["rounding_mode"]!r})', output)
        if _scalar(b):
            factor = float(b)
            carrier = self._carrier(('divide', factor), lambda: layers.Scale(factor, divide=True))
            return self._inherit(self._attach(name, carrier, (a,), output), a)
        # division by a constant tensor: a product with a constant factor, which passes all relevance to the dividend
        result = self._attach(name, self._carrier('product', layers.Product), (a, self._constant(b, output)), output)
        return self._inherit(result, a)

    def _rdiv(self, name, func, args, kwargs):
        # number / tensor
        output = func(*args, **kwargs)
        if any(_differentiable(tensor) and _is_variable(tensor) for tensor in _tensors(args)):
            return self._refuse('div', output)
        return output

    def _neg(self, name, func, args, kwargs):
        if name in INPLACE:
            return self._inplace(name, func, args, kwargs, lambda copy: self._neg('neg', torch.neg, (copy,), {}))
        output = func(*args, **kwargs)
        result = self._attach('neg', self._carrier(('scale', -1.0), lambda: layers.Scale(-1.0)), (args[0],), output)
        if result is not output:
            result._zennit_attn_negated = args[0]
        return self._inherit(result, args[0])

    def _pos(self, name, func, args, kwargs):
        return func(*args, **kwargs)

    def _matmul(self, name, func, args, kwargs, reverse=False):
        bound = _bind(('input', 'other'), args, kwargs)
        a, b = bound['input'], bound['other']
        if reverse:
            a, b = b, a
        output = func(*args, **kwargs)
        if not any(_differentiable(tensor) and _is_variable(tensor) for tensor in (a, b)):
            return output
        if a.ndim < 2 or b.ndim < 2:
            return self._refuse(f'{name} of a vector', output)
        role_a, role_b = self._role(a), self._role(b)
        if role_a == 'probabilities':
            carrier = self._carrier('context', layers.AttentionContext)
        elif role_b == 'probabilities':
            raise UnsupportedOperationError(
                f'{self._location()}: attention probabilities as the second operand of a matmul are not supported; '
                'compute probabilities @ values.'
            )
        else:
            carrier = self._carrier('matmul', layers.MatMul)
        result = self._attach(name, carrier, (a, b), output)
        if carrier is not self._carriers.get('context'):
            self._tag(result, 'scores')
        return result

    def _rmatmul(self, name, func, args, kwargs):
        return self._matmul(name, func, args, kwargs, reverse=True)

    def _softmax(self, name, func, args, kwargs):
        names = ('input', 'dim', '_stacklevel', 'dtype') if func is F.softmax else ('input', 'dim', 'dtype')
        bound = _bind(names, args, kwargs, {'dim': None, 'dtype': None})
        output = func(*args, **kwargs)
        x, dim = bound['input'], bound['dim']
        if not (_differentiable(x) and _is_variable(x)):
            return output
        if dim is None:
            return self._refuse('softmax without dim', output)
        attention = self._role(x) == 'scores'
        carrier = (layers.AttentionSoftmax if attention else layers.Softmax)(dim=dim, dtype=bound['dtype'])
        result = self._attach('softmax', carrier, (x,), output)
        # any other softmax weighs something (a mixture-of-experts router): a gate, which CP-LRP treats as constant in
        # the product it weighs
        return self._tag(result, 'probabilities' if attention else 'gate')

    def _reduce(self, name, func, args, kwargs):
        bound = _bind(('input', 'dim', 'keepdim'), args, kwargs, {'dim': None, 'keepdim': False})
        output = func(*args, **kwargs)
        x = bound['input']
        if not isinstance(output, torch.Tensor) or not (_differentiable(x) and _is_variable(x)):
            return output
        dim = bound['dim']
        if dim is None:
            dim = tuple(range(x.ndim))
        carrier = layers.Mean(dim=dim, keepdim=bound['keepdim'])
        result = self._attach(name, carrier, (x,), output)
        if name == 'sum' and bound['keepdim'] and result is not output:
            # the divisor of a re-normalisation x / x.sum(dim, keepdim=True), see _div
            result._zennit_attn_sum_of = (x, dim, (x._version, result._version))
        return result

    def _pool(self, name, func, args, kwargs):
        output = func(*args, **kwargs)
        options = dict(kwargs)
        x = args[0] if args else options.pop('input')
        carrier = layers.AveragePool(func, *args[1:], **options)
        return self._attach(name, carrier, (x,), output)

    def _clamp(self, name, func, args, kwargs):
        '''``clamp(x, min, max)`` with constant bounds: the element-wise activation Hardtanh, so the identity rule
        (AttnLRP Eq. 9), e.g. T5's float16 guard against overflow; the output keeps the input's role. Bounds that
        depend on the input have no rule.'''
        if name.endswith('_'):
            plain = getattr(torch, name.rstrip('_'))
            return self._inplace(name, func, args, kwargs, lambda copy: self._clamp(
                name.rstrip('_'), plain, (copy,) + tuple(args[1:]), kwargs))
        x = args[0] if args else kwargs.get('input')
        bounds = list(args[1:]) + [value for key, value in kwargs.items() if key != 'input']
        if any(_differentiable(bound) and _is_variable(bound) for bound in bounds):
            return self._unknown(f'{name} (input-dependent bounds)', func, args, kwargs, force=True)
        output = func(*args, **kwargs)
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return output
        carrier = self._carrier(('activation', torch.nn.Hardtanh), torch.nn.Hardtanh)
        return self._inherit(self._attach(name, carrier, (x,), output), x)

    def _activation(self, name, func, args, kwargs):
        x = args[0] if args else kwargs.get('input')
        if name.endswith('_') or kwargs.get('inplace') or (len(args) > 1 and args[-1] is True):
            plain = getattr(F, name.rstrip('_'), None) or getattr(torch, name.rstrip('_'))
            return self._inplace(name, func, args, kwargs, lambda copy: self._activation(
                name.rstrip('_'), plain, (copy,), {}))
        output = func(*args, **kwargs)
        if not isinstance(x, torch.Tensor):
            return output
        kind = ACTIVATIONS[name]
        result = self._attach(name, self._carrier(('activation', kind), kind), (x,), output)
        # an activation of attention scores (soft-capping) keeps them scores; otherwise its output gates a product
        return self._tag(result, 'scores') if self._role(x) == 'scores' else self._tag(result, 'gate')

    def _linear(self, name, func, args, kwargs):
        bound = _bind(('input', 'weight', 'bias'), args, kwargs, {'bias': None})
        output = func(*args, **kwargs)
        return self._linear_node(name, bound['input'], bound['weight'], bound['bias'], output)

    def _linear_node(self, name, x, weight, bias, output):
        if not (_differentiable(x) and _is_variable(x)):
            if any(_differentiable(tensor) and _is_variable(tensor) for tensor in (weight, bias)):
                return self._refuse(f'{name} with an input-dependent weight', output)
            return output
        if any(_differentiable(tensor) and _is_variable(tensor) for tensor in (weight, bias)):
            return self._refuse(f'{name} with an input-dependent weight', output)
        frame = self.stack[-1] if self.stack else None
        role = 'attention_projection' if frame is not None and frame.attention else None
        return self._attach(name, _LinearCall(weight, bias), (x,), output, role=role)

    def _addmm(self, name, func, args, kwargs):
        # bias + x @ weight (transformers' Conv1D, when called outside its module)
        bound = _bind(('input', 'mat1', 'mat2'), args, kwargs, {'beta': 1, 'alpha': 1})
        output = func(*args, **kwargs)
        if bound['beta'] != 1 or bound['alpha'] != 1:
            return self._refuse('addmm with alpha/beta', output)
        return self._linear_node('addmm', bound['mat1'], bound['mat2'].t(), bound['input'], output)

    def _conv(self, name, func, args, kwargs):
        bound = _bind(('input', 'weight', 'bias', 'stride', 'padding', 'dilation', 'groups'), args, kwargs,
                      {'bias': None, 'stride': 1, 'padding': 0, 'dilation': 1, 'groups': 1})
        output = func(*args, **kwargs)
        x, weight, bias = bound['input'], bound['weight'], bound['bias']
        if not any(_differentiable(tensor) and _is_variable(tensor) for tensor in (x, weight, bias)):
            return output
        if any(_differentiable(tensor) and _is_variable(tensor) for tensor in (weight, bias)):
            return self._refuse(f'{name} with an input-dependent weight', output)
        carrier = _conv_call(weight, bias, bound['stride'], bound['padding'], bound['dilation'], bound['groups'])
        return self._attach(name, carrier, (x,), output)

    def _layer_norm(self, name, func, args, kwargs):
        bound = _bind(('input', 'normalized_shape', 'weight', 'bias', 'eps'), args, kwargs,
                      {'weight': None, 'bias': None, 'eps': 1e-5})
        output = func(*args, **kwargs)
        carrier = _LayerNormCall(bound['normalized_shape'], bound['weight'], bound['bias'], bound['eps'])
        return self._attach('layer_norm', carrier, (bound['input'],), output)

    def _rms_norm(self, name, func, args, kwargs):
        output = func(*args, **kwargs)
        x = args[0] if args else kwargs['input']
        return self._attach('rms_norm', self._carrier('rms_norm', _RMSNormCall), (x,), output)

    def _index_add(self, name, func, args, kwargs):
        if name == 'index_add_':
            return self._inplace(name, func, args, kwargs, lambda copy: self._index_add(
                'index_add', torch.index_add, (copy,) + tuple(args[1:]), kwargs))
        bound = _bind(('input', 'dim', 'index', 'source'), args, kwargs, {'alpha': 1})
        output = func(*args, **kwargs)
        carrier = layers.IndexAdd(bound['dim'], bound['index'], bound['alpha'])
        return self._attach('index_add', carrier, (bound['input'], bound['source']), output)

    # ------------------------------------------------------------------------------------------------- attention
    def _sdpa(self, name, func, args, kwargs):
        bound = _bind(('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale', 'enable_gqa'),
                      args, kwargs, {'attn_mask': None, 'dropout_p': 0., 'is_causal': False, 'scale': None,
                                     'enable_gqa': False})
        query, key, value = bound['query'], bound['key'], bound['value']
        recording = self.rule_for is None
        if not recording and not any(_differentiable(tensor) and _is_variable(tensor) for tensor in (query, key,
                                                                                                     value)):
            return func(*args, **kwargs)
        if bound['dropout_p'] and not recording:
            raise UnsupportedOperationError(
                f'{self._location()}: attention dropout p={bound["dropout_p"]} is active (training mode), which makes '
                'every heatmap random; call model.eval() first.'
            )
        scale = bound['scale'] if bound['scale'] is not None else 1 / math.sqrt(query.shape[-1])
        mask = self._additive_mask(bound['attn_mask'], bound['is_causal'], query, key)
        if self.fused:
            output = func(*args, **kwargs)
            carrier = layers.AttentionCore(scale=scale)
            inputs = (query, key, value) if mask is None else (query, key, value, mask)
            return self._attach('attention', carrier, inputs, output)
        return self.unfolded_attention(query, key, value, mask, scale)[0]

    def unfolded_attention(self, query, key, value, mask, scale):
        '''``softmax(scale * q @ k^T + mask) @ v`` as separate rule nodes (scaled score matmul, ε mask sum, softmax,
        context matmul: exactly the rules that :py:class:`~zennit_attn.rules.AttentionRule` composes); returns the
        context and the probabilities.'''
        groups = layers.query_groups(query, key)
        key, value = layers.repeat_heads(key, groups), layers.repeat_heads(value, groups)
        if self.rule_for is None:
            return self._plain_attention(query, key, value, mask, scale)
        # one scaled product (as AttentionRule's scores), so that ε is applied where the fused rule applies it
        transposed = key.transpose(-1, -2)
        carrier = layers.AttentionScores(scale=scale, scale_output=True)
        scores = self._attach('matmul', carrier, (query, transposed), (query @ transposed) * scale)
        self._tag(scores, 'scores')
        if mask is not None:
            scores = self._add('add', torch.add, (scores, mask), {})
            self._tag(scores, 'scores')
        probabilities = self._softmax('softmax', torch.softmax, (scores, -1), {})
        return self._matmul('matmul', torch.matmul, (probabilities.to(value.dtype), value), {}), probabilities

    def _additive_mask(self, mask, is_causal, query, key):
        '''The additive float form of an attention mask (boolean ``True`` = attend; ``is_causal`` = top-left causal),
        masked entries at the dtype's minimum (at most float32's, so that no NaN arises in a float32 softmax). Built
        once per forward for each distinct mask, so that all layers share (and their rules keep) one tensor.'''
        cache_key = (id(mask), bool(is_causal), query.shape[-2], key.shape[-2], query.dtype, query.device)
        cached = self._masks.get(cache_key)
        if cached is not None and cached[0] is mask:
            return cached[1]
        result = self._build_mask(mask, is_causal, query, key)
        self._masks[cache_key] = (mask, result)
        return result

    @staticmethod
    def _build_mask(mask, is_causal, query, key):
        '''See :py:meth:`_additive_mask`.'''
        dtype = query.dtype
        fill = max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)
        if is_causal:
            length, source = query.shape[-2], key.shape[-2]
            causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
            mask = causal if mask is None else mask & causal if mask.dtype == torch.bool else mask.masked_fill(
                ~causal, fill)
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, fill)
        return mask.to(dtype).clamp(min=fill)

    def _multi_head_attention(self, name, func, args, kwargs):
        '''``F.multi_head_attention_forward`` (behind :py:class:`torch.nn.MultiheadAttention`), decomposed into its
        projections (functional linear layers: attention projections) and the attention core.'''
        names = ('query', 'key', 'value', 'embed_dim_to_check', 'num_heads', 'in_proj_weight', 'in_proj_bias',
                 'bias_k', 'bias_v', 'add_zero_attn', 'dropout_p', 'out_proj_weight', 'out_proj_bias', 'training',
                 'key_padding_mask', 'need_weights', 'attn_mask', 'use_separate_proj_weight', 'q_proj_weight',
                 'k_proj_weight', 'v_proj_weight', 'static_k', 'static_v', 'average_attn_weights', 'is_causal')
        bound = _bind(names, args, kwargs, {
            'training': True, 'key_padding_mask': None, 'need_weights': True, 'attn_mask': None,
            'use_separate_proj_weight': False, 'q_proj_weight': None, 'k_proj_weight': None, 'v_proj_weight': None,
            'static_k': None, 'static_v': None, 'average_attn_weights': True, 'is_causal': False,
        })
        query, key, value = bound['query'], bound['key'], bound['value']
        if self.rule_for is not None and not any(
                _differentiable(tensor) and _is_variable(tensor) for tensor in (query, key, value)):
            return func(*args, **kwargs)
        if bound['bias_k'] is not None or bound['add_zero_attn'] or bound['static_k'] is not None:
            return self._unknown('multi_head_attention_forward with add_bias_kv/add_zero_attn/static_k',
                                 lambda: None, (), {}, force=True)
        if bound['training'] and bound['dropout_p'] and self.rule_for is not None:
            raise UnsupportedOperationError(
                f'{self._location()}: attention dropout is active (training mode); call model.eval() first.'
            )
        heads = bound['num_heads']
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (tensor.unsqueeze(1) for tensor in (query, key, value))
        target, batch, embed = query.shape
        source = key.shape[0]
        head_dim = embed // heads
        if bound['use_separate_proj_weight']:
            weights = (bound['q_proj_weight'], bound['k_proj_weight'], bound['v_proj_weight'])
        else:
            weights = bound['in_proj_weight'].chunk(3)
        in_bias = bound['in_proj_bias']
        biases = (None,) * 3 if in_bias is None else in_bias.chunk(3)
        if query is key and key is value and not bound['use_separate_proj_weight']:
            packed = self._linear_node('linear', query, bound['in_proj_weight'], in_bias,
                                       F.linear(query, bound['in_proj_weight'], in_bias))
            q, k, v = packed.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        else:
            q, k, v = (
                self._linear_node('linear', tensor, weight, bias, F.linear(tensor, weight, bias))
                for tensor, weight, bias in zip((query, key, value), weights, biases)
            )

        def heads_first(tensor, length):
            # (length, batch, embed) -> (batch, heads, length, head_dim)
            return tensor.reshape(length, batch, heads, head_dim).permute(1, 2, 0, 3)
        q, k, v = heads_first(q, target), heads_first(k, source), heads_first(v, source)
        mask = self._mha_mask(bound, batch, heads, target, source, q)
        scale = 1 / math.sqrt(head_dim)
        need_weights = bound['need_weights']
        if self.fused and not need_weights:
            output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            inputs = (q, k, v) if mask is None else (q, k, v, mask)
            context = self._attach('attention', layers.AttentionCore(scale=scale), inputs, output)
            probabilities = None
        else:
            context, probabilities = self.unfolded_attention(q, k, v, mask, scale)
        merged = context.permute(2, 0, 1, 3).reshape(target * batch, embed)
        out = self._linear_node('linear', merged, bound['out_proj_weight'], bound['out_proj_bias'],
                                F.linear(merged, bound['out_proj_weight'], bound['out_proj_bias']))
        out = out.view(target, batch, embed)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = probabilities.mean(1) if bound['average_attn_weights'] else probabilities
        return out, weights.squeeze(0) if unbatched else weights

    @staticmethod
    def _mha_mask(bound, batch, heads, target, source, q):
        masks = []
        attn_mask, key_padding_mask = bound['attn_mask'], bound['key_padding_mask']
        if bound['is_causal'] and attn_mask is None:
            attn_mask = torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1)
        fill = max(torch.finfo(q.dtype).min, torch.finfo(torch.float32).min)
        for mask in (attn_mask, key_padding_mask):
            if mask is None:
                continue
            if mask is key_padding_mask:
                mask = mask.reshape(batch, 1, 1, source)
            elif mask.dim() == 3:
                mask = mask.reshape(batch, heads, target, source)
            if mask.dtype == torch.bool:
                # torch's convention for nn.MultiheadAttention: True = masked
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, fill)
            masks.append(mask.to(q.dtype).clamp(min=fill))
        if not masks:
            return None
        return masks[0] if len(masks) == 1 else (masks[0] + masks[1]).clamp(min=fill)

    # -------------------------------------------------------------------------------------- probability recording
    def _record(self, name, func, args, kwargs, frame):
        '''Recording mode (no rules): attention calls run unfolded with plain operations, so that their probabilities
        are part of the graph (Grad×AttnRoll differentiates with respect to them), and are passed to
        ``on_probabilities``; everything else runs unchanged.'''
        if name == 'scaled_dot_product_attention':
            return self._sdpa(name, func, args, kwargs)
        if name == 'multi_head_attention_forward':
            return self._multi_head_attention(name, func, args, kwargs)
        if name in SOFTMAX and frame is not None and frame.attention:
            # eager attention written with an explicit softmax inside an attention module
            output = func(*args, **kwargs)
            self.on_probabilities(output)
            return output
        return func(*args, **kwargs)

    def _plain_attention(self, query, key, value, mask, scale):
        '''``softmax(scale * q @ k^T + mask) @ v`` with plain operations, recording the probabilities.'''
        scores = (query @ key.transpose(-1, -2)) * scale
        probabilities = torch.softmax(scores if mask is None else scores + mask, -1)
        self.on_probabilities(probabilities)
        return probabilities @ value, probabilities

    _handlers = {}


for _names, _method in (
    (ADD, Engine._add), (SUB, Engine._sub), (RSUB, Engine._rsub), (MUL, Engine._mul), (DIV, Engine._div),
    (RDIV, Engine._rdiv), (NEG, Engine._neg), (POS, Engine._pos), (MATMUL, Engine._matmul),
    (RMATMUL, Engine._rmatmul), (SOFTMAX, Engine._softmax), (REDUCE, Engine._reduce), (POOL, Engine._pool),
    (('linear',), Engine._linear), (('addmm',), Engine._addmm), (('conv1d', 'conv2d', 'conv3d'), Engine._conv),
    (('layer_norm',), Engine._layer_norm), (('rms_norm',), Engine._rms_norm),
    (('scaled_dot_product_attention',), Engine._sdpa), (('index_add', 'index_add_'), Engine._index_add),
    (('multi_head_attention_forward',), Engine._multi_head_attention),
    (('clamp', 'clip', 'clamp_min', 'clamp_max', 'clamp_', 'clip_', 'clamp_min_', 'clamp_max_'), Engine._clamp),
):
    for _op in _names:
        Engine._handlers[_op] = _method


class ProbabilityRecorder:
    '''Context manager: run ``model`` with attention unfolded (no rules, no composite) and record the attention
    probabilities ``(batch, heads, T_q, T_k)`` of every attention call in forward order in :py:attr:`attentions`.
    The forward's outputs are those of the unfolded attention (equal to fused attention up to rounding).
    '''
    def __init__(self, model):
        self.model = model
        self.attentions = []
        self.engine = None

    def __enter__(self):
        self.engine = Engine(rule_for=None, fused=False, on_probabilities=self.attentions.append)
        self.engine.register(self.model)
        return self

    def __exit__(self, *exc):
        self.engine.remove()
        return False
