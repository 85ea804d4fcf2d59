'''AttnLRP rules (Achtibat et al., ICML 2024) as Zennit hooks.

All rules are closed forms: they store in the forward what the backward needs and never re-run the module or modify
its parameters. Each returns one relevance per positional tensor argument of the module call.

Operands that are constants (tensors that do not require a gradient, and :py:class:`torch.nn.Parameter` objects such
as learned position embeddings) receive no relevance: their share is absorbed like a bias, and for bilinear operations
the other operand then receives the full, unhalved relevance.
Tensors computed from parameters alone (``param.expand(...)``, ``param[:, :n]``) are constants too: the rules
follow their autograd graph back to its leaves.
'''
import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer

from .layers import query_groups, repeat_heads, rotate_half


__all__ = [
    'AttnHook', 'IdentityRule', 'SoftmaxRule', 'MatMulRule', 'ProductRule', 'SumRule', 'LayerNormRule', 'RMSNormRule',
    'RoPERule', 'MeanRule', 'CPMatMulRule', 'CPProductRule', 'StopRule', 'AttentionRule', 'CPAttentionRule', 'Epsilon',
    'Gamma', 'SignStabilizer',
]


def _compute_dtype(tensor):
    '''Dtype in which relevance ratios are computed: float32 for half types, otherwise the tensor's own dtype.'''
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return tensor.dtype


def _mask_threshold(dtype):
    '''Inputs of a softmax at or below this value are masked: half the most negative value of ``dtype``, at most
    float32's (masks are filled with ``finfo(dtype).min``, or float32's minimum in float64 models).
    '''
    return max(torch.finfo(dtype).min, torch.finfo(torch.float32).min) / 2


def _unbroadcast(tensor, shape):
    '''Sum ``tensor`` over the dimensions along which an operand of ``shape`` was broadcast.'''
    if tensor.shape == shape:
        return tensor
    return tensor.sum_to_size(shape)


_VARIABLE_KEY = 'zennit_attn_variable'


def _node_is_variable(root):
    '''Whether the autograd node ``root`` depends on a leaf that is not a parameter (i.e. on the model input).

    A post-order walk that stops at leaves and at rule nodes (which know whether their inputs were variable) and caches
    the answer in each node's ``metadata``, so a whole forward costs one pass over the graph.
    '''
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node is None or _VARIABLE_KEY in node.metadata:
            continue
        kind = type(node).__name__
        if kind == 'AccumulateGrad':
            node.metadata[_VARIABLE_KEY] = not isinstance(node.variable, torch.nn.Parameter)
        elif kind == '_RelevanceFunctionBackward':
            node.metadata[_VARIABLE_KEY] = any(node.variable)
        elif expanded:
            node.metadata[_VARIABLE_KEY] = any(
                child is not None and child.metadata.get(_VARIABLE_KEY, False) for child, _ in node.next_functions
            )
        else:
            stack.append((node, True))
            stack.extend((child, False) for child, _ in node.next_functions)
    return root.metadata[_VARIABLE_KEY]


def _is_variable(tensor):
    '''Whether ``tensor`` depends on the model input: it requires a gradient and is neither a parameter nor computed
    from parameters alone (e.g. ``param.expand(...)``), which are constants.
    '''
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad or isinstance(tensor, torch.nn.Parameter):
        return False
    return tensor.grad_fn is None or _node_is_variable(tensor.grad_fn)


class SignStabilizer(Stabilizer):
    '''Zennit's default stabilizer ``z + epsilon * sign(z)`` (sign(0) = +1; :py:func:`zennit.core.stabilize` without
    clipping or norm scaling), with the same values from cheaper operations: ``sign(sign(z) + 1/2)`` is the sign with
    sign(0) = +1 (also for -0.0) without boolean masks.
    '''
    def shift(self, input):
        '''``epsilon * sign(input)`` with sign(0) = +1.'''
        return torch.sign(input).add_(0.5).sign_().mul_(self.epsilon)

    def __call__(self, input):
        return self.shift(input).add_(input)

    def stabilize_(self, input):
        '''Stabilize ``input`` in place and return it.'''
        return input.add_(self.shift(input))


def _stabilizer(epsilon):
    '''The stabilizer of ``epsilon``: :py:class:`SignStabilizer` for numbers, else Zennit's ``Stabilizer.ensure``.'''
    if isinstance(epsilon, (float, int)) and not isinstance(epsilon, bool):
        return SignStabilizer(epsilon=float(epsilon))
    return Stabilizer.ensure(epsilon)


class _RelevanceFunction(torch.autograd.Function):
    '''Autograd node that connects a hooked module's inputs to its output with the rule as backward.

    The module's own graph is dropped, so its plain gradient is never computed, and each call keeps its own inputs in
    its own node (a module called twice in one forward gets the right relevance for both calls).
    '''
    @staticmethod
    def forward(ctx, hook, module, variable, output, *inputs):
        ctx.hook, ctx.module, ctx.variable = hook, module, variable
        # keep only what the rule reads; the rest is described by shape and dtype (meta tensors) to save memory
        ctx.meta = tuple((tensor.shape, tensor.dtype) for tensor in (output,) + inputs)
        save_output, save_inputs = hook.selection(inputs, output, variable)
        ctx.save_for_backward(
            output if save_output else None, *(tensor if save else None for tensor, save in zip(inputs, save_inputs))
        )
        return output.view_as(output)

    @staticmethod
    def backward(ctx, relevance):
        output, *inputs = (
            torch.empty(shape, dtype=dtype, device='meta') if tensor is None else tensor
            for tensor, (shape, dtype) in zip(ctx.saved_tensors, ctx.meta)
        )
        return (None, None, None, None) + ctx.hook.backward_relevance(
            ctx.module, tuple(inputs), output, relevance, ctx.variable
        )


