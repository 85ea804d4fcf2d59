'''Conformance entries: vision-language models (CLIP, SigLIP) (joined into ``conformance.ENTRIES``).

Every tower is an entry of its own (the image or text embedding's dimensions are the "classes"), and the two-tower
models (``CLIPModel``, ``SiglipModel``) have one entry per side: zero-shot logits
``scale * <u / |u|, v / |v|> (+ bias)`` of each image against fixed texts (or each text against fixed images), with
the other side and both norms constant (the rule of :py:mod:`zennit_attn.similarity`), so that CP-LRP on the bias-free
model conserves the logit.

The oracles are hand-written forwards of the towers (ATTNLRP.md §3) built on the helpers of ``oracle_hf``; they read the
configs and weights with plain torch ops and share no code with zennit_attn or with the transformers forwards.
'''
import math

import torch
import torch.nn.functional as F

from conformance import Entry, generator, perturbed, token_inputs
from oracle_hf import attention, half_grad, identity_grad, layer_norm, linear, oracle_relevance, padding_mask


VOCAB = 40
#: the end-of-text token of the tiny CLIP text configs: the largest id, so that both of CLIP's pooling variants (the
#: first ``eos_token_id``, or the legacy argmax over the ids when ``eos_token_id == 2``) find it
EOS = VOCAB - 1
IMAGES = 2
TEXTS = 3


def vision_config(name, implementation, **extra):
    import transformers
    return getattr(transformers, name)(
        image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        attn_implementation=implementation, **extra,
    )


def text_config(name, implementation, eos_token_id=EOS, **extra):
    import transformers
    return getattr(transformers, name)(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=24, pad_token_id=1, bos_token_id=0, eos_token_id=eos_token_id,
        attn_implementation=implementation, **extra,
    )


def clip_text_config(implementation, legacy_eos=False):
    # eos_token_id == 2 selects CLIP's legacy pooling (argmax over the ids)
    return text_config('CLIPTextConfig', implementation, eos_token_id=2 if legacy_eos else EOS, projection_dim=8)


def tower(model_name, config):
    '''A builder of a tiny tower ``model_name`` (float64, eval, biases and norms perturbed).'''
    def build():
        import transformers
        torch.manual_seed(0)
        return perturbed(getattr(transformers, model_name)(config()).double().eval())
    return build


def two_tower(kind, implementation='sdpa'):
    '''A builder of a tiny ``CLIPModel`` / ``SiglipModel`` with a logit scale of 10 (and a SigLIP bias of -1.5).'''
    def build():
        import transformers
        if kind == 'clip':
            config = transformers.CLIPConfig(
                text_config=clip_text_config(implementation).to_dict(),
                vision_config=vision_config('CLIPVisionConfig', implementation).to_dict(), projection_dim=8,
            )
            model_type = transformers.CLIPModel
        else:
            config = transformers.SiglipConfig(
                text_config=text_config('SiglipTextConfig', implementation).to_dict(),
                vision_config=vision_config('SiglipVisionConfig', implementation).to_dict(),
            )
            model_type = transformers.SiglipModel
        config._attn_implementation = implementation
        torch.manual_seed(0)
        model = model_type(config).double().eval()
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.))
            if hasattr(model, 'logit_bias'):
                model.logit_bias.fill_(-1.5)
        return perturbed(model)
    return build


def features(output):
    '''The embedding of a tower's output (a tensor, or a ``ModelOutput`` with the embedding as ``pooler_output``).'''
    if isinstance(output, torch.Tensor):
        return output
    return output.image_embeds if 'image_embeds' in output else output.text_embeds if 'text_embeds' in output else \
        output.pooler_output


def input_embeddings(model):
    '''The token embedding (``CLIPModel`` does not implement ``get_input_embeddings``; its text tower does).'''
    text = getattr(model, 'text_model', model)
    return text.embeddings.token_embedding


def text_inputs(model, batch=2):
    '''Token ids in [2, EOS) with EOS as the last real token of each row, a padding mask (two padding tokens in the
    second row), and the embedded ids.'''
    ids, mask, _ = token_inputs(getattr(model, 'text_model', model), EOS, batch=batch)
    lengths = mask.sum(1)
    ids[torch.arange(batch), lengths - 1] = EOS
    with torch.no_grad():
        embeds = input_embeddings(model)(ids).double()
    return ids, mask, embeds


