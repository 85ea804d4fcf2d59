'''The attention rules through PyTorch's own fused attention backward (the fast path for GPUs).

With ``S0 = c * q @ k^T``, ``S = S0 + mask``, ``P = softmax(S)``, ``O = P @ v`` and ``r = R / stab(O)``, the exact
:py:class:`~zennit_attn.rules.AttentionRule` composes the uniform-ε matmul rule, the bias-absorbing softmax rule, the
ε-sum rule on the mask and the uniform-ε matmul rule (ATTNLRP.md §2). Writing ``g_q, g_k, g_v`` for the plain gradient
of ``O`` (upstream gradient ``r``) with respect to ``q, k, v``, and ``g_S = P * (r @ v^T - sum(P * (r @ v^T)))`` for
that of ``S``, the composition is

- context matmul: ``R_v = 1/2 * v * (P^T @ r) = 1/2 * v * g_v`` and ``R_P = 1/2 * P * (r @ v^T)``;
- softmax (Prop. 3.1): ``R_S = S * (R_P - P * sum(R_P)) = 1/2 * S * g_S`` (the softmax rule *is* gradient × input:
  it has no ε, and its non-conservation, the "bias" ``sum_i s_i x_i``, is part of that gradient);
- mask sum (ε-sum, the mask absorbs its share): ``R_S0 = S0 * R_S / stab(S) = 1/2 * S0 * g_S * S / stab(S)``;
- score matmul: ``r0 = R_S0 / stab(S0) = 1/2 * g_S * (S / stab(S)) * (S0 / stab(S0))``, so
  ``R_q = 1/2 * q * (c * r0 @ k)`` and ``R_k = 1/2 * k * (c * r0^T @ q)``.

As ``ε -> 0`` the two factors ``S / stab(S)`` and ``S0 / stab(S0)`` tend to 1 (wherever the scores are not within
about ε of 0), and ``R_q = 1/4 * q * g_q``, ``R_k = 1/4 * k * g_k``, ``R_v = 1/2 * v * g_v``: one fused attention
backward with the upstream gradient ``r`` (the ε of the output is kept exactly). Constant operands change the shares
exactly as in the exact rule (e.g. a constant ``v``: ``R_q = 1/2 * q * g_q``). Under CP-LRP (probabilities constant)
``R_v = v * g_v`` and ``q``, ``k`` get nothing: there the fast path is exact, with no ε term dropped.

Queries whose keys are all masked (left padding with a finite fill: uniform probabilities) are the one place where the
identity needs care: the softmax rule gives their scores no relevance (a masked input counts as 0), while their gradient
is not 0; their rows of ``r`` are left out of the fused backward, and ``v`` receives their share of the context
product from their probabilities computed explicitly (see :py:meth:`SDPAAttentionRule.blank_value_gradient`).
'''
import torch
import torch.nn.functional as F

from ..layers import query_groups
from .attention import AttentionRule, MatMulRule
from .machinery import _compute_dtype, _mask_threshold, _unbroadcast


def _rows(tensor, rows):
    '''The query rows ``rows`` of a mask-like ``tensor`` (all of it if it broadcasts over the queries).'''
    return tensor if tensor.shape[-2] == 1 else tensor[..., rows, :]


