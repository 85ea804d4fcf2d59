'''Canonizers for Hugging Face BERT-style encoders (transformers 5.x): ``BertModel`` and its heads, and the look-alikes
whose modules are the same code under another class prefix (see :py:data:`LOOK_ALIKES`): RoBERTa, XLM-RoBERTa,
CamemBERT, Data2VecText and ELECTRA (``*Model``, ``*ForSequenceClassification``, ``*ForMaskedLM``, ...).

Unfolded operations (one op module per call site, see :py:class:`~zennit_attn.canonizers.ForwardCanonizer`):

* embeddings: ``inputs_embeds + token_type_embeddings`` and ``+ position_embeddings`` as two
  :py:class:`~zennit_attn.layers.Sum` (the input-dependent operand receives its ε-share, the embedding tables absorb
  theirs); the embedding ``LayerNorm`` gets the LayerNorm rule by type.
* self-attention: ``query``/``key``/``value`` keep their Linear (role ``'attention_projection'``), then the attention
  core ``softmax((q @ k^T) * scaling + mask) @ v`` of :py:mod:`zennit_attn.canonizers.attention` (one
  :py:class:`~zennit_attn.layers.AttentionCore`, or the unfolded chain with ``fused=False``, when attention weights are
  requested or dropout is active). The wrapper ``BertAttention`` is marked as handled.
* ``BertSelfOutput``/``BertOutput``: the residual ``LayerNorm(dense(x) + input)`` as a Sum (``dense`` of the attention
  output has the role ``'attention_projection'``).
* RoBERTa's classification head: its inline ``torch.tanh`` as an :py:class:`torch.nn.Tanh` module (identity rule);
  RoBERTa's LM head: its shared module-level ``gelu`` as a per-head copy.

The activation of the MLP (transformers' ``GELUActivation`` etc.) and the pooler's ``nn.Tanh`` are modules already.
An :py:class:`~.common.EagerAttentionCanonizer` makes the models build eager masks (a 4-D additive float mask, or
None) whatever ``attn_implementation`` they were loaded with; the canonical attention computes the eager formula.
Cross-attention (``add_cross_attention=True``) is not unfolded, so composites report its ``BertCrossAttention``.
'''
import copy
import sys
from importlib import import_module

import torch
from transformers.cache_utils import EncoderDecoderCache

from ... import layers
from ..attention import AttentionCanonizer, attend, attention_ops
from ..base import ForwardCanonizer
from ..group import CanonizerGroup
from .. import register_family
from .common import EagerAttentionCanonizer, additive_mask, attentions_requested, reject_unexpected, take_cache


__all__ = [
    'BertEmbeddingsCanonizer', 'BertSelfAttentionCanonizer', 'BertAttentionCanonizer', 'BertResidualCanonizer',
    'RobertaClassificationHeadCanonizer', 'RobertaLMHeadCanonizer', 'BertCanonizer', 'additive_mask',
]


#: modules of the BERT look-alikes whose classes are the same code as BERT's / RoBERTa's under another prefix
#: (verified against transformers 5.x): module path, class prefix
LOOK_ALIKES = (
    ('transformers.models.bert.modeling_bert', 'Bert'),
    ('transformers.models.roberta.modeling_roberta', 'Roberta'),
    ('transformers.models.xlm_roberta.modeling_xlm_roberta', 'XLMRoberta'),
    ('transformers.models.camembert.modeling_camembert', 'Camembert'),
    ('transformers.models.data2vec.modeling_data2vec_text', 'Data2VecText'),
    ('transformers.models.electra.modeling_electra', 'Electra'),
)


