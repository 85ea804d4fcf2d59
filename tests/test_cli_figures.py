'''Figures and raw relevance written by the image commands of the CLI (--format, --dpi, --normalize, --sign,
--patches), on the embedded default model.'''
import json

import numpy as np
import pytest
import torch
from PIL import Image

from zennit_attn.cli import main


@pytest.fixture(scope='module')
def dress(tmp_path_factory):
    '''A shipped 28 x 28 Fashion-MNIST image as a PNG file, with its raw pixels.'''
    from zennit_attn.models import load_fashion_mnist_samples
    _, _, raw = load_fashion_mnist_samples()
    path = tmp_path_factory.mktemp('image') / 'dress.png'
    Image.fromarray(raw[3].numpy()).save(path)
    return path, raw[3]


def test_explain_pdf_writes_figures_and_raw_relevance(tmp_path, dress):
    '''explain --format pdf: comparison and overlay PDFs, the raw relevance as .npy and a .json saying what it is.'''
    from zennit_attn.data import fashion_mnist_transform
    from zennit_attn.models import load_fashion_mnist_vit
    path, raw = dress
    assert main(['explain', str(path), '--format', 'pdf', '--target', '3', '-o', str(tmp_path)]) == 0
    for name in ('explain_comparison.pdf', 'explain_overlays.pdf'):
        assert (tmp_path / name).read_bytes().startswith(b'%PDF-')
    assert not list(tmp_path.glob('explain_comparison.png'))
    relevance = np.load(tmp_path / 'explain_00_attnlrp_vit_relevance.npy')
    record = json.loads((tmp_path / 'explain_00_attnlrp_vit_relevance.json').read_text())
    assert relevance.shape == (3, 28, 28) and np.isfinite(relevance).all() and np.abs(relevance).max() > 0
    assert record['method'] == record['composite'] == 'attnlrp_vit'
    assert record['target_index'] == 3 and record['target_name'] == 'Dress'
    assert record['input_shape'] == [3, 28, 28] and record['normalisation'].startswith('none')
    assert record['relevance_sum'] == pytest.approx(float(relevance.astype(np.float64).sum()), rel=1e-9)
    # the logit, computed here without the CLI
    with torch.no_grad():
        logit = load_fashion_mnist_vit()(fashion_mnist_transform(raw[None]))[0, 3].item()
    assert record['logit'] == pytest.approx(logit, rel=1e-5)
    assert 'Fashion-MNIST' in record['model']
    # the overlay PNG stays a plain image asset at 224 px
    with Image.open(tmp_path / 'explain_00_attnlrp_vit_overlay.png') as image:
        assert image.size == (224, 224)


def test_compare_svg_shared_sign_and_patches(tmp_path, dress):
    '''compare with two methods: SVG figures, a patch-level figure, one .npy + .json per method, and the display
    options recorded in the JSON.'''
    path, _ = dress
    args = ['compare', str(path), '--methods', 'attnlrp_vit', 'attention_rollout', '--format', 'svg',
            '--normalize', 'shared', '--sign', 'absolute', '--patches', '-o', str(tmp_path)]
    assert main(args) == 0
    for name in ('compare_comparison.svg', 'compare_overlays.svg', 'compare_patches.svg'):
        assert b'<svg' in (tmp_path / name).read_bytes()[:2000]
    records = {}
    for method in ('attnlrp_vit', 'attention_rollout'):
        records[method] = json.loads((tmp_path / f'compare_00_{method}_relevance.json').read_text())
        assert np.load(tmp_path / f'compare_00_{method}_relevance.npy').shape == (3, 28, 28)
    assert records['attention_rollout']['composite'] is None
    display = records['attnlrp_vit']['display']
    assert display['normalize'] == 'shared' and display['sign'] == 'absolute' and display['colour_map'] == 'inferno'
    # one scale for the grid: the largest |R| summed over channels of either method, recomputed from the .npy files
    largest = max(np.abs(np.load(tmp_path / f'compare_00_{method}_relevance.npy').astype(np.float64).sum(0)).max()
                  for method in records)
    assert display['scale'] == pytest.approx(largest, rel=1e-9)
    assert records['attention_rollout']['display']['scale'] == display['scale']


def test_png_dpi_option(tmp_path, dress):
    '''--dpi sets the PNG's resolution metadata (the pixel size follows it, see tests/test_figures.py).'''
    path, _ = dress
    assert main(['explain', str(path), '--dpi', '80', '-o', str(tmp_path)]) == 0
    with Image.open(tmp_path / 'explain_comparison.png') as image:
        assert image.info['dpi'][0] == pytest.approx(80, abs=0.1) and image.mode == 'RGB'


@pytest.mark.parametrize('args,message', [
    (['--format', 'jpg'], "invalid choice: 'jpg'"),
    (['--percentile', '0'], 'expected a number in (0, 100]'),
    (['--normalize', 'max'], "invalid choice: 'max'"),
])
def test_bad_figure_options(tmp_path, dress, capsys, args, message):
    path, _ = dress
    with pytest.raises(SystemExit) as exit_info:
        main(['explain', str(path), *args, '-o', str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
