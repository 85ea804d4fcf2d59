'''Token attributions for text models (Hugging Face or any module that accepts ``inputs_embeds``).

:py:func:`token_relevance` runs Zennit's :py:class:`zennit.attribution.Gradient` with an AttnLRP composite on a small
wrapper module whose only input is the embedded sequence ``inputs_embeds`` (Zennit's attributors take one input
tensor), and reads the relevance at the input embeddings.
'''
import inspect
from typing import NamedTuple

import torch
from zennit.attribution import Gradient


__all__ = ['TokenRelevance', 'token_relevance', 'EmbeddingsForward', 'EncoderDecoderForward', 'LogitsOnly']


class TokenRelevance(NamedTuple):
    '''Result of :py:func:`token_relevance`.

    Attributes
    ----------
    relevance: :py:obj:`torch.Tensor`
        Relevance per token, shape ``(batch, tokens)``: the relevance at the input embeddings summed over the hidden
        dimension (float32, or float64 for float64 models).
    embedding_relevance: :py:obj:`torch.Tensor`
        The relevance at the input embeddings, shape ``(batch, tokens, hidden)``, in the model's dtype.
    logits: :py:obj:`torch.Tensor`
        The model's logits: ``(batch, classes)`` for classifiers; for language models only those at the explained
        position, ``(batch, vocabulary)`` (causal language models compute no others, via ``logits_to_keep``).
    target: :py:obj:`torch.Tensor`
        The explained class or token id per sample, shape ``(batch,)``.
    position: :py:obj:`torch.Tensor` or None
        For per-token logits: the explained position per sample, shape ``(batch,)``; None for classifiers.
    contrast: :py:obj:`torch.Tensor` or None
        The contrast class or token id per sample, or None.
    decoder_relevance: :py:obj:`torch.Tensor` or None
        Encoder-decoder models: the relevance of every decoder input token, shape ``(batch, decoder tokens)``
        (``relevance`` then holds the encoder tokens'; together they sum to the explained logit up to what biases
        absorb). None for other models.
    decoder_embedding_relevance: :py:obj:`torch.Tensor` or None
        Encoder-decoder models: the relevance at the decoder input embeddings.
    '''
    relevance: torch.Tensor
    embedding_relevance: torch.Tensor
    logits: torch.Tensor
    target: torch.Tensor
    position: torch.Tensor = None
    contrast: torch.Tensor = None
    decoder_relevance: torch.Tensor = None
    decoder_embedding_relevance: torch.Tensor = None


def logits_of(output):
    '''The logits of a model output: a tensor, a ModelOutput / dict with ``logits``, or the first element of a
    tuple.'''
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get('logits') if isinstance(output, dict) else getattr(output, 'logits', None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f'cannot find logits in the model output of type {type(output).__name__}; the model must '
            'return a tensor or an output with a `logits` field (wrap a headless model with a readout module).'
        )
    return logits


class LogitsOnly(torch.nn.Module):
    '''Wrapper returning only the logits tensor of a model whose forward returns a ``ModelOutput`` (e.g. Hugging Face
    ``ViTForImageClassification``), since Zennit's attributors need a tensor output:
    ``Gradient(LogitsOnly(model), composite)(pixel_values, ...)``.
    '''
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        '''Return the logits of ``model(*args, **kwargs)``.'''
        return logits_of(self.model(*args, **kwargs))


class EmbeddingsForward(torch.nn.Module):
    '''Wrapper whose forward takes only ``inputs_embeds`` and returns the model's logits, so that Zennit's attributors
    (one input tensor) can explain text models. Fixed keyword arguments (``attention_mask``, ``token_type_ids``,
    ``position_ids``) are passed on every call.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model accepting ``inputs_embeds=`` (and the given keyword arguments).
    **kwargs:
        Keyword arguments of every model call; ``None`` values are left out.
    '''
    def __init__(self, model, **kwargs):
        super().__init__()
        self.model = model
        self.kwargs = {key: value for key, value in kwargs.items() if value is not None}

    def forward(self, inputs_embeds):
        '''Return the logits of ``model(inputs_embeds=inputs_embeds, **kwargs)``.'''
        return logits_of(self.model(inputs_embeds=inputs_embeds, **self.kwargs))