def _classes(suffix):
    '''The classes ``<prefix><suffix>`` of all importable look-alikes.'''
    found = []
    for path, prefix in LOOK_ALIKES:
        try:
            module = import_module(path)
        except ImportError:  # pragma: no cover (an older or trimmed transformers)
            continue
        cls = getattr(module, prefix + suffix, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


EMBEDDINGS = _classes('Embeddings')
SELF_ATTENTIONS = _classes('SelfAttention')
ATTENTIONS = _classes('Attention')
RESIDUAL_OUTPUTS = _classes('SelfOutput') + _classes('Output')
#: RoBERTa-style heads with an inline ``torch.tanh`` / a module-level ``gelu``
CLASSIFICATION_HEADS = tuple(cls for cls in _classes('ClassificationHead') if not cls.__name__.startswith('Electra'))
LM_HEADS = _classes('LMHead')


class BertEmbeddingsCanonizer(ForwardCanonizer):
    '''Unfold the two embedding sums of ``BertEmbeddings`` / ``RobertaEmbeddings`` into
    :py:class:`~zennit_attn.layers.Sum` ops (``'token_type'`` and ``'position'``).
    '''
    module_type = EMBEDDINGS

    def make_ops(self, module):
        return {'token_type': layers.Sum(), 'position': layers.Sum()}

    def canonical_forward(
        self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, cache_length=None,
        past_key_values_length=None,
    ):
        module, ops = self.module, self.ops
        # the length of the cached prefix: ``cache_length`` from transformers 5.24 on, ``past_key_values_length`` before
        if cache_length is not None and past_key_values_length is not None and cache_length != past_key_values_length:
            raise TypeError(
                f'{type(module).__name__} (canonized): got both cache_length={cache_length} and '
                f'past_key_values_length={past_key_values_length}; pass one of them.'
            )
        past_key_values_length = next((n for n in (cache_length, past_key_values_length) if n is not None), 0)
        # RoBERTa-style embeddings count positions from the padding index and skip padding tokens
        roberta = hasattr(module, 'create_position_ids_from_input_ids')
        if roberta and position_ids is None:
            if input_ids is not None:
                position_ids = module.create_position_ids_from_input_ids(
                    input_ids, module.padding_idx, past_key_values_length
                )
            else:
                position_ids = module.create_position_ids_from_inputs_embeds(inputs_embeds, module.padding_idx)

        input_shape = input_ids.size() if input_ids is not None else inputs_embeds.size()[:-1]
        batch_size, seq_length = input_shape

        if position_ids is None:
            position_ids = module.position_ids[:, past_key_values_length:seq_length + past_key_values_length]

        if token_type_ids is None:
            if hasattr(module, 'token_type_ids'):
                buffered = module.token_type_ids.to(position_ids.device).expand(position_ids.shape[0], -1)
                buffered = torch.gather(buffered, dim=1, index=position_ids)
                token_type_ids = buffered.expand(batch_size, seq_length)
            else:
                token_type_ids = torch.zeros(input_shape, dtype=torch.long, device=module.position_ids.device)

        if inputs_embeds is None:
            inputs_embeds = module.word_embeddings(input_ids)
        token_type_embeddings = module.token_type_embeddings(token_type_ids)
        embeddings = ops['token_type'](inputs_embeds, token_type_embeddings)

        position_embeddings = module.position_embeddings(position_ids)
        embeddings = ops['position'](embeddings, position_embeddings)

        embeddings = module.LayerNorm(embeddings)
        return module.dropout(embeddings)


class BertSelfAttentionCanonizer(AttentionCanonizer):
    '''Unfold ``BertSelfAttention`` / ``RobertaSelfAttention`` into hookable ops computing the eager attention
    ``softmax((q @ k^T) * scaling + mask) @ v`` (whatever attention implementation the model was loaded with).
    '''
    module_type = SELF_ATTENTIONS

    def make_ops(self, module):
        return attention_ops(module.scaling, fused=self.fused)

    def make_roles(self, module):
        return {module.query: 'attention_projection', module.key: 'attention_projection',
                module.value: 'attention_projection'}

    def canonical_forward(
        self, hidden_states, attention_mask=None, cache=None, past_key_values=None, encoder_hidden_states=None,
        **kwargs
    ):
        module, ops = self.module, self.ops
        owner = type(module).__name__
        # the cache is passed as ``cache`` from transformers 5.24 on, as ``past_key_values`` before
        past_key_values = take_cache(owner, cache, past_key_values)
        if encoder_hidden_states is not None:
            raise NotImplementedError(f'{owner} (canonized): encoder_hidden_states (cross-attention) are unsupported.')
        reject_unexpected(owner, kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, module.attention_head_size)

        query = module.query(hidden_states).view(*hidden_shape).transpose(1, 2)
        key = module.key(hidden_states).view(*hidden_shape).transpose(1, 2)
        value = module.value(hidden_states).view(*hidden_shape).transpose(1, 2)

        if past_key_values is not None:
            cache = past_key_values
            if isinstance(past_key_values, EncoderDecoderCache):
                cache = past_key_values.self_attention_cache
            key, value = cache.update(key, value, module.layer_idx)

        context, probabilities = attend(
            ops, query, key, value, additive_mask(attention_mask, query.dtype), dropout=module.dropout.p,
            training=module.training, need_weights=attentions_requested(),
        )
        context = context.transpose(1, 2).contiguous()
        return context.reshape(*input_shape, -1).contiguous(), probabilities


class BertAttentionCanonizer(ForwardCanonizer):
    '''Mark the self-attention wrapper ``BertAttention`` / ``RobertaAttention`` as handled: its computation is the
    canonized self-attention followed by the canonized ``*SelfOutput``. Its own forward is kept (called through the
    class). Cross-attention wrappers are not matched.
    '''
    module_type = ATTENTIONS

    def matches(self, module):
        return super().matches(module) and isinstance(getattr(module, 'self', None), SELF_ATTENTIONS)

    def make_ops(self, module):
        return {}

    def make_roles(self, module):
        return {module.output.dense: 'attention_projection'}

    def canonical_forward(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)


class BertResidualCanonizer(ForwardCanonizer):
    '''Unfold the residual sum of ``BertSelfOutput`` / ``BertOutput`` (and RoBERTa's):
    ``LayerNorm(dropout(dense(x)) + input)``.
    '''
    module_type = RESIDUAL_OUTPUTS

    def make_ops(self, module):
        return {'residual': layers.Sum()}

    def canonical_forward(self, hidden_states, input_tensor):
        module = self.module
        hidden_states = module.dropout(module.dense(hidden_states))
        return module.LayerNorm(self.ops['residual'](hidden_states, input_tensor))


class RobertaClassificationHeadCanonizer(ForwardCanonizer):
    '''Replace the inline ``torch.tanh`` of ``RobertaClassificationHead`` by an :py:class:`torch.nn.Tanh` module.'''
    module_type = CLASSIFICATION_HEADS

    def make_ops(self, module):
        return {'tanh': torch.nn.Tanh()}

    def canonical_forward(self, features, **kwargs):
        module = self.module
        x = module.dropout(features[:, 0, :])
        x = self.ops['tanh'](module.dense(x))
        return module.out_proj(module.dropout(x))


class RobertaLMHeadCanonizer(ForwardCanonizer):
    '''Replace the module-level ``gelu`` that ``RobertaLMHead`` calls (a module shared by all heads, so never a child)
    by a copy inserted as the op ``'gelu'`` (identity rule).'''
    module_type = LM_HEADS

    def make_ops(self, module):
        return {'gelu': copy.deepcopy(sys.modules[type(module).__module__].gelu)}

    def canonical_forward(self, features, **kwargs):
        module = self.module
        x = self.ops['gelu'](module.dense(features))
        return module.decoder(module.layer_norm(x))


@register_family
class BertCanonizer(CanonizerGroup):
    '''Canonizer for Hugging Face BERT and its look-alikes (RoBERTa, XLM-RoBERTa, CamemBERT, Data2VecText, ELECTRA;
    ``*Model`` and the heads): eager masks, embedding sums, self-attention, residual sums and the RoBERTa-style heads.
    Not supported: cross-attention (reported by the composites), ELECTRA's sequence summary with
    ``summary_type='mean'``.
    '''
    model_type = EMBEDDINGS + SELF_ATTENTIONS

    def __init__(self, fused=True):
        self.fused = fused
        super().__init__([
            EagerAttentionCanonizer(),
            BertEmbeddingsCanonizer(),
            BertSelfAttentionCanonizer(fused),
            BertAttentionCanonizer(),
            BertResidualCanonizer(),
            RobertaClassificationHeadCanonizer(),
            RobertaLMHeadCanonizer(),
        ])

    def copy(self):
        return self.__class__(fused=self.fused)

    def check(self, root_module):
        for name, module in root_module.named_modules():
            if type(module).__name__.endswith('SequenceSummary') and getattr(module, 'summary_type', None) not in (
                'first', 'last', 'cls_index'
            ):
                raise NotImplementedError(
                    f'BertCanonizer: {name!r} ({type(module).__name__}) with summary_type='
                    f'{module.summary_type!r} is not supported (its pooling is computed inline); use "first".'
                )
