'''Explain what a language model generates: every generated token attributed to every earlier token.

:py:func:`explain_generation` generates a continuation (or takes a given one), runs *one* forward pass over the whole
sequence with an AttnLRP composite registered, and then one modified backward pass per generated token through the
same graph: row ``i`` of the result is the relevance of every source token (prompt and earlier generated tokens) for
the ``i``-th generated token. The explained quantity per token is its logit (default), its probability, its
log-probability, a contrast with another token, or any function of the logits.

Causal language models (``*ForCausalLM``) and encoder-decoders (``T5ForConditionalGeneration``, BART) are supported;
for encoder-decoders the source is the encoder input followed by the decoder input.
'''
import html
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .attribution import EmbeddingsForward, EncoderDecoderForward, _accepts, _decoder_embedding, _is_encoder_decoder
from .attribution import _declares, first_non_finite


__all__ = ['GenerationAttribution', 'explain_generation', 'TARGETS']

#: the named targets of :py:func:`explain_generation`
TARGETS = ('logit', 'probability', 'log_probability')


@dataclass
class GenerationAttribution:
    '''Result of :py:func:`explain_generation` for one sequence.

    Attributes
    ----------
    relevance: :py:obj:`torch.Tensor`
        Relevance of every source token (columns) for every generated token (rows), shape ``(generated, source)``,
        float32 (float64 for float64 models). Row ``i`` is zero at the columns of tokens that generated token ``i``
        cannot see (itself and later tokens).
    source_tokens: list[str]
        The raw source tokens: the prompt followed by the generated tokens (encoder-decoders: the encoder input
        followed by the decoder input, which starts with the decoder start token).
    target_tokens: list[str]
        The raw generated tokens (one per row).
    source_ids, target_ids: :py:obj:`torch.Tensor`
        Token ids of the columns and rows.
    target_positions: :py:obj:`torch.Tensor`
        For every row, the column index of its generated token (its relevance lies in the columns before it).
    target_values: :py:obj:`torch.Tensor`
        The explained value per generated token (logit, probability, ...; minus the contrast's), shape
        ``(generated,)``: the relevance of a row sums to it up to what the rules absorb (biases, the softmax).
    probabilities: :py:obj:`torch.Tensor`
        The model's probability of each generated token.
    prompt_length: int
        The number of source columns that belong to the prompt (encoder-decoders: to the encoder input).
    target: str
        What was explained (``'logit'``, ``'probability'``, ``'log_probability'`` or the callable's name).
    contrast_ids: :py:obj:`torch.Tensor` or None
        The contrast token per row, if any.
    composite: str
        The composite's class name.
    word_level: bool
        Whether the columns are words (see :py:meth:`aggregate_words`).
    '''
    relevance: torch.Tensor
    source_tokens: list
    target_tokens: list
    source_ids: torch.Tensor
    target_ids: torch.Tensor
    target_positions: torch.Tensor
    target_values: torch.Tensor
    probabilities: torch.Tensor
    prompt_length: int
    target: str = 'logit'
    contrast_ids: torch.Tensor = None
    composite: str = ''
    word_level: bool = False
    source_groups: list = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------------ analysis
    def special_columns(self):
        '''Boolean mask of the source columns that are special tokens (``<bos>``, ``</s>``, ``[CLS]``, ...).'''
        from .text import clean_tokens
        return torch.tensor([token.special for token in clean_tokens(self.source_tokens)], dtype=torch.bool)

    def top(self, row=-1, k=5, exclude_special=True):
        '''The ``k`` source tokens with the highest relevance for generated token ``row``: a list of
        ``(column, token, relevance)``.'''
        values = self.relevance[row].clone()
        if exclude_special:
            values[self.special_columns()] = -float('inf')
        visible = values[:int(self.target_positions[row])]
        order = visible.argsort(descending=True)[:k]
        return [(int(index), self.source_tokens[index], float(values[index])) for index in order]

    def aggregate_words(self):
        '''Sum the relevance of the sub-word tokens of each prompt word (columns): a new result whose prompt columns
        are words (generated tokens stay single columns). Special tokens stay on their own. Word boundaries come from
        :py:func:`zennit_attn.text.clean_tokens` (WordPiece, byte-level BPE and SentencePiece markers).'''
        from .text import clean_tokens
        if self.word_level:
            return self
        groups = []
        for index, token in enumerate(clean_tokens(self.source_tokens)):
            # generated tokens stay single columns: each is also a row, and merging would blur what a row can see
            starts = not groups or token.new_word or token.special or groups[-1][1] or index >= self.prompt_length
            if starts:
                groups.append(([index], token.special))
            else:
                groups[-1][0].append(index)
        members = [indices for indices, _ in groups]
        relevance = torch.stack([self.relevance[:, indices].sum(1) for indices in members], 1)
        words = [''.join(self.source_tokens[index] for index in indices) for indices in members]
        column = {index: group for group, indices in enumerate(members) for index in indices}
        return replace(
            self, relevance=relevance, source_tokens=words,
            source_ids=torch.tensor([int(self.source_ids[indices[0]]) for indices in members]),
            target_positions=torch.tensor([column[int(position)] for position in self.target_positions]),
            prompt_length=column[self.prompt_length] if self.prompt_length < len(column) else len(members),
            word_level=True, source_groups=members,
        )

    # ------------------------------------------------------------------------------------------------ rendering
    def _scale(self, exclude_special):
        values = self.relevance.clone()
        if exclude_special and not self.word_level:
            values[:, self.special_columns()] = 0.
        scale = float(values.abs().max()) if values.numel() else 0.
        return scale if scale > 0 else 1.

    def _labels(self):
        from .text import clean_tokens
        # words are joined raw tokens, so their markers are cleaned the same way
        sources = [token.text for token in clean_tokens(self.source_tokens)]
        targets = [token.text for token in clean_tokens(self.target_tokens)]
        return sources, targets

    def to_html(self, path=None, title=None, exclude_special=True, cmap='bwr'):
        '''The relevance matrix as a self-contained HTML page (rows: generated tokens, columns: source tokens; the
        cell colour is the relevance divided by the largest absolute relevance in the matrix, the value shows on hover).

        Parameters
        ----------
        path: str or :py:obj:`os.PathLike`, optional
            Write the page there.
        title: str, optional
            Heading.
        exclude_special: bool
            Leave special tokens (``<bos>``, which often collects much relevance) out of the colour scale; their
            cells are clipped and framed.
        cmap: str
            Zennit colour map.

        Returns
        -------
        str
            The document.
        '''
        from .image import colorize
        from .text import _css_color, _text_color, _write_text, format_relevance
        sources, targets = self._labels()
        scale = self._scale(exclude_special)
        special = self.special_columns() if not self.word_level else torch.zeros(len(sources), dtype=torch.bool)
        normalized = (self.relevance.double() / scale).clamp(-1, 1).numpy()
        colours = colorize(normalized, cmap=cmap)
        head = ''.join(
            f'<th class="{"prompt" if index < self.prompt_length else "generated"}">{html.escape(text)}</th>'
            for index, text in enumerate(sources)
        )
        rows = []
        for row, target in enumerate(targets):
            cells = []
            for column in range(len(sources)):
                value = float(self.relevance[row, column])
                hidden = column >= int(self.target_positions[row])
                rgb = colours[row, column]
                style = '' if hidden else (
                    f' style="background:{_css_color(rgb)};color:{_text_color(rgb)}"'
                )
                kind = ' class="special"' if bool(special[column]) and exclude_special else ''
                text = '' if hidden else html.escape(format_relevance(value))
                cells.append(f'<td{kind}{style} title="{html.escape(sources[column])}: {format_relevance(value)}">'
                             f'{text}</td>')
            label = (f'{html.escape(target)} <small>({self.target}={self.target_values[row]:+.3g}, '
                     f'p={self.probabilities[row]:.2f})</small>')
            rows.append(f'<tr><th class="target">{label}</th>{"".join(cells)}</tr>')
        note = (
            f'Colour: relevance / {scale:.4g} (the largest |relevance| in the matrix'
            f'{", special tokens excluded and clipped" if exclude_special else ""}); red positive, blue negative. '
            f'Relevance is in units of the explained {self.target}; a row sums to its value minus what the rules '
            'absorb (biases, the softmax). Composite: ' + html.escape(self.composite) + '.'
        )
        document = (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<title>{html.escape(title or "Generation relevance")}</title>\n<style>\n{_MATRIX_STYLE}\n</style>\n'
            f'</head>\n<body>\n{"<h1>" + html.escape(title) + "</h1>" if title else ""}\n'
            f'<table>\n<tr><th></th>{head}</tr>\n' + '\n'.join(rows) + f'\n</table>\n<p>{note}</p>\n</body>\n</html>\n'
        )
        if path is not None:
            _write_text(document, path)
        return document

    def to_png(self, path, title=None, exclude_special=True, dpi=150):
        '''The relevance matrix as a PNG figure with token labels and a colour bar.'''
        from .image import mpl, save_figure
        sources, targets = self._labels()
        scale = self._scale(exclude_special)
        matplotlib = mpl()
        width = min(3 + 0.32 * len(sources), 40)
        height = min(2.8 + 0.32 * len(targets), 30)
        fig = matplotlib.Figure(figsize=(width, height), dpi=dpi)
        axes = fig.add_subplot(1, 1, 1)
        values = self.relevance.double().numpy().copy()
        mask = np.arange(len(sources))[None] >= self.target_positions.numpy()[:, None]
        image = axes.imshow(np.ma.masked_array(values, mask), cmap='bwr', vmin=-scale, vmax=scale, aspect='auto',
                            interpolation='nearest')
        axes.set_xticks(range(len(sources)), sources, rotation=90, fontsize=8)
        axes.set_yticks(range(len(targets)), targets, fontsize=8)
        axes.axvline(self.prompt_length - 0.5, color='black', linewidth=0.8)
        axes.set_xlabel('source token (prompt | generated)')
        axes.set_ylabel('generated token')
        if title:
            axes.set_title(title)
        bar = fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
        bar.set_label(f'relevance ({self.target})')
        if exclude_special:
            fig.text(0.005, 0.005, 'special tokens are left out of the colour scale (clipped)', fontsize=7)
        fig.tight_layout()
        return save_figure(fig, path)

    def value_label(self, row=0):
        '''What :py:attr:`target_values` of ``row`` is, e.g. ``'logit'`` or ``'logit - logit[1234]'`` with a contrast
        (a contrast subtracts the contrast token's logit for ``'logit'`` and ``'log_probability'``, the log-softmax
        normaliser cancelling, and its probability for ``'probability'``).'''
        if self.contrast_ids is None:
            return self.target
        return f'{self.target} - {self.target}[{int(self.contrast_ids[row])}]'

    def __str__(self):
        sources, targets = self._labels()
        lines = [f'{len(targets)} generated tokens explained with {self.composite} ({self.value_label()}):']
        for row, target in enumerate(targets):
            top = ', '.join(f'{sources[column]!r} {value:+.3g}' for column, _, value in self.top(row, 3))
            lines.append(f'  {target!r:>16} {self.value_label(row)}={float(self.target_values[row]):+.3g} '
                         f'sum={float(self.relevance[row].sum()):+.3g}  top: {top}')
        return '\n'.join(lines)

    def show(self, **kwargs):
        '''Display the result: the HTML matrix in a Jupyter notebook, a text summary (top sources per generated
        token) elsewhere.'''
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
            if get_ipython() is not None and 'IPKernelApp' in get_ipython().config:
                display(HTML(self.to_html(**kwargs)))
                return
        except ImportError:
            pass
        print(str(self))

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path):
        '''Write the result to ``path`` (a ``torch.save`` file of tensors, strings and numbers).'''
        state = {key: getattr(self, key) for key in self.__dataclass_fields__}
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        torch.save(state, path)
        return path

    @classmethod
    def load(cls, path):
        '''Read a result written by :py:meth:`save`.'''
        return cls(**torch.load(path, weights_only=True))


