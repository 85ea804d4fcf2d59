'''The zennit-attn command line on the embedded default: files written, images readable, errors in one line.'''
import html.parser
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zennit_attn.cli import DEMO_METHODS, main


def run_cli(*args):
    '''Run the CLI in a subprocess, as a user would.'''
    return subprocess.run(
        [sys.executable, '-m', 'zennit_attn', *args], capture_output=True, text=True, timeout=600,
    )


class SpanCounter(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.titles = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'span' and 'relevance' in (attrs.get('title') or ''):
            self.titles.append(attrs['title'])


@pytest.fixture(scope='module')
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    result = run_cli('demo', '-o', str(out), '--samples', '3')
    assert result.returncode == 0, result.stderr
    return out, result


def test_demo_writes_comparison_grid_and_overlays(demo_output):
    '''The demo writes a grid with one column per method plus the input, and one overlay per image and method.'''
    out, result = demo_output
    grid = Image.open(out / 'comparison.png')
    assert grid.mode == 'RGB'
    # 3 rows of 28×28 panels at scale 4 plus titles, 8 columns (input + 7 methods)
    assert grid.size[0] > 8 * 28 * 4 and grid.size[1] > 3 * 28 * 4
    pixels = np.asarray(grid)
    assert pixels.std() > 10, 'the grid is blank'
    overlays = sorted(out.glob('*_overlay.png'))
    assert len(overlays) == 3 * len(DEMO_METHODS)
    assert {Image.open(path).size for path in overlays} == {(224, 224)}
    assert str(out.resolve()) in result.stdout


def test_demo_writes_token_heatmap_and_summary(demo_output):
    '''The MiniLM token heatmap is valid HTML with one hover value per token; the summary has the faithfulness.'''
    out, _ = demo_output
    parser = SpanCounter()
    parser.feed((out / 'text_heatmap.html').read_text())
    assert len(parser.titles) > 20
    assert Image.open(out / 'text_heatmap.png').size[0] > 100
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['samples'] == 3
    assert 'ABPC' in summary['faithfulness']
    assert (out / 'faithfulness' / 'faithfulness_abpc.png').is_file()


def test_explain_default_image(tmp_path):
    '''explain on a 28×28 grey image writes a grid and an overlay for the chosen composite and class.'''
    from zennit_attn.models import load_fashion_mnist_samples
    _, _, raw = load_fashion_mnist_samples()
    image_path = tmp_path / 'shirt.png'
    Image.fromarray(raw[0].numpy()).save(image_path)
    assert main(['explain', str(image_path), '--composite', 'cp_lrp_vit', '--target', '3', '-o', str(tmp_path)]) == 0
    assert (tmp_path / 'explain_comparison.png').is_file()
    assert Image.open(tmp_path / 'explain_00_cp_lrp_vit_overlay.png').size == (224, 224)


@pytest.mark.parametrize('args,message', [
    (['explain', 'missing.png'], 'image file not found: missing.png'),
    (['explain', '{image}', '--composite', 'nope'], "unknown composite 'nope'"),
    (['explain', '{image}', '--target', '10'], 'class index 10 is out of range'),
    (['explain', '{big}'], 'expects 28×28; pass --resize'),
    (['explain', '{image}', '--model', 'not_a_model'], "unknown model 'not_a_model'"),
    (['compare', '{image}', '--methods', 'magic'], 'unknown method(s) magic'),
    (['explain', '{text}'], 'cannot read'),
])
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    '''Bad input ends with exit status 2 and one line on stderr, never a traceback.'''
    image = tmp_path / 'image.png'
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    big = tmp_path / 'big.png'
    Image.fromarray(np.zeros((40, 30), dtype=np.uint8)).save(big)
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    args = [arg.format(image=image, big=big, text=text) for arg in args]
    result = run_cli(*args, '-o', str(tmp_path / 'out'))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr
    assert lines[0].startswith('zennit-attn: error:') and message in lines[0]


def test_resize_accepts_other_sizes(tmp_path):
    '''With --resize an image of another size is resized to the model's input.'''
    big = tmp_path / 'big.png'
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(big)
    assert main(['explain', str(big), '--resize', '-o', str(tmp_path)]) == 0


def test_unsupported_torchvision_model_is_a_one_line_error(tmp_path):
    '''A CNN with batch norms is refused by the composites: exit status 2, one line naming the module.'''
    image = tmp_path / 'image.png'
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    result = run_cli('explain', str(image), '--model', 'resnet18', '--resize', '-o', str(tmp_path / 'out'))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith('note:')]
    assert len(lines) == 1 and "unsupported model: module 'bn1' (BatchNorm2d)" in lines[0]


@pytest.mark.parametrize('args,message', [
    (['explain', '--text', 'a fine film', '--generate', '3'],
     '--generate apply to language models; default is a sequence classifier (MiniLM sentiment classifier)'),
    (['explain', '--text', 'a fine film', '--target', 'log_probability'],
     '--target log_probability applies to language models'),
    (['explain', '{image}', '--contrast', '3'], '--contrast apply to --text only'),
    (['explain', '{image}', '--target', 'probability'], '--target probability applies to language models'),
    (['compare', '{image}', '--generate', '2'], '--generate, --continuation and --contrast apply to --text only'),
])
def test_language_model_options_are_refused_where_they_do_not_apply(tmp_path, capsys, args, message):
    '''Options of language models given for the default classifier or an image: status 2, one line (in process).'''
    image = tmp_path / 'image.png'
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    capsys.readouterr()
    status = main([arg.format(image=image) for arg in args] + ['-o', str(tmp_path / 'out')])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