class AttnHook(Hook):
    '''Base class of the closed-form rules: validates the module call, replaces the module's autograd graph by one node
    whose backward is the rule, and computes relevance in float32 for half-precision tensors.

    Unlike Zennit's :py:class:`~zennit.core.BasicHook`, the module is never re-run and its plain gradient is never
    computed, so a rule costs about as much as the gradient it replaces. Relevance is distributed only to inputs that
    depend on the model input: tensors that require a gradient and are not parameters.

    Subclasses set ``num_inputs`` (the number of positional tensor arguments, ``None`` for any) and implement
    :py:meth:`relevance`. While the hook is inactive (:py:meth:`zennit.core.Composite.inactive`), forwards build the
    plain graph.

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of the denominators: a float adds ``epsilon * sign(z)`` (sign(0) = +1), as Zennit's
        :py:func:`~zennit.core.stabilize`; a callable ``(z) -> z_stabilized`` is used as is.
    '''
    num_inputs = None
    uses_epsilon = True
    #: whether :py:meth:`relevance` reads the values of the inputs / the output (else it gets meta tensors)
    saves_inputs = True
    saves_output = True

    def __init__(self, epsilon=1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.stabilizer = _stabilizer(epsilon)
        # the unmodified inputs of an in-place module's running call (see pre_forward)
        self.originals = None

    def _copy_kwargs(self):
        '''Keyword arguments that rebuild this rule in :py:meth:`copy`.'''
        return {'epsilon': self.epsilon} if self.uses_epsilon else {}

    def copy(self):
        '''Return a copy of this hook with the same parameters (Zennit composites register copies of templates).'''
        return self.__class__(**self._copy_kwargs())

    def _check_call(self, module, args, kwargs):
        '''Raise a clear error for module calls whose relevance this rule cannot compute.'''
        rule, name = type(self).__name__, type(module).__name__
        tensor_kwargs = [key for key, value in kwargs.items() if isinstance(value, torch.Tensor)]
        if tensor_kwargs:
            raise TypeError(
                f'{rule} on {name}: tensor keyword argument(s) {tensor_kwargs} would bypass the rule (Zennit passes '
                'only positional arguments through hooks); pass every tensor positionally.'
            )
        non_tensors = [type(arg).__name__ for arg in args if not isinstance(arg, torch.Tensor)]
        if non_tensors:
            raise TypeError(
                f'{rule} on {name}: non-tensor positional argument(s) of type {non_tensors}; Zennit hooks need one '
                'relevance per positional argument, so pass constants as module attributes or keyword arguments.'
            )
        if self.num_inputs is not None and len(args) != self.num_inputs:
            raise ValueError(
                f'{rule} on {name}: expected {self.num_inputs} positional tensor argument(s), got {len(args)}; is '
                'this rule attached to the right module type?'
            )

    def selection(self, inputs, output, variable):
        '''Which tensors of a call the backward pass needs: ``(save_output, (save_input, ...))``; unsaved ones reach
        :py:meth:`relevance` as meta tensors (shape and dtype only). Defaults to ``saves_output`` / ``saves_inputs``.
        '''
        return self.saves_output, (self.saves_inputs,) * len(inputs)

    def register(self, module):
        '''Attach this rule to ``module``.

        Returns
        -------
        :py:obj:`zennit.core.RemovableHandleList`
            Handles that detach the rule again.
        '''
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_forward, with_kwargs=True),
            module.register_forward_hook(self.post_forward, with_kwargs=True),
        ])

    def _applies(self, args):
        '''Whether this call gets a rule node: the rule is active, gradients are on and an input requires a gradient.'''
        return self.active and torch.is_grad_enabled() and any(
            isinstance(arg, torch.Tensor) and arg.requires_grad for arg in args
        )

    def pre_forward(self, module, args, kwargs):
        '''Validate the call before the module runs; in-place modules (``inplace=True``, e.g. ``ReLU(inplace=True)``)
        get copies of their inputs.
        '''
        self._check_call(module, args, kwargs)
        if getattr(module, 'inplace', False) is True and self._applies(args):
            # the inputs are often outputs of other rules' nodes, which autograd forbids to modify in place; the copies
            # are modified instead, and the rule connects its relevance to the unmodified inputs
            self.originals = args
            return tuple(arg.clone() for arg in args), kwargs
        return None

    def post_forward(self, module, args, kwargs, output):
        '''Replace the output's graph by a single node whose backward is this rule.'''
        if self.originals is not None:
            args, self.originals = self.originals, None
        if not self._applies(args):
            return None
        variable = tuple(_is_variable(arg) for arg in args)
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f'{type(self).__name__} on {type(module).__name__}: the module returned {type(output).__name__}, '
                'but rules need a single tensor output.'
            )
        return _RelevanceFunction.apply(self, module, variable, output.detach(), *args)

    def backward_relevance(self, module, inputs, output, relevance_out, variable):
        '''Compute the relevance of every input from the relevance ``relevance_out`` of the output.'''
        if relevance_out is None:
            # nothing reached the output (e.g. a branch stopped by CP-LRP): nothing to distribute
            return (None,) * len(inputs)
        dtype = _compute_dtype(relevance_out)
        relevances = self.relevance(
            module,
            tuple(tensor.to(dtype) for tensor in inputs),
            output.to(dtype),
            relevance_out.to(dtype),
            variable,
        )
        return tuple(
            None if rel is None or not var else rel.to(tensor.dtype)
            for rel, tensor, var in zip(relevances, inputs, variable)
        )

    def relevance(self, module, inputs, output, relevance, variable):
        '''Closed-form relevance of each input.

        Parameters
        ----------
        module: :py:obj:`torch.nn.Module`
            The hooked module.
        inputs: tuple[:py:obj:`torch.Tensor`]
            The positional inputs of the call, in the compute dtype.
        output: :py:obj:`torch.Tensor`
            The output of the call, in the compute dtype.
        relevance: :py:obj:`torch.Tensor`
            The relevance of the output.
        variable: tuple[bool]
            Which inputs are input-dependent (constants receive no relevance).

        Returns
        -------
        tuple[:py:obj:`torch.Tensor` or None]
            One relevance per input.
        '''
        raise NotImplementedError


