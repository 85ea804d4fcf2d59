'''Tests for zennit_attn.text: token cleaning, the HTML heatmap (parsed, and rendered by headless Chromium), PNG.'''
import os
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from zennit_attn.text import clean_tokens, format_relevance, token_heatmap_html, token_heatmap_png

CHROMIUM = '/usr/bin/chromium'


def joined(cleaned):
    '''The sentence as a reader sees it: a space before every token that starts a new word.'''
    return ''.join((' ' if n and new_word else '') + text for n, (text, new_word) in enumerate(cleaned))


def test_clean_wordpiece():
    tokens = ['[CLS]', 'the', 'un', '##bear', '##able', 'film', ',', 'it', "'", 's', 'great', '(', 'really', ')',
              '!', '[SEP]']
    cleaned = clean_tokens(tokens)
    assert cleaned[:5] == [('[CLS]', True), ('the', True), ('un', True), ('bear', False), ('able', False)]
    assert joined(cleaned) == "[CLS] the unbearable film, it's great (really)! [SEP]"
    assert [token.special for token in cleaned] == [True] + [False] * 14 + [True]
    assert cleaned[0].text == '[CLS]' and cleaned[3].new_word is False


def test_clean_gpt2_byte_level_bpe():
    tokens = ['<|endoftext|>', 'Hello', ',', 'Ġworld', 'ĠcafÃ©', '!', 'Ċ', 'The', 'Ġend', 'Ġ']
    cleaned = clean_tokens(tokens)
    assert [text for text, _ in cleaned] == ['<|endoftext|>', 'Hello', ',', 'world', 'café', '!', '\n', 'The', 'end',
                                             '\u2423']
    assert [new for _, new in cleaned] == [True, True, False, True, True, False, False, True, True, True]
    assert cleaned[0].special and not cleaned[1].special


def test_clean_sentencepiece():
    tokens = ['<s>', '▁Hello', '▁wor', 'ld', '<0x0A>', '▁the', 're', '</s>']
    cleaned = clean_tokens(tokens)
    assert cleaned == [('<s>', True), ('Hello', True), ('wor', True), ('ld', False), ('\n', False), ('the', True),
                       ('re', False), ('</s>', True)]
    assert [token.special for token in cleaned] == [True] + [False] * 6 + [True]
    # SentencePiece pieces are text, not GPT-2 byte stand-ins: 'é' must not be decoded as the byte 0xE9
    assert joined(clean_tokens(['▁caf', 'é', '▁au', '▁lait'])) == 'café au lait'


def test_special_token_patterns_and_lookalikes():
    cleaned = clean_tokens(['[MASK]', '<pad>', '<script>', '##', 'x'])
    assert [token.special for token in cleaned] == [True, True, False, False, False]
    # a lone '##' is text, not a continuation marker
    assert cleaned[3] == ('##', True)


class SpanCollector(HTMLParser):
    '''Collects token spans (text, classes, style, title), all tags, and the text inside the token rows.'''
    def __init__(self):
        super().__init__()
        self.spans, self.tags, self.rows = [], [], []
        self._span = None
        self._row_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == 'div' and attrs.get('class') == 'tokens':
            self._row_depth = 1
            self.rows.append('')
        elif tag == 'div' and self._row_depth:
            self._row_depth += 1
        if tag == 'span' and 'tok' in attrs.get('class', '').split():
            self._span = dict(attrs, text='')

    def handle_endtag(self, tag):
        if tag == 'span' and self._span is not None:
            self.spans.append(self._span)
            self._span = None
        if tag == 'div' and self._row_depth:
            self._row_depth -= 1

    def handle_data(self, data):
        if self._span is not None:
            self._span['text'] += data
        if self._row_depth:
            self.rows[-1] += data


def parse(document):
    collector = SpanCollector()
    collector.feed(document)
    collector.close()
    return collector


def background(span):
    '''The (r, g, b) background colour from a span's inline style.'''
    value = span['style'].split('background-color:')[1].split(';')[0].strip().lstrip('#')
    return tuple(int(value[i:i + 2], 16) for i in (0, 2, 4))


