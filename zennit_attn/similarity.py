'''Explain the image-text similarity of a two-tower vision-language model (CLIP, SigLIP) on both sides with one call.

The similarity of image ``i`` and text ``j`` is ``s = exp(t) * <u / |u|, v / |v|> + b`` with the image embedding ``u``,
the text embedding ``v``, the learned logit scale ``t`` and, for SigLIP, the logit bias ``b`` (CLIP has none). Dividing
by an input-dependent norm has no AttnLRP rule, so :py:func:`explain_similarity` uses this one:

* the norms ``|u|`` and ``|v|`` are held constant, as AttnLRP holds the standard deviation of a LayerNorm constant
  (Prop. 3.4): ``s - b`` becomes the bilinear form ``exp(t) * <u, v> / (|u| |v|)``;
* each side is explained with the other side's embedding held constant (the ε-matmul rule with one constant operand,
  unhalved): ``R_u = u * exp(t) * v / (|u| |v|)`` and ``R_v = v * exp(t) * u / (|u| |v|)`` (element-wise), which each
  sum to exactly ``s - b``;
* the bias ``b`` is a constant and keeps its own share, as a constant operand of a sum does (ε-sum rule).

So the image relevance and the text relevance are each a complete explanation of the same value ``s - b`` (not two
halves of it). The uniform matmul rule of AttnLRP (Prop. 3.3) would give each side exactly half of these relevances,
summing to ``s - b`` over both sides together: divide both by 2 for that reading. The image side equals explaining the
zero-shot classifier ``pixels -> s(image, text_k)`` over fixed texts, and the text side the classifier over fixed
images. Inside the towers, the composite's rules propagate ``R_u`` and ``R_v`` to the pixels and to the token
embeddings; biases, the class embedding and the position embeddings absorb their shares, so the relevance of each side
sums to ``s - b`` exactly only on a bias-free model with CP-LRP (AttnLRP's softmax rule is not conservative by design).
'''
from typing import NamedTuple

import torch
from zennit.attribution import Gradient


__all__ = ['SimilarityRelevance', 'explain_similarity']


class SimilarityRelevance(NamedTuple):
    '''Result of :py:func:`explain_similarity`, one row per explained (image, text) pair.

    Attributes
    ----------
    image_relevance: :py:obj:`torch.Tensor`
        Relevance of the pixels, shape ``(pairs, channels, height, width)`` (the dtype of ``pixel_values``).
    patch_relevance: :py:obj:`torch.Tensor` or None
        Relevance per patch, ``(pairs, height // patch_size, width // patch_size)``: the pixel relevance summed over the
        channels and the pixels of each patch (None if the model's config has no ``vision_config.patch_size``).
    token_relevance: :py:obj:`torch.Tensor`
        Relevance per token, ``(pairs, tokens)``: the relevance at the token embeddings summed over the hidden
        dimension (float32, or float64 for float64 models).
    embedding_relevance: :py:obj:`torch.Tensor`
        Relevance at the token embeddings (before position embeddings are added), ``(pairs, tokens, hidden)``.
    similarity: :py:obj:`torch.Tensor`
        The model's similarity logit ``s = exp(logit_scale) * cos(u, v) (+ logit_bias)`` of each pair, ``(pairs,)``
        (the entry of ``logits_per_image``).
    explained: :py:obj:`torch.Tensor`
        ``s - logit_bias`` (``s`` for CLIP): the value that each side's relevance explains, ``(pairs,)``.
    image_index: :py:obj:`torch.Tensor`
        The index into ``pixel_values`` of each pair's image, ``(pairs,)``.
    text_index: :py:obj:`torch.Tensor`
        The index into ``input_ids`` of each pair's text, ``(pairs,)``.
    '''
    image_relevance: torch.Tensor
    patch_relevance: torch.Tensor
    token_relevance: torch.Tensor
    embedding_relevance: torch.Tensor
    similarity: torch.Tensor
    explained: torch.Tensor
    image_index: torch.Tensor
    text_index: torch.Tensor