class IdentityRule(AttnHook):
    '''Identity rule (AttnLRP Eq. 9): the relevance passes unchanged, ``R_in = R_out``. For element-wise activations
    and constant scalings.
    '''
    num_inputs = 1
    uses_epsilon = False
    saves_inputs = saves_output = False

    def __init__(self):
        super().__init__(epsilon=1e-6)

    def relevance(self, module, inputs, output, relevance, variable):
        (x,) = inputs
        if relevance.shape != x.shape:
            raise ValueError(
                f'{type(self).__name__} on {type(module).__name__}: output shape {tuple(relevance.shape)} differs from '
                f'input shape {tuple(x.shape)}; the identity rule needs an element-wise module.'
            )
        return (relevance,)


class RMSNormRule(IdentityRule):
    '''RMSNorm rule (AttnLRP Prop. 3.4): identity, ``R_x = R_y``, for ``y = w * x / rms(x)`` with any weight
    parametrisation (Gemma's ``1 + w``, q/k-norms).
    '''


class SoftmaxRule(AttnHook):
    '''Bias-absorbing softmax rule (AttnLRP Prop. 3.1, Eq. 13): ``R_x = x * (R - s * sum(R))`` along the softmax
    dimension. Not conservative by design: ``sum(R_x) = sum_j R_j (x_j - sum_i s_i x_i)``.

    Masked inputs (``-inf`` or below half the most negative value of the input dtype, capped at float32's, e.g.
    ``torch.finfo(dtype).min``) are treated as 0, which gives them zero relevance instead of NaN. The module must have
    a ``dim`` attribute.
    '''
    num_inputs = 1
    uses_epsilon = False
    # the probabilities are recomputed from the scores in the backward pass, so only the scores are kept
    saves_output = False

    def __init__(self):
        super().__init__(epsilon=1e-6)

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        if getattr(module, 'dim', None) is None:
            raise TypeError(
                f'SoftmaxRule on {type(module).__name__}: the module needs an integer attribute `dim` (the softmax '
                'dimension); use zennit_attn.layers.Softmax.'
            )

    @staticmethod
    def unmask(x):
        '''Return ``x`` with masked entries (``-inf``, or very negative fill values) set to 0. The threshold is half
        the most negative value of ``x.dtype``, at most float32's.
        '''
        return x.masked_fill(x <= _mask_threshold(x.dtype), 0.)

    def backward_relevance(self, module, inputs, output, relevance_out, variable):
        (x,) = inputs
        output = torch.softmax(x, module.dim, dtype=_compute_dtype(x))
        # unmask before the upcast of half types, whose mask values (e.g. float16's min) are only extreme in their dtype
        return super().backward_relevance(module, (self.unmask(x),), output, relevance_out, variable)

    def relevance(self, module, inputs, output, relevance, variable):
        (x,) = inputs
        return (x * (relevance - output * relevance.sum(module.dim, keepdim=True)),)


class MatMulRule(AttnHook):
    '''Uniform-ε matmul rule (AttnLRP Prop. 3.3, Eq. 15) for ``O = c * (A @ B)``: with ``r = R / stab(O)``,
    ``R_A = 1/2 * A * (c * r @ B^T)`` and ``R_B = 1/2 * B * (c * A^T @ r)``. If one operand is constant it receives
    no relevance and the other gets the full (unhalved) ε-rule. The scale ``c`` is read from ``module.scale``
    (default 1).
    '''
    num_inputs = 2

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        if any(arg.ndim < 2 for arg in args):
            raise ValueError(
                f'MatMulRule on {type(module).__name__}: operands need at least 2 dimensions, got shapes '
                f'{[tuple(arg.shape) for arg in args]}; unsqueeze vectors before the product.'
            )

    @staticmethod
    def _shares(variable):
        '''Fraction of relevance each operand receives: 1/2 each if both are variable, else all to the variable one.'''
        return tuple((0.5 if all(variable) else 1.0) if var else 0. for var in variable)

    def selection(self, inputs, output, variable):
        # attention scores (T x T) are larger than q and k (T x d): recomputing them in the backward pass is cheaper
        # than holding one more T x T matrix per layer
        a, b = inputs
        return output.numel() <= a.numel() + b.numel(), (True, True)

    def relevance(self, module, inputs, output, relevance, variable):
        a, b = inputs
        scale = getattr(module, 'scale', 1.0)
        if output.is_meta:
            output = (a @ b) * scale
        ratio = relevance / self.stabilizer(output)
        share_a, share_b = self._shares(variable)
        rel_a = rel_b = None
        if share_a:
            rel_a = a * _unbroadcast((share_a * scale) * (ratio @ b.transpose(-1, -2)), a.shape)
        if share_b:
            rel_b = b * _unbroadcast((share_b * scale) * (a.transpose(-1, -2) @ ratio), b.shape)
        return rel_a, rel_b


class CPMatMulRule(MatMulRule):
    '''CP-LRP matmul rule (Ali et al., 2022) for ``O = c * (A @ V)``: the operand ``constant`` (default 0, the attention
    probabilities) is treated as constant, so the other operand receives the full ε-rule, e.g.
    ``R_V = V * (c * A^T @ r)``, and the attention probabilities receive nothing.

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of ``O``.
    constant: int, optional
        Index of the operand treated as constant.
    '''
    def __init__(self, epsilon=1e-6, constant=0):
        super().__init__(epsilon=epsilon)
        if constant not in (0, 1):
            raise ValueError(f'CPMatMulRule: constant must be 0 or 1, got {constant!r}')
        self.constant = constant

    def _copy_kwargs(self):
        return {**super()._copy_kwargs(), 'constant': self.constant}

    def relevance(self, module, inputs, output, relevance, variable):
        variable = tuple(var and index != self.constant for index, var in enumerate(variable))
        return super().relevance(module, inputs, output, relevance, variable)


