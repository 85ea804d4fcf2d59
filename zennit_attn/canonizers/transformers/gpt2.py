'''Canonizer for Hugging Face ``transformers`` (5.x) GPT-2 (``GPT2Model`` and every head on it, e.g.
``GPT2LMHeadModel``).

* :py:class:`GPT2ModelCanonizer`: the inline ``inputs_embeds + position_embeds`` of ``GPT2Model.forward`` becomes a
  :py:class:`~zennit_attn.layers.Sum`. The instance forward computes the sum and passes it as ``inputs_embeds`` to the
  original forward, while ``wpe`` (patched at instance level) returns zeros there, so the original adds an exact 0.
* :py:class:`GPT2BlockCanonizer`: the two residual sums of ``GPT2Block``.
* :py:class:`GPT2AttentionCanonizer`: the eager attention with hookable ops: ``c_attn`` (one ``Conv1D`` producing q, k
  and v, split afterwards) and ``c_proj`` keep ε (role ``'attention_projection'``), and the attention core
  ``softmax((q @ k^T) * scaling + mask) @ v`` of :py:mod:`zennit_attn.canonizers.attention` (one
  :py:class:`~zennit_attn.layers.AttentionCore`, or the unfolded chain).

``GPT2MLP`` needs no canonizer: ``c_fc``, the activation (``NewGELUActivation``, identity rule) and ``c_proj`` are all
modules; ``Conv1D`` gets the ε-rule (:py:class:`zennit_attn.types.LinearLike`). Not supported (clear errors):
cross-attention (``add_cross_attention``), ``reorder_and_upcast_attn``, ``token_type_ids``.
'''
import torch

from transformers.models.gpt2 import modeling_gpt2

from ... import layers
from .. import register_family
from ..attention import AttentionCanonizer, attend, attention_ops
from ..base import ForwardCanonizer
from ..group import CanonizerGroup
from .common import (
    EagerAttentionCanonizer, additive_mask, attentions_requested, cache_keyword, reject_unexpected, take_cache,
)


__all__ = ['GPT2ModelCanonizer', 'GPT2BlockCanonizer', 'GPT2AttentionCanonizer', 'GPT2Canonizer']


def _zeros_embedding(embedding):
    '''An instance forward for ``embedding`` that returns zeros of the embedding's output shape and dtype.'''
    def forward(ids):
        return torch.zeros(
            (*ids.shape, embedding.embedding_dim), dtype=embedding.weight.dtype, device=embedding.weight.device
        )
    return forward


class GPT2ModelCanonizer(ForwardCanonizer):
    '''Unfold the position-embedding sum of ``GPT2Model`` into a :py:class:`~zennit_attn.layers.Sum` (see the module
    docstring). The position embeddings are computed from ``wpe``'s weight, so they absorb their share of relevance.
    '''
    module_type = (modeling_gpt2.GPT2Model,)

    def register(self, module):
        if 'forward' in vars(module.wpe):
            raise RuntimeError(
                f'{type(self).__name__}: {type(module.wpe).__name__} already has an instance-level forward; remove '
                'the other canonizer first.'
            )
        super().register(module)
        module.wpe.forward = _zeros_embedding(module.wpe)

    def remove(self):
        if self.module is not None:
            vars(self.module.wpe).pop('forward', None)
        super().remove()

    def make_ops(self, module):
        return {'position_embedding': layers.Sum()}

    def canonical_forward(
        self, input_ids=None, cache=None, attention_mask=None, token_type_ids=None, position_ids=None,
        inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs
    ):
        module = self.module
        # the cache is called ``cache`` from transformers 5.24 on, ``past_key_values`` before
        past_key_values = take_cache(type(module).__name__, cache, past_key_values)
        if token_type_ids is not None:
            raise NotImplementedError(
                'GPT2ModelCanonizer: token_type_ids add the word embedding of the token types inline, which has no '
                'rule; attribute without token_type_ids.'
            )
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError('You cannot specify both input_ids and inputs_embeds at the same time')
        if input_ids is not None:
            module.warn_if_padding_and_no_attention_mask(input_ids, attention_mask)
            inputs_embeds = module.wte(input_ids.view(-1, input_ids.shape[-1]))
        elif inputs_embeds is None:
            raise ValueError('You have to specify either input_ids or inputs_embeds')
        if use_cache is None:
            use_cache = module.config.use_cache
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        # the real position embeddings (wpe's instance forward returns zeros inside the original forward)
        position_embeds = type(module.wpe).forward(module.wpe, position_ids).to(inputs_embeds.device)
        hidden_states = self.ops['position_embedding'](inputs_embeds, position_embeds)
        return type(module).forward(
            module, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=hidden_states,
            use_cache=use_cache, **{cache_keyword(type(module).forward): past_key_values}, **kwargs
        )