_MATRIX_STYLE = '''
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 4px; text-align: center; white-space: nowrap; }
th.prompt { background: #f4f4f4; writing-mode: vertical-rl; transform: rotate(180deg); }
th.generated { background: #e8f0ff; writing-mode: vertical-rl; transform: rotate(180deg); }
th.target { text-align: right; background: #e8f0ff; }
td.special { outline: 2px dashed #888; outline-offset: -2px; }
'''


def _token_id(tokenizer, value, name, vocabulary):
    '''A single token id from an int or a string (which must be one token).'''
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f'explain_generation: {name}={value!r} is a string; pass a tokenizer to encode it')
        ids = tokenizer(value, add_special_tokens=False)['input_ids']
        if len(ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f'explain_generation: {name}={value!r} is {len(ids)} tokens {pieces}, not one; pass a token id or a '
                'string that is a single token (mind the leading space, e.g. " Paris")'
            )
        value = ids[0]
    value = int(value)
    if not 0 <= value < vocabulary:
        raise ValueError(f'explain_generation: {name}={value} is not a token id (vocabulary size {vocabulary})')
    return value


def _seed(logits, tokens, target, contrast):
    '''The initial relevance at the logits of one position ``(batch, vocabulary)`` and the explained values.'''
    rows = torch.arange(len(tokens), device=logits.device)
    onehot = torch.zeros_like(logits)
    onehot[rows, tokens] = 1.
    if contrast is not None:
        onehot[rows, contrast] -= 1.
    probabilities = torch.softmax(logits.float(), -1).to(logits.dtype)
    if callable(target):
        seed = target(logits, tokens)
        if not isinstance(seed, torch.Tensor) or seed.shape != logits.shape:
            raise ValueError(
                f'explain_generation: a callable target must return the initial relevance at the logits, a tensor of '
                f'shape {tuple(logits.shape)}; got {getattr(seed, "shape", type(seed).__name__)}'
            )
    elif target == 'logit':
        seed = logits * onehot
    elif target == 'probability':
        # the probability is distributed like the logit: relevance p_t at the target logit (minus p_c)
        seed = probabilities * onehot
    else:
        # log p_t = z_t - logsumexp(z); its gradient onehot - p weights the logits: z_t - E_p[z] (= log p_t + H(p))
        weight = onehot - (probabilities if contrast is None else 0.)
        seed = logits * weight
    return seed, seed.sum(-1)