def _embedding(output, side):
    '''The embedding in the output of ``get_image_features`` / ``get_text_features``: a tensor (transformers 4) or a
    ``ModelOutput`` with the projected embedding as ``pooler_output`` (transformers 5).'''
    if isinstance(output, torch.Tensor):
        return output
    embedding = getattr(output, 'pooler_output', None)
    if not isinstance(embedding, torch.Tensor):
        raise TypeError(
            f'explain_similarity: get_{side}_features returned {type(output).__name__} without a pooler_output tensor; '
            'expected the embedding (a tensor) or a ModelOutput holding it as pooler_output.'
        )
    return embedding


def _unit(embedding):
    return embedding / embedding.norm(dim=-1, keepdim=True)


class _ImageEmbedding(torch.nn.Module):
    '''``pixel_values -> model.get_image_features(pixel_values)``: the module the composite is registered on (so that
    everything between the tower's modules runs under the engine as well).'''
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return _embedding(self.model.get_image_features(pixel_values=pixel_values), 'image')


class _TextEmbedding(torch.nn.Module):
    '''``inputs_embeds -> model.get_text_features(input_ids, attention_mask)``: CLIP's and SigLIP's text towers take no
    ``inputs_embeds``, so a forward hook (for this call only) replaces the token embedding's output by
    ``inputs_embeds``, which equals it; the model's own forward runs otherwise unchanged.'''
    def __init__(self, model, embedding, input_ids, attention_mask):
        super().__init__()
        self.model = model
        self.embedding = embedding
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def forward(self, inputs_embeds):
        calls = []

        def replace(module, args, output):
            if output.shape != inputs_embeds.shape:
                raise RuntimeError(
                    f'explain_similarity: the token embedding returned shape {tuple(output.shape)}, expected '
                    f'{tuple(inputs_embeds.shape)}; the text tower embeds something else than input_ids.'
                )
            calls.append(module)
            return inputs_embeds

        handle = self.embedding.register_forward_hook(replace)
        try:
            output = self.model.get_text_features(input_ids=self.input_ids, attention_mask=self.attention_mask)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(
                f'explain_similarity: the text tower called its token embedding {len(calls)} times (expected once), '
                'so the relevance of the token embeddings would be wrong.'
            )
        return _embedding(output, 'text')


def _token_embedding(model):
    '''The token embedding module: ``model.get_input_embeddings()``, or that of ``model.text_model`` (``CLIPModel``
    does not implement it).'''
    for owner in (model, getattr(model, 'text_model', None)):
        getter = getattr(owner, 'get_input_embeddings', None)
        if callable(getter):
            try:
                embedding = getter()
            except NotImplementedError:
                continue
            if isinstance(embedding, torch.nn.Module):
                return embedding
    raise TypeError(
        f'explain_similarity: cannot find the token embedding of {type(model).__name__} (get_input_embeddings() of '
        'the model or of its text_model).'
    )


def _check_model(model):
    for name in ('get_image_features', 'get_text_features'):
        if not callable(getattr(model, name, None)):
            raise TypeError(
                f'explain_similarity: {type(model).__name__} has no {name}(); expected a two-tower image-text model '
                'such as transformers.CLIPModel or SiglipModel.'
            )
    scale = getattr(model, 'logit_scale', None)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise TypeError(
            f'explain_similarity: {type(model).__name__} has no scalar logit_scale; the similarity '
            'exp(logit_scale) * cos(image, text) (+ logit_bias) of CLIP / SigLIP cannot be formed.'
        )
    bias = getattr(model, 'logit_bias', None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.numel() != 1):
        raise TypeError(f'explain_similarity: logit_bias of {type(model).__name__} is not a scalar.')
    return scale.detach().exp().reshape(()), None if bias is None else bias.detach().reshape(())


def _check_inputs(pixel_values, input_ids, attention_mask):
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise ValueError('explain_similarity: pixel_values must be a floating-point tensor (the image processor\'s '
                         'output), shape (images, channels, height, width).')
    if pixel_values.ndim == 3:
        pixel_values = pixel_values[None]
    if pixel_values.ndim != 4:
        raise ValueError(f'explain_similarity: pixel_values must have shape (images, channels, height, width), got '
                         f'{tuple(pixel_values.shape)}.')
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError('explain_similarity: input_ids must be an integer tensor of token ids, shape (texts, tokens).')
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if input_ids.ndim != 2:
        raise ValueError(
            f'explain_similarity: input_ids must have shape (texts, tokens), got {tuple(input_ids.shape)}.'
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f'explain_similarity: attention_mask has shape {tuple(attention_mask.shape)}, input_ids '
                         f'{tuple(input_ids.shape)}; they must be equal.')
    return pixel_values, input_ids, attention_mask


