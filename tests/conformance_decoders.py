'''Conformance entries: decoder-only language models beyond the LLaMA family and GPT-2, and encoder-decoders
(joined into ``conformance.ENTRIES``).'''
import torch

from conformance import LENGTH, EncoderDecoderLogits, Entry, Logits, generator, perturbed, token_inputs
from oracle_decoders import decoder_oracle

VOCAB = 50

#: family -> (config class, model class, config options beyond the common tiny decoder)
DECODERS = {
    # fused qkv and gate/up projections, partial-free RoPE
    'phi3': ('Phi3Config', 'Phi3ForCausalLM', dict(pad_token_id=0, num_key_value_heads=2)),
    # soft-capped attention logits (tanh; caps small enough to bend these tiny scores), sandwich norms, sliding
    # window; no sdpa in transformers 5
    'gemma2': ('Gemma2Config', 'Gemma2ForCausalLM', dict(
        num_key_value_heads=2, head_dim=8, sliding_window=3, attn_logit_softcapping=0.05, final_logit_softcapping=0.5,
        query_pre_attn_scalar=10, attn_implementation='eager',
    )),
    # parallel residual, partial rotary
    'gpt_neox': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', dict(rotary_pct=0.5, use_parallel_residual=True)),
    'gpt_neox_sequential': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', dict(rotary_pct=0.25, use_parallel_residual=False)),
    # multi-query attention, parallel attention/MLP
    'falcon': ('FalconConfig', 'FalconForCausalLM', dict(multi_query=True, parallel_attn=True, bias=True)),
    'falcon_new_arch': ('FalconConfig', 'FalconForCausalLM', dict(
        new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False,
    )),
}


def decoder(family):
    def build():
        import transformers
        config_name, model_name, extra = DECODERS[family]
        options = dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, use_cache=False, attn_implementation='sdpa',
        )
        options.update(extra)
        config = getattr(transformers, config_name)(**options)
        torch.manual_seed(0)
        return perturbed(getattr(transformers, model_name)(config).double().eval())
    return build


def wrap_decoder(model):
    '''Left padding (right padding for eager attention, whose float64 masks turn fully masked rows into NaN inside
    transformers itself), explicit positions, the logits of the last position.'''
    _, mask, embeds = token_inputs(model, VOCAB, pad_left=model.config._attn_implementation != 'eager')
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    wrapper = Logits(model, 'inputs_embeds', position=-1, attention_mask=mask, position_ids=positions)
    return wrapper, embeds, torch.tensor([3, 5])


def oracle_decoder(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_decoder(model)
    return decoder_oracle(model, x, wrapper.kwargs['attention_mask'], wrapper.kwargs['position_ids'], target,
                          cp_lrp=cp_lrp)[0]


#: the families the hand-written decoder oracle (tests/oracle_decoders.py) implements
WITH_ORACLE = ('phi3', 'gemma2')


def opt():
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1, use_cache=False,
        attn_implementation='sdpa',
    )
    return perturbed(OPTForCausalLM(config).double().eval())


def wrap_opt(model):
    '''OPT derives its learned positions from the attention mask.'''
    _, mask, embeds = token_inputs(model, VOCAB, pad_left=True)
    return Logits(model, 'inputs_embeds', position=-1, attention_mask=mask), embeds, torch.tensor([3, 5])


def bart():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
        scale_embedding=True, attn_implementation='sdpa',
    )
    return perturbed(BartForConditionalGeneration(config).double().eval())


def wrap_bart(model):
    ids = torch.randint(4, VOCAB, (2, LENGTH + 3), generator=generator(2))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).double()
    return EncoderDecoderLogits(model, LENGTH), embeds, torch.tensor([3, 4])


#: learned position tables and BART/OPT's additive position embeddings absorb relevance
POSITIONS = ('embed_positions',)

ENTRIES = [
    *(Entry(family, decoder(family), wrap_decoder, oracle_decoder if family in WITH_ORACLE else None)
      for family in sorted(DECODERS)),
    Entry('opt', opt, wrap_opt, absorbing=POSITIONS),
    Entry('bart', bart, wrap_bart, absorbing=POSITIONS),
]
