'''The conformance registry: one entry per supported model family (timm-style registry-driven tests).

Each :py:class:`Entry` builds a tiny random model (float64, eval), a wrapper ``x -> logits (batch, classes)`` with
its input and targets, and names its independent whole-model check: a hand-written oracle (ATTNLRP.md §3; the
modified gradient × input of a forward that shares no code with the library) and/or exact conservation of CP-LRP on a
bias-free copy. ``tests/test_conformance.py`` generates the whole suite for every entry: forward unchanged while
registered, bit-identical model after removal (also after an exception), lint clean, the independent check, and fused
== unfolded attention. Adding a family = one entry here or in a group module ``conformance_<group>.py`` (joined in
``registry.py``), plus its declaration in ``zennit_attn.families`` if it needs one.
'''
from dataclasses import dataclass

import torch
import torchvision

from oracle_decoders import decoder_oracle, gpt2_oracle
from oracle_hf import bert_classifier_logits, oracle_relevance, vit_logits
from oracle_vit import vit_oracle


@dataclass(frozen=True)
class Entry:
    '''A conformance-suite entry.

    Attributes
    ----------
    name: str
        Test id.
    build: callable
        ``() -> model`` (tiny, random, float64, eval).
    wrap: callable
        ``model -> (wrapper, x, target)``: the wrapper maps one tensor ``x`` to logits ``(batch, classes)``.
    oracle: callable or None
        ``(model, x, target, cp_lrp) -> relevance`` (an independent implementation), or None.
    conserves: bool
        Whether CP-LRP on :py:func:`bias_free` of the model is exactly conservative (the rules conserve).
    absorbing: tuple[str]
        Names (substrings) of further parameters that absorb relevance in this family, zeroed by :py:func:`bias_free`.
    check: str
        What the independent whole-model check of this family is (documentation, listed in the README's table).
    '''
    name: str
    build: object
    wrap: object
    oracle: object = None
    conserves: bool = True
    absorbing: tuple = ()
    check: str = 'CP-LRP conservation (bias-free)'


class Logits(torch.nn.Module):
    '''``x -> model(**{key: x}, **kwargs).logits`` (at ``position`` if given).'''
    def __init__(self, model, key=None, position=None, **kwargs):
        super().__init__()
        self.model, self.key, self.position, self.kwargs = model, key, position, kwargs

    def forward(self, x):
        output = self.model(x, **self.kwargs) if self.key is None else self.model(**{self.key: x}, **self.kwargs)
        logits = getattr(output, 'logits', output)
        return logits if self.position is None else logits[:, self.position]


def generator(seed):
    return torch.Generator().manual_seed(seed)


def perturbed(model, seed=1, scale=0.2):
    '''Perturb norm weights and all biases so that no parameter is trivially 0 or 1 (absorption is visible).'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name.lower() or '.ln' in name or name.endswith('bias'):
                param.add_(scale * torch.randn(param.shape, generator=generator(seed), dtype=param.dtype))
    return model


#: parameters that absorb relevance (biases, additive embeddings, class tokens, LayerNorm shifts)
ABSORBING = (
    'bias', 'pos_embed', 'position_embedding', 'class_token', 'cls_token', 'dist_token', 'reg_token', 'token_type',
    'wpe',
)


def bias_free(model, absorbing=()):
    '''Zero every absorbing parameter (:py:data:`ABSORBING` and ``absorbing``): then CP-LRP conserves relevance
    exactly (ATTNLRP.md §2).'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ABSORBING + tuple(absorbing)):
                param.zero_()
    return model


# ------------------------------------------------------------------------------------------------------ vision
def torchvision_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24, num_classes=5,
    )
    with torch.no_grad():
        model.heads.head.weight.copy_(torch.randn(model.heads.head.weight.shape, generator=generator(3)))
    return perturbed(model.double().eval())


def wrap_torchvision_vit(model):
    x = torch.randn(2, 3, 16, 16, generator=generator(2), dtype=torch.float64)
    return model, x, torch.tensor([1, 3])