def _prepare(model, tokenizer, prompt, input_ids, attention_mask):
    if (prompt is None) == (input_ids is None):
        raise ValueError('explain_generation: pass either prompt (with a tokenizer) or input_ids')
    single = isinstance(prompt, str) or (input_ids is not None and input_ids.ndim == 1)
    if prompt is not None:
        if tokenizer is None:
            raise ValueError('explain_generation: a text prompt needs a tokenizer')
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not _is_encoder_decoder(model):
            tokenizer.padding_side = 'left'
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(prompts, return_tensors='pt', padding=True)
        input_ids, attention_mask = encoded['input_ids'], encoded['attention_mask']
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not _is_encoder_decoder(model) and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            'explain_generation: the prompts are right-padded; causal language models generate after the last token, '
            'so pad on the left (tokenizer.padding_side = "left")'
        )
    device = next(model.parameters()).device
    return single, input_ids.to(device), attention_mask.to(device)


def _continuation_ids(tokenizer, continuation, batch, device):
    if isinstance(continuation, str):
        if tokenizer is None:
            raise ValueError('explain_generation: a text continuation needs a tokenizer')
        continuation = torch.tensor(tokenizer(continuation, add_special_tokens=False)['input_ids'])
    continuation = torch.as_tensor(continuation, dtype=torch.long, device=device)
    if continuation.ndim == 1:
        continuation = continuation[None].expand(batch, -1)
    if continuation.shape[0] != batch or continuation.shape[1] == 0:
        raise ValueError(
            f'explain_generation: continuation must have shape (tokens,) or ({batch}, tokens), got '
            f'{tuple(continuation.shape)}'
        )
    return continuation