class ProductRule(AttnHook):
    '''Uniform rule for element-wise products (AttnLRP Prop. 3.2): ``R_a = R_b = R / 2`` (summed over broadcast
    dimensions). If one factor is constant, the other receives all of ``R``.
    '''
    num_inputs = 2
    uses_epsilon = False
    saves_inputs = saves_output = False

    def __init__(self):
        super().__init__(epsilon=1e-6)

    def relevance(self, module, inputs, output, relevance, variable):
        shares = MatMulRule._shares(variable)
        return tuple(
            _unbroadcast(share * relevance, tensor.shape) if share else None for share, tensor in zip(shares, inputs)
        )


class CPProductRule(ProductRule):
    '''CP-LRP product rule: the factor ``constant`` (default 0, the gate of a gated MLP) is treated as constant and
    the other factor receives all relevance.

    Parameters
    ----------
    constant: int, optional
        Index of the factor treated as constant.
    '''
    def __init__(self, constant=0):
        super().__init__()
        if constant not in (0, 1):
            raise ValueError(f'CPProductRule: constant must be 0 or 1, got {constant!r}')
        self.constant = constant

    def copy(self):
        return self.__class__(constant=self.constant)

    def relevance(self, module, inputs, output, relevance, variable):
        variable = tuple(var and index != self.constant for index, var in enumerate(variable))
        return super().relevance(module, inputs, output, relevance, variable)


class SumRule(AttnHook):
    '''ε-sum rule for ``y = a + b``: ``R_a = a * R / stab(y)``, ``R_b = b * R / stab(y)`` (summed over broadcast
    dimensions). A constant operand (a parameter such as a position embedding, or a mask) keeps its share, which is
    absorbed like a bias.
    '''
    num_inputs = 2

    def selection(self, inputs, output, variable):
        # by default keep the operands and recompute the sum; with one input-dependent operand of the output's shape
        # and a constant (e.g. scores + mask), keep the sum and the constant instead: the sum is what the next op
        # (softmax) keeps anyway, so the operand (the scores) need not stay alive
        if sum(variable) == 1 and inputs[variable.index(True)].shape == output.shape:
            return True, tuple(not var for var in variable)
        return False, (True, True)

    @staticmethod
    def _difference(output, kept):
        '''The operand not kept, ``output - kept``; 0 where ``kept`` is infinite (a ``-inf`` mask), where the sum is
        infinite too and its relevance ratio is 0 whatever the operand (``-inf - -inf`` would give NaN).
        '''
        return (output - kept).masked_fill(torch.isinf(kept), 0.)

    def relevance(self, module, inputs, output, relevance, variable):
        a, b = inputs
        if output.is_meta:
            output = a + b
        elif a.is_meta:
            a = self._difference(output, b)
        elif b.is_meta:
            b = self._difference(output, a)
        inputs = (a, b)
        ratio = relevance / self.stabilizer(output)
        return tuple(
            tensor * _unbroadcast(ratio, tensor.shape) if var else None for tensor, var in zip(inputs, variable)
        )


class MeanRule(AttnHook):
    '''ε-rule for mean pooling ``y = mean_i x_i``: ``R_i = x_i * R / stab(sum_k x_k)``. For a masked mean
    (:py:class:`zennit_attn.layers.MaskedMean`, called with ``(x, mask)``) the masked terms ``x_i * m_i`` take the place
    of ``x_i`` and the mask gets no relevance. The module needs the attributes ``dim`` (and ``keepdim`` for
    :py:class:`zennit_attn.layers.Mean`).
    '''
    saves_output = False

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        if not hasattr(module, 'dim'):
            raise TypeError(f'MeanRule on {type(module).__name__}: the module needs attributes `dim` and `keepdim`.')
        if len(args) not in (1, 2):
            raise ValueError(
                f'MeanRule on {type(module).__name__}: expected (x) or (x, mask) positional tensors, got {len(args)}.'
            )

    def relevance(self, module, inputs, output, relevance, variable):
        terms = inputs[0] if len(inputs) == 1 else inputs[0] * inputs[1]
        total = terms.sum(module.dim, keepdim=True)
        if not getattr(module, 'keepdim', False):
            relevance = relevance.reshape(total.shape)
        rel_x = _unbroadcast(terms * (relevance / self.stabilizer(total)), inputs[0].shape)
        return (rel_x,) if len(inputs) == 1 else (rel_x, None)


class LayerNormRule(AttnHook):
    '''LayerNorm rule (AttnLRP Prop. 3.4): the standard deviation is held constant and the remaining linear map gets
    the ε-rule. With ``u = gamma * R / stab(y) / sigma``, ``R_x = x * (u - mean(u))``; the bias ``beta`` absorbs its
    share. Works for modules with ``normalized_shape``, ``weight`` (may be None) and ``eps`` (or
    ``variance_epsilon``), such as :py:class:`torch.nn.LayerNorm`.
    '''
    num_inputs = 1
    # the output is recomputed from the input in the backward pass
    saves_output = False

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        has_eps = hasattr(module, 'eps') or hasattr(module, 'variance_epsilon')
        if not hasattr(module, 'normalized_shape') or not has_eps:
            raise TypeError(
                f'LayerNormRule on {type(module).__name__}: the module needs `normalized_shape` and `eps` like '
                'torch.nn.LayerNorm; use RMSNormRule for RMS normalisations.'
            )

    def relevance(self, module, inputs, output, relevance, variable):
        (x,) = inputs
        normalized_shape = module.normalized_shape
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        dims = tuple(range(-len(normalized_shape), 0))
        eps = getattr(module, 'eps', getattr(module, 'variance_epsilon', None))
        weight, bias = getattr(module, 'weight', None), getattr(module, 'bias', None)
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        # one pass gives the output and 1 / sigma
        output, _, inverse_sigma = torch.native_layer_norm(x, tuple(normalized_shape), weight, bias, eps)
        u = relevance / self.stabilizer(output) * inverse_sigma.reshape(output.shape[:-len(dims)] + (1,) * len(dims))
        if weight is not None:
            u = u * weight
        return (x * (u - u.mean(dims, keepdim=True)),)


