'''Render token-level relevance as self-contained HTML or as a PNG figure.

Tokens come as the tokenizer produced them (``tokenizer.convert_ids_to_tokens(ids)``): WordPiece continuations
('##ing'), GPT-2 byte-level BPE ('Ġworld', 'Ċ'), SentencePiece ('▁world', '<0x0A>') and special tokens ('[CLS]',
'<s>', ``<|endoftext|>``). :py:func:`clean_tokens` turns them into display text with word boundaries, so that the
renderings read as the original sentence while every token keeps its own colour.
'''
import html
import os
import re

import numpy as np

from .image import colorize, mpl, save_figure, to_numpy


# special tokens of the common tokenizers; bracketed upper-case names and <|...|> are recognised by pattern as well
SPECIAL_TOKENS = frozenset({
    '<s>', '</s>', '<pad>', '<unk>', '<mask>', '<bos>', '<eos>', '<cls>', '<sep>', '<start_of_turn>', '<end_of_turn>',
})
_SPECIAL_PATTERN = re.compile(r'^(\[[A-Z][A-Z_0-9]*\]|<\|[^<>|]*\|>)$')
# SentencePiece byte-fallback tokens such as '<0x0A>'
_BYTE_PATTERN = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')
# WordPiece drops the original spacing; these heuristics restore it for punctuation
_CLOSING = frozenset('.,!?;:)]}%')
_OPENING = frozenset('([{')
_CONTRACTIONS = frozenset({'s', 't', 'd', 'm', 'll', 're', 've'})
# shown for tokens that are nothing but a space marker, so they stay visible and hoverable
VISIBLE_SPACE = '\u2423'
NEWLINE_SYMBOL = '\u21b5'


def _byte_decoder():
    '''Map GPT-2's printable stand-in characters back to bytes (inverse of GPT-2's ``bytes_to_unicode``).'''
    printable = (
        list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1))
        + list(range(ord('\xae'), ord('\xff') + 1))
    )
    decoder = {chr(byte): byte for byte in printable}
    # the other bytes (control characters, space, ...) are shown as the characters 256, 257, ... in byte order
    shifted = [byte for byte in range(256) if byte not in decoder.values()]
    decoder.update({chr(256 + n): byte for n, byte in enumerate(shifted)})
    return decoder


_BYTE_DECODER = _byte_decoder()


class CleanToken(tuple):
    '''A cleaned token: the pair ``(text, new_word)``, with the flag ``special`` as an attribute.

    Parameters
    ----------
    text : str
        Text to display, without sub-word markers.
    new_word : bool
        Whether the token starts a new word, i.e. is preceded by a space when the sentence is shown.
    special : bool
        Whether the token is a special token such as '[CLS]' or '<s>' (kept verbatim, to be shown distinctly).
    '''
    def __new__(cls, text, new_word, special=False):
        self = super().__new__(cls, (text, new_word))
        self.special = special
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.special)

    @property
    def text(self):
        '''Text to display.'''
        return self[0]

    @property
    def new_word(self):
        '''Whether the token starts a new word.'''
        return self[1]

    def __repr__(self):
        return f'CleanToken({self[0]!r}, {self[1]!r}, special={self.special!r})'


def is_special_token(token):
    '''Whether a raw token is a special token ('[CLS]', '[SEP]', '<s>', '</s>', ``<|endoftext|>``, ...).

    Parameters
    ----------
    token : str
        A raw token.

    Returns
    -------
    bool
        True for known special tokens and for the patterns '[UPPER]' and ``<|...|>``.
    '''
    return token in SPECIAL_TOKENS or bool(_SPECIAL_PATTERN.match(token))


