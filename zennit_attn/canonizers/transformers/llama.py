'''Canonizers for the LLaMA-style decoder families of Hugging Face ``transformers`` (5.x): LLaMA, Mistral, Qwen2,
Qwen3 and Gemma3 (text).

All of them share one decoder layout, unfolded here by three canonizers per family:

* :py:class:`DecoderLayerCanonizer`: the two residual sums of every decoder layer as
  :py:class:`~zennit_attn.layers.Sum` (Gemma3's "sandwich" norms around attention and MLP included).
* :py:class:`DecoderAttentionCanonizer`: the attention, written with hookable ops: the module's own q/k/v/o
  projections (role ``'attention_projection'``), optional q/k RMSNorms (Qwen3, Gemma3), one
  :py:class:`~zennit_attn.layers.RotaryEmbedding` for q and one for k, and the attention core (grouped-query
  attention without repeating keys and values in the fused core) ``softmax((q @ k^T) * scaling + mask) @ v`` with the softmax in float32 (cast back afterwards):
  one :py:class:`~zennit_attn.layers.AttentionCore`, or the unfolded chain (see
  :py:mod:`zennit_attn.canonizers.attention`), which also carries optional logit soft-capping for families whose
  attention applies it (:py:class:`~zennit_attn.layers.Scale`, :py:class:`torch.nn.Tanh`,
  :py:class:`~zennit_attn.layers.Scale` before the mask).
* :py:class:`GatedMLPCanonizer`: ``down(act(gate(x)) * up(x))`` with a :py:class:`~zennit_attn.layers.GatedProduct`.

Every family group also contains :py:class:`~zennit_attn.canonizers.transformers.common.EagerAttentionCanonizer`, so
the model builds additive eager masks (causal, padding, sliding window) whatever attention implementation it was loaded
with. Gemma3's final logit soft-capping is unfolded by :py:class:`FinalLogitSoftcapCanonizer`. Normalisations
(``*RMSNorm``, Gemma's ``1 + w`` included) and activations are matched by type in the composites; Gemma3's embedding
scaling happens inside the embedding lookup, before ``inputs_embeds``, and needs no rule.

Deliberate difference to transformers: the additive mask is floored at float32's minimum. transformers' own eager
attention turns float64 models with left padding into NaN everywhere (float64's mask minimum becomes -inf in the
float32 softmax, the fully masked rows of padding queries give NaN, which spreads through the next layer); the canonized
model stays finite, and every output the original computes without NaN is bit-identical.

A key/value cache (``past_key_values``, also the ``DynamicCache`` a model creates itself with ``use_cache=True``) is
supported: the cached keys and values are constants, so their share of relevance is absorbed.
'''
import inspect

import torch

from ... import layers
from .. import register_family
from ..attention import attend, attention_ops
from ..base import ForwardCanonizer
from ..group import CanonizerGroup
from .common import (
    EagerAttentionCanonizer, additive_mask, attentions_requested, cache_keyword, reject_unexpected, take_cache,
)

from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.gemma3 import modeling_gemma3


__all__ = [
    'DecoderLayerCanonizer', 'DecoderAttentionCanonizer', 'GatedMLPCanonizer', 'FinalLogitSoftcapCanonizer',
    'DecoderFamilyCanonizer', 'LlamaCanonizer', 'MistralCanonizer', 'Qwen2Canonizer', 'Qwen3Canonizer',
    'Gemma3TextCanonizer',
]


class TypedForwardCanonizer(ForwardCanonizer):
    '''A :py:class:`~zennit_attn.canonizers.base.ForwardCanonizer` whose module types are given at construction.

    Parameters
    ----------
    module_type: tuple[type]
        The module classes this canonizer unfolds.
    '''
    def __init__(self, module_type=()):
        super().__init__()
        self.module_type = tuple(module_type)

    def copy(self):
        return self.__class__(self.module_type)


def _keywords(module, args, kwargs):
    '''Turn the positional arguments after the first of a call of ``module`` into keyword arguments, using the
    signature of the class's own forward.
    '''
    if not args:
        return dict(kwargs)
    names = [
        name for name, parameter in inspect.signature(type(module).forward).parameters.items()
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    ][2:]  # self and the hidden states
    if len(args) > len(names):
        raise TypeError(f'{type(module).__name__}.forward got {len(args) + 1} positional arguments, expected at most '
                        f'{len(names) + 1}')
    return {**dict(zip(names, args)), **kwargs}