class TextEmbeddings(torch.nn.Module):
    '''``inputs_embeds -> embedding`` of a text tower (or, with ``readout``, any function of the model output) whose
    forward takes only ``input_ids``: a forward hook on the token embedding replaces its output by ``inputs_embeds``.'''
    def __init__(self, model, ids, mask, readout=None):
        super().__init__()
        self.model, self.ids, self.mask = model, ids, mask
        self.readout = readout or (lambda model, ids, mask: features(model(input_ids=ids, attention_mask=mask)))

    def forward(self, x):
        handle = input_embeddings(self.model).register_forward_hook(lambda module, args, output: x)
        try:
            return self.readout(self.model, self.ids, self.mask)
        finally:
            handle.remove()


class ImageEmbeddings(torch.nn.Module):
    '''``pixel_values -> embedding`` of a vision tower.'''
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return features(self.model(pixel_values=x))


def pixels(batch=IMAGES):
    return torch.randn(batch, 3, 16, 16, generator=generator(2), dtype=torch.float64)


def wrap_vision(model):
    return ImageEmbeddings(model), pixels(), torch.tensor([1, 3])


def wrap_text(model):
    ids, mask, embeds = text_inputs(model)
    return TextEmbeddings(model, ids, mask), embeds, torch.tensor([1, 3])


def zero_shot_logits(model, own, other):
    '''``exp(logit_scale) * <own / |own|, other / |other|> (+ logit_bias)`` for every row of ``own`` against every row
    of ``other``: the norms and ``other`` are constants (detached), so the logit is linear in ``own``.'''
    other = other.detach()
    other = other / other.norm(dim=-1, keepdim=True)
    logits = (own / own.detach().norm(dim=-1, keepdim=True)) @ other.transpose(0, 1) * model.logit_scale.exp()
    bias = getattr(model, 'logit_bias', None)
    return logits if bias is None else logits + bias


class ZeroShot(torch.nn.Module):
    '''One side of a two-tower model: ``x`` (pixel values, or token embeddings) -> zero-shot logits
    ``(batch, other side's batch)`` against the fixed inputs of the other side, which runs inside the forward (so that
    both towers run while registered) without gradient.'''
    def __init__(self, model, side, images, ids, mask):
        super().__init__()
        self.model, self.side, self.images, self.ids, self.mask = model, side, images, ids, mask

    def image_features(self, images):
        return features(self.model.get_image_features(pixel_values=images))

    def text_features(self, embeds=None):
        embedding = input_embeddings(self.model)
        handle = None if embeds is None else embedding.register_forward_hook(lambda module, args, output: embeds)
        try:
            return features(self.model.get_text_features(input_ids=self.ids, attention_mask=self.mask))
        finally:
            if handle is not None:
                handle.remove()

    def forward(self, x):
        if self.side == 'image':
            own = self.image_features(x)
            with torch.no_grad():
                other = self.text_features()
        else:
            own = self.text_features(x)
            with torch.no_grad():
                other = self.image_features(self.images)
        return zero_shot_logits(self.model, own, other)


def wrap_zero_shot(side):
    def wrap(model):
        ids, mask, embeds = text_inputs(model, TEXTS)
        images = pixels()
        wrapper = ZeroShot(model, side, images, ids, mask)
        if side == 'image':
            return wrapper, images, torch.tensor([2, 0])
        return wrapper, embeds, torch.tensor([1, 0, 1])
    return wrap


# ---------------------------------------------------------------------------------------------------------- oracles
ACTIVATIONS = {
    # CLIP: x * sigmoid(1.702 x) as one element-wise function: the identity rule (not a product of two factors)
    'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x),
    'gelu_pytorch_tanh': lambda x: F.gelu(x, approximate='tanh'),
    'gelu': F.gelu,
}