def _marker_scheme(tokens):
    '''Which word-start marker a sequence uses: 'sentencepiece' ('▁'), 'byte-bpe' (GPT-2 'Ġ'), or None.'''
    plain = [token for token in tokens if not is_special_token(token)]
    # '▁' (U+2581) lies outside GPT-2's byte alphabet, so it identifies SentencePiece unambiguously
    if any('▁' in token or _BYTE_PATTERN.match(token) for token in plain):
        return 'sentencepiece'
    if any(token[:1] == 'Ġ' or 'Ċ' in token for token in plain):
        return 'byte-bpe'
    return None


def _decode_marked(token, scheme):
    '''Decode one token of a space-marking tokenizer to plain text; word starts become a leading space.'''
    if scheme == 'sentencepiece':
        byte = _BYTE_PATTERN.match(token)
        if byte:
            return bytes([int(byte.group(1), 16)]).decode('utf-8', errors='replace')
        return token.replace('▁', ' ')
    if all(char in _BYTE_DECODER for char in token):
        # byte-level BPE: every character stands for one byte, so 'cafÃ©' is the UTF-8 of 'café'
        return bytes(_BYTE_DECODER[char] for char in token).decode('utf-8', errors='replace')
    return token


def _clean_marked(tokens, scheme):
    '''Clean tokens of GPT-2 / RoBERTa / LLaMA / T5 style tokenizers, which mark word starts with a space.'''
    result, after_break = [], True
    for token in tokens:
        if is_special_token(token):
            result.append(CleanToken(token, True, special=True))
            after_break = True
            continue
        text = _decode_marked(token, scheme)
        stripped = text.lstrip(' ')
        # the tokenizer's own marker decides, except that nothing glues onto a special token or a line break
        new_word = after_break or stripped != text
        result.append(CleanToken(stripped or VISIBLE_SPACE, new_word))
        after_break = '\n' in text
    return result


def _clean_wordpiece(tokens):
    '''Clean tokens of WordPiece (BERT-style) tokenizers: '##' continues a word; spacing of punctuation restored.'''
    result, glue_next = [], False
    for n, token in enumerate(tokens):
        if is_special_token(token):
            result.append(CleanToken(token, True, special=True))
            glue_next = False
            continue
        if token.startswith('##') and len(token) > 2 and n > 0 and not result[-1].special:
            result.append(CleanToken(token[2:], False))
            continue
        following = tokens[n + 1] if n + 1 < len(tokens) else ''
        apostrophe = token == "'" and following in _CONTRACTIONS and n > 0
        attach_left = glue_next or apostrophe or (bool(token) and set(token) <= _CLOSING)
        result.append(CleanToken(token, not (attach_left and n > 0 and not result[-1].special)))
        glue_next = token in _OPENING or apostrophe
    return result


def clean_tokens(tokens):
    '''Turn raw tokenizer tokens into display text and word boundaries.

    Handles WordPiece ('##' continues the previous word; punctuation is attached heuristically, since WordPiece
    discards the original spacing), GPT-2/RoBERTa byte-level BPE ('Ġ' starts a word, 'Ċ' is a newline, bytes are
    decoded to UTF-8), and SentencePiece/LLaMA ('▁' starts a word, '<0x0A>' byte tokens). The scheme is detected from
    the sequence: any 'Ġ' or '▁' marker means word starts are marked and unmarked tokens continue a word; only
    byte-level BPE sequences get their bytes decoded (SentencePiece keeps 'é' as it is). Special
    tokens ('[CLS]', '[SEP]', '<s>', '</s>', ``<|endoftext|>``, ...) are kept verbatim, always stand alone, and are
    marked with ``special=True``.

    Parameters
    ----------
    tokens : sequence of str
        Raw tokens, e.g. from ``tokenizer.convert_ids_to_tokens(input_ids)``.

    Returns
    -------
    list of :py:class:`CleanToken`
        One ``(display_text, starts_new_word)`` pair per token (a tuple, with the extra attribute ``special``).
        Display text is never empty: a bare space marker shows as '␣'; newlines are kept as '\\n'.
    '''
    tokens = [str(token) for token in tokens]
    scheme = _marker_scheme(tokens)
    if scheme is None:
        return _clean_wordpiece(tokens)
    return _clean_marked(tokens, scheme)