class RoPERule(AttnHook):
    '''ε-rule for rotary position embeddings ``y = x * cos + rotate_half(x) * sin`` (a linear map of ``x``, ``cos``
    and ``sin`` constant): ``R_x = x * J^T (R / stab(y))`` with ``J^T r = r * cos - rotate_half(r * sin)``. Channels
    beyond ``cos.shape[-1]`` (partial rotary embeddings) pass their relevance unchanged. ``cos`` and ``sin`` receive
    no relevance.
    '''
    num_inputs = 3
    saves_output = False

    def relevance(self, module, inputs, output, relevance, variable):
        x, cos, sin = inputs
        rotary_dim = cos.shape[-1]
        x_rot = x[..., :rotary_dim]
        # the rotated output is recomputed from x, cos and sin rather than kept
        ratio = relevance[..., :rotary_dim] / self.stabilizer(x_rot * cos + rotate_half(x_rot) * sin)
        transposed = ratio * cos - rotate_half(ratio * sin)
        rel_rot = x_rot * transposed
        if rotary_dim == x.shape[-1]:
            return rel_rot, None, None
        return torch.cat((rel_rot, relevance[..., rotary_dim:]), dim=-1), None, None


class StopRule(AttnHook):
    '''Stop rule: no relevance passes through the module. CP-LRP uses it on the softmax and the score product, whose
    output it treats as constant.
    '''
    uses_epsilon = False
    saves_inputs = saves_output = False

    def __init__(self):
        super().__init__(epsilon=1e-6)

    def relevance(self, module, inputs, output, relevance, variable):
        return (None,) * len(inputs)


