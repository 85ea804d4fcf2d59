'''The machinery of the closed-form rules: the hook base class, the autograd node that carries a rule, the stabilizer
and the test whether a tensor depends on the model input.'''
import copy

import torch
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer


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
    def forward(ctx, hook, module, variable, boxed, *inputs):
        # the output arrives in a list, so that autograd does not see it as an input (an input returned as is would be
        # a view, which in-place operations on the result may not modify)
        (output,) = boxed
        ctx.hook, ctx.module, ctx.variable = hook, module, variable
        # a branch that receives no relevance (e.g. the scores under CP-LRP) gets None, not a tensor of zeros
        ctx.set_materialize_grads(False)
        # keep only what the rule reads; the rest is described by shape and dtype (meta tensors) to save memory
        ctx.meta = tuple((tensor.shape, tensor.dtype) for tensor in (output,) + inputs)
        save_output, save_inputs = hook.selection(inputs, output, variable)
        # read by the engine: an in-place op may not modify a kept output
        ctx.keeps_output = save_output
        ctx.save_for_backward(
            output if save_output else None, *(tensor if save else None for tensor, save in zip(inputs, save_inputs))
        )
        return output

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
    #: names of the module's parameters and buffers that :py:meth:`relevance` reads (see :py:meth:`forward_module`)
    parameters = ()
    #: ``forward_tensors(module) -> (name, {parameter name: tensor})``: the qualified name of a running module call and
    #: the parameters and buffers its forward computed with (set by the composite to its engine's
    #: :py:meth:`~zennit_attn.engine.Engine.forward_tensors`), or None
    forward_tensors = None

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
        if self.parameters:
            module = self.forward_module(module)
        return _RelevanceFunction.apply(self, module, variable, [output.detach()], *args)

    def forward_module(self, module):
        '''``module`` as its forward computed, for the backward pass: if a parameter or buffer that
        :py:meth:`relevance` reads was replaced since the forward used it (accelerate's offloading hooks put a meta
        tensor in its place right after the forward), a shallow copy of the module holding the tensors the forward used
        (as :py:attr:`forward_tensors` reports them; autograd keeps the same tensors for a plain gradient). A meta
        placeholder whose forward tensor is unknown is refused: it would give garbage relevance.
        '''
        name, used = (None, {}) if self.forward_tensors is None else self.forward_tensors(module)
        current = {key: getattr(module, key, None) for key in self.parameters}
        replaced = {key: tensor for key, tensor in used.items() if key in current and tensor is not current[key]}
        for key, value in current.items():
            if key not in replaced and isinstance(value, torch.Tensor) and value.is_meta:
                where = f'module {name!r} ({type(module).__name__})' if name else type(module).__name__
                raise RuntimeError(
                    f'{type(self).__name__} on {where}: its {key!r} is a placeholder on the meta device after the '
                    'forward (offloaded, e.g. by accelerate) and the tensor its forward computed with is unknown, so '
                    'the backward pass cannot read it. Register the rule through a zennit_attn composite (AttnLRP, '
                    '...), whose engine records that tensor, or load the model without offloading.'
                )
        if not replaced:
            return module
        frozen = copy.copy(module)
        parameters, buffers = dict(module._parameters), dict(module._buffers)
        for key, tensor in replaced.items():
            (buffers if key in buffers else parameters)[key] = tensor
        frozen.__dict__['_parameters'], frozen.__dict__['_buffers'] = parameters, buffers
        return frozen

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