def _as_vector(relevance, length):
    '''Relevance of one sequence as a float vector of the given length.'''
    values = to_numpy(relevance).astype(np.float64)
    if values.size == length and values.ndim >= 1 and max(values.shape) == values.size:
        # accept (1, L) batch output as well as (L,)
        values = values.reshape(length)
    if values.shape != (length,):
        raise ValueError(
            f'Relevance of shape {values.shape} does not match {length} tokens; for embedding-level relevance '
            'sum over the embedding axis first (relevance.sum(-1)).'
        )
    if not np.isfinite(values).all():
        raise ValueError('Relevance contains NaN or infinite values.')
    return values


def _rows(tokens, relevance, labels):
    '''Normalise one sequence or a list of sequences to a list of (tokens, relevance, label).'''
    tokens = list(tokens)
    multiple = bool(tokens) and not isinstance(tokens[0], str)
    token_rows = [list(row) for row in tokens] if multiple else [tokens]
    relevance_rows = list(relevance) if multiple else [relevance]
    if len(relevance_rows) != len(token_rows):
        raise ValueError(f'Got {len(token_rows)} token sequences but {len(relevance_rows)} relevance sequences.')
    if labels is None:
        labels = [None] * len(token_rows)
    elif isinstance(labels, str):
        labels = [labels]
    if len(labels) != len(token_rows):
        raise ValueError(f'Got {len(labels)} labels for {len(token_rows)} sequences.')
    return [
        (row, _as_vector(values, len(row)), label)
        for row, values, label in zip(token_rows, relevance_rows, labels)
    ]


def _normalized_rows(rows, shared_scale):
    '''Divide each row by its own max ``|R|``, or all rows by the common max ``|R|``; return (normalised, scales).'''
    scales = [np.abs(values).max(initial=0.) for _, values, _ in rows]
    if shared_scale:
        scales = [max(scales, default=0.)] * len(rows)
    # an all-zero row stays 0 (the neutral colour) instead of becoming NaN
    normalized = [
        values / scale if scale > 0. else np.zeros_like(values) for (_, values, _), scale in zip(rows, scales)
    ]
    return normalized, scales


def format_relevance(value):
    '''Format a relevance value with its sign: '+0.123', '-1.500', or scientific notation for tiny or huge values.

    Parameters
    ----------
    value : float
        Relevance value.

    Returns
    -------
    str
        The signed, formatted value.
    '''
    if value == 0. or 1e-3 <= abs(value) < 1e4:
        return f'{value:+.3f}'
    return f'{value:+.3e}'


def _css_color(rgb):
    return '#{:02x}{:02x}{:02x}'.format(*(int(channel) for channel in rgb))


def _text_color(rgb):
    '''Black or white text, whichever is readable on the background (dark saturated colours get white).'''
    red, green, blue = (float(channel) for channel in rgb)
    return '#ffffff' if 0.2126 * red + 0.7152 * green + 0.0722 * blue < 128. else '#000000'


HTML_STYLE = '''
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 16px; color: #111; background: #fff; }
h1 { font-size: 18px; margin: 0 0 12px 0; }
.row { margin: 0 0 14px 0; }
.label { font-size: 13px; font-weight: bold; color: #444; margin: 0 0 2px 0; }
.scale { font-weight: normal; color: #777; }
.tokens { font-size: 18px; line-height: 2.1; }
.tok { padding: 3px 1px; border-radius: 3px; white-space: pre; }
.tok.special { font-style: italic; font-size: 14px; box-shadow: inset 0 0 0 1px #999; padding: 3px 3px; }
.legend { font-size: 12px; color: #444; margin-top: 8px; }
.bar { width: 320px; height: 14px; border: 1px solid #999; }
.ticks { width: 322px; display: flex; justify-content: space-between; }
'''.strip()


