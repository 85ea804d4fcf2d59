'''Independent oracle for the LLaMA-style decoders of Hugging Face transformers (ATTNLRP.md §3): a hand-written
forward of LLaMA / Mistral / Qwen2 / Qwen3 / Gemma2 / Gemma3-text / Phi-3 with modified gradients, whose gradient ×
input equals the AttnLRP (or CP-LRP) relevance as ε -> 0.

It reads only the model's config and weights and shares no code with zennit_attn (nor with transformers' modeling
code): RoPE, masks, grouped-query attention and the norms are written out here. The forward values follow the
Hugging Face numerics (RMSNorm and softmax in float32, cast back), the gradients are modified as in §3:
(i) element-wise nonlinearities (SiLU / GELU-tanh, tanh soft-capping) pass the gradient scaled by f(x)/x;
(ii) the gradient into each operand of a product of two input-dependent tensors is halved (q·k, probabilities·v and
the gated product); CP-LRP instead detaches the attention probabilities and the gate;
(iii) RMSNorm's rms is detached (the norm becomes the diagonal linear map x -> (w / rms) x);
(iv) everything else (linear maps, sums, softmax, RoPE, scaling, masks) keeps its plain gradient.
'''
import math

import torch
import torch.nn.functional as F


def identity_grad(x, y):
    '''Value ``y = f(x)`` (element-wise), gradient ``f(x) / x``: the identity rule of an element-wise map.'''
    ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
    return x * ratio.detach()


def half_grad(x):
    '''Value ``x``, half its gradient (uniform rule for an operand of a product of two variable tensors).'''
    return 0.5 * x + 0.5 * x.detach()


def rms_norm(x, weight, eps, gemma):
    '''RMSNorm with the rms held constant. Values as Hugging Face computes them (float32, cast back); LLaMA scales by
    ``w`` after the cast, Gemma by ``1 + w`` before it. With the rms detached the norm is the diagonal linear map
    ``x -> (y / x) x``, whose gradient × input is ``y`` times the incoming gradient.
    '''
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        value = (normed * (1.0 + weight.to(torch.float32))).to(x.dtype)
    else:
        value = weight * normed.to(x.dtype)
    return identity_grad(x, value)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTIVATIONS = {
    'silu': lambda x: x * torch.sigmoid(x),
    'gelu_pytorch_tanh': gelu_tanh,
}


def rope_cos_sin(config, layer_type, positions, dtype):
    '''cos/sin of the default rotary embedding for integer ``positions`` of shape (batch, length).'''
    parameters = config.rope_parameters
    if layer_type is not None and layer_type in parameters:
        parameters = parameters[layer_type]
    if parameters.get('rope_type', 'default') != 'default':
        raise NotImplementedError(f'oracle: rope_type {parameters["rope_type"]!r}')
    dim = getattr(config, 'head_dim', None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (parameters['rope_theta'] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = positions[..., None].to(torch.float32) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate(x, cos, sin):
    '''``x * cos + rot(x) * sin`` with ``rot(x1, x2) = (-x2, x1)`` on the two halves of the last dimension.'''
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def additive_mask(padding, window, dtype):
    '''Causal (+ sliding window, + key padding) additive mask of shape (batch, 1, length, length).'''
    batch, length = padding.shape
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    allowed = allowed[None] & padding[:, None, :].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype)
    # float32's minimum for every dtype: float64's would overflow to -inf in the float32 softmax (NaN rows)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def attention(x, attn, config, cos, sin, mask, gemma, cp_lrp):
    batch, length, _ = x.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, 'head_dim', None) or config.hidden_size // heads

    def split(tensor, count):
        return tensor.reshape(batch, length, count, head_dim).transpose(1, 2)

    if hasattr(attn, 'qkv_proj'):  # Phi-3: one fused projection, q then k then v
        fused = linear(x, attn.qkv_proj)
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)
    else:
        q, k, v = split(linear(x, attn.q_proj), heads), split(linear(x, attn.k_proj), kv_heads), split(
            linear(x, attn.v_proj), kv_heads)
    if hasattr(attn, 'q_norm'):
        q = rms_norm(q, attn.q_norm.weight, config.rms_norm_eps, gemma)
        k = rms_norm(k, attn.k_norm.weight, config.rms_norm_eps, gemma)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = config.query_pre_attn_scalar ** -0.5 if gemma else head_dim ** -0.5
    cap = getattr(config, 'attn_logit_softcapping', None)  # Gemma2: cap * tanh(scores / cap) before the mask

    def capped(scores):
        return scores if cap is None else cap * identity_grad(scores / cap, torch.tanh(scores / cap))

    if cp_lrp:
        scores = capped((q @ k.transpose(-1, -2)) * scale)
        probabilities = torch.softmax(scores + mask, -1, dtype=torch.float32).to(x.dtype).detach()
        context = probabilities @ v
    else:
        scores = capped((half_grad(q) @ half_grad(k).transpose(-1, -2)) * scale)
        probabilities = torch.softmax(scores + mask, -1, dtype=torch.float32).to(x.dtype)
        context = half_grad(probabilities) @ half_grad(v)
    context = context.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return linear(context, attn.o_proj)


def mlp(x, block, activation, cp_lrp):
    if hasattr(block, 'gate_up_proj'):  # Phi-3: one fused projection, gate then up
        gate, up = linear(x, block.gate_up_proj).chunk(2, -1)
    else:
        gate, up = linear(x, block.gate_proj), linear(x, block.up_proj)
    gate = identity_grad(gate, ACTIVATIONS[activation](gate))
    hidden = gate.detach() * up if cp_lrp else half_grad(gate) * half_grad(up)
    return linear(hidden, block.down_proj)