def test_html_one_span_per_token_with_hover_values(tmp_path):
    tokens = ['[CLS]', 'a', 'great', 'film', 'but', 'bor', '##ing', '[SEP]']
    relevance = torch.tensor([0., 0.05, 0.123, 0., -0.02, -0.4, -0.2, 0.])
    path = tmp_path / 'out' / 'tokens.html'
    document = token_heatmap_html(tokens, relevance, title='Review', path=path)
    assert path.read_text(encoding='utf-8') == document
    parsed = parse(document)
    assert len(parsed.spans) == len(tokens)
    assert [span['text'] for span in parsed.spans] == [text for text, _ in clean_tokens(tokens)]
    assert parsed.spans[2]['title'].startswith('relevance: +0.123\n')
    assert 'relevance: -0.400' in parsed.spans[5]['title']
    assert 'token: ##ing' in parsed.spans[6]['title']
    assert parsed.rows == ['[CLS] a great film but boring [SEP]']
    assert 'special' in parsed.spans[0]['class'].split() and 'special' not in parsed.spans[1]['class'].split()


def test_html_colours_signed_relevance():
    tokens = ['good', 'bad', 'neutral', 'slightly']
    parsed = parse(token_heatmap_html(tokens, np.array([2., -2., 0., 0.5])))
    red, blue, white, pink = (background(span) for span in parsed.spans)
    assert red == (255, 0, 0) and blue == (0, 0, 255) and white == (255, 255, 255)
    assert pink[0] == 255 and 150 < pink[1] == pink[2] < 230
    # normalisation by max |R|: scaling changes nothing, flipping the sign swaps red and blue
    scaled = parse(token_heatmap_html(tokens, np.array([2., -2., 0., 0.5]) * 37.))
    assert [background(span) for span in scaled.spans] == [red, blue, white, pink]
    flipped = parse(token_heatmap_html(tokens, -np.array([2., -2., 0., 0.5])))
    assert background(flipped.spans[0]) == (0, 0, 255) and background(flipped.spans[1]) == (255, 0, 0)


def test_html_escapes_and_is_self_contained():
    tokens = ['<script>', 'alert', '(', '"x"', ')', '&amp;']
    document = token_heatmap_html(tokens, np.ones(6), title='<b>title</b>', labels=['<i>label</i>'])
    parsed = parse(document)
    assert 'script' not in parsed.tags and 'b' not in parsed.tags and 'i' not in parsed.tags
    assert '&lt;script&gt;' in document and '&amp;amp;' in document
    assert parsed.spans[0]['text'] == '<script>' and parsed.spans[5]['text'] == '&amp;'
    assert 'token: <script>' in parsed.spans[0]['title']
    for external in ('<script', '<link', 'src=', 'http://', 'https://', 'url(', '@import'):
        assert external not in document


def test_html_multiple_rows_with_labels():
    tokens = ['a', 'b', 'c']
    document = token_heatmap_html([tokens, tokens], [np.array([1., 0., -1.]), np.array([0.1, 0., -0.1])],
                                  labels=['AttnLRP', 'CP-LRP'])
    parsed = parse(document)
    assert len(parsed.spans) == 6 and parsed.rows == ['a b c', 'a b c']
    assert 'AttnLRP' in document and 'CP-LRP' in document
    # each row is normalised on its own by default, so both rows look the same
    assert [background(span) for span in parsed.spans[:3]] == [background(span) for span in parsed.spans[3:]]
    shared = parse(token_heatmap_html([tokens, tokens], [np.array([1., 0., -1.]), np.array([0.1, 0., -0.1])],
                                      shared_scale=True))
    assert background(shared.spans[0]) == (255, 0, 0) and background(shared.spans[3])[1] > 200