class AttentionRule(AttnHook):
    '''AttnLRP for a whole :py:class:`~zennit_attn.layers.AttentionCore` ``O = softmax(c * q @ k^T + mask) @ v``: the
    composition of the uniform-ε matmul rule on the context product, the bias-absorbing softmax rule, the ε-sum rule on
    the additive mask and the uniform-ε matmul rule on the scores, i.e. exactly what :py:class:`MatMulRule`,
    :py:class:`SoftmaxRule`, :py:class:`SumRule` and :py:class:`MatMulRule` give on the unfolded ops.

    With ``S0 = c * q @ k^T``, ``S = S0 + mask``, ``P = softmax(S)`` and ``r = R / stab(O)``:
    ``R_v = 1/2 * v * (P^T @ r)``, ``R_P = 1/2 * P * (r @ v^T)``, ``R_S = unmask(S) * (R_P - P * sum(R_P))``,
    ``R_S0 = S0 * R_S / stab(S)`` (the mask absorbs its share), ``r0 = R_S0 / stab(S0)``,
    ``R_q = 1/2 * q * (c * r0 @ k)`` and ``R_k = 1/2 * k * (c * r0^T @ q)``. Constant operands receive nothing and
    their partner the unhalved share, as in the separate rules; the mask is always a constant.

    Only ``q``, ``k``, ``v``, the mask and the output are kept; the scores and probabilities are recomputed in the
    backward pass for blocks of queries at a time, so no ``T x T`` matrix of the whole layer is ever held, and only for
    the keys a block attends to (under a causal mask, up to the block's last query: about half the work).

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of the output, the masked and the unmasked scores.
    block_elements: int, optional
        Number of score elements (batch x heads x queries x keys) recomputed at once in the backward pass; bounds
        its temporary memory.
    '''
    def __init__(self, epsilon=1e-6, block_elements=2 ** 20):
        super().__init__(epsilon=epsilon)
        self.block_elements = int(block_elements)

    def _copy_kwargs(self):
        return {**super()._copy_kwargs(), 'block_elements': self.block_elements}

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        rule, name = type(self).__name__, type(module).__name__
        if not callable(getattr(module, 'scores', None)):
            raise TypeError(
                f'{rule} on {name}: the module needs a `scores(q, k, mask)` method; use '
                'zennit_attn.layers.AttentionCore.'
            )
        if len(args) not in (3, 4) or any(arg.ndim < 2 for arg in args[:3]):
            raise ValueError(
                f'{rule} on {name}: expected (q, k, v) or (q, k, v, mask) with matrices of at least 2 dimensions, got '
                f'shapes {[tuple(arg.shape) for arg in args]}.'
            )

    def selection(self, inputs, output, variable):
        if len(variable) == 4 and variable[3]:
            raise ValueError(
                f'{type(self).__name__}: the attention mask depends on the model input, but the rule treats it as a '
                'constant; compute the mask from constants, or unfold the attention (fused=False) to give it relevance.'
            )
        return True, (True,) * len(inputs)

    def _blocks(self, query, key, align=1):
        '''Slices of query rows whose scores hold about ``block_elements`` elements, starting at multiples of
        ``align``.
        '''
        batch = 1
        for size in torch.broadcast_shapes(query.shape[:-2], key.shape[:-2]):
            batch *= size
        rows, length = query.shape[-2], key.shape[-2]
        step = max(1, self.block_elements // max(1, batch * length)) // align * align or align
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]

    @staticmethod
    def _keys(mask, length, threshold):
        '''The range of keys that any query of a block attends to (e.g. up to the block's last query under a causal
        mask): outside it every probability is exactly 0 and nothing needs to be computed. Queries with every key
        masked have uniform probabilities instead: then all keys, and a 0/1 factor that is 0 for those queries
        (``None`` if there are none).
        '''
        if mask is None:
            return slice(None), None
        attended = mask > threshold
        rows = attended.any(-1, keepdim=True)
        if not bool(rows.all()):
            return slice(None), rows.to(mask.dtype)
        if mask.shape[-1] != length:
            # the mask broadcasts over the keys
            return slice(None), None
        columns = attended.reshape(-1, length).any(0).nonzero()
        return slice(int(columns[0]), int(columns[-1]) + 1), None

    def _stabilize_(self, tensor):
        '''The stabilized ``tensor``, in place if the stabilizer allows.'''
        if isinstance(self.stabilizer, SignStabilizer):
            return self.stabilizer.stabilize_(tensor)
        return self.stabilizer(tensor)

    def backward_relevance(self, module, inputs, output, relevance_out, variable):
        if relevance_out is None:
            return (None,) * len(inputs)
        dtype = _compute_dtype(relevance_out)
        query, key, value = (tensor.to(dtype) for tensor in inputs[:3])
        mask = inputs[3] if len(inputs) == 4 else None
        # masked entries are recognised in the dtype of the forward's scores (e.g. float16's minimum), as SoftmaxRule
        score_dtype = inputs[0].dtype if mask is None else torch.promote_types(inputs[0].dtype, mask.dtype)
        threshold = _mask_threshold(score_dtype)
        mask = None if mask is None else mask.to(dtype)
        output, relevance = output.to(dtype), relevance_out.to(dtype)
        groups = query_groups(query, key)
        if groups > 1 and mask is not None and mask.ndim >= 3 and mask.shape[-3] != 1:
            # grouped-query attention with a mask per query head: repeat keys and values for this backward pass
            repeated = self.attention_relevance(
                module, query, repeat_heads(key, groups), repeat_heads(value, groups), mask, output, relevance,
                variable, threshold,
            )
            relevances = repeated[:1] + tuple(
                None if rel is None else rel.unflatten(-3, (-1, groups)).sum(-3) for rel in repeated[1:]
            )
        elif groups > 1:
            # grouped-query attention: the queries of a key/value head become rows (token-major, so that blocks of
            # rows stay blocks of tokens for the mask and its key ranges)
            def rows(tensor):
                return tensor.unflatten(-3, (-1, groups)).transpose(-3, -2).flatten(-3, -2)

            relevances = self.attention_relevance(
                module, rows(query), key, value, mask, rows(output), rows(relevance), variable, threshold,
                groups=groups,
            )
            rel_query = relevances[0]
            if rel_query is not None:
                rel_query = rel_query.unflatten(-2, (-1, groups)).transpose(-3, -2).flatten(-4, -3)
            relevances = (rel_query,) + relevances[1:]
        else:
            relevances = self.attention_relevance(
                module, query, key, value, mask, output, relevance, variable, threshold
            )
        return tuple(
            None if rel is None or not var else rel.to(tensor.dtype)
            for rel, tensor, var in zip(relevances + (None,), inputs, variable)
        )

    def attention_relevance(self, module, query, key, value, mask, output, relevance, variable, threshold, groups=1):
        '''Relevance of ``(q, k, v)`` (in the compute dtype), block by block over the queries. With ``groups > 1`` the
        rows of ``q`` are ``groups`` query heads per token (token-major) and the mask's rows are tokens.
        '''
        var_query, var_key, var_value = variable[:3]
        share_probabilities, share_value = MatMulRule._shares((var_query or var_key, var_value))
        share_query, share_key = MatMulRule._shares((var_query, var_key))
        scale = module.scale
        batch_shape = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        rel_query = torch.zeros(batch_shape + query.shape[-2:], dtype=query.dtype, device=query.device) \
            if share_probabilities and share_query else None
        grad_key = torch.zeros(batch_shape + key.shape[-2:], dtype=key.dtype, device=key.device) \
            if share_probabilities and share_key else None
        grad_value = torch.zeros(batch_shape + value.shape[-2:], dtype=value.dtype, device=value.device) \
            if share_value else None
        # the scale is applied to q (T x d) rather than to the scores (T x T)
        scaled_query = query * scale
        for rows in self._blocks(query, key, groups):
            block_mask = mask
            if mask is not None and mask.ndim > 1 and mask.shape[-2] != 1:
                block_mask = mask[..., rows.start // groups:rows.stop // groups, :]
                if groups > 1:
                    block_mask = block_mask.repeat_interleave(groups, dim=-2)
            keys, blank = self._keys(block_mask, key.shape[-2], threshold)
            block_key, block_value = key[..., keys, :], value[..., keys, :]
            if block_mask is not None:
                block_mask = block_mask[..., keys]
            scores = scaled_query[..., rows, :] @ block_key.transpose(-1, -2)
            masked = scores if block_mask is None else scores + block_mask
            probabilities = torch.softmax(masked, -1)
            ratio = relevance[..., rows, :] / self.stabilizer(output[..., rows, :])
            if grad_value is not None:
                grad_value[..., keys, :] += probabilities.transpose(-1, -2) @ ratio
            if not share_probabilities:
                continue
            # context product, then the softmax (Prop. 3.1), both without the share, which is applied at the end:
            # t = R_P - P * sum(R_P) with R_P = P * (r @ v^T)
            rel_scores = (ratio @ block_value.transpose(-1, -2)).mul_(probabilities)
            rel_scores.sub_(probabilities.mul_(rel_scores.sum(-1, keepdim=True)))
            if block_mask is None:
                rel_scores.mul_(scores)
            else:
                # masked inputs count as 0 in the softmax rule. Their probability is exactly 0, and so is t, unless the
                # whole row is masked (uniform probabilities): such rows are zeroed first, then clamping avoids 0 * -inf
                if blank is not None:
                    rel_scores.mul_(blank)
                rel_scores.mul_(masked.clamp(min=threshold))
                # the ε-sum rule: the mask absorbs its share
                rel_scores.mul_(scores).div_(self._stabilize_(masked))
            # the score product: r0 = R_S0 / stab(S0)
            rel_scores.div_(self._stabilize_(scores))
            if rel_query is not None:
                rel_query[..., rows, :] = rel_scores @ block_key
            if grad_key is not None:
                grad_key[..., keys, :] += rel_scores.transpose(-1, -2) @ query[..., rows, :]
        factor_query = share_probabilities * share_query * scale
        factor_key = share_probabilities * share_key * scale
        rel_query = None if rel_query is None else _unbroadcast(query * rel_query.mul_(factor_query), query.shape)
        rel_key = None if grad_key is None else _unbroadcast(key * grad_key.mul_(factor_key), key.shape)
        rel_value = None if grad_value is None else _unbroadcast(value * grad_value.mul_(share_value), value.shape)
        return rel_query, rel_key, rel_value


class CPAttentionRule(AttentionRule):
    '''CP-LRP for a whole :py:class:`~zennit_attn.layers.AttentionCore`: the attention probabilities are constant, so
    ``R_v = v * (P^T @ (R / stab(O)))`` (unhalved) and ``q``, ``k`` and the mask receive nothing, as
    :py:class:`CPMatMulRule` and :py:class:`StopRule` give on the unfolded ops. The probabilities are recomputed
    block by block in the backward pass.
    '''
    def attention_relevance(self, module, query, key, value, mask, output, relevance, variable, threshold, groups=1):
        return super().attention_relevance(
            module, query, key, value, mask, output, relevance, (False, False) + tuple(variable[2:3]), threshold,
            groups=groups,
        )


class _LinearOp:
    '''Forward (``z = W x + b``) and transposed (``W^T r``) maps of Linear, ConvNd and Hugging Face ``Conv1D`` modules,
    written with the module's own parameters, so that the ε and γ rules neither re-run the module nor swap its
    parameters. ``Conv1D`` (``transformers.pytorch_utils``, GPT-2) is a linear layer ``z = x @ W + b`` whose weight is
    stored transposed, ``(in_features, out_features)``; it is matched by class name so that transformers stays optional.
    '''
    @staticmethod
    def is_conv1d(module):
        '''Whether ``module`` is Hugging Face's ``Conv1D`` (a transposed-weight linear layer).'''
        kind = type(module)
        return kind.__name__ == 'Conv1D' and kind.__module__.startswith('transformers.')

    @staticmethod
    def is_linear(module):
        '''Whether ``module`` is a linear layer (``torch.nn.Linear`` or Hugging Face's ``Conv1D``).'''
        return isinstance(module, torch.nn.Linear) or _LinearOp.is_conv1d(module)

    @staticmethod
    def check(rule, module):
        if _LinearOp.is_linear(module):
            return
        if isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed:
            if module.padding_mode != 'zeros' or isinstance(module.padding, str) and module.padding != 'valid':
                raise TypeError(
                    f'{rule} on {type(module).__name__}: padding_mode={module.padding_mode!r}, '
                    f'padding={module.padding!r} is not supported; use zennit.rules instead.'
                )
            return
        raise TypeError(
            f'{rule} on {type(module).__name__}: only torch.nn.Linear, Conv1d/2d/3d and transformers\' Conv1D are '
            'supported; use zennit.rules for other layers.'
        )

    @staticmethod
    def forward(module, x, weight):
        '''``W x`` without bias, for a (possibly modified) weight.'''
        if isinstance(module, torch.nn.Linear):
            return torch.nn.functional.linear(x, weight)
        if _LinearOp.is_conv1d(module):
            return x @ weight
        conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)
        return conv[len(module.kernel_size) - 1](
            x, weight, None, module.stride, _LinearOp.padding(module), module.dilation, module.groups
        )

    @staticmethod
    def transpose(module, x, weight, ratio):
        '''``W^T ratio``, the gradient of ``W x`` with respect to ``x`` (shape of ``x``).'''
        if isinstance(module, torch.nn.Linear):
            return ratio @ weight
        if _LinearOp.is_conv1d(module):
            return ratio @ weight.transpose(0, 1)
        conv_input = (torch.nn.grad.conv1d_input, torch.nn.grad.conv2d_input, torch.nn.grad.conv3d_input)
        return conv_input[len(module.kernel_size) - 1](
            x.shape, weight, ratio, module.stride, _LinearOp.padding(module), module.dilation, module.groups
        )

    @staticmethod
    def padding(module):
        '''The convolution's padding as numbers (``'valid'`` is no padding).'''
        return 0 if module.padding == 'valid' else module.padding


