'''``zennit-attn neurons``: the HTML/PNG report of the most relevant units, end to end on tiny models.'''
import html.parser
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zennit_attn.cli import main

pytestmark = pytest.mark.usefixtures('single_thread')

WORDS = ['[PAD]', '[UNK]'] + 'a good film bad movie plot thin the is and not very fun dull'.split()
CORPUS = ['a good film', 'the plot is thin', 'not a very good movie', 'a dull plot', 'fun', 'the film is bad']


class Marks(html.parser.HTMLParser):
    '''Counts the marked context tokens of the reference snippets and the token spans of the heatmaps.'''
    def __init__(self):
        super().__init__()
        self.marks, self.spans = 0, 0

    def handle_starttag(self, tag, attrs):
        self.marks += tag == 'mark'
        self.spans += tag == 'span' and 'relevance' in (dict(attrs).get('title') or '')


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    root = tmp_path_factory.mktemp('neurons')
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token='[UNK]'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]', unk_token='[UNK]')
    config = transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, num_labels=2, id2label={0: 'negative', 1: 'positive'},
        label2id={'negative': 0, 'positive': 1}, architectures=['BertForSequenceClassification'],
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(root / 'model')
    tokenizer.save_pretrained(root / 'model')
    (root / 'corpus.txt').write_text('\n'.join(CORPUS) + '\n')
    return root


def test_text_report_end_to_end(classifier, tmp_path, capsys):
    out = tmp_path / 'report'
    status = main(['neurons', '--model', str(classifier / 'model'), '--layer', 'bert.encoder.layer.0.intermediate',
                   '--text', 'a good film', '--text', 'the plot is thin', '--corpus', str(classifier / 'corpus.txt'),
                   '--top', '3', '-k', '2', '-o', str(out)])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / 'neurons.json').read_text())
    assert [entry['text'] for entry in summary['texts']] == ['a good film', 'the plot is thin']
    assert summary['corpus'] == len(CORPUS)
    for entry in summary['texts']:
        relevance = [item['relevance'] for item in entry['units']]
        assert len(relevance) == 3 and relevance == sorted(relevance, reverse=True)
        assert len({item['unit'] for item in entry['units']}) == 3
        for item in entry['units']:
            assert 1 <= len(item['references']) <= 2
            # every reference is a corpus text with one marked word
            for snippet in item['references']:
                assert snippet.count('[') == 1 and snippet.replace('[', '').replace(']', '') in CORPUS
    page = (out / 'neurons.html').read_text()
    marks = Marks()
    marks.feed(page)
    references = sum(len(item['references']) for entry in summary['texts'] for item in entry['units'])
    assert marks.marks == references
    # per text: the full map and the 3 conditional maps, one span per token
    assert marks.spans == 4 * 3 + 4 * 4
    with Image.open(out / 'neurons.png') as image:
        assert image.size[0] > 200 and image.size[1] > 200


def test_heads_report(classifier, tmp_path, capsys):
    out = tmp_path / 'heads'
    status = main(['neurons', '--model', str(classifier / 'model'), '--layer', 'bert.encoder.layer.0.attention.self',
                   '--heads', '2', '--text', 'a dull plot', '--corpus', str(classifier / 'corpus.txt'), '--top', '5',
                   '-k', '1', '-o', str(out)])
    assert status == 0, capsys.readouterr().err
    units = json.loads((out / 'neurons.json').read_text())['texts'][0]['units']
    assert sorted(item['unit'] for item in units) == [0, 1]  # only two heads to rank


def test_image_report_end_to_end(tmp_path, capsys):
    out = tmp_path / 'images'
    status = main(['neurons', '--images', '--corpus-size', '6', '--top', '1', '-k', '2', '-o', str(out)])
    assert status == 0, capsys.readouterr().err
    summary = json.loads((out / 'neurons.json').read_text())
    assert [entry['prediction'] for entry in summary['images']] and summary['corpus'] == 6
    for entry in summary['images']:
        for item in entry['units']:
            for reference in item['references']:
                top, left, height, width = reference['box']
                assert 0 <= top <= 28 - height and 0 <= left <= 28 - width and height == width == 10
    with Image.open(out / 'neurons.png') as image:
        pixels = np.asarray(image.convert('RGB'))
    assert pixels.std() > 10  # not a blank figure


@pytest.mark.parametrize('args, message', [
    (['--layer', 'bert.nothing'], "--layer 'bert.nothing' is no module"),
    ([], '--layer is required'),
    (['--layer', 'bert.encoder.layer.0.intermediate', '--corpus', 'missing.txt'], 'no such file'),
])
def test_bad_input_is_a_one_line_error(classifier, tmp_path, capsys, args, message):
    status = main(['neurons', '--model', str(classifier / 'model'), '--text', 'a good film', '-o', str(tmp_path),
                   *args])
    error = capsys.readouterr().err
    assert status == 2 and message in error and len(error.strip().splitlines()) == 1