def _attribute(value):
    '''Escape an attribute value; newlines become character references so that each span stays on one line.'''
    return html.escape(value, quote=True).replace('\n', '&#10;')


def _token_span(clean, value, normalized, raw, cmap, level):
    '''One token as a coloured, hoverable, HTML-escaped <span>.'''
    rgb = colorize(normalized, cmap=cmap, level=level)
    text = clean.text.replace('\n', NEWLINE_SYMBOL).replace('\t', '\u21e5')
    hover = f'relevance: {format_relevance(value)}\nnormalised: {normalized:+.3f}\ntoken: {raw}'
    classes = 'tok special' if clean.special else 'tok'
    span = (
        f'<span class="{classes}" style="background-color: {_css_color(rgb)}; color: {_text_color(rgb)};" '
        f'title="{_attribute(hover)}">{html.escape(text, quote=False)}</span>'
    )
    # a newline token also breaks the line, as in the original text
    return span + '<br>' if '\n' in clean.text else span


def _row_html(tokens, values, normalized, label, scale, cmap, level):
    parts = []
    for n, (clean, raw) in enumerate(zip(clean_tokens(tokens), tokens)):
        if n > 0 and clean.new_word:
            parts.append(' ')
        parts.append(_token_span(clean, values[n], normalized[n], raw, cmap, level))
    header = ''
    if label is not None:
        header = (
            f'<div class="label">{html.escape(str(label))} '
            f'<span class="scale">(max |R| = {format_relevance(scale)[1:]})</span></div>'
        )
    # spans of one word must touch: no whitespace between them, or the browser would render a gap
    return f'<div class="row">{header}<div class="tokens">{"".join(parts)}</div></div>'


def _legend_html(cmap, level, scales, shared_scale, labelled):
    stops = colorize(np.linspace(-1., 1., 17), cmap=cmap, level=level)
    gradient = ', '.join(f'{_css_color(rgb)} {100. * n / 16:.2f}%' for n, rgb in enumerate(stops))
    if shared_scale or not labelled:
        note = f'colour = relevance / max |R|, max |R| = {format_relevance(scales[0])[1:]}'
        note += ' over all rows' if len(scales) > 1 else ''
    else:
        note = 'colour = relevance / max |R| of each row'
    return (
        '<div class="legend">'
        f'<div class="bar" style="background: linear-gradient(to right, {gradient});"></div>'
        '<div class="ticks"><span>&minus;max |R|</span><span>0</span><span>+max |R|</span></div>'
        f'<div>{html.escape(note)}; hover a token for its value.</div>'
        '</div>'
    )


def token_heatmap_html(tokens, relevance, title=None, cmap='bwr', path=None, labels=None, level=1.0,
                       shared_scale=False):
    '''Render token relevance as a self-contained HTML page (inline CSS only, no scripts, no external resources).

    Each token is a ``<span>`` whose background is its signed relevance divided by the maximum absolute relevance
    (with 'bwr': red positive, blue negative, white zero) and whose ``title`` attribute shows the value on hover,
    e.g. 'relevance: +0.123'. Words are spaced as in the original text (see :py:func:`clean_tokens`), special tokens
    are set in italics with a frame, and a legend bar shows the colour scale.

    Parameters
    ----------
    tokens : sequence of str, or sequence of sequences of str
        Raw tokens of one sequence, or a list of sequences to render several rows (e.g. one sentence per row, or the
        same sentence under several attribution methods).
    relevance : array-like, or sequence of array-like
        Relevance per token, matching ``tokens`` (shape (L,) or (1, L); torch tensors are accepted).
    title : str, optional
        Heading of the page.
    cmap : str or :py:obj:`zennit.cmap.ColorMap`
        Zennit colour map ('bwr' by default).
    path : str or :py:obj:`os.PathLike`, optional
        If given, the page is written there (UTF-8).
    labels : sequence of str, optional
        One label per row, shown above it together with the row's max ``|R|``.
    level : float
        Contrast, as Zennit's ``level``.
    shared_scale : bool
        If True, all rows are divided by the common max ``|R|`` (compare magnitudes across rows); by default each row is
        normalised on its own (compare patterns).

    Returns
    -------
    str
        The HTML document.
    '''
    rows = _rows(tokens, relevance, labels)
    normalized, scales = _normalized_rows(rows, shared_scale)
    body = [f'<h1>{html.escape(title)}</h1>'] if title else []
    for (row_tokens, values, label), row_normalized, scale in zip(rows, normalized, scales):
        body.append(_row_html(row_tokens, values, row_normalized, label, scale, cmap, level))
    labelled = any(label is not None for _, _, label in rows)
    body.append(_legend_html(cmap, level, scales, shared_scale, labelled))
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<title>{html.escape(title or "Token relevance")}</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n'
        '<body>\n' + '\n'.join(body) + '\n</body>\n</html>\n'
    )
    if path is not None:
        _write_text(document, path)
    return document