def oracle_torchvision_vit(model, x, target, cp_lrp):
    return vit_oracle(model, x, target, cp_lrp=cp_lrp)[0]


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, num_labels=5, initializer_range=0.2, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, attn_implementation='sdpa',
    )
    return perturbed(ViTForImageClassification(config).double().eval())


def wrap_hf_vit(model):
    x = torch.randn(2, 3, 16, 16, generator=generator(2), dtype=torch.float64)
    return Logits(model), x, torch.tensor([1, 3])


def oracle_hf_vit(model, x, target, cp_lrp):
    weight = torch.nn.functional.one_hot(target, model.config.num_labels).double()
    return oracle_relevance(lambda pixels: vit_logits(model, pixels, cp_lrp=cp_lrp), x, weight)[0]


def timm_vit(constructor='vision_transformer.VisionTransformer', fused_attn=True, **options):
    '''A tiny timm ViT; ``fused_attn=False`` makes its attention modules compute softmax(q k^T) v inline.'''
    def build():
        import importlib
        module, name = constructor.rsplit('.', 1)
        model_type = getattr(importlib.import_module(f'timm.models.{module}'), name)
        torch.manual_seed(0)
        model = model_type(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=5, **options)
        for child in model.modules():
            if hasattr(child, 'fused_attn'):
                child.fused_attn = fused_attn
        return perturbed(model.double().eval())
    return build


def wrap_image(model):
    return model, torch.randn(2, 3, 16, 16, generator=generator(2), dtype=torch.float64), torch.tensor([1, 3])


# -------------------------------------------------------------------------------------------------------- text
LENGTH = 6


def token_inputs(model, vocab, batch=2, pad_left=False, pad_id=1):
    '''Token ids (never ``pad_id`` except at padding), an attention mask with two padding tokens in the second row,
    and the embedded ids.'''
    ids = torch.randint(2, vocab, (batch, LENGTH), generator=generator(2))
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    if pad_left:
        mask[1, :2] = 0
    else:
        mask[1, -2:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).double()
    return ids, mask, embeds


def bert(kind):
    def build():
        from transformers import BertConfig, BertForSequenceClassification, RobertaConfig
        from transformers import RobertaForSequenceClassification
        torch.manual_seed(0)
        common = dict(
            vocab_size=40, max_position_embeddings=24, num_labels=3, initializer_range=0.2, hidden_size=16,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, attn_implementation='sdpa',
        )
        if kind == 'roberta':
            model = RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **common))
        else:
            model = BertForSequenceClassification(BertConfig(**common))
        return perturbed(model.double().eval())
    return build


def wrap_bert(model):
    ids, mask, embeds = token_inputs(model, 40)
    token_type = torch.zeros_like(ids)
    wrapper = Logits(model, 'inputs_embeds', attention_mask=mask, token_type_ids=token_type)
    wrapper.ids = ids
    return wrapper, embeds, torch.tensor([0, 2])


def oracle_bert(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_bert(model)
    mask, token_type = wrapper.kwargs['attention_mask'], wrapper.kwargs['token_type_ids']
    weight = torch.nn.functional.one_hot(target, 3).double()
    return oracle_relevance(
        lambda embeds: bert_classifier_logits(
            model, embeds, input_ids=wrapper.ids, attention_mask=mask, token_type_ids=token_type, cp_lrp=cp_lrp,
        ), x, weight,
    )[0]


def distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=40, dim=16, n_layers=2, n_heads=2, hidden_dim=24, num_labels=3, max_position_embeddings=24,
        initializer_range=0.2, attn_implementation='sdpa',
    )
    return perturbed(DistilBertForSequenceClassification(config).double().eval())


def wrap_distilbert(model):
    _, mask, embeds = token_inputs(model, 40)
    return Logits(model, 'inputs_embeds', attention_mask=mask), embeds, torch.tensor([0, 2])