class GPT2BlockCanonizer(ForwardCanonizer):
    '''Unfold the residual sums of ``GPT2Block`` into :py:class:`~zennit_attn.layers.Sum` modules.'''
    module_type = (modeling_gpt2.GPT2Block,)

    def check(self, module):
        if hasattr(module, 'crossattention'):
            raise NotImplementedError(
                'GPT2Canonizer: GPT-2 with cross-attention (add_cross_attention=True) is not supported.'
            )

    def make_ops(self, module):
        return {'residual_attention': layers.Sum(), 'residual_mlp': layers.Sum()}

    def canonical_forward(
        self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
        encoder_attention_mask=None, use_cache=False, past_key_values=None, **kwargs
    ):
        module, ops = self.module, self.ops
        # the cache is called ``cache`` from transformers 5.24 on, ``past_key_values`` before
        past_key_values = take_cache(type(module).__name__, cache, past_key_values)
        if encoder_hidden_states is not None:
            raise NotImplementedError('GPT2Canonizer: encoder_hidden_states (cross-attention) are not supported.')
        residual = hidden_states
        attn_output, _ = module.attn(
            module.ln_1(hidden_states), past_key_values=past_key_values, attention_mask=attention_mask,
            use_cache=use_cache, **kwargs
        )
        hidden_states = ops['residual_attention'](attn_output, residual)
        residual = hidden_states
        feed_forward = module.mlp(module.ln_2(hidden_states))
        return ops['residual_mlp'](residual, feed_forward)


class GPT2AttentionCanonizer(AttentionCanonizer):
    '''Re-implement GPT-2's eager self-attention with hookable op modules (see the module docstring).'''
    module_type = (modeling_gpt2.GPT2Attention,)

    def check(self, module):
        if module.is_cross_attention:
            raise NotImplementedError('GPT2Canonizer: cross-attention layers are not supported.')
        if module.reorder_and_upcast_attn:
            raise NotImplementedError(
                'GPT2Canonizer: reorder_and_upcast_attn=True (float32 baddbmm scores) is not supported; set '
                'config.reorder_and_upcast_attn = False.'
            )

    def make_ops(self, module):
        return attention_ops(module.scaling, fused=self.fused)

    def make_roles(self, module):
        return {module.c_attn: 'attention_projection', module.c_proj: 'attention_projection'}

    def canonical_forward(
        self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
        encoder_attention_mask=None, output_attentions=False, past_key_values=None, **kwargs
    ):
        module, ops = self.module, self.ops
        # the cache is called ``cache`` from transformers 5.24 on, ``past_key_values`` before
        past_key_values = take_cache(type(module).__name__, cache, past_key_values)
        if encoder_hidden_states is not None:
            raise NotImplementedError('GPT2Canonizer: encoder_hidden_states (cross-attention) are not supported.')
        reject_unexpected(type(module).__name__, kwargs)
        query, key, value = module.c_attn(hidden_states).split(module.split_size, dim=2)
        shape = (*query.shape[:-1], -1, module.head_dim)
        query, key, value = (tensor.view(shape).transpose(1, 2) for tensor in (query, key, value))
        if past_key_values is not None:
            cache = getattr(past_key_values, 'self_attention_cache', past_key_values)
            key, value = cache.update(key, value, module.layer_idx)

        mask = None if attention_mask is None else additive_mask(attention_mask, query.dtype)[:, :, :, :key.shape[-2]]
        context, probabilities = attend(
            ops, query, key, value, mask, dropout=module.attn_dropout.p, training=module.training,
            need_weights=attentions_requested(),
        )
        context = context.transpose(1, 2)
        context = context.reshape(*context.shape[:-2], -1).contiguous()
        return module.resid_dropout(module.c_proj(context)), probabilities


@register_family
class GPT2Canonizer(CanonizerGroup):
    '''GPT-2 (``GPT2Model`` and its heads): eager masks, position-embedding sum, block residuals, attention.'''
    model_type = (modeling_gpt2.GPT2Model,)

    def __init__(self, fused=True):
        self.fused = fused
        super().__init__([
            EagerAttentionCanonizer(), GPT2ModelCanonizer(), GPT2BlockCanonizer(), GPT2AttentionCanonizer(fused),
        ])

    def copy(self):
        return self.__class__(fused=self.fused)