def _composite(composite):
    if composite is None:
        from .composites import AttnLRP
        return AttnLRP()
    if isinstance(composite, str):
        from zennit.composites import COMPOSITES
        if composite not in COMPOSITES:
            raise ValueError(f'explain_generation: unknown composite {composite!r}')
        return COMPOSITES[composite]()
    return composite


def explain_generation(
    model, tokenizer=None, prompt=None, composite=None, max_new_tokens=10, target='logit', contrast=None,
    input_ids=None, attention_mask=None, continuation=None, generate_kwargs=None, method=None, **method_options,
):
    '''Generate a continuation of a prompt (or take a given one) and attribute every generated token to every
    earlier token, with one forward pass and one modified backward pass per generated token.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A Hugging Face causal language model (``*ForCausalLM``) or encoder-decoder (``*ForConditionalGeneration``).
    tokenizer: optional
        Its tokenizer; needed for text prompts, text continuations, string targets and token strings in the result.
    prompt: str or list[str], optional
        The prompt(s); a list is processed as one left-padded batch and gives a list of results.
    composite: :py:obj:`zennit.core.Composite` or str, optional
        An AttnLRP composite or its name in ``zennit.composites.COMPOSITES`` (default: ``AttnLRP()``).
    max_new_tokens: int
        Tokens to generate (greedy, unless ``generate_kwargs`` says otherwise); generation stops at the end-of-sequence
        token, which is explained too.
    target: str or callable
        What is explained per generated token: ``'logit'``, ``'probability'`` (the probability distributed like the
        logit), ``'log_probability'`` (its gradient's weighting of the logits, ``z_t - E_p[z]``, which equals
        ``log p_t`` plus the entropy), or ``callable(logits, token_ids) -> initial relevance`` at the logits
        (shapes ``(batch, vocabulary)`` and ``(batch,)``).
    contrast: int or str, optional
        A token whose logit (probability) is subtracted at every step: "why this token rather than that one".
    input_ids, attention_mask: :py:obj:`torch.Tensor`, optional
        The prompt as token ids instead of text (left padding for causal models).
    continuation: str, sequence of int or :py:obj:`torch.Tensor`, optional
        Explain this continuation instead of generating one (teacher forcing).
    generate_kwargs: dict, optional
        Further arguments of ``model.generate``.
    method: str, optional
        A gradient baseline instead of a composite, for comparison: ``'input_x_gradient'`` or
        ``'integrated_gradients'`` (zero-embedding baseline, ``n_iter=20`` steps), see
        :py:class:`zennit_attn.methods.GenerationGradients`; they explain the value itself (``log p_t`` for
        ``'log_probability'``; a callable target's sum, differentiated). A composite name is accepted as well.
    **method_options:
        Options of ``method`` (e.g. ``n_iter``) or of the named composite's constructor.

    Returns
    -------
    :py:class:`GenerationAttribution` or list of them
        One per prompt (a list for a batch of prompts).
    '''
    if not (callable(target) or target in TARGETS):
        raise ValueError(f'explain_generation: target must be one of {TARGETS} or a callable, got {target!r}')
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f'explain_generation: max_new_tokens must be a positive int, got {max_new_tokens!r}')
    encoder_decoder = _is_encoder_decoder(model)
    single, input_ids, attention_mask = _prepare(model, tokenizer, prompt, input_ids, attention_mask)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    vocabulary = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else (
        model.config.vocab_size)
    contrast_id = None if contrast is None else _token_id(tokenizer, contrast, 'contrast', vocabulary)
    baseline = None
    if method is not None:
        from .methods import generation_method
        baseline, composite = generation_method(method, composite, method_options)
    elif method_options:
        raise TypeError(f'explain_generation: unexpected keyword arguments {sorted(method_options)} (options need '
                        'method=)')
    composite = None if baseline is not None else _composite(composite)

    # 1. the sequence: generated, or prompt + the given continuation
    if continuation is None:
        options = dict(max_new_tokens=max_new_tokens, do_sample=False)
        pad = getattr(model.generation_config, 'pad_token_id', None)
        if pad is None:
            eos = getattr(model.generation_config, 'eos_token_id', None)
            options['pad_token_id'] = eos[0] if isinstance(eos, (list, tuple)) else eos
        options.update(generate_kwargs or {})
        with torch.no_grad():
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
        generated = sequences[:, 1:] if encoder_decoder else sequences[:, prompt_length:]
        lengths = _generated_lengths(model, generated)
    else:
        generated = _continuation_ids(tokenizer, continuation, batch, device)
        lengths = torch.full((batch,), generated.shape[1], dtype=torch.long)
    steps = generated.shape[1]
    if steps == 0:
        raise ValueError('explain_generation: nothing was generated')
    if contrast_id is not None:
        clashes = [(int(row), int(step)) for row, step in (generated == contrast_id).nonzero()
                   if step < lengths[row]]
        if clashes:
            raise ValueError(
                f'explain_generation: the contrast token {contrast_id} is the explained token itself at (sample, '
                f'step) {clashes}; its relevance would be zero. Choose another contrast.'
            )

    # 2. one forward over the whole sequence, only the logits the targets need
    embedding = model.get_input_embeddings()
    if encoder_decoder:
        start = model.generation_config.decoder_start_token_id
        if start is None:
            start = model.config.decoder_start_token_id
        decoder_ids = torch.cat([torch.full((batch, 1), start, dtype=torch.long, device=device), generated], 1)
        decoder_mask = (torch.arange(steps + 1, device=device)[None] <= lengths[:, None].to(device)).long()
        with torch.no_grad():
            embeds = torch.cat([embedding(input_ids), _decoder_embedding(model)(decoder_ids)], 1)
        wrapper = EncoderDecoderForward(model, prompt_length, attention_mask=attention_mask,
                                        decoder_attention_mask=decoder_mask)
        source_ids = torch.cat([input_ids, decoder_ids], 1)
    else:
        source_ids = torch.cat([input_ids, generated], 1)
        full_mask = torch.cat([attention_mask, (torch.arange(steps, device=device)[None] < lengths[:, None].to(
            device)).long()], 1)
        options = dict(attention_mask=full_mask)
        if _accepts(model, 'position_ids'):
            options['position_ids'] = (full_mask.cumsum(-1) - 1).clamp(min=0)
        keep = steps + 1 if _declares(model, 'logits_to_keep') else None
        if keep is not None:
            options['logits_to_keep'] = keep
        with torch.no_grad():
            embeds = embedding(source_ids)
        wrapper = EmbeddingsForward(model, **options)

    contrast_ids = None if contrast_id is None else torch.full((batch,), contrast_id, device=device)
    if baseline is not None:
        # a gradient baseline (methods.GenerationGradients) through the plain model, for comparison
        relevance, values, probabilities = baseline(wrapper, embeds, generated, target, contrast_ids)
    else:
        x = embeds.detach().requires_grad_(True)
        with composite.context(wrapper) as modified:
            try:
                with torch.enable_grad():
                    logits = modified(x)
            except ValueError as error:
                if 'produced NaN' not in str(error):
                    raise
                logits = None
            if logits is None or not torch.isfinite(logits).all():
                where = first_non_finite(wrapper, embeds)
                raise ValueError(
                    f'explain_generation: the model\'s logits are not finite (first non-finite hidden state: '
                    f'{where or "unknown"}); in float16 this is usually an overflow: use bfloat16 or float32.'
                )
            # the positions that predict the generated tokens (the last one predicts nothing explained)
            logits = logits[:, -steps - 1:-1]
            rows, values, probabilities = [], [], []
            for step in range(steps):
                step_logits = logits[:, step]
                seed, value = _seed(step_logits.detach(), generated[:, step], target, contrast_ids)
                grad_output = torch.zeros_like(logits)
                grad_output[:, step] = seed
                (grad,) = torch.autograd.grad(logits, x, grad_output, retain_graph=step < steps - 1)
                rows.append(grad)
                values.append(value)
                probabilities.append(torch.softmax(step_logits.detach().float(), -1)[
                    torch.arange(batch, device=device), generated[:, step]])
        summed = torch.float64 if x.dtype == torch.float64 else torch.float32
        relevance = torch.stack([row.to(summed).sum(-1) for row in rows], 1)  # (batch, steps, source)
        values, probabilities = torch.stack(values, 1), torch.stack(probabilities, 1)

    results = []
    for sample in range(batch):
        real = attention_mask[sample].bool()
        prompt_columns = real.nonzero().flatten()
        # causal: drop the left padding; encoder-decoder: drop the encoder's padding
        columns = torch.cat([prompt_columns, torch.arange(prompt_length, source_ids.shape[1], device=device)])
        count = int(lengths[sample])
        ids = source_ids[sample, columns]
        decoded = ids.tolist()
        tokens = tokenizer.convert_ids_to_tokens(decoded) if tokenizer is not None else [str(i) for i in decoded]
        length = len(prompt_columns)
        first = length + (1 if encoder_decoder else 0)
        source_count = first + count
        results.append(GenerationAttribution(
            relevance=relevance[sample, :count][:, columns[:source_count]].detach().cpu(),
            source_tokens=tokens[:source_count],
            target_tokens=tokens[first:source_count],
            source_ids=ids[:source_count].cpu(),
            target_ids=generated[sample, :count].cpu(),
            target_positions=torch.arange(first, source_count),
            target_values=values[sample, :count].detach().cpu(),
            probabilities=probabilities[sample, :count].cpu(),
            prompt_length=length,
            target=target if isinstance(target, str) else getattr(target, '__name__', 'callable'),
            contrast_ids=None if contrast_ids is None else contrast_ids[sample].repeat(count).cpu(),
            composite=baseline.name if baseline is not None else type(composite).__name__,
        ))
    return results[0] if single else results


def _generated_lengths(model, generated):
    '''Per sample, the number of generated tokens up to and including the first end-of-sequence token.'''
    eos = getattr(model.generation_config, 'eos_token_id', None)
    steps = generated.shape[1]
    if eos is None:
        return torch.full((len(generated),), steps, dtype=torch.long)
    eos = torch.as_tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=generated.device)
    hit = torch.isin(generated, eos)
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], steps, dtype=torch.long))
    return first.cpu()