class DecoderLayerCanonizer(TypedForwardCanonizer):
    '''Unfold the residual sums of a pre-norm decoder layer (``LlamaDecoderLayer`` and relatives) into
    :py:class:`~zennit_attn.layers.Sum` modules.

    Layers with ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm`` (Gemma2/3) use the sandwich layout
    ``x + post_attention_layernorm(attn(input_layernorm(x)))``, ``x + post_feedforward_layernorm(mlp(
    pre_feedforward_layernorm(x)))``; all others ``x + attn(input_layernorm(x))``, ``x + mlp(post_attention_layernorm(
    x))``.
    '''
    def check(self, module):
        missing = [name for name in ('self_attn', 'mlp', 'input_layernorm') if not hasattr(module, name)]
        if missing:
            raise NotImplementedError(f'{type(self).__name__}: {type(module).__name__} has no {missing}.')

    def make_ops(self, module):
        return {'residual_attention': layers.Sum(), 'residual_mlp': layers.Sum()}

    def canonical_forward(self, hidden_states, *args, **kwargs):
        module, ops = self.module, self.ops
        kwargs = _keywords(module, args, kwargs)
        sandwich = hasattr(module, 'pre_feedforward_layernorm') and hasattr(module, 'post_feedforward_layernorm')

        residual = hidden_states
        hidden_states = module.input_layernorm(hidden_states)
        hidden_states, _ = module.self_attn(hidden_states=hidden_states, **kwargs)
        if sandwich:
            hidden_states = module.post_attention_layernorm(hidden_states)
        hidden_states = ops['residual_attention'](residual, hidden_states)

        residual = hidden_states
        if sandwich:
            hidden_states = module.pre_feedforward_layernorm(hidden_states)
        else:
            hidden_states = module.post_attention_layernorm(hidden_states)
        hidden_states = module.mlp(hidden_states)
        if sandwich:
            hidden_states = module.post_feedforward_layernorm(hidden_states)
        return ops['residual_mlp'](residual, hidden_states)


class DecoderAttentionCanonizer(TypedForwardCanonizer):
    '''Re-implement the eager attention of the LLaMA-style families with hookable op modules (see the module
    docstring). The additive mask is the eager format, which
    :py:class:`~zennit_attn.canonizers.transformers.common.EagerAttentionCanonizer` makes the model build.

    Parameters
    ----------
    module_type: tuple[type]
        The attention classes.
    norm_after_transpose: bool, optional
        Apply ``q_norm``/``k_norm`` after moving the heads to dim 1 (Gemma3) instead of before (Qwen3); the values
        are the same, the flag only keeps the original order of operations.
    softcapping: bool, optional
        Apply the module's ``attn_logit_softcapping`` (``cap * tanh(scores / cap)``) before the mask. Off by default:
        transformers 5.x's Gemma3 attention stores the value but never applies it, and the canonical forward must
        compute what the original computes. Soft-capped attention always runs unfolded.
    fused: bool, optional
        Run the attention core as one :py:class:`~zennit_attn.layers.AttentionCore` where possible (see
        :py:mod:`zennit_attn.canonizers.attention`).
    '''
    def __init__(self, module_type=(), norm_after_transpose=False, softcapping=False, fused=True):
        super().__init__(module_type)
        self.norm_after_transpose = norm_after_transpose
        self.softcapping = softcapping
        self.fused = fused

    def copy(self):
        return self.__class__(self.module_type, self.norm_after_transpose, self.softcapping, self.fused)

    def check(self, module):
        missing = [
            name for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'head_dim', 'scaling', 'num_key_value_groups')
            if not hasattr(module, name)
        ]
        if missing:
            raise NotImplementedError(f'{type(self).__name__}: {type(module).__name__} has no {missing}.')

    def make_ops(self, module):
        softcap = getattr(module, 'attn_logit_softcapping', None) if self.softcapping else None
        score_ops = None if softcap is None else {
            'softcap_divide': layers.Scale(softcap, divide=True),
            'softcap_tanh': torch.nn.Tanh(),
            'softcap_multiply': layers.Scale(softcap),
        }
        return {
            'rope_query': layers.RotaryEmbedding(),
            'rope_key': layers.RotaryEmbedding(),
            **attention_ops(module.scaling, softmax_dtype=torch.float32, fused=self.fused, score_ops=score_ops),
        }

    def make_roles(self, module):
        return {
            getattr(module, name): 'attention_projection' for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
        }

    def canonical_forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, past_key_values=None, **kwargs
    ):
        module, ops = self.module, self.ops
        # the cache is passed as ``cache`` from transformers 5.24 on, as ``past_key_values`` before
        past_key_values = take_cache(type(module).__name__, cache, past_key_values)
        reject_unexpected(type(module).__name__, kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, module.head_dim)

        query = module.q_proj(hidden_states).view(hidden_shape)
        key = module.k_proj(hidden_states).view(hidden_shape)
        value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        q_norm, k_norm = getattr(module, 'q_norm', None), getattr(module, 'k_norm', None)
        if q_norm is not None and not self.norm_after_transpose:
            query, key = q_norm(query), k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        if q_norm is not None and self.norm_after_transpose:
            query, key = q_norm(query), k_norm(key)

        if position_embeddings is None:
            raise ValueError(
                f'{type(module).__name__} (canonized): position_embeddings (cos, sin) are required; call the model, '
                'not the attention module alone.'
            )
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = ops['rope_query'](query, cos, sin)
        key = ops['rope_key'](key, cos, sin)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, module.layer_idx)

        softcap = None
        if 'softcap_tanh' in ops:
            def softcap(scores):
                return ops['softcap_multiply'](ops['softcap_tanh'](ops['softcap_divide'](scores)))
        mask = None
        if attention_mask is not None:
            # float64 models: the eager mask holds float64's minimum, which becomes -inf in the float32 softmax, so
            # the fully masked rows of left-padding queries turn NaN in transformers and the NaN spreads to every
            # token through the next layer. Flooring at float32's minimum changes nothing else (exp still underflows
            # to exactly 0), so unpadded outputs stay bit-identical.
            mask = additive_mask(attention_mask, query.dtype, floor=torch.finfo(torch.float32).min)
            mask = mask[:, :, :, :key.shape[-2]]
        context, probabilities = attend(
            ops, query, key, value, mask, dropout=module.attention_dropout, training=module.training,
            need_weights=attentions_requested(), score_transform=softcap,
        )
        context = context.transpose(1, 2).contiguous()
        context = context.reshape(*input_shape, -1).contiguous()
        return module.o_proj(context), probabilities


