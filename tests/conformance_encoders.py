'''Conformance entries: text encoders beyond the BERT family (joined into the registry, ``registry.ENTRIES``).

MPNet and DeBERTa-v2/v3 add position terms to the attention scores that the oracles here compute on their own
(ATTNLRP.md §3, with the helpers of ``oracle_hf``, which share no code with zennit_attn):

* MPNet adds a relative position bias (an embedding of T5-style buckets of ``j - i``): a constant, which absorbs its
  share of the ε-sum;
* DeBERTa adds content-to-position ``q · pos_k[δ(i, j)]`` and position-to-content ``k_j · pos_q[δ'(i, j)]`` scores,
  where ``pos_k``/``pos_q`` are projections of the relative position embeddings (constant): each is a product with a
  constant factor, so ``q`` resp. ``k`` gets the full gradient (no halving), unlike the content-to-content ``q · k``.
'''
import math

import torch

from conformance import Entry, Logits, perturbed, token_inputs
from oracle_hf import ACTIVATIONS, attention, half_grad, identity_grad, layer_norm, linear, oracle_relevance

TARGET = torch.tensor([0, 2])


def _one_hot(target, model):
    return torch.nn.functional.one_hot(target, model.config.num_labels).double()


def _additive(keep, dtype):
    '''0 where ``keep``, the most negative float elsewhere.'''
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


# ------------------------------------------------------------------------------------------------------------ MPNet
def mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification
    torch.manual_seed(0)
    # MPNetEncoder.compute_position_bias always buckets into 32 (its num_buckets default, not the config's): a smaller
    # relative_attention_num_buckets makes the bias embedding too short (IndexError in transformers itself)
    config = MPNetConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, num_labels=3,
        max_position_embeddings=24, relative_attention_num_buckets=32, initializer_range=0.2,
    )
    return perturbed(MPNetForSequenceClassification(config).double().eval())


def mpnet_positions(ids, padding=1):
    '''MPNet's positions of token ids: 2, 3, ... for real tokens, ``padding`` at padding tokens (the positions the
    model derives itself from input ids; with inputs_embeds it would number the padding too).'''
    real = (ids != padding).long()
    return real.cumsum(1) * real + padding


def wrap_mpnet(model):
    ids, mask, embeds = token_inputs(model, 40, pad_id=1)
    wrapper = Logits(model, 'inputs_embeds', attention_mask=mask, position_ids=mpnet_positions(ids))
    return wrapper, embeds, TARGET


def mpnet_buckets(length, buckets=32, max_distance=128):
    '''Bucket of the relative position ``j - i`` (T5's bidirectional scheme): half the buckets per direction, exact
    up to a quarter of them, logarithmic beyond.'''
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = buckets // 2
    exact = half // 2
    distance = relative.abs()
    logarithmic = exact + (torch.log(distance.clamp(min=1).double() / exact) / math.log(max_distance / exact) *
                           (half - exact)).long()
    bucket = torch.where(distance < exact, distance, logarithmic.clamp(max=half - 1))
    return bucket + half * (relative > 0).long()


