'''Rules for the attention operations: softmax, matrix products and the fused attention core.'''
import torch

from ..layers import query_groups, repeat_heads
from .machinery import AttnHook, SignStabilizer, _compute_dtype, _mask_threshold, _unbroadcast


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
