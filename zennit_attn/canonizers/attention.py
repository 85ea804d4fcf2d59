'''The attention core shared by all canonizers: its op modules and the call that runs them.

Every canonizer computes ``softmax(scale * q @ k^T + mask) @ v`` the same way. By default (``fused=True``) a call goes
through one :py:class:`~zennit_attn.layers.AttentionCore`, whose rule keeps only ``q``, ``k``, ``v`` and the output and
recomputes the scores and probabilities in the backward pass. The unfolded chain (:py:class:`AttentionScores`,
:py:class:`AttentionMask`, :py:class:`AttentionSoftmax`, :py:class:`AttentionContext`) is used when the caller needs
the probabilities (attention weights requested, attention rollout), when dropout on the probabilities is active, and
always with ``fused=False``, which makes the relevance of the scores and probabilities observable (e.g. for
:py:func:`zennit_attn.latent.record_relevance`) at the cost of two ``T x T`` matrices per layer. Both give the same
relevance (tested).
'''
import torch.nn.functional as F

from .. import layers
from .base import ForwardCanonizer


__all__ = ['attention_ops', 'attend', 'AttentionCanonizer']


def attention_ops(scale, scale_output=True, softmax_dtype=None, fused=True, score_ops=None, suffix=''):
    '''The op modules of attention ``softmax(scale * q @ k^T + mask) @ v``: ``'scores'``
    (:py:class:`~zennit_attn.layers.AttentionScores` with the scaling folded in), then ``score_ops`` (further ops on the
    scores before the mask, e.g. logit soft-capping), ``'mask'`` (:py:class:`~zennit_attn.layers.AttentionMask`),
    ``'softmax'`` (:py:class:`~zennit_attn.layers.AttentionSoftmax` over the last dimension, computed in
    ``softmax_dtype``), ``'context'`` (:py:class:`~zennit_attn.layers.AttentionContext`) and, with ``fused`` and no
    ``score_ops``, ``'attention'`` (the same computation as one :py:class:`~zennit_attn.layers.AttentionCore`). Every
    key gets ``suffix`` appended (for a second set of ops in one module).
    '''
    ops = {'scores': layers.AttentionScores(scale=scale, scale_output=scale_output)}
    ops.update(score_ops or {})
    ops.update(
        mask=layers.AttentionMask(),
        softmax=layers.AttentionSoftmax(dim=-1, dtype=softmax_dtype),
        context=layers.AttentionContext(),
    )
    if fused and not score_ops:
        ops['attention'] = layers.AttentionCore(scale=scale, scale_output=scale_output, softmax_dtype=softmax_dtype)
    return {key + suffix: op for key, op in ops.items()}


def attend(ops, query, key, value, mask=None, dropout=0., training=False, need_weights=False, score_transform=None,
           suffix=''):
    '''Compute ``softmax(score_transform(scale * q @ k^T) + mask) @ v`` with the op modules of
    :py:func:`attention_ops`.

    The fused core runs if ``ops`` has one and neither the probabilities (``need_weights``) nor dropout on them
    (``dropout`` while ``training``) are needed; otherwise the unfolded chain runs. The probabilities are cast to the
    dtype of ``v`` before the product (as every eager attention does).

    Parameters
    ----------
    ops: dict[str, :py:obj:`torch.nn.Module`]
        The op modules of :py:func:`attention_ops`.
    query, key, value: :py:obj:`torch.Tensor`
        ``(..., T_q, d)``, ``(..., T_k, d)`` (not transposed) and ``(..., T_k, d_v)``; ``key`` and ``value`` may have
        fewer heads (dimension -3) than ``query`` (grouped-query attention; repeated for the unfolded chain only).
    mask: :py:obj:`torch.Tensor`, optional
        Additive mask broadcastable to the scores.
    dropout: float, optional
        Dropout probability on the attention probabilities.
    training: bool, optional
        Whether dropout is active.
    need_weights: bool, optional
        Whether the caller returns the probabilities.
    score_transform: callable, optional
        Applied to the scores before the mask (forces the unfolded chain).
    suffix: str, optional
        Suffix of the keys of the ops to use.

    Returns
    -------
    tuple[:py:obj:`torch.Tensor`, :py:obj:`torch.Tensor` or None]
        The context ``(..., T_q, d_v)`` and the probabilities (None when the fused core ran).
    '''
    core = ops.get('attention' + suffix)
    if core is not None and score_transform is None and not need_weights and not (training and dropout):
        return core(*((query, key, value) if mask is None else (query, key, value, mask))), None
    groups = layers.query_groups(query, key)
    key, value = layers.repeat_heads(key, groups), layers.repeat_heads(value, groups)
    scores = ops['scores' + suffix](query, key.transpose(-1, -2))
    if score_transform is not None:
        scores = score_transform(scores)
    if mask is not None:
        scores = ops['mask' + suffix](scores, mask)
    probabilities = ops['softmax' + suffix](scores).to(value.dtype)
    dropped = F.dropout(probabilities, p=dropout, training=training) if dropout else probabilities
    return ops['context' + suffix](dropped, value), probabilities


class AttentionCanonizer(ForwardCanonizer):
    '''Base of the canonizers that unfold an attention module; ``fused`` chooses whether its core runs as one
    :py:class:`~zennit_attn.layers.AttentionCore` (default) or as the unfolded chain (see the module docstring).

    Parameters
    ----------
    fused: bool, optional
        Insert the fused attention core.
    '''
    def __init__(self, fused=True):
        super().__init__()
        self.fused = fused

    def copy(self):
        return self.__class__(fused=self.fused)