class GatedMLPCanonizer(TypedForwardCanonizer):
    '''Unfold a gated MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a
    :py:class:`~zennit_attn.layers.GatedProduct` (gate first).
    '''
    def check(self, module):
        missing = [name for name in ('gate_proj', 'up_proj', 'down_proj', 'act_fn') if not hasattr(module, name)]
        if missing:
            raise NotImplementedError(f'{type(self).__name__}: {type(module).__name__} has no {missing}.')

    def make_ops(self, module):
        return {'product': layers.GatedProduct()}

    def canonical_forward(self, x):
        module = self.module
        return module.down_proj(self.ops['product'](module.act_fn(module.gate_proj(x)), module.up_proj(x)))


class FinalLogitSoftcapCanonizer(TypedForwardCanonizer):
    '''Re-implement the forward of a causal LM head with final logit soft-capping (``Gemma3ForCausalLM``):
    ``cap * tanh(logits / cap)`` as :py:class:`~zennit_attn.layers.Scale`, :py:class:`torch.nn.Tanh` (identity rule as
    an activation) and :py:class:`~zennit_attn.layers.Scale`. Models without soft-capping are left alone.
    '''
    def matches(self, module):
        return super().matches(module) and getattr(module.config, 'final_logit_softcapping', None) is not None

    def make_ops(self, module):
        cap = module.config.final_logit_softcapping
        return {
            'softcap_divide': layers.Scale(cap, divide=True),
            'softcap_tanh': torch.nn.Tanh(),
            'softcap_multiply': layers.Scale(cap),
        }

    def canonical_forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
        labels=None, use_cache=None, logits_to_keep=0, return_dict=None, past_key_values=None, **kwargs
    ):
        from transformers.modeling_outputs import CausalLMOutputWithPast
        try:
            from transformers.modeling_utils import slice_logits_to_keep
        except ImportError:  # transformers < 5.21 slices inline, as here
            def slice_logits_to_keep(hidden_states, logits_to_keep):
                indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
                return hidden_states[:, indices, :]

        module, ops = self.module, self.ops
        if return_dict is None:
            return_dict = getattr(module.config, 'return_dict', True)
        # the cache is called ``cache`` from transformers 5.24 on (inputs and outputs), ``past_key_values`` before
        cache = take_cache(type(module).__name__, cache, past_key_values)
        cache_name = cache_keyword(type(module.model).forward)
        outputs = module.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{cache_name: cache},
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = module.lm_head(hidden_states)
        logits = ops['softcap_multiply'](ops['softcap_tanh'](ops['softcap_divide'](logits)))
        loss = None
        if labels is not None:
            loss = module.loss_function(logits, labels, module.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{cache_name: getattr(outputs, cache_name)},
        )
        return output if return_dict else output.to_tuple()