def oracle_mpnet(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_mpnet(model)
    mask, positions = wrapper.kwargs['attention_mask'], wrapper.kwargs['position_ids']
    base, config = model.mpnet, model.config

    def logits(embeds):
        length = embeds.shape[1]
        h = layer_norm(embeds + base.embeddings.position_embeddings.weight[positions], base.embeddings.LayerNorm)
        bias = base.encoder.relative_attention_bias.weight[mpnet_buckets(length)].permute(2, 0, 1)[None]
        additive = bias + _additive(mask.bool()[:, None, None, :], h.dtype)
        act = ACTIVATIONS[config.hidden_act]
        for layer in base.encoder.layer:
            attn = layer.attention
            sa = attn.attn
            context = attention(h, (sa.q, sa.k, sa.v), config.num_attention_heads, additive, cp_lrp)
            h = layer_norm(linear(context, sa.o) + h, attn.LayerNorm)
            z = identity_grad(linear(h, layer.intermediate.dense), act)
            h = layer_norm(linear(z, layer.output.dense) + h, layer.output.LayerNorm)
        head = model.classifier
        return linear(identity_grad(linear(h[:, 0], head.dense), torch.tanh), head.out_proj)

    return oracle_relevance(logits, x, _one_hot(target, model))[0]


# ------------------------------------------------------------------------------------------------------- DeBERTa-v2
#: DeBERTa-v2 as in the issue (separate position projections, absolute positions added to the input) and as released
#: for DeBERTa-v3 (position projections shared with q/k, LayerNorm on the relative embeddings, no absolute positions)
DEBERTA = {
    'deberta_v2': dict(),
    'deberta_v3': dict(share_att_key=True, norm_rel_ebd='layer_norm', position_biased_input=False),
}


def deberta(variant):
    def build():
        from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
        torch.manual_seed(0)
        config = DebertaV2Config(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            num_labels=3, max_position_embeddings=24, relative_attention=True, position_buckets=8,
            pos_att_type=['p2c', 'c2p'], initializer_range=0.2, **DEBERTA[variant],
        )
        return perturbed(DebertaV2ForSequenceClassification(config).double().eval())
    return build


def wrap_deberta(model):
    _, mask, embeds = token_inputs(model, 40, pad_id=model.config.pad_token_id)
    return Logits(model, 'inputs_embeds', attention_mask=mask), embeds, TARGET


def deberta_buckets(relative, buckets, max_position):
    '''DeBERTa's log-bucketed relative position: exact for ``|δ| <= buckets / 2``, logarithmic (rounded up) beyond.'''
    mid = buckets // 2
    distance = relative.abs().double()
    logarithmic = torch.ceil(torch.log(distance / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return torch.where(distance <= mid, relative.double(), logarithmic * relative.sign()).long()


def oracle_deberta(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_deberta(model)
    mask = wrapper.kwargs['attention_mask']
    base, config = model.deberta, model.config
    heads = config.num_attention_heads
    span = config.position_buckets
    relative = torch.arange(x.shape[1])[:, None] - torch.arange(x.shape[1])[None, :]
    # rel_pos[i, j] (query i, key j); content-to-position reads row δ(i, j) + span of the position keys,
    # position-to-content reads row span - δ(j, i) of the position queries (as seen from key j)
    delta = deberta_buckets(relative, span, config.max_position_embeddings)
    c2p_index = (delta + span).clamp(0, 2 * span - 1)
    p2c_index = (span - delta.T).clamp(0, 2 * span - 1)
    rel = base.encoder.rel_embeddings.weight[:2 * span]
    if 'layer_norm' in getattr(config, 'norm_rel_ebd', 'none'):
        rel = torch.nn.functional.layer_norm(rel, rel.shape[-1:], base.encoder.LayerNorm.weight,
                                             base.encoder.LayerNorm.bias, base.encoder.LayerNorm.eps)
    keep = mask.bool()
    additive = _additive((keep[:, None, :, None] & keep[:, None, None, :]), x.dtype)

    def split(tensor):
        return tensor.reshape(*tensor.shape[:-1], heads, -1).transpose(-3, -2)

    def attend(h, sa):
        q, k, v = (split(linear(h, layer)) for layer in (sa.query_proj, sa.key_proj, sa.value_proj))
        scale = math.sqrt(q.shape[-1] * (1 + len(config.pos_att_type)))
        shared = getattr(config, 'share_att_key', False)
        pos_k = split(linear(rel, sa.key_proj if shared else sa.pos_key_proj)).detach()
        pos_q = split(linear(rel, sa.query_proj if shared else sa.pos_query_proj)).detach()
        if cp_lrp:
            content = q @ k.transpose(-1, -2)
        else:
            content = half_grad(q) @ half_grad(k).transpose(-1, -2)
        rows = torch.arange(q.shape[-2])
        # products with a constant factor (the position projections): the full gradient
        c2p = (q @ pos_k.transpose(-1, -2))[:, :, rows[:, None], c2p_index]
        p2c = (k @ pos_q.transpose(-1, -2))[:, :, rows[None, :], p2c_index]
        probabilities = torch.softmax((content + c2p + p2c) / scale + additive, -1)
        if cp_lrp:
            context = probabilities.detach() @ v
        else:
            context = half_grad(probabilities) @ half_grad(v)
        return context.transpose(1, 2).flatten(2)

    def logits(embeds):
        emb = base.embeddings
        h = embeds
        if config.position_biased_input:
            h = h + emb.position_embeddings.weight[:embeds.shape[1]]
        h = layer_norm(h, emb.LayerNorm) * mask[..., None].to(h.dtype)
        act = ACTIVATIONS[config.hidden_act]
        for layer in base.encoder.layer:
            attn = layer.attention
            h = layer_norm(linear(attend(h, attn.self), attn.output.dense) + h, attn.output.LayerNorm)
            z = identity_grad(linear(h, layer.intermediate.dense), act)
            h = layer_norm(linear(z, layer.output.dense) + h, layer.output.LayerNorm)
        pooled = identity_grad(linear(h[:, 0], model.pooler.dense), ACTIVATIONS[config.pooler_hidden_act])
        return linear(pooled, model.classifier)

    return oracle_relevance(logits, x, _one_hot(target, model))[0]


CHECK = 'oracle (modified gradient × input, AttnLRP and CP-LRP) + CP-LRP conservation (bias-free)'

ENTRIES = [
    Entry('mpnet', mpnet, wrap_mpnet, oracle_mpnet, check=CHECK),
    *(Entry(variant, deberta(variant), wrap_deberta, oracle_deberta, check=CHECK) for variant in sorted(DEBERTA)),
]