def _zero_bias(rule, zero_params):
    '''Validate ``zero_params``: the closed-form rules can only zero the bias.'''
    zero_params = [zero_params] if isinstance(zero_params, str) else list(zero_params or [])
    if set(zero_params) - {'bias'}:
        raise ValueError(f'{rule}: zero_params may only contain \'bias\', got {zero_params}')
    return bool(zero_params)


class Epsilon(AttnHook):
    '''ε-rule (AttnLRP Eq. 8) for Linear and ConvNd layers, ``R_x = x * W^T (R / stab(z))``, in closed form. Gives the
    same relevance as :py:class:`zennit.rules.Epsilon` but never re-runs the module or swaps its parameters (Zennit's
    ``ParamMod`` replaces the ``nn.Parameter`` objects, which unties tied weights).

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of ``z``.
    zero_params: str or list[str], optional
        ``'bias'`` to compute ``z`` without the bias (as Zennit's ``zero_params``).
    '''
    num_inputs = 1

    def __init__(self, epsilon=1e-6, zero_params=None):
        super().__init__(epsilon=epsilon)
        self.zero_params = zero_params
        self.no_bias = _zero_bias(type(self).__name__, zero_params)

    def _copy_kwargs(self):
        return {**super()._copy_kwargs(), 'zero_params': self.zero_params}

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        _LinearOp.check(type(self).__name__, module)
        kernel_size = getattr(module, 'kernel_size', None)
        if kernel_size is not None and not _LinearOp.is_conv1d(module) and args[0].ndim != len(kernel_size) + 2:
            raise ValueError(
                f'{type(self).__name__} on {type(module).__name__}: expected a batched input with '
                f'{len(kernel_size) + 2} dimensions, got shape {tuple(args[0].shape)}; add a batch dimension.'
            )

    #: outputs larger than this many times the input (e.g. a language model's vocabulary head) are not kept but
    #: recomputed in the backward pass, for the rows that receive relevance only
    max_output_ratio = 4

    def selection(self, inputs, output, variable):
        return output.numel() <= self.max_output_ratio * inputs[0].numel(), (True,)

    def _bias(self, module, output):
        '''The bias broadcastable to ``output`` (channel dimension 1 for convolutions), or None.'''
        if module.bias is None:
            return None
        bias = module.bias.to(output.dtype)
        return bias if _LinearOp.is_linear(module) else bias.reshape((-1,) + (1,) * (output.ndim - 2))

    def relevance(self, module, inputs, output, relevance, variable):
        (x,) = inputs
        if not output.is_meta:
            return (self.layer_relevance(module, x, output, relevance),)
        weight = module.weight.to(x.dtype)
        bias = self._bias(module, relevance)
        if not _LinearOp.is_linear(module):
            output = _LinearOp.forward(module, x, weight)
            return (self.layer_relevance(module, x, output if bias is None else output + bias, relevance),)
        # the output was not kept (a widening layer such as a vocabulary head): recompute it for the rows (tokens) that
        # receive relevance only, and compute their relevance; the other rows get none either way
        flat_x, flat_relevance = x.reshape(-1, x.shape[-1]), relevance.reshape(-1, relevance.shape[-1])
        rows = flat_relevance.ne(0).any(-1).nonzero().squeeze(-1)
        x_rows, relevance_rows = flat_x[rows], flat_relevance[rows]
        output_rows = _LinearOp.forward(module, x_rows, weight)
        output_rows = output_rows if bias is None else output_rows + bias
        result = torch.zeros_like(flat_x)
        result[rows] = self.layer_relevance(module, x_rows, output_rows, relevance_rows)
        return (result.reshape(x.shape),)

    def layer_relevance(self, module, x, output, relevance):
        '''The relevance of ``x`` from the layer's ``output`` and its ``relevance``.'''
        bias = self._bias(module, output)
        if self.no_bias and bias is not None:
            output = output - bias
        ratio = relevance / self.stabilizer(output)
        return x * _LinearOp.transpose(module, x, module.weight.to(x.dtype), ratio)


