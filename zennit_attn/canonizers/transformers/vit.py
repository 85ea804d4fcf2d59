'''Canonizers for Hugging Face ViT (transformers 5.x): ``ViTModel``, ``ViTForImageClassification`` and
``ViTForMaskedImageModeling``'s encoder.

Unfolded operations:

* ``ViTEmbeddings``: the position-embedding sum as a :py:class:`~zennit_attn.layers.Sum` (the embedding is a parameter,
  or its bicubic interpolation with ``interpolate_pos_encoding=True``; either way a constant that absorbs its share),
  the class-token concatenation stays (a re-arrangement), and the optional mask-token replacement
  ``x * (1 - m) + t * m`` as a :py:class:`~zennit_attn.layers.Product` with a constant and a Sum. The patch embedding
  is a ``Conv2d`` (γ in the vision preset).
* ``ViTAttention``: ``q_proj``/``k_proj``/``v_proj``/``o_proj`` keep their Linear (role ``'attention_projection'``),
  and the attention core of :py:mod:`zennit_attn.canonizers.attention` (one
  :py:class:`~zennit_attn.layers.AttentionCore` or the unfolded chain) with the optional additive mask; the softmax runs
  in float32 for half-precision inputs, as the eager code (a second set of ops with the suffix ``_float32``).
* ``ViTLayer``: the two residual sums.

LayerNorms get the LayerNorm rule by type; the MLP activation and the pooler activation are modules already.
'''
import torch
from transformers.models.vit import modeling_vit

from ... import layers
from ..attention import AttentionCanonizer, attend, attention_ops
from ..base import ForwardCanonizer
from ..group import CanonizerGroup
from .. import register_family
from .common import EagerAttentionCanonizer, additive_mask, attentions_requested


__all__ = ['ViTEmbeddingsCanonizer', 'ViTAttentionCanonizer', 'ViTLayerCanonizer', 'ViTCanonizer']


class ViTEmbeddingsCanonizer(ForwardCanonizer):
    '''Unfold the position-embedding sum (and the mask-token replacement) of ``ViTEmbeddings``.'''
    module_type = (modeling_vit.ViTEmbeddings,)

    def make_ops(self, module):
        return {'position': layers.Sum(), 'mask_keep': layers.Product(), 'mask_token': layers.Sum()}

    def canonical_forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
        module, ops = self.module, self.ops
        batch_size, _, height, width = pixel_values.shape
        embeddings = module.patch_embeddings(pixel_values)

        if bool_masked_pos is not None:
            seq_length = embeddings.shape[1]
            mask_tokens = module.mask_token.expand(batch_size, seq_length, -1)
            mask = bool_masked_pos.unsqueeze(-1).type_as(mask_tokens)
            # the mask and the (parameter) mask tokens are constants: kept patches get all relevance
            embeddings = ops['mask_token'](ops['mask_keep'](embeddings, 1.0 - mask), mask_tokens * mask)

        cls_tokens = module.cls_token.expand(batch_size, -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)

        if interpolate_pos_encoding:
            # the interpolated position embedding is a function of parameters only: a constant operand of the sum
            position_embeddings = module.interpolate_pos_encoding(embeddings, height, width)
        else:
            if height != module.image_size[0] or width != module.image_size[1]:
                raise ValueError(
                    f"Input image size ({height}*{width}) doesn't match model"
                    f" ({module.image_size[0]}*{module.image_size[1]})."
                )
            position_embeddings = module.position_embeddings
        embeddings = ops['position'](embeddings, position_embeddings)
        return module.dropout(embeddings)


class ViTAttentionCanonizer(AttentionCanonizer):
    '''Unfold ``ViTAttention`` into hookable ops computing the eager attention
    ``o_proj(softmax((q @ k^T) * scaling + mask) @ v)`` whatever attention implementation the model was loaded with.

    The eager code computes the softmax in float32 and casts back; this forward does so for half-precision inputs
    only, so float64 models keep float64 precision (as ``sdpa`` does).
    '''
    module_type = (modeling_vit.ViTAttention,)

    def make_ops(self, module):
        return {
            **attention_ops(module.scaling, fused=self.fused),
            **attention_ops(module.scaling, softmax_dtype=torch.float32, fused=self.fused, suffix='_float32'),
        }

    def make_roles(self, module):
        return {
            getattr(module, name): 'attention_projection' for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
        }

    def canonical_forward(self, hidden_states, attention_mask=None, **kwargs):
        module, ops = self.module, self.ops
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, module.head_dim)

        query = module.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = module.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        context, probabilities = attend(
            ops, query, key, value, additive_mask(attention_mask, query.dtype), dropout=module.attention_dropout,
            training=module.training, need_weights=attentions_requested(),
            suffix='_float32' if query.dtype in (torch.float16, torch.bfloat16) else '',
        )
        context = context.transpose(1, 2).contiguous()
        context = context.reshape(*input_shape, -1).contiguous()
        return module.o_proj(context), probabilities


class ViTLayerCanonizer(ForwardCanonizer):
    '''Unfold the two residual sums of ``ViTLayer`` (pre-norm block).'''
    module_type = (modeling_vit.ViTLayer,)

    def make_ops(self, module):
        return {'residual_attention': layers.Sum(), 'residual_mlp': layers.Sum()}

    def canonical_forward(self, hidden_states, attention_mask=None, **kwargs):
        module, ops = self.module, self.ops
        residual = hidden_states
        hidden_states = module.layernorm_before(hidden_states)
        hidden_states, _ = module.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = module.dropout(hidden_states)
        hidden_states = ops['residual_attention'](hidden_states, residual)

        residual = hidden_states
        hidden_states = module.layernorm_after(hidden_states)
        hidden_states = module.mlp(hidden_states)
        hidden_states = module.dropout(hidden_states)
        return ops['residual_mlp'](hidden_states, residual)


@register_family
class ViTCanonizer(CanonizerGroup):
    '''Canonizer for Hugging Face ViT models (``ViTModel``, ``ViTForImageClassification``): eager masks, embeddings,
    attention and residual sums.
    '''
    model_type = (modeling_vit.ViTEmbeddings, modeling_vit.ViTAttention, modeling_vit.ViTLayer)

    def __init__(self, fused=True):
        self.fused = fused
        super().__init__([
            EagerAttentionCanonizer(), ViTEmbeddingsCanonizer(), ViTAttentionCanonizer(fused), ViTLayerCanonizer(),
        ])

    def copy(self):
        return self.__class__(fused=self.fused)
