'''Closed-form ε and γ rules for Linear and ConvNd layers.'''
import torch

from .machinery import AttnHook


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

    @staticmethod
    def is_quantized(module):
        '''Whether the weight of ``module`` holds quantized codes rather than its values: an integer weight, or
        bitsandbytes' ``Params4bit`` (packed 4-bit codes, stored as uint8 or, for FSDP, in a float ``quant_storage``).
        '''
        weight = getattr(module, 'weight', None)
        return isinstance(weight, torch.Tensor) and (
            not weight.is_floating_point() or type(weight).__name__ == 'Params4bit'
        )

    @staticmethod
    def weight_problem(module):
        '''Why the effective weight of ``module`` cannot be read (a quantized format that :py:meth:`weight` does not
        know), or None.'''
        if not _LinearOp.is_quantized(module):
            return None
        weight = module.weight
        kind = type(weight).__name__
        if kind == 'Params4bit' and getattr(getattr(weight, 'quant_state', None), 'packing_format_for_cpu', False):
            return (
                'its 4-bit weight was repacked for bitsandbytes\' CPU inference kernel (a forward without gradients '
                'ran on a CPU with AVX512-BF16), a layout the rule cannot dequantize; reload the model and attribute '
                'before any forward without gradients'
            )
        if kind in ('Int8Params', 'Params4bit'):
            return None
        return (
            f'its weight is a {weight.dtype} {kind} (a quantized format) whose dequantized values the ε/γ rules cannot '
            'read; quantize with bitsandbytes (Linear8bitLt, Linear4bit) or dequantize the layer to a float nn.Linear'
        )

    @staticmethod
    def weight(module, dtype):
        '''The effective weight of ``module`` in ``dtype``: bitsandbytes' quantized weights (``Int8Params`` of
        ``Linear8bitLt``, ``Params4bit`` of ``Linear4bit``, matched by class name so that bitsandbytes stays optional)
        dequantized as their forward uses them; raw int8 codes or packed 4-bit bytes would give garbage relevance.
        '''
        weight = module.weight
        if not _LinearOp.is_quantized(module):
            return weight.to(dtype)
        problem = _LinearOp.weight_problem(module)
        if problem is not None:
            raise TypeError(f'{type(module).__name__}: {problem}.')
        if type(weight).__name__ == 'Params4bit':
            from bitsandbytes.functional import dequantize_4bit
            return dequantize_4bit(weight.data, weight.quant_state).to(dtype)
        # Int8Params: int8 codes with one absmax per output row (LLM.int8()), W = codes * absmax / 127; the first
        # forward moves the absmax from the weight to the module's matmul state
        scales = getattr(weight, 'SCB', None)
        if scales is None:
            scales = getattr(getattr(module, 'state', None), 'SCB', None)
        if scales is None:
            raise TypeError(
                f'{type(module).__name__}: its int8 weight has no row scales (SCB) on the weight or in module.state; '
                'load or quantize the layer with bitsandbytes before attributing.'
            )
        return weight.data.to(torch.float32).mul_(scales.to(torch.float32)[:, None] / 127).to(dtype)


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
    parameters = ('weight', 'bias')

    def __init__(self, epsilon=1e-6, zero_params=None):
        super().__init__(epsilon=epsilon)
        self.zero_params = zero_params
        self.no_bias = _zero_bias(type(self).__name__, zero_params)

    def _copy_kwargs(self):
        return {**super()._copy_kwargs(), 'zero_params': self.zero_params}

    def _check_call(self, module, args, kwargs):
        super()._check_call(module, args, kwargs)
        _LinearOp.check(type(self).__name__, module)
        problem = _LinearOp.weight_problem(module)
        if problem is not None:
            raise TypeError(f'{type(self).__name__} on {type(module).__name__}: {problem}.')
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
        weight = _LinearOp.weight(module, x.dtype)
        bias = self._bias(module, relevance)
        if not _LinearOp.is_linear(module):
            output = _LinearOp.forward(module, x, weight)
            return (self.layer_relevance(module, x, output if bias is None else output + bias, relevance),)
        # the output was not kept (a widening layer such as a vocabulary head): recompute it for the rows (tokens) that
        # receive relevance only, and compute their relevance; the other rows get none either way
        flat_x, flat_relevance = x.reshape(-1, x.shape[-1]), relevance.reshape(-1, relevance.shape[-1])
        # any() reads floats as booleans: no (rows x vocabulary) mask is materialised
        rows = flat_relevance.any(-1).nonzero().squeeze(-1)
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
        return x * _LinearOp.transpose(module, x, _LinearOp.weight(module, x.dtype), ratio)


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
        weight = _LinearOp.weight(module, x.dtype)
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