class Gamma(Epsilon):
    '''Generalized γ-rule (Andéol et al., 2021) for Linear and ConvNd layers in closed form; the same relevance as
    :py:class:`zennit.rules.Gamma` without re-running the module four times or swapping parameters.

    With ``a = |W| |x|`` and ``z0 = W x`` (bias-free), the positive and negative parts of Zennit's four modified
    forwards sum to ``z + γ ((z0 + a) / 2 + b+)`` and ``z + γ ((z0 - a) / 2 + b-)``; with ``g+ = R [z > 0] / stab(.)``
    and ``g- = R [z < 0] / stab(.)``, ``R_x = (1 + γ/2) x * W^T (g+ + g-) + γ/2 |x| * |W|^T (g+ - g-)``.

    Parameters
    ----------
    gamma: float, optional
        Weight of the positive (for positive outputs) or negative (for negative outputs) contributions.
    stabilizer: callable or float, optional
        Stabilizer of the denominators.
    zero_params: str or list[str], optional
        ``'bias'`` to drop the bias, as Zennit's ``zero_params``.
    '''
    def __init__(self, gamma=0.25, stabilizer=1e-6, zero_params=None):
        super().__init__(epsilon=stabilizer, zero_params=zero_params)
        self.gamma = gamma

    def _copy_kwargs(self):
        return {'gamma': self.gamma, 'stabilizer': self.epsilon, 'zero_params': self.zero_params}

    def layer_relevance(self, module, x, output, relevance):
        gamma = self.gamma
        weight = module.weight.to(x.dtype)
        bias = self._bias(module, output)
        if bias is None:
            bias = pos_bias = neg_bias = 0.
            plain = output
        else:
            plain = output - bias
            pos_bias, neg_bias = bias.clamp(min=0), bias.clamp(max=0)
        if self.no_bias:
            # Zennit zeroes the bias in every modified forward, but keeps the unmodified z for the sign masks
            bias = pos_bias = neg_bias = 0.
        magnitude = _LinearOp.forward(module, x.abs(), weight.abs())
        denominator = plain + bias
        pos = relevance * (output > 0) / self.stabilizer(denominator + gamma * ((plain + magnitude) / 2 + pos_bias))
        neg = relevance * (output < 0) / self.stabilizer(denominator + gamma * ((plain - magnitude) / 2 + neg_bias))
        signed = _LinearOp.transpose(module, x, weight, pos + neg)
        absolute = _LinearOp.transpose(module, x, weight.abs(), pos - neg)
        return (1 + gamma / 2) * x * signed + (gamma / 2) * x.abs() * absolute