DECODERS = {
    'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(tie_word_embeddings=True, attention_bias=True)),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(sliding_window=3, head_dim=8)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(use_sliding_window=True, max_window_layers=1, sliding_window=3)),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(head_dim=8, tie_word_embeddings=False)),
    'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM', dict(
        head_dim=8, sliding_window=3, query_pre_attn_scalar=10, final_logit_softcapping=3.0, tie_word_embeddings=True,
        layer_types=['sliding_attention', 'full_attention'],
    )),
}


def decoder(family):
    def build():
        import transformers
        config_name, model_name, extra = DECODERS[family]
        config = getattr(transformers, config_name)(
            vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=False, rms_norm_eps=1e-6,
            attn_implementation='sdpa', **extra,
        )
        torch.manual_seed(0)
        return perturbed(getattr(transformers, model_name)(config).double().eval())
    return build


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=64, use_cache=False, bos_token_id=0,
        eos_token_id=0, attn_implementation='sdpa',
    )
    return perturbed(GPT2LMHeadModel(config).double().eval())


def wrap_decoder(model):
    _, mask, embeds = token_inputs(model, 50, pad_left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    wrapper = Logits(model, 'inputs_embeds', position=-1, attention_mask=mask, position_ids=positions)
    return wrapper, embeds, torch.tensor([3, 5])


def oracle_decoder(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_decoder(model)
    oracle = gpt2_oracle if type(model).__name__.startswith('GPT2') else decoder_oracle
    return oracle(model, x, wrapper.kwargs['attention_mask'], wrapper.kwargs['position_ids'], target,
                  cp_lrp=cp_lrp)[0]


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        feed_forward_proj='gated-gelu', relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return perturbed(T5ForConditionalGeneration(config).double().eval())


class EncoderDecoderLogits(torch.nn.Module):
    '''``cat(encoder embeddings, decoder embeddings) -> logits of the last decoder position``: one input tensor holding
    both sides, so that relevance is attributed (and conserved) over encoder and decoder tokens together.'''
    def __init__(self, model, encoder_length):
        super().__init__()
        self.model, self.encoder_length = model, encoder_length

    def forward(self, x):
        split = self.encoder_length
        return self.model(inputs_embeds=x[:, :split], decoder_inputs_embeds=x[:, split:]).logits[:, -1]


def wrap_t5(model):
    ids = torch.randint(1, 50, (2, LENGTH + 3), generator=generator(2))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).double()
    return EncoderDecoderLogits(model, LENGTH), embeds, torch.tensor([3, 4])


# ----------------------------------------------------------------------------------------- torch's own layers
def torch_transformer(norm_first):
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    def build():
        torch.manual_seed(0)
        return perturbed(Classifier().double().eval())
    return build


def wrap_plain(model):
    x = torch.randn(2, 5, 16, generator=generator(2), dtype=torch.float64)
    return model, x, torch.tensor([0, 2])


ENTRIES = [
    Entry('torchvision_vit', torchvision_vit, wrap_torchvision_vit, oracle_torchvision_vit),
    Entry('hf_vit', hf_vit, wrap_hf_vit, oracle_hf_vit),
    Entry('timm_vit', timm_vit(), wrap_image),
    Entry('timm_vit_avg_layerscale_unfused', timm_vit(
        fused_attn=False, global_pool='avg', init_values=0.1, fc_norm=True), wrap_image),
    Entry('timm_deit_distilled', timm_vit('deit.VisionTransformerDistilled'), wrap_image),
    Entry('bert', bert('bert'), wrap_bert, oracle_bert),
    Entry('roberta', bert('roberta'), wrap_bert, oracle_bert),
    Entry('distilbert', distilbert, wrap_distilbert),
    Entry('gpt2', gpt2, wrap_decoder, oracle_decoder),
    *(Entry(family, decoder(family), wrap_decoder, oracle_decoder) for family in sorted(DECODERS)),
    Entry('t5', t5, wrap_t5),
    Entry('torch_encoder_pre_norm', torch_transformer(True), wrap_plain),
    Entry('torch_encoder_post_norm', torch_transformer(False), wrap_plain),
]