def encoder(h, tower, mask, cp_lrp):
    '''The pre-norm encoder layers shared by CLIP and SigLIP, with the oracle's modified gradients.'''
    config = tower.config
    act = ACTIVATIONS[config.hidden_act]
    for layer in tower.encoder.layers:
        attn = layer.self_attn
        context = attention(layer_norm(h, layer.layer_norm1), (attn.q_proj, attn.k_proj, attn.v_proj),
                            config.num_attention_heads, mask, cp_lrp)
        h = linear(context, attn.out_proj) + h
        z = identity_grad(linear(layer_norm(h, layer.layer_norm2), layer.mlp.fc1), act)
        h = linear(z, layer.mlp.fc2) + h
    return h


def patches(embeddings, x):
    conv = embeddings.patch_embedding
    return F.conv2d(x, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)


def attention_pool(h, head, act, cp_lrp):
    '''SigLIP's attention-pooling head: a constant probe (query) attends to ``h``; with a constant query the keys get
    the unhalved gradient, the probabilities and values half each (AttnLRP) or the values all (CP-LRP).'''
    mha = head.attention
    batch, length, width = h.shape
    heads, head_dim = mha.num_heads, width // mha.num_heads
    (weight_q, weight_k, weight_v), (bias_q, bias_k, bias_v) = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)

    def split(tensor):
        return tensor.reshape(tensor.shape[0], tensor.shape[1], heads, head_dim).transpose(1, 2)

    query = split(F.linear(head.probe, weight_q, bias_q)).detach()
    key, value = split(F.linear(h, weight_k, bias_k)), split(F.linear(h, weight_v, bias_v))
    probabilities = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(head_dim), -1)
    if cp_lrp:
        context = probabilities.detach() @ value
    else:
        context = half_grad(probabilities) @ half_grad(value)
    pooled = F.linear(context.transpose(1, 2).reshape(batch, 1, width), mha.out_proj.weight, mha.out_proj.bias)
    z = identity_grad(linear(layer_norm(pooled, head.layernorm), head.mlp.fc1), act)
    return (pooled + linear(z, head.mlp.fc2))[:, 0]


def image_features_oracle(model, x, cp_lrp):
    '''Image embedding of a CLIP (class token, pre-norm, post-norm of the class token, projection) or SigLIP (no class
    token, attention-pooling head) vision tower, with modified gradients.'''
    vision = getattr(model, 'vision_model', model)
    embeddings = vision.embeddings
    h = patches(embeddings, x)
    if hasattr(embeddings, 'class_embedding'):
        h = torch.cat([embeddings.class_embedding.expand(len(x), 1, -1), h], dim=1)
    h = h + embeddings.position_embedding.weight
    if hasattr(vision, 'pre_layrnorm'):
        h = layer_norm(h, vision.pre_layrnorm)
    h = encoder(h, vision, None, cp_lrp)
    if hasattr(vision, 'head'):
        return attention_pool(layer_norm(h, vision.post_layernorm), vision.head, ACTIVATIONS[vision.config.hidden_act],
                              cp_lrp)
    pooled = layer_norm(h[:, 0], vision.post_layernorm)
    projection = getattr(model, 'visual_projection', None)
    return pooled if projection is None else linear(pooled, projection)


def text_features_oracle(model, embeds, ids, mask, cp_lrp):
    '''Text embedding of a CLIP (causal, pooled at the end-of-text token, projection) or SigLIP (bidirectional, pooled
    at the last position, head) text tower, with modified gradients.'''
    text = getattr(model, 'text_model', model)
    config = text.config
    length = embeds.shape[1]
    h = embeds + text.embeddings.position_embedding.weight[:length]
    clip = hasattr(text, 'eos_token_id')
    if clip:
        keep = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
        additive = torch.zeros(keep.shape, dtype=h.dtype).masked_fill(~keep, torch.finfo(h.dtype).min)
    else:
        additive = padding_mask(mask, h.dtype)
    h = layer_norm(encoder(h, text, additive, cp_lrp), text.final_layer_norm)
    if not clip:
        return linear(h[:, -1], text.head)
    # CLIP's pooling, read from its definition: the first end-of-text token, or the largest id (legacy configs)
    position = ids.argmax(-1) if config.eos_token_id == 2 else (ids == config.eos_token_id).int().argmax(-1)
    pooled = h[torch.arange(len(ids)), position]
    projection = getattr(model, 'text_projection', None)
    return pooled if projection is None else linear(pooled, projection)