def _pair_indices(pairs, images, texts):
    '''``(image_index, text_index)`` of the pairs to explain, see :py:func:`explain_similarity`.'''
    if pairs is None:
        if images != texts:
            raise ValueError(
                f'explain_similarity: {images} images and {texts} texts; the default pairs (image i with text i) need '
                'as many images as texts. Pass pairs=[(image, text), ...], or pairs="all" for every combination.'
            )
        index = torch.arange(images)
        return index, index.clone()
    if isinstance(pairs, str):
        if pairs != 'all':
            raise ValueError(f'explain_similarity: pairs={pairs!r}; expected None, "all" or (image, text) pairs.')
        image_index, text_index = torch.meshgrid(torch.arange(images), torch.arange(texts), indexing='ij')
        return image_index.flatten(), text_index.flatten()
    try:
        pairs = torch.as_tensor(pairs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'explain_similarity: pairs must be (image, text) index pairs ({err}).') from err
    if pairs.is_floating_point() or pairs.is_complex() or pairs.dtype == torch.bool:
        raise ValueError('explain_similarity: pairs must hold integer indices.')
    pairs = pairs.long().cpu()
    if pairs.ndim == 1 and pairs.numel() == 2:
        pairs = pairs[None]
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not len(pairs):
        raise ValueError(f'explain_similarity: pairs must be an (image, text) index pair or a non-empty sequence of '
                         f'them, shape (pairs, 2); got shape {tuple(pairs.shape)}.')
    image_index, text_index = pairs.unbind(1)
    for index, count, side in ((image_index, images, 'image'), (text_index, texts, 'text')):
        if bool(((index < 0) | (index >= count)).any()):
            raise ValueError(f'explain_similarity: {side} index out of range in pairs ({index.tolist()}); there are '
                             f'{count} {side}s.')
    return image_index, text_index


def _patch_relevance(model, relevance):
    '''Pixel relevance summed over channels and over the pixels of each (non-overlapping) patch.'''
    config = getattr(getattr(model, 'config', None), 'vision_config', None)
    size = getattr(config, 'patch_size', None)
    if not isinstance(size, int):
        return None
    pairs, _, height, width = relevance.shape
    rows, cols = height // size, width // size
    # the patch convolution (stride = kernel = patch_size) ignores the remainder pixels, whose relevance is 0
    summed = relevance[:, :, :rows * size, :cols * size].sum(1)
    return summed.reshape(pairs, rows, size, cols, size).sum((2, 4))


def _seed(other_unit, scale):
    '''The relevance of an embedding ``own`` for ``scale * <own / |own|, other_unit>`` with ``|own|`` and
    ``other_unit`` constant: ``own * scale * other_unit / |own|``, which sums to the value.'''
    def seed(own):
        own = own.detach()
        return own * (scale * other_unit.to(own.dtype) / own.norm(dim=-1, keepdim=True))
    return seed