def _write_text(text, path):
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as fd:
        fd.write(text)


class _Measure:
    '''Measures text in pixels with the Agg renderer at the figure's dpi, so the layout matches the drawing.'''
    def __init__(self, dpi):
        plot = mpl()
        self.renderer = plot.FigureCanvasAgg(plot.Figure(dpi=dpi)).get_renderer()

    def width(self, text, font):
        return self.renderer.get_text_width_height_descent(text, font, ismath=False)[0]


def _layout_row(cleans, measure, font, line_width, pad):
    '''Place tokens into lines, breaking only between words (inside a word only if it is wider than a line).

    Returns a list of lines, each a list of (token index, x, box width).
    '''
    space = measure.width('n n', font) - measure.width('nn', font)
    widths = [measure.width(clean.text.replace('\n', NEWLINE_SYMBOL), font) + 2 * pad for clean in cleans]
    lines, line, x = [], [], 0.
    for n, clean in enumerate(cleans):
        if line and clean.new_word:
            word_width = sum(widths[n:_word_end(cleans, n)])
            if x + space + word_width > line_width:
                lines.append(line)
                line, x = [], 0.
            else:
                x += space
        elif line and x + widths[n] > line_width:
            lines.append(line)
            line, x = [], 0.
        line.append((n, x, widths[n]))
        x += widths[n]
        if '\n' in clean.text:
            lines.append(line)
            line, x = [], 0.
    return lines + [line] if line else lines


def _word_end(cleans, start):
    '''Index one past the last token of the word that starts at ``start``.'''
    end = start + 1
    while end < len(cleans) and not cleans[end].new_word:
        end += 1
    return end


