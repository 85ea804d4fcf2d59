'''Rules for element-wise operations, sums, reductions and normalisations.'''
import torch

from ..layers import rotate_half
from .machinery import AttnHook, _unbroadcast
from .attention import MatMulRule


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

    def _copy_kwargs(self):
        return {'constant': self.constant}

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
        # two input-dependent operands (residual streams, rotary sums): keep the sum and the first operand of its shape;
        # the sum is usually kept by what consumes it (the next residual sum, the attention core) and the operand by
        # what produced it (the previous sum, a Linear), so the sum adds no tensor of its own
        if all(variable):
            for index, tensor in enumerate(inputs):
                if tensor.shape == output.shape:
                    return True, tuple(position == index for position in range(2))
        return False, (True, True)

    @staticmethod
    def _difference(output, kept):
        '''The operand not kept, ``output - kept``; 0 where the sum is infinite: a ``-inf`` mask (``-inf - -inf``
        would give NaN), or a half-precision sum that overflowed (float16 scores below -16 plus float16's minimum as
        mask give ``-inf``, and ``-inf - mask`` is no operand). There the relevance ratio ``R / stab(y)`` is 0
        whatever the operand, and ``inf * 0`` would be NaN.
        '''
        return (output - kept).masked_fill(torch.isinf(output), 0.)

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


class PoolRule(AttnHook):
    '''ε-rule for average pooling (:py:class:`zennit_attn.layers.AveragePool`, ``avg_pool*d`` and
    ``adaptive_avg_pool*d``), a linear map ``y = P x`` without bias (each output the mean of a window): AttnLRP Eq. 8
    on that map, ``R_x = x * P^T (R / stab(y))``, with ``P^T`` the pooling's own vector-Jacobian product (any window
    layout, overlap, padding or divisor). Conservative up to ε: ``sum R_x = sum R * y / stab(y)``. (The ε of
    :py:class:`MeanRule` stabilizes the window sum instead of the mean; the two agree as ε -> 0.)
    '''
    num_inputs = 1

    def relevance(self, module, inputs, output, relevance, variable):
        (x,) = inputs
        ratio = relevance / self.stabilizer(output)
        # P^T ratio: the gradient of the (linear) pooling at any point, here 0
        with torch.enable_grad():
            probe = torch.zeros_like(x, requires_grad=True)
            (transposed,) = torch.autograd.grad(module(probe), probe, ratio)
        return (x * transposed,)


class LayerNormRule(AttnHook):
    '''LayerNorm rule (AttnLRP Prop. 3.4): the standard deviation is held constant and the remaining linear map gets
    the ε-rule. With ``u = gamma * R / stab(y) / sigma``, ``R_x = x * (u - mean(u))``; the bias ``beta`` absorbs its
    share. Works for modules with ``normalized_shape``, ``weight`` (may be None) and ``eps`` (or
    ``variance_epsilon``), such as :py:class:`torch.nn.LayerNorm`.
    '''
    num_inputs = 1
    # the output is recomputed from the input in the backward pass
    saves_output = False
    parameters = ('weight', 'bias')

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


class IndexAddRule(AttnHook):
    '''ε-sum rule for a scatter-sum ``y = target.index_add(dim, index, source, alpha)``
    (:py:class:`~zennit_attn.layers.IndexAdd`): every contribution gets its share of the relevance of the place it is
    added to, ``R_target = target * R / stab(y)`` and ``R_source = alpha * source * (R / stab(y))[index]``. A constant
    operand absorbs its share.
    '''
    num_inputs = 2

    def relevance(self, module, inputs, output, relevance, variable):
        target, source = inputs
        ratio = relevance / self.stabilizer(output)
        rel_target = target * ratio if variable[0] else None
        rel_source = None
        if variable[1]:
            rel_source = source * ratio.index_select(module.dim, module.index) * module.alpha
        return rel_target, rel_source


class RenormalizeRule(AttnHook):
    '''Rule for a re-normalisation ``y = x / sum_d x`` (:py:class:`~zennit_attn.layers.Renormalize`, the re-normalised
    top-k weights of a mixture-of-experts router): the ε-rule of the whole map (its gradient times input, as the
    softmax rule is for the softmax, AttnLRP Prop. 3.1), ``R_x = x * J^T (R / y) = R - y * sum_d(R)``, in closed form
    (no division, so no stabilizer). Not conservative by design: ``y`` does not change when ``x`` is scaled, so
    ``sum_d(R_x) = 0``. After a top-k selection of softmax probabilities, the softmax rule then gives the unselected
    logits no relevance and the selected ones exactly the softmax rule of the softmax over the selected logits, which
    the re-normalised weights are.
    '''
    num_inputs = 1
    uses_epsilon = False
    saves_inputs = False

    def __init__(self):
        super().__init__(epsilon=1e-6)

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        if getattr(module, 'dim', None) is None:
            raise TypeError(f'RenormalizeRule on {type(module).__name__}: the module needs an attribute `dim`.')

    def relevance(self, module, inputs, output, relevance, variable):
        return (relevance - output * relevance.sum(module.dim, keepdim=True),)


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
