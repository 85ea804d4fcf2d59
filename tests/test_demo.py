'''The demo's parts are guarded: a failing part is reported in one line, the other parts still write their files,
``summary.json`` is always written and lists the failure, and the exit status is 1 only if a part failed.

The demo runs in-process on the shipped Fashion-MNIST ViT with one cheap method (gradient), two grid images and 6
faithfulness samples; the MiniLM text part is replaced by a stand-in that writes one file (loading transformers and the
model would dominate the test's time; ``tests/test_cli.py`` runs the real demo).
'''
import json
import types

import pytest

import zennit_attn.cli as cli
import zennit_attn.evaluation
import zennit_attn.models


pytestmark = pytest.mark.usefixtures('single_thread')


class Boom(RuntimeError):
    '''The error a patched part raises (a class of its own, so no real error can pass for it).'''


#: the one-line report a failing part must print (on stderr), by the part that fails
FAILURE_LINES = {
    'comparison grid': 'demo: comparison grid failed: Boom: broken comparison grid second line '
                       '(skipped: comparison grid, overlays)',
    'text heatmap': 'demo: text heatmap failed: Boom: broken text heatmap second line (skipped: token heatmap)',
    'faithfulness': 'demo: faithfulness failed: Boom: broken faithfulness second line '
                    '(skipped: faithfulness plot, summary table)',
}


def raising(message):
    def function(*args, **kwargs):
        raise Boom(message)
    return function


@pytest.fixture
def cheap_demo(monkeypatch):
    '''Make the demo cheap: one method, the first 6 shipped samples, a stand-in text part.'''
    monkeypatch.setattr(cli, 'DEMO_METHODS', {'gradient': 'Gradient'})
    load_samples = zennit_attn.models.load_fashion_mnist_samples

    def first_samples():
        return tuple(tensor[:6] for tensor in load_samples())

    monkeypatch.setattr(zennit_attn.models, 'load_fashion_mnist_samples', first_samples)
    monkeypatch.setattr(cli, 'text_task', lambda name: types.SimpleNamespace(model=None, tokenizer=None, classes=()))

    def fake_explain_text(model, tokenizer, classes, texts, composite, target, out, **kwargs):
        path = out / 'text_heatmap.html'
        path.write_text(''.join(f'<p>{text}</p>' for text in texts))
        return [path]

    monkeypatch.setattr(cli, 'explain_text', fake_explain_text)
    return monkeypatch


def files_of(out):
    '''Which parts left their files in ``out``.'''
    return {
        'comparison grid': (out / 'comparison.png').is_file() and len(list(out.glob('*_gradient_overlay.png'))) == 2,
        'text heatmap': (out / 'text_heatmap.html').is_file(),
        'faithfulness': all((out / 'faithfulness' / name).is_file() for name in (
            'faithfulness.json', 'faithfulness_summary.csv', 'faithfulness_abpc.png', 'faithfulness_curves.png')),
    }


def run_demo(out, capsys):
    status = cli.main(['demo', '-o', str(out), '--samples', '2'])
    captured = capsys.readouterr()
    return status, captured.out, captured.err, json.loads((out / 'summary.json').read_text())


@pytest.mark.parametrize('part', list(FAILURE_LINES))
def test_failing_part_is_reported_and_the_rest_runs(part, cheap_demo, tmp_path, capsys):
    '''One part raises (its message spans two lines): one line names it, what it skips and the error; the other
    parts' files exist; summary.json lists the failure; the exit status is 1.'''
    broken = {
        'comparison grid': (cli, 'image_heatmaps'),
        'text heatmap': (cli, 'explain_text'),
        'faithfulness': (zennit_attn.evaluation, 'evaluate'),
    }[part]
    cheap_demo.setattr(*broken, raising(f'broken {part}\nsecond line'))
    status, stdout, stderr, summary = run_demo(tmp_path, capsys)
    assert status == 1
    lines = [line for line in stderr.splitlines() if line.startswith('demo: ')]
    assert lines == [FAILURE_LINES[part]]
    files = files_of(tmp_path)
    assert files == {name: name != part for name in files}
    assert summary['failed'] == {part: f'Boom: broken {part} second line'}
    assert summary['skipped'] == FAILURE_LINES[part].split('(skipped: ')[1].rstrip(')').split(', ')
    # the closing lines: where the files are, then what was skipped
    assert str(tmp_path.resolve()) in stdout
    assert stdout.rstrip().splitlines()[-1].startswith(f'skipped: {", ".join(summary["skipped"])}')


def test_nothing_fails(cheap_demo, tmp_path, capsys):
    '''All parts run: every file exists, nothing failed or skipped, exit status 0.'''
    status, stdout, stderr, summary = run_demo(tmp_path, capsys)
    assert status == 0, stderr
    assert all(files_of(tmp_path).values())
    assert summary['failed'] == {} and summary['skipped'] == []
    assert 'failed' not in stderr and 'skipped' not in stdout
    assert len(summary['predictions']) == 2 and 'gradient' in summary['faithfulness']
    assert stdout.rstrip().splitlines()[-1].strip() == str(tmp_path / 'summary.json')


def test_missing_text_model_is_a_skip_not_a_failure(cheap_demo, tmp_path, capsys):
    '''Without the optional MiniLM package the text part is skipped (said so), the rest runs, exit status 0.'''
    def unavailable(name):
        raise cli.CLIError('the MiniLM package is not installed')

    cheap_demo.setattr(cli, 'text_task', unavailable)
    status, stdout, _, summary = run_demo(tmp_path, capsys)
    assert status == 0
    assert summary['failed'] == {} and summary['skipped'] == ['token heatmap (MiniLM model not available)']
    files = files_of(tmp_path)
    assert files == {'comparison grid': True, 'text heatmap': False, 'faithfulness': True}
    assert stdout.rstrip().splitlines()[-1] == 'skipped: token heatmap (MiniLM model not available)'