def token_heatmap_png(tokens, relevance, path, title=None, cmap='bwr', labels=None, level=1.0, shared_scale=False,
                      width=8.0, fontsize=12, dpi=150):
    '''Render token relevance as a PNG figure for papers: tokens as coloured boxes, wrapped into lines.

    Colours and normalisation are those of :py:func:`token_heatmap_html`; lines break between words.

    Parameters
    ----------
    tokens : sequence of str, or sequence of sequences of str
        Raw tokens of one sequence, or a list of sequences (one block each).
    relevance : array-like, or sequence of array-like
        Relevance per token, matching ``tokens``.
    path : str or :py:obj:`os.PathLike`
        Output PNG file.
    title : str, optional
        Title above the tokens.
    cmap : str or :py:obj:`zennit.cmap.ColorMap`
        Zennit colour map ('bwr' by default).
    labels : sequence of str, optional
        One label per sequence.
    level : float
        Contrast, as Zennit's ``level``.
    shared_scale : bool
        Normalise all sequences by the common max ``|R|`` instead of each by its own.
    width : float
        Figure width in inches; the height follows from the number of lines.
    fontsize : float
        Font size in points.
    dpi : int
        Resolution of the PNG.

    Returns
    -------
    :py:obj:`matplotlib.figure.Figure`
        The figure (Agg canvas, not registered with pyplot).
    '''
    rows = _rows(tokens, relevance, labels)
    normalized, scales = _normalized_rows(rows, shared_scale)
    plot = mpl()
    measure = _Measure(dpi)
    font = plot.FontProperties(size=fontsize)
    bold = plot.FontProperties(size=fontsize, weight='bold')
    px = dpi / 72.  # pixels per point
    margin, pad, line_h = 10 * px, 1.5 * px, 1.9 * fontsize * px
    fig_w = width * dpi

    # first pass: lay out everything in pixels, top-down
    items, y = [], margin
    if title:
        items.append(('text', margin, y + fontsize * px, title, bold, None))
        y += line_h * 1.2
    for (row_tokens, values, label), row_normalized, scale in zip(rows, normalized, scales):
        if label is not None:
            items.append(('text', margin, y + fontsize * px, f'{label} (max |R| = {format_relevance(scale)[1:]})',
                          bold, None))
            y += line_h
        cleans = clean_tokens(row_tokens)
        for line in _layout_row(cleans, measure, font, fig_w - 2 * margin, pad):
            for n, x, box_w in line:
                rgb = colorize(row_normalized[n], cmap=cmap, level=level)
                items.append(('box', margin + x, y, box_w, cleans[n], rgb))
            y += line_h
        y += 0.4 * line_h
    legend_y = y
    fig_h = legend_y + 1.3 * line_h + margin

    fig = plot.Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor='white')
    plot.FigureCanvasAgg(fig)
    # one axes over the whole figure in pixel units, y pointing down, so the layout above is drawn as computed
    axes = fig.add_axes([0., 0., 1., 1.])
    axes.set_xlim(0., fig_w)
    axes.set_ylim(fig_h, 0.)
    axes.set_axis_off()
    for item in items:
        _draw_item(axes, item, font, fontsize * px, line_h, pad)
    _draw_legend(axes, margin, legend_y, line_h, cmap, level, font)
    save_figure(fig, path)
    return fig


def _draw_item(axes, item, font, font_px, line_h, pad):
    kind, x, y = item[:3]
    if kind == 'text':
        _, _, _, text, prop, _ = item
        axes.text(x, y, text, fontproperties=prop, va='baseline', ha='left', parse_math=False)
        return
    _, _, _, box_w, clean, rgb = item
    box_h = 1.45 * font_px
    top = y + (line_h - box_h) / 2
    edge = '0.55' if clean.special else 'none'
    axes.add_patch(mpl().Rectangle((x, top), box_w, box_h, facecolor=np.asarray(rgb) / 255., edgecolor=edge,
                                   linewidth=0.6))
    style = 'italic' if clean.special else 'normal'
    axes.text(x + pad, top + box_h * 0.76, clean.text.replace('\n', NEWLINE_SYMBOL), fontproperties=font,
              color=_text_color(rgb), va='baseline', ha='left', style=style, parse_math=False)


def _draw_legend(axes, margin, y, line_h, cmap, level, font):
    '''A colour bar from -max ``|R|`` to +max ``|R|`` below the tokens.'''
    bar_w, bar_h = 40 * line_h / 6, line_h * 0.45
    strip = colorize(np.linspace(-1., 1., 256), cmap=cmap, level=level)[None]
    axes.imshow(strip, extent=(margin, margin + bar_w, y + bar_h, y), interpolation='nearest', aspect='auto')
    axes.add_patch(mpl().Rectangle((margin, y), bar_w, bar_h, facecolor='none', edgecolor='0.6', linewidth=0.6))
    small = mpl().FontProperties(size=font.get_size() * 0.75)
    for frac, text, align in ((0., '\u2212max |R|', 'left'), (0.5, '0', 'center'), (1., '+max |R|', 'right')):
        axes.text(margin + frac * bar_w, y + bar_h + line_h * 0.55, text, fontproperties=small, ha=align,
                  va='baseline', color='0.3', parse_math=False)