def decoder_logits(model, inputs_embeds, attention_mask, position_ids, cp_lrp=False):
    '''Logits of a ``*ForCausalLM`` (LLaMA, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text, Phi-3) computed from
    ``inputs_embeds`` with the oracle's modified gradients.
    '''
    config = model.config
    gemma = config.model_type.startswith('gemma')
    activation = getattr(config, 'hidden_activation', None) or config.hidden_act
    dtype = inputs_embeds.dtype
    layer_types = getattr(config, 'layer_types', None) or ['full_attention'] * config.num_hidden_layers
    h = inputs_embeds
    for index, layer in enumerate(model.model.layers):
        layer_type = layer_types[index]
        if getattr(config, 'layer_types', None) is None:
            window = getattr(config, 'sliding_window', None)  # Mistral: every layer uses the window if set
        else:
            window = config.sliding_window if layer_type == 'sliding_attention' else None
        cos, sin = rope_cos_sin(config, layer_type if gemma else None, position_ids, dtype)
        mask = additive_mask(attention_mask, window, dtype)
        eps = config.rms_norm_eps
        if gemma:
            a = attention(rms_norm(h, layer.input_layernorm.weight, eps, True), layer.self_attn, config, cos, sin,
                          mask, True, cp_lrp)
            h = h + rms_norm(a, layer.post_attention_layernorm.weight, eps, True)
            m = mlp(rms_norm(h, layer.pre_feedforward_layernorm.weight, eps, True), layer.mlp, activation, cp_lrp)
            h = h + rms_norm(m, layer.post_feedforward_layernorm.weight, eps, True)
        else:
            h = h + attention(rms_norm(h, layer.input_layernorm.weight, eps, False), layer.self_attn, config, cos,
                              sin, mask, False, cp_lrp)
            h = h + mlp(rms_norm(h, layer.post_attention_layernorm.weight, eps, False), layer.mlp, activation, cp_lrp)
    h = rms_norm(h, model.model.norm.weight, config.rms_norm_eps, gemma)
    logits = F.linear(h, model.lm_head.weight, model.lm_head.bias)
    cap = getattr(config, 'final_logit_softcapping', None)
    if cap is not None:
        logits = cap * identity_grad(logits / cap, torch.tanh(logits / cap))
    return logits


def last_logit_oracle(logits_fn, model, inputs_embeds, attention_mask, position_ids, target, cp_lrp=False):
    '''Relevance ``x * g`` at ``inputs_embeds``, ``g`` the modified gradient (through ``logits_fn``) of the logit
    ``target`` (one per batch row) at the last position; equals LRP seeded with ``logit * onehot(target)``.
    Returns (relevance, logits).
    '''
    x = inputs_embeds.detach().clone().requires_grad_(True)
    logits = logits_fn(model, x, attention_mask, position_ids, cp_lrp=cp_lrp)[:, -1]
    seed = torch.zeros_like(logits)
    seed[torch.arange(len(target)), target] = 1.
    (grad,) = torch.autograd.grad(logits, x, grad_outputs=seed)
    return x.detach() * grad, logits.detach()


def decoder_oracle(*args, **kwargs):
    '''The oracle of the LLaMA-style families (see :py:func:`last_logit_oracle`).'''
    return last_logit_oracle(decoder_logits, *args, **kwargs)


def layer_norm_detached(x, norm):
    '''LayerNorm with the standard deviation held constant (§3 iii).'''
    centered = x - x.mean(-1, keepdim=True)
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
    return centered / std * norm.weight + norm.bias


def conv1d(x, layer):
    '''Hugging Face's ``Conv1D``: ``x @ W + b`` with the weight stored as (in, out).'''
    return x @ layer.weight + layer.bias


def gpt2_logits(model, inputs_embeds, attention_mask, position_ids, cp_lrp=False):
    '''Logits of a ``GPT2LMHeadModel`` computed from ``inputs_embeds`` with the oracle's modified gradients.'''
    config = model.config
    transformer = model.transformer
    batch, length, width = inputs_embeds.shape
    heads = config.num_attention_heads
    head_dim = width // heads
    mask = additive_mask(attention_mask, None, inputs_embeds.dtype)
    h = inputs_embeds + transformer.wpe.weight[position_ids]
    for index, block in enumerate(transformer.h):
        x = layer_norm_detached(h, block.ln_1)
        q, k, v = conv1d(x, block.attn.c_attn).split(width, dim=2)
        q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale = scale / (index + 1)
        if cp_lrp:
            probabilities = torch.softmax((q @ k.transpose(-1, -2)) * scale + mask, -1).detach()
            context = probabilities @ v
        else:
            probabilities = torch.softmax((half_grad(q) @ half_grad(k).transpose(-1, -2)) * scale + mask, -1)
            context = half_grad(probabilities) @ half_grad(v)
        context = context.transpose(1, 2).reshape(batch, length, width)
        h = conv1d(context, block.attn.c_proj) + h
        z = conv1d(layer_norm_detached(h, block.ln_2), block.mlp.c_fc)
        z = identity_grad(z, gelu_tanh(z))
        h = h + conv1d(z, block.mlp.c_proj)
    h = layer_norm_detached(h, transformer.ln_f)
    return F.linear(h, model.lm_head.weight)


def gpt2_oracle(*args, **kwargs):
    '''The oracle of GPT-2 (see :py:func:`last_logit_oracle`).'''
    return last_logit_oracle(gpt2_logits, *args, **kwargs)