class SDPAAttentionRule(AttentionRule):
    '''AttnLRP for a whole :py:class:`~zennit_attn.layers.AttentionCore` through PyTorch's fused attention backward
    (:py:func:`torch.nn.functional.scaled_dot_product_attention`, any kernel: flash or memory-efficient on GPUs):
    ``R_q = 1/4 * q * g_q``, ``R_k = 1/4 * k * g_k`` and ``R_v = 1/2 * v * g_v``, with ``g`` the gradient of the
    attention for the upstream gradient ``R / stab(O)``. Equal to :py:class:`~zennit_attn.rules.AttentionRule` up to
    the ε-stabilizers of the scores, which it drops (see :py:mod:`zennit_attn.rules.fast_attention`); the ε of the
    output is kept. The backward pass re-runs the attention forward once (as gradient checkpointing does), holds no
    ``T x T`` matrix where the kernel does not, and computes in float32 for half-precision inputs.

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of the output.
    block_elements: int, optional
        Unused (kept for the signature of :py:class:`~zennit_attn.rules.AttentionRule`; the kernel chooses its blocks).
    '''
    #: whether the probabilities are constant (CP-LRP): then ``q`` and ``k`` get nothing and ``v`` everything
    constant_probabilities = False

    def _factors(self, variable):
        '''The factors of ``q * g_q``, ``k * g_k`` and ``v * g_v`` (0 for an operand that receives nothing).'''
        var_query, var_key, var_value = variable[:3]
        if self.constant_probabilities:
            var_query = var_key = False
        share_probabilities, share_value = MatMulRule._shares((var_query or var_key, var_value))
        share_query, share_key = MatMulRule._shares((var_query, var_key))
        # a further 1/2 for q and k: the softmax rule's gradient × input of the scores, halved by the score product
        return share_probabilities * share_query, share_probabilities * share_key, share_value

    def backward_relevance(self, module, inputs, output, relevance_out, variable):
        if relevance_out is None:
            return (None,) * len(inputs)
        dtype = _compute_dtype(relevance_out)
        factors = self._factors(variable)
        if not any(factors):
            # e.g. CP-LRP with a constant v: nothing is attributed through the core
            return (None,) * len(inputs)
        query, key, value = (
            tensor.detach().to(dtype).requires_grad_(bool(factor)) for tensor, factor in zip(inputs[:3], factors)
        )
        mask = inputs[3] if len(inputs) == 4 else None
        attended = None
        if mask is not None:
            # masked entries are recognised in the dtype of the forward's scores, as AttentionRule does
            threshold = _mask_threshold(torch.promote_types(inputs[0].dtype, mask.dtype))
            rows = (mask > threshold).any(-1, keepdim=True)
            attended = None if bool(rows.all()) else rows.to(dtype)
            mask = mask.detach().to(dtype)
        ratio = relevance_out.to(dtype) / self.stabilizer(output.detach().to(dtype))
        leaves = [tensor for tensor in (query, key, value) if tensor.requires_grad]
        with torch.enable_grad():
            attention = self.attention(module, query, key, value, mask)
            # fully masked queries: no relevance through their scores (the softmax rule's unmasking), so their rows
            # of r are left out; v receives their share of the context product below
            grads = torch.autograd.grad(attention, leaves, ratio if attended is None else ratio * attended)
        if attended is not None and factors[2]:
            blank = self.blank_value_gradient(module, query, key, value, mask, ratio, attended)
            grads = grads[:-1] + (grads[-1] + blank,)
        grads = iter(grads)
        relevances = tuple(
            (tensor.detach() * next(grads)).mul_(factor) if factor else None
            for tensor, factor in zip((query, key, value), factors)
        )
        return tuple(
            None if rel is None or not var else rel.to(tensor.dtype)
            for rel, tensor, var in zip(relevances + (None,), inputs, variable)
        )

    def blank_value_gradient(self, module, query, key, value, mask, ratio, attended):
        '''The gradient ``P^T @ r`` of ``v`` from the fully masked queries alone, with their probabilities computed as
        the exact rule does, ``softmax(fl(scale * q @ k^T + mask))``, for those queries only (blocks of about
        ``block_elements`` scores). Fused kernels cannot be used for it: their backward recomputes
        ``P = exp(S - logsumexp(S))``, and with ``logsumexp`` near the mask's fill (e.g. -3e38) the difference loses
        everything (PyTorch's CPU flash kernel returns ``P = 1`` instead of ``1 / keys`` there).
        '''
        blank = 1 - attended
        if blank.ndim < 2:
            blank, mask = blank.reshape(1, 1), mask.reshape(1, -1)
        # the query positions that are fully masked in some sample or head (left padding: a few leading positions)
        length = query.shape[-2]
        positions = blank.expand(*blank.shape[:-2], length, 1).reshape(-1, length).any(0).nonzero().flatten()
        groups = query_groups(query, key)
        scaled_query, key = query.detach() * module.scale, key.detach()
        step = max(1, self.block_elements // max(1, ratio[..., 0, 0].numel() * key.shape[-2]))
        gradient = 0.
        for start in range(0, len(positions), step):
            rows = positions[start:start + step]
            block = scaled_query[..., rows, :]
            if groups > 1:
                # the query heads of one key/value head become rows of one product
                scores = block.unflatten(-3, (-1, groups)).flatten(-3, -2) @ key.transpose(-1, -2)
                scores = scores.unflatten(-2, (groups, -1)).flatten(-4, -3)
            else:
                scores = block @ key.transpose(-1, -2)
            weights = torch.softmax(scores + _rows(mask, rows), -1).mul_(_rows(blank, rows))
            # per query head, like the relevance
            gradient = gradient + weights.transpose(-1, -2) @ ratio[..., rows, :]
        if groups > 1:
            # query head h attends with key/value head h // groups
            gradient = gradient.unflatten(-3, (-1, groups)).sum(-3)
        return _unbroadcast(gradient, value.shape)

    @staticmethod
    def attention(module, query, key, value, mask):
        '''``softmax(scale * q @ k^T + mask) @ v`` through :py:func:`torch.nn.functional.scaled_dot_product_attention`
        (grouped-query attention without repeating keys and values; operands that broadcast over the batch dimensions
        are expanded, so that their gradients sum over them).'''
        if query_groups(query, key) > 1:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=module.scale, enable_gqa=True
            )
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        query, key, value = (tensor.expand(batch + tensor.shape[-2:]) for tensor in (query, key, value))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=module.scale)


class SDPACPAttentionRule(SDPAAttentionRule):
    '''CP-LRP for a whole :py:class:`~zennit_attn.layers.AttentionCore` through PyTorch's fused attention backward:
    ``R_v = v * g_v`` (the probabilities are constant) and nothing for ``q``, ``k`` and the mask; exactly
    :py:class:`~zennit_attn.rules.CPAttentionRule` (no ε term is dropped).
    '''
    constant_probabilities = True