class DecoderFamilyCanonizer(CanonizerGroup):
    '''Base of the LLaMA-style family groups: eager masks, decoder layers, attention and gated MLPs.

    Subclasses set ``model_type`` (detection), ``decoder_types``, ``attention_types``, ``mlp_types`` and optionally
    ``causal_lm_types`` (heads with final logit soft-capping), ``norm_after_transpose`` and ``attention_softcapping``
    (see :py:class:`DecoderAttentionCanonizer`).
    '''
    decoder_types = ()
    attention_types = ()
    mlp_types = ()
    causal_lm_types = ()
    norm_after_transpose = False
    attention_softcapping = False

    def __init__(self, fused=True):
        self.fused = fused
        canonizers = [
            EagerAttentionCanonizer(),
            DecoderLayerCanonizer(self.decoder_types),
            DecoderAttentionCanonizer(
                self.attention_types, self.norm_after_transpose, self.attention_softcapping, fused=fused
            ),
            GatedMLPCanonizer(self.mlp_types),
        ]
        if self.causal_lm_types:
            canonizers.append(FinalLogitSoftcapCanonizer(self.causal_lm_types))
        super().__init__(canonizers)

    def copy(self):
        return self.__class__(fused=self.fused)


@register_family
class LlamaCanonizer(DecoderFamilyCanonizer):
    '''LLaMA (``LlamaModel`` and every head on it, e.g. ``LlamaForCausalLM``).'''
    model_type = (modeling_llama.LlamaModel,)
    decoder_types = (modeling_llama.LlamaDecoderLayer,)
    attention_types = (modeling_llama.LlamaAttention,)
    mlp_types = (modeling_llama.LlamaMLP,)


@register_family
class MistralCanonizer(DecoderFamilyCanonizer):
    '''Mistral (``MistralModel`` and its heads), sliding-window masks included.'''
    model_type = (modeling_mistral.MistralModel,)
    decoder_types = (modeling_mistral.MistralDecoderLayer,)
    attention_types = (modeling_mistral.MistralAttention,)
    mlp_types = (modeling_mistral.MistralMLP,)


@register_family
class Qwen2Canonizer(DecoderFamilyCanonizer):
    '''Qwen2 (``Qwen2Model`` and its heads), biased q/k/v projections and sliding-window layers included.'''
    model_type = (modeling_qwen2.Qwen2Model,)
    decoder_types = (modeling_qwen2.Qwen2DecoderLayer,)
    attention_types = (modeling_qwen2.Qwen2Attention,)
    mlp_types = (modeling_qwen2.Qwen2MLP,)


@register_family
class Qwen3Canonizer(DecoderFamilyCanonizer):
    '''Qwen3 (``Qwen3Model`` and its heads), with RMSNorms on the query and key heads.'''
    model_type = (modeling_qwen3.Qwen3Model,)
    decoder_types = (modeling_qwen3.Qwen3DecoderLayer,)
    attention_types = (modeling_qwen3.Qwen3Attention,)
    mlp_types = (modeling_qwen3.Qwen3MLP,)


@register_family
class Gemma3TextCanonizer(DecoderFamilyCanonizer):
    '''Gemma3 text (``Gemma3TextModel``, ``Gemma3ForCausalLM``): ``1 + w`` RMSNorms (identity rule), sandwich norms,
    q/k-norms, ``query_pre_attn_scalar`` scaling, sliding-window layers and optional final-logit soft-capping.
    ``attn_logit_softcapping`` is ignored, as by transformers' own ``Gemma3Attention`` (5.x).
    '''
    model_type = (modeling_gemma3.Gemma3TextModel,)
    decoder_types = (modeling_gemma3.Gemma3DecoderLayer,)
    attention_types = (modeling_gemma3.Gemma3Attention,)
    mlp_types = (modeling_gemma3.Gemma3MLP,)
    causal_lm_types = (modeling_gemma3.Gemma3ForCausalLM,)
    norm_after_transpose = True