def test_html_zero_relevance_and_shape_checks():
    document = token_heatmap_html(['a', 'b'], torch.zeros(1, 2))
    assert 'nan' not in document.lower()
    assert all(background(span) == (255, 255, 255) for span in parse(document).spans)
    with pytest.raises(ValueError, match='embedding'):
        token_heatmap_html(['a', 'b'], np.zeros((2, 8)))
    with pytest.raises(ValueError):
        token_heatmap_html(['a', 'b'], np.zeros(3))
    with pytest.raises(ValueError):
        token_heatmap_html(['a', 'b'], np.array([0., np.inf]))


def test_format_relevance():
    assert format_relevance(0.123) == '+0.123'
    assert format_relevance(-1.5) == '-1.500'
    assert format_relevance(0.) == '+0.000'
    assert format_relevance(2e-5) == '+2.000e-05'


def test_token_heatmap_png(tmp_path):
    tokens = ['▁The', '▁film', '▁was', '▁great', ',', '▁but', '▁the', '▁end', '▁was', '▁boring', '.']
    relevance = np.array([0., 0.1, 0., 1., 0., -0.1, 0., -0.2, 0., -1., 0.])
    path = tmp_path / 'tokens.png'
    token_heatmap_png(tokens, relevance, path, title='Review', width=6., dpi=100)
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.mode == 'RGB' and image.width == 600
        pixels = np.asarray(image).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    # the legend bar holds both colours too; the token boxes alone are larger than that
    assert red.sum() > 300 and blue.sum() > 300
    # more text wraps into more lines
    token_heatmap_png([tokens * 4, tokens], [np.tile(relevance, 4), relevance], tmp_path / 'long.png', width=6.,
                      dpi=100, labels=['long', 'short'])
    with Image.open(tmp_path / 'long.png') as image:
        assert image.width == 600 and image.height > pixels.shape[0] + 100


def colour_bands(mask):
    '''Contiguous ranges of image rows that contain any pixel of the mask, top to bottom.'''
    rows = np.flatnonzero(mask.any(axis=1))
    splits = np.flatnonzero(np.diff(rows) > 1) + 1
    return [(group[0], group[-1] + 1) for group in np.split(rows, splits)] if rows.size else []


def test_html_renders_in_headless_chromium(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f'{CHROMIUM} not found: install the Debian package with `apt-get install -y chromium`.')
    tokens = ['[CLS]', 'a', 'great', 'film', ',', 'but', 'slow', 'and', 'boring', '[SEP]']
    relevance = np.array([0., 0., 1., 0., 0., 0., 0., 0., -1., 0.])
    page = tmp_path / 'tokens.html'
    shot = tmp_path / 'shot.png'
    token_heatmap_html(tokens, relevance, title='Chromium rendering check', path=page)
    command = [
        CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync', '--hide-scrollbars',
        '--force-device-scale-factor=1', f'--user-data-dir={tmp_path / "profile"}', f'--screenshot={shot}',
        '--window-size=800,300', page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and shot.exists(), f'chromium failed ({result.returncode}):\n{result.stderr[-2000:]}'

    with Image.open(shot) as image:
        assert image.size == (800, 300)
        pixels = np.asarray(image.convert('RGB')).astype(int)
    # not blank: dark text and more than a handful of distinct colours
    assert ((pixels.sum(axis=-1) < 200).sum() > 500) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    token_band, legend_band = colour_bands(red)[0], colour_bands(red)[-1]
    assert token_band[1] <= legend_band[0], 'the tokens must be drawn above the legend'

    # in the token line 'great' (red) comes before 'boring' (blue); both are boxes of about one line of text
    token_red, token_blue = red[slice(*token_band)], blue[slice(*token_band)]
    red_cols, blue_cols = np.flatnonzero(token_red.any(axis=0)), np.flatnonzero(token_blue.any(axis=0))
    assert red_cols.size > 30 and blue_cols.size > 30
    assert red_cols.max() < blue_cols.min()
    assert 15 <= token_band[1] - token_band[0] <= 45

    # the legend bar runs from blue (left) to red (right)
    legend_red, legend_blue = red[slice(*legend_band)], blue[slice(*legend_band)]
    assert np.flatnonzero(legend_blue.any(axis=0)).max() < np.flatnonzero(legend_red.any(axis=0)).min()
