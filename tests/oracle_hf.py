'''Independent oracles for Hugging Face BERT, RoBERTa and ViT (ATTNLRP.md §3): hand-written forwards of the same
models with modified gradients, whose gradient × input equals the AttnLRP (or CP-LRP) relevance as ε -> 0.

They read the models' configs and weights with plain torch ops and share no code with zennit_attn (nor with the
transformers modules' forwards):
(i) element-wise nonlinearities (GELU, tanh) pass the gradient scaled by f(x)/x; (ii) the gradient into each operand of
a product of two input-dependent tensors is halved (q, k, probabilities, v); CP-LRP instead detaches the attention
probabilities; (iii) the LayerNorm standard deviation is detached; (iv) everything else (linear maps, sums, scaling,
masks, softmax) is the plain gradient.
'''
import math

import torch
import torch.nn.functional as F


ACTIVATIONS = {
    'gelu': F.gelu,
    'relu': F.relu,
    'gelu_new': lambda x: F.gelu(x, approximate='tanh'),
    'gelu_pytorch_tanh': lambda x: F.gelu(x, approximate='tanh'),
}


def identity_grad(x, fn):
    '''Value ``fn(x)``, gradient ``fn(x) / x`` (the identity rule).'''
    return x * (fn(x) / x).detach()


def half_grad(x):
    '''Value ``x``, half its gradient (uniform rule for an operand of a bilinear product).'''
    return 0.5 * x + 0.5 * x.detach()


def layer_norm(x, norm):
    '''LayerNorm with the standard deviation held constant.'''
    centered = x - x.mean(-1, keepdim=True)
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
    return centered / std * norm.weight + norm.bias


def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def attention(x, projections, heads, additive_mask, cp_lrp):
    '''Multi-head self-attention ``softmax(q k^T / sqrt(d) + mask) v`` with modified gradients; ``projections`` are
    the q, k, v Linear layers. Returns the concatenated heads (before the output projection).'''
    batch, length, _ = x.shape
    query, key, value = (linear(x, layer) for layer in projections)
    head_dim = query.shape[-1] // heads

    def split(tensor):
        return tensor.reshape(batch, length, heads, head_dim).transpose(1, 2)

    query, key, value = split(query), split(key), split(value)
    if cp_lrp:
        scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    else:
        scores = half_grad(query) @ half_grad(key).transpose(-1, -2) / math.sqrt(head_dim)
    if additive_mask is not None:
        scores = scores + additive_mask
    probabilities = torch.softmax(scores, -1)
    if cp_lrp:
        context = probabilities.detach() @ value
    else:
        context = half_grad(probabilities) @ half_grad(value)
    return context.transpose(1, 2).reshape(batch, length, heads * head_dim)


def padding_mask(attention_mask, dtype):
    '''Additive mask ``(batch, 1, 1, tokens)``: 0 for real tokens, the most negative float for padding.'''
    if attention_mask is None:
        return None
    keep = attention_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def bert_encoder(base, inputs_embeds, input_ids=None, attention_mask=None, token_type_ids=None, cp_lrp=False):
    '''Sequence output of a ``BertModel`` / ``RobertaModel`` (``base``) for given input embeddings.'''
    config = base.config
    batch, length, _ = inputs_embeds.shape
    emb = base.embeddings
    if token_type_ids is None:
        token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    if config.model_type == 'roberta':
        pad = config.pad_token_id
        real = (input_ids != pad).long()
        position_ids = real.cumsum(1) * real + pad
    else:
        position_ids = torch.arange(length)[None].expand(batch, length)
    h = inputs_embeds + emb.token_type_embeddings.weight[token_type_ids]
    h = h + emb.position_embeddings.weight[position_ids]
    h = layer_norm(h, emb.LayerNorm)
    mask = padding_mask(attention_mask, h.dtype)
    act = ACTIVATIONS[config.hidden_act]
    for layer in base.encoder.layer:
        attn = layer.attention
        sa = attn.self
        context = attention(h, (sa.query, sa.key, sa.value), config.num_attention_heads, mask, cp_lrp)
        h = layer_norm(linear(context, attn.output.dense) + h, attn.output.LayerNorm)
        z = identity_grad(linear(h, layer.intermediate.dense), act)
        h = layer_norm(linear(z, layer.output.dense) + h, layer.output.LayerNorm)
    return h


def bert_classifier_logits(model, inputs_embeds, input_ids=None, attention_mask=None, token_type_ids=None,
                           cp_lrp=False):
    '''Logits of ``BertForSequenceClassification`` or ``RobertaForSequenceClassification``.'''
    if model.config.model_type == 'roberta':
        h = bert_encoder(model.roberta, inputs_embeds, input_ids, attention_mask, token_type_ids, cp_lrp)[:, 0]
        head = model.classifier
        h = identity_grad(linear(h, head.dense), torch.tanh)
        return linear(h, head.out_proj)
    h = bert_encoder(model.bert, inputs_embeds, input_ids, attention_mask, token_type_ids, cp_lrp)[:, 0]
    pooler = model.bert.pooler
    h = identity_grad(linear(h, pooler.dense), torch.tanh)
    return linear(h, model.classifier)


def vit_logits(model, pixel_values, cp_lrp=False):
    '''Logits of a ``ViTForImageClassification`` (default image size, no interpolation).'''
    vit, config = model.vit, model.config
    batch = pixel_values.shape[0]
    conv = vit.embeddings.patch_embeddings.projection
    h = F.conv2d(pixel_values, conv.weight, conv.bias, stride=conv.stride)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([vit.embeddings.cls_token.expand(batch, -1, -1), h], dim=1)
    h = h + vit.embeddings.position_embeddings
    act = ACTIVATIONS[config.hidden_act]
    for layer in vit.layers:
        attn = layer.attention
        context = attention(
            layer_norm(h, layer.layernorm_before), (attn.q_proj, attn.k_proj, attn.v_proj),
            config.num_attention_heads, None, cp_lrp,
        )
        h = linear(context, attn.o_proj) + h
        z = identity_grad(linear(layer_norm(h, layer.layernorm_after), layer.mlp.fc1), act)
        h = linear(z, layer.mlp.fc2) + h
    h = layer_norm(h, vit.layernorm)[:, 0]
    return linear(h, model.classifier)


def oracle_relevance(forward, x, weight):
    '''Relevance ``x * g`` with ``g`` the modified gradient of ``forward(x)`` seeded with ``weight`` (e.g.
    ``onehot(target) - onehot(contrast)``); equals LRP seeded with ``logits * weight``.'''
    x = x.detach().clone().requires_grad_(True)
    logits = forward(x)
    (grad,) = torch.autograd.grad(logits, x, grad_outputs=weight.to(logits.dtype))
    return x.detach() * grad, logits.detach()