class EncoderDecoderForward(EmbeddingsForward):
    '''Wrapper for encoder-decoder models whose one input is the encoder and the decoder embeddings concatenated along
    the tokens, ``cat(inputs_embeds, decoder_inputs_embeds, 1)``, so that one attribution reaches both sides.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model accepting ``inputs_embeds=`` and ``decoder_inputs_embeds=`` (e.g. ``T5ForConditionalGeneration``).
    encoder_length: int
        The number of encoder tokens at the start of the input.
    **kwargs:
        Keyword arguments of every model call (``attention_mask``, ``decoder_attention_mask``); ``None`` values are
        left out.
    '''
    def __init__(self, model, encoder_length, **kwargs):
        super().__init__(model, **kwargs)
        self.encoder_length = encoder_length

    def forward(self, inputs_embeds):
        '''Return the decoder logits of the model on the split input.'''
        split = self.encoder_length
        return logits_of(self.model(
            inputs_embeds=inputs_embeds[:, :split], decoder_inputs_embeds=inputs_embeds[:, split:], **self.kwargs
        ))


def _accepts(model, name):
    '''Whether ``model.forward`` accepts the keyword argument ``name`` (explicitly or through ``**kwargs``).'''
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return name in parameters or any(param.kind is param.VAR_KEYWORD for param in parameters.values())


def _position_ids(model, input_ids):
    '''Position ids that the model would derive from ``input_ids`` but not from ``inputs_embeds`` (RoBERTa-style
    embeddings count positions from the padding index and skip padding tokens); None for other models and for models
    whose forward does not accept ``position_ids``.'''
    if not _accepts(model, 'position_ids'):
        return None
    for module in model.modules():
        create = getattr(type(module), 'create_position_ids_from_input_ids', None)
        padding_idx = getattr(module, 'padding_idx', None)
        if create is not None and padding_idx is not None and hasattr(module, 'word_embeddings'):
            return create(input_ids, padding_idx)
    return None


class _NonFinite(Exception):
    '''Raised from the seed function when the explained logits are not finite.'''


def _declares(model, name):
    '''Whether ``model.forward`` names the keyword argument ``name`` explicitly (not through ``**kwargs``).'''
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _positions(position, mask, batch, length, device):
    '''The explained position per sample: the last non-padding one by default; explicit ones are checked (negative
    values count from the end).'''
    if position is None:
        return last_positions(mask, batch, length, device)
    positions = per_sample(position, batch, 'position', device)
    if bool(((positions < -length) | (positions >= length)).any()):
        raise ValueError(f'token_relevance: position {positions.tolist()} is out of range for {length} tokens')
    return positions % length


def _class_ids(value, batch, name, device, classes):
    '''A class / token id per sample, checked against the number of classes (no negative indices).'''
    ids = per_sample(value, batch, name, device)
    if bool(((ids < 0) | (ids >= classes)).any()):
        raise ValueError(f'token_relevance: {name} {ids.tolist()} is not in [0, {classes}) (the logits have {classes} '
                         'entries)')
    return ids


def first_non_finite(wrapper, inputs_embeds):
    '''Name the first hidden state that is not finite when ``wrapper`` (an :py:class:`EmbeddingsForward`) runs on
    ``inputs_embeds``, for a clear error; None if it cannot be found.'''
    kwargs = dict(wrapper.kwargs, output_hidden_states=True)
    kwargs.pop('logits_to_keep', None)
    try:
        with torch.no_grad():
            if isinstance(wrapper, EncoderDecoderForward):
                split = wrapper.encoder_length
                output = wrapper.model(inputs_embeds=inputs_embeds[:, :split],
                                       decoder_inputs_embeds=inputs_embeds[:, split:], **kwargs)
            else:
                output = wrapper.model(inputs_embeds=inputs_embeds, **kwargs)
    except Exception:  # the diagnosis must not hide the original problem
        return None
    for key in ('encoder_hidden_states', 'decoder_hidden_states', 'hidden_states'):
        states = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        for index, state in enumerate(states or ()):
            if not torch.isfinite(state).all():
                side = key.split('_')[0] + ' ' if key != 'hidden_states' else ''
                return f'{side}embeddings' if index == 0 else f'{side}layer {index - 1} (hidden_states[{index}])'
    return None


def per_sample(value, batch, name, device):
    '''``value`` (int, sequence or tensor) as a long tensor of shape ``(batch,)``.'''
    value = torch.as_tensor(value, dtype=torch.long, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f'{name} must be an int or have shape ({batch},), got {tuple(value.shape)}')
    return value


def last_positions(attention_mask, batch, length, device):
    '''The index of the last non-padding token of each sample (left or right padding); ``length - 1`` without
    mask.'''
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    mask = attention_mask.to(device).bool()
    if mask.ndim != 2:
        raise ValueError('token_relevance: position=None needs a 2-D attention_mask (batch, tokens)')
    if not mask.any(1).all():
        raise ValueError('token_relevance: a sample has no non-padding token')
    return length - 1 - mask.flip(1).int().argmax(1)


def _is_encoder_decoder(model):
    return bool(getattr(getattr(model, 'config', None), 'is_encoder_decoder', False))