def explain_similarity(model, composite, pixel_values, input_ids, attention_mask=None, pairs=None,
                       text_composite=None):
    '''Explain the image-text similarity of a two-tower model (CLIP, SigLIP) on the image side (pixels, patches) and
    the text side (token embeddings) with one call.

    For each explained pair, ``s = exp(logit_scale) * <u / |u|, v / |v|> + logit_bias`` (no bias for CLIP), with the
    image embedding ``u = model.get_image_features(pixel_values)`` and the text embedding
    ``v = model.get_text_features(input_ids, attention_mask)``. The rule for the normalisation (see
    :py:mod:`zennit_attn.similarity`): the norms are held constant and each side is explained with the other side's
    embedding held constant, so the embedding relevance ``R_u = u * exp(logit_scale) * v / (|u| |v|)`` (and ``R_v``
    alike) sums to exactly ``s - logit_bias`` on each side; the logit bias is a constant that keeps its own share. The
    towers then propagate it with the composite (registered on the image tower for the image side, then on the text
    tower for the text side, only for the duration of the call); their biases and position / class embeddings absorb
    shares, so each side's relevance sums to ``s - logit_bias`` exactly only on a bias-free model with CP-LRP.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A two-tower model with ``get_image_features``, ``get_text_features``, ``logit_scale`` (and ``logit_bias``):
        ``transformers.CLIPModel`` or ``SiglipModel`` (in eval mode, ``attn_implementation`` ``'sdpa'`` or
        ``'eager'``).
    composite: :py:obj:`zennit.core.Composite`
        The rules, e.g. :py:class:`~zennit_attn.AttnLRPViT` (the paper's vision preset) or
        :py:class:`~zennit_attn.AttnLRP`; used for both towers unless ``text_composite`` is given.
    pixel_values: :py:obj:`torch.Tensor`
        Images, shape ``(images, channels, height, width)`` (a 3-D tensor is one image), as the image processor
        returns them.
    input_ids: :py:obj:`torch.Tensor`
        Token ids, shape ``(texts, tokens)`` (a 1-D tensor is one text).
    attention_mask: :py:obj:`torch.Tensor`, optional
        Padding mask of ``input_ids`` (same shape, 1 for real tokens).
    pairs: None, "all", or (image, text) index pairs, optional
        Which similarities to explain: None (default) pairs image ``i`` with text ``i`` (as many images as texts
        needed); ``"all"`` every image with every text (image-major); or one ``(image, text)`` index pair, a sequence
        of them, or a long tensor of shape ``(pairs, 2)``.
    text_composite: :py:obj:`zennit.core.Composite`, optional
        Rules for the text tower (default: ``composite``), e.g. :py:class:`~zennit_attn.AttnLRP` for the text side
        with :py:class:`~zennit_attn.AttnLRPViT` for the image side.

    Returns
    -------
    :py:class:`SimilarityRelevance`
        One row per explained pair.

    Raises
    ------
    TypeError
        If ``model`` is not a two-tower image-text model as described.
    ValueError
        For inputs of the wrong shape or dtype, unequal numbers of images and texts without ``pairs``, or pair indices
        out of range.
    '''
    scale, bias = _check_model(model)
    pixel_values, input_ids, attention_mask = _check_inputs(pixel_values, input_ids, attention_mask)
    image_index, text_index = _pair_indices(pairs, len(pixel_values), len(input_ids))
    images = pixel_values[image_index.to(pixel_values.device)]
    ids = input_ids[text_index.to(input_ids.device)]
    mask = None if attention_mask is None else attention_mask[text_index.to(attention_mask.device)]
    embedding = _token_embedding(model)

    with torch.no_grad():
        # the text side's embedding, held constant while the image side is explained
        text_unit = _unit(_embedding(model.get_text_features(input_ids=ids, attention_mask=mask), 'text'))
        inputs_embeds = embedding(ids)

    with Gradient(_ImageEmbedding(model), composite) as attributor:
        image_embeds, image_relevance = attributor(images, _seed(text_unit, scale))
    image_unit = _unit(image_embeds.detach())

    text_side = _TextEmbedding(model, embedding, ids, mask)
    with Gradient(text_side, composite if text_composite is None else text_composite) as attributor:
        text_embeds, embedding_relevance = attributor(inputs_embeds, _seed(image_unit, scale))
    text_unit = _unit(text_embeds.detach())

    explained = scale * (image_unit * text_unit.to(image_unit.dtype)).sum(-1)
    summed_dtype = torch.float64 if embedding_relevance.dtype == torch.float64 else torch.float32
    return SimilarityRelevance(
        image_relevance=image_relevance,
        patch_relevance=_patch_relevance(model, image_relevance),
        token_relevance=embedding_relevance.to(summed_dtype).sum(-1),
        embedding_relevance=embedding_relevance,
        similarity=explained if bias is None else explained + bias,
        explained=explained,
        image_index=image_index,
        text_index=text_index,
    )