def onehot(target, classes):
    return F.one_hot(target, classes).double()


def oracle_vision(model, x, target, cp_lrp):
    forward = (lambda pixels: image_features_oracle(model, pixels, cp_lrp))
    with torch.no_grad():
        classes = forward(x).shape[-1]
    return oracle_relevance(forward, x, onehot(target, classes))[0]


def oracle_text(model, x, target, cp_lrp):
    wrapper, _, _ = wrap_text(model)
    forward = (lambda embeds: text_features_oracle(model, embeds, wrapper.ids, wrapper.mask, cp_lrp))
    with torch.no_grad():
        classes = forward(x).shape[-1]
    return oracle_relevance(forward, x, onehot(target, classes))[0]


def oracle_zero_shot(side):
    def oracle(model, x, target, cp_lrp):
        wrapper, _, _ = wrap_zero_shot(side)(model)
        with torch.no_grad():
            # the other side is a constant: the model's own forward computes it
            other = wrapper.image_features(wrapper.images) if side == 'text' else wrapper.text_features()
        if side == 'image':
            def forward(images):
                return zero_shot_logits(model, image_features_oracle(model, images, cp_lrp), other)
        else:
            def forward(embeds):
                return zero_shot_logits(
                    model, text_features_oracle(model, embeds, wrapper.ids, wrapper.mask, cp_lrp), other)
        return oracle_relevance(forward, x, onehot(target, len(other)))[0]
    return oracle


ENTRIES = [
    Entry('clip_vision', tower('CLIPVisionModel', lambda: vision_config('CLIPVisionConfig', 'sdpa')), wrap_vision,
          oracle_vision, absorbing=('class_embedding',), check='oracle + CP-LRP conservation (bias-free)'),
    Entry('clip_vision_projection_eager', tower(
        'CLIPVisionModelWithProjection', lambda: vision_config('CLIPVisionConfig', 'eager', projection_dim=8)),
        wrap_vision, oracle_vision, absorbing=('class_embedding',), check='oracle + CP-LRP conservation (bias-free)'),
    Entry('clip_text', tower('CLIPTextModel', lambda: clip_text_config('sdpa')), wrap_text, oracle_text,
          check='oracle + CP-LRP conservation (bias-free)'),
    Entry('clip_text_projection_legacy_eos_eager', tower(
        'CLIPTextModelWithProjection', lambda: clip_text_config('eager', legacy_eos=True)), wrap_text, oracle_text,
        check='oracle + CP-LRP conservation (bias-free)'),
    Entry('clip_model_image', two_tower('clip'), wrap_zero_shot('image'), oracle_zero_shot('image'),
          absorbing=('class_embedding',), check='oracle + CP-LRP conservation (bias-free)'),
    Entry('clip_model_text', two_tower('clip', 'eager'), wrap_zero_shot('text'), oracle_zero_shot('text'),
          absorbing=('class_embedding',), check='oracle + CP-LRP conservation (bias-free)'),
    Entry('siglip_vision', tower('SiglipVisionModel', lambda: vision_config('SiglipVisionConfig', 'sdpa')),
          wrap_vision, oracle_vision, check='oracle + CP-LRP conservation (bias-free)'),
    Entry('siglip_vision_eager', tower('SiglipVisionModel', lambda: vision_config('SiglipVisionConfig', 'eager')),
          wrap_vision, oracle_vision, check='oracle + CP-LRP conservation (bias-free)'),
    Entry('siglip_text', tower('SiglipTextModel', lambda: text_config('SiglipTextConfig', 'sdpa')), wrap_text,
          oracle_text, check='oracle + CP-LRP conservation (bias-free)'),
    Entry('siglip_model_image', two_tower('siglip'), wrap_zero_shot('image'), oracle_zero_shot('image'),
          check='oracle + CP-LRP conservation (bias-free)'),
    Entry('siglip_model_text', two_tower('siglip', 'eager'), wrap_zero_shot('text'), oracle_zero_shot('text'),
          check='oracle + CP-LRP conservation (bias-free)'),
]