def _decoder_embedding(model):
    '''The decoder's token embedding module (with the model's own scaling, e.g. BART's), or None.'''
    get_decoder = getattr(model, 'get_decoder', None)
    decoder = get_decoder() if callable(get_decoder) else None
    get_embeddings = getattr(decoder, 'get_input_embeddings', None)
    embedding = get_embeddings() if callable(get_embeddings) else getattr(decoder, 'embed_tokens', None)
    return embedding if embedding is not None else model.get_input_embeddings()


def token_relevance(
    model, composite, input_ids, attention_mask=None, target=None, position=None, contrast=None, token_type_ids=None,
    decoder_input_ids=None, decoder_attention_mask=None,
):
    '''Relevance of every input token for a logit of a text model, with an AttnLRP composite.

    Encoder-decoder models (``model.config.is_encoder_decoder``, e.g. T5, BART) explain a decoder logit: the decoder
    tokens so far are given as ``decoder_input_ids``, and a single attribution distributes the relevance over the
    encoder tokens (``relevance``) *and* the decoder tokens (``decoder_relevance``).

    The input embeddings ``model.get_input_embeddings()(input_ids)`` (which includes model-specific scaling, e.g.
    Gemma's) are fed as ``inputs_embeds`` through a wrapper to :py:class:`zennit.attribution.Gradient` with
    ``composite``; the output relevance is seeded with ``y * onehot(target) - y * onehot(contrast)``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A sequence classifier (logits ``(batch, classes)``) or a causal / masked language model (logits
        ``(batch, tokens, vocabulary)``), accepting ``inputs_embeds=``, ``attention_mask=`` (and ``token_type_ids=``
        if given), returning a tensor or an output with ``logits``, and providing ``get_input_embeddings()``.
    composite: :py:obj:`zennit.core.Composite`
        E.g. :py:class:`~zennit_attn.AttnLRP`, :py:class:`~zennit_attn.CPLRP`, :py:class:`~zennit_attn.AttnLRPViT`,
        :py:class:`~zennit_attn.CPLRPViT`.
    input_ids: :py:obj:`torch.Tensor`
        Token ids, shape ``(batch, tokens)`` (a 1-D tensor is treated as a batch of one).
    attention_mask: :py:obj:`torch.Tensor`, optional
        Padding mask ``(batch, tokens)``, 1 for real tokens (left or right padding).
    target: int, sequence or :py:obj:`torch.Tensor`, optional
        The class (classifiers) or token id (language models) to explain, per sample or for all; default: the argmax.
    position: int, sequence or :py:obj:`torch.Tensor`, optional
        Language models only: the position whose logits are explained; default: the last non-padding position of
        each sample. Negative values count from the end.
    contrast: int, sequence or :py:obj:`torch.Tensor`, optional
        A class / token id whose logit is subtracted (contrastive explanation).
    token_type_ids: :py:obj:`torch.Tensor`, optional
        Segment ids for BERT-style models.
    decoder_input_ids: :py:obj:`torch.Tensor`, optional
        Encoder-decoder models only (and required there): the decoder input tokens ``(batch, decoder tokens)``,
        starting with the decoder start token (``model.config.decoder_start_token_id``); ``position`` then indexes
        them.
    decoder_attention_mask: :py:obj:`torch.Tensor`, optional
        Encoder-decoder models only: the decoder's padding mask.

    Returns
    -------
    :py:class:`TokenRelevance`
    '''
    encoder_decoder = _is_encoder_decoder(model)
    if encoder_decoder and decoder_input_ids is None:
        raise ValueError(
            f'token_relevance: {type(model).__name__} is an encoder-decoder model; pass decoder_input_ids (the decoder '
            'tokens so far, starting with model.config.decoder_start_token_id): the logits of a decoder position are '
            'explained, over the encoder and the decoder tokens.'
        )
    if not encoder_decoder and (decoder_input_ids is not None or decoder_attention_mask is not None):
        raise ValueError(
            f'token_relevance: decoder_input_ids/decoder_attention_mask given, but {type(model).__name__} is not an '
            'encoder-decoder model (config.is_encoder_decoder is not set).'
        )
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        token_type_ids = None if token_type_ids is None else token_type_ids.reshape(1, -1)
    if decoder_input_ids is not None and decoder_input_ids.ndim == 1:
        decoder_input_ids = decoder_input_ids[None]
        decoder_attention_mask = None if decoder_attention_mask is None else decoder_attention_mask.reshape(1, -1)
    if decoder_input_ids is not None and len(decoder_input_ids) != len(input_ids):
        raise ValueError(
            f'token_relevance: decoder_input_ids has batch size {len(decoder_input_ids)}, input_ids {len(input_ids)}'
        )
    get_embeddings = getattr(model, 'get_input_embeddings', None)
    embedding = get_embeddings() if callable(get_embeddings) else None
    if embedding is None:
        raise TypeError(
            f'token_relevance: {type(model).__name__} has no get_input_embeddings(); it is needed to embed input_ids.'
        )
    batch, length = input_ids.shape
    device = input_ids.device
    with torch.no_grad():
        inputs_embeds = embedding(input_ids)

    keep = None
    if encoder_decoder:
        with torch.no_grad():
            decoder_embeds = _decoder_embedding(model)(decoder_input_ids)
        if decoder_embeds.shape[-1] != inputs_embeds.shape[-1] or decoder_embeds.dtype != inputs_embeds.dtype:
            raise ValueError(
                f'token_relevance: the encoder and decoder embeddings of {type(model).__name__} differ in size or '
                f'dtype ({tuple(inputs_embeds.shape)} {inputs_embeds.dtype} vs {tuple(decoder_embeds.shape)} '
                f'{decoder_embeds.dtype}); this model is not supported.'
            )
        wrapper = EncoderDecoderForward(
            model, length, attention_mask=attention_mask, decoder_attention_mask=decoder_attention_mask,
        )
        inputs_embeds = torch.cat([inputs_embeds, decoder_embeds], 1)
        # positions index the decoder tokens
        position_mask, position_length = decoder_attention_mask, decoder_input_ids.shape[1]
    else:
        position_mask, position_length = attention_mask, length
        if _declares(model, 'logits_to_keep'):
            # a causal LM: compute the logits of the explained positions only (vocabulary-sized rows are big)
            keep = torch.unique(_positions(position, position_mask, batch, position_length, device))
        wrapper = EmbeddingsForward(
            model, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=_position_ids(model, input_ids), logits_to_keep=keep,
        )
    resolved = {}
    rows = torch.arange(batch, device=device)

    def seed(output):
        logits = output.detach()
        if logits.ndim == 3:
            positions = _positions(position, position_mask, batch, position_length, device)
            index = positions if keep is None else torch.searchsorted(keep, positions)
            selected = logits[rows, index]
        elif logits.ndim == 2:
            if position is not None:
                raise ValueError('token_relevance: position is only meaningful for per-token logits (B, T, V)')
            positions, selected = None, logits
        else:
            raise ValueError(
                f'token_relevance: expected logits of shape (B, C) or (B, T, V), got {tuple(logits.shape)}'
            )
        if not torch.isfinite(selected).all():
            raise _NonFinite()
        classes = selected.shape[-1]
        goal = selected.argmax(-1) if target is None else _class_ids(target, batch, 'target', device, classes)
        onehot = torch.zeros_like(selected)
        onehot[rows, goal] = 1.
        against = None
        if contrast is not None:
            against = _class_ids(contrast, batch, 'contrast', device, classes)
            if bool((against == goal).any()):
                same = (against == goal).nonzero().flatten().tolist()
                raise ValueError(
                    f'token_relevance: contrast equals the target for sample(s) {same}; the explained difference would '
                    'be zero. Choose another contrast.'
                )
            onehot[rows, against] -= 1.
        weight = torch.zeros_like(logits)
        if positions is None:
            weight = onehot
        else:
            weight[rows, index] = onehot
        resolved.update(logits=selected, target=goal, position=positions, contrast=against)
        return logits * weight

    try:
        with Gradient(wrapper, composite) as attributor:
            _, embedding_relevance = attributor(inputs_embeds, seed)
    except (_NonFinite, ValueError) as error:
        if not isinstance(error, _NonFinite) and 'produced NaN' not in str(error):
            raise
        where = first_non_finite(wrapper, inputs_embeds)
        raise ValueError(
            f'token_relevance: the logits of {type(model).__name__} are not finite (first non-finite hidden state: '
            f'{where or "unknown"}); in float16 this is usually an overflow: use bfloat16 or float32.'
        ) from None
    summed_dtype = torch.float64 if embedding_relevance.dtype == torch.float64 else torch.float32
    decoder_part = {}
    if encoder_decoder:
        embedding_relevance, decoder_relevance = embedding_relevance[:, :length], embedding_relevance[:, length:]
        decoder_part = dict(
            decoder_relevance=decoder_relevance.to(summed_dtype).sum(-1),
            decoder_embedding_relevance=decoder_relevance,
        )
    return TokenRelevance(
        relevance=embedding_relevance.to(summed_dtype).sum(-1),
        embedding_relevance=embedding_relevance,
        logits=resolved['logits'],
        target=resolved['target'],
        position=resolved['position'],
        contrast=resolved['contrast'],
        **decoder_part,
    )
