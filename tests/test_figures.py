'''Tests for zennit_attn.figures: normalisation modes, sign modes, colour maps, overlays, patch maps, raw relevance
files and figure output (PNG/PDF/SVG, dpi), against hand computations and brute force.'''
import json

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from zennit_attn.figures import (
    apply_sign, colorize_map, display_scales, luminance, model_patch_size, normalize_map, overlay_relevance,
    patch_relevance, pixel_relevance, relevance_grid, save_relevance,
)
from zennit_attn.image import overlay, relevance_to_heatmap


@pytest.fixture
def signed_map():
    '''(H, W) = (8, 12) map with a positive and a weaker negative block; H != W to catch transposes.'''
    relevance = np.zeros((8, 12))
    relevance[1:3, 1:3] = 4.
    relevance[5:7, 8:11] = -1.
    return relevance


def test_pixel_relevance_sums_channels_and_refuses_bad_input():
    channels = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    np.testing.assert_array_equal(pixel_relevance(channels), channels[0] + channels[1])
    with pytest.raises(ValueError, match='shape'):
        pixel_relevance(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match='NaN'):
        pixel_relevance(np.array([[0., np.inf]]))


def test_sign_modes():
    values = np.array([[-2., 0., 3.]])
    np.testing.assert_array_equal(apply_sign(values, 'signed'), [[-2., 0., 3.]])
    np.testing.assert_array_equal(apply_sign(values, 'positive'), [[0., 0., 3.]])
    np.testing.assert_array_equal(apply_sign(values, 'absolute'), [[2., 0., 3.]])
    with pytest.raises(ValueError, match="sign='negative'"):
        apply_sign(values, 'negative')


def test_normalisation_modes_by_hand():
    '''Scales of a 2 x 2 grid, computed by hand: panel max|R|, column max, grid max, and the 99.5th percentile.'''
    a = np.array([[1., -3.]])
    b = np.array([[0.5, 2.]])
    c = np.array([[-6., 1.]])
    d = np.array([[0.25, 0.]])
    grid = [[a, b], [c, d]]
    np.testing.assert_array_equal(display_scales(grid, 'panel'), [[3., 2.], [6., 0.25]])
    np.testing.assert_array_equal(display_scales(grid, 'column'), [[6., 2.], [6., 2.]])
    np.testing.assert_array_equal(display_scales(grid, 'shared'), [[6., 6.], [6., 6.]])
    # |R| = 1..200: numpy's linear percentile sits at index 0.995 * 199 = 198.005 between 199 and 200
    ramp = np.arange(1., 201.).reshape(10, 20) * np.where(np.arange(200).reshape(10, 20) % 2, -1., 1.)
    scale = display_scales([[ramp]], 'percentile', 99.5)[0, 0]
    assert scale == pytest.approx(199.005, abs=1e-9)
    # the value 200 lies above the scale: clipped to 1 (or -1), the rest divided by it
    normalized = normalize_map(ramp, scale)
    assert np.abs(normalized).max() == 1. and (np.abs(normalized) == 1.).sum() == 1
    assert normalized[0, 2] == pytest.approx(3. / 199.005)
    assert display_scales([[ramp]], 'percentile', 50.)[0, 0] == pytest.approx(100.5)
    # a sparse map whose percentile is 0 falls back to max|R|, so its few values stay visible
    sparse = np.zeros((20, 20))
    sparse[3, 4] = -0.5
    assert display_scales([[sparse]], 'percentile')[0, 0] == 0.5
    # empty panels have no scale; an all-zero map stays 0 without NaN
    scales = display_scales([[a, None]], 'column')
    assert scales[0, 0] == 3. and np.isnan(scales[0, 1])
    assert (normalize_map(np.zeros((2, 2)), 0.) == 0.).all()
    with pytest.raises(ValueError, match='normalize'):
        display_scales(grid, 'global')


def test_grid_reports_scales_and_chooses_sequential_map_for_non_negative_columns(signed_map):
    '''A non-negative column (e.g. rollout) gets the sequential map, a signed one the diverging map; sign modes other
    than 'signed' make every column sequential.'''
    image = np.zeros((8, 12, 3), dtype=np.uint8)
    rollout = np.abs(signed_map) + 0.5
    rows = [[image, signed_map, rollout], [image, 2. * signed_map, rollout]]
    _, info = relevance_grid(rows, ['input', 'lrp', 'rollout'], normalize='column')
    assert info['cmaps'] == [None, 'bwr', 'inferno']
    assert info['scales'] == [[None, 8., 4.5], [None, 8., 4.5]]
    _, info = relevance_grid(rows, ['input', 'lrp', 'rollout'], sign='positive')
    assert info['cmaps'] == [None, 'inferno', 'inferno']
    assert info['scales'][0][1:] == [4., 4.5]
    _, info = relevance_grid([[-signed_map]], ['lrp'], sign='absolute', sequential='hot')
    assert info['cmaps'] == ['hot'] and info['scales'] == [[4.]]
    assert 'each panel' in info['label'] and '|R|' in info['label']


def test_sequential_colours_span_zero_to_one():
    '''A sequential map puts 0 at its low end and 1 at its high end; a diverging map puts 0 in its centre.'''
    values = np.array([[0., 0.5, 1.]])
    expected = np.floor(colormaps['inferno'](np.array([0., 0.5, 1.]))[:, :3] * 255. + 0.5)
    np.testing.assert_array_equal(colorize_map(values, 'inferno', sequential=True)[0], expected)
    # Zennit's 'bwr' through the diverging path equals Zennit's own rendering (white at 0, red at 1)
    diverging = colorize_map(np.array([[-1., 0., 1.]]), 'bwr', sequential=False)
    np.testing.assert_array_equal(diverging, relevance_to_heatmap(np.array([[-1., 0., 1.]])))
    assert diverging[0, 1].tolist() == [255, 255, 255]


def test_overlay_keeps_the_image_contrast():
    '''With zero relevance a black pixel stays black and a white one white (the old alpha blend turned black grey).'''
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[0, 1] = image[1, 0] = 255
    zero = np.zeros((2, 2))
    result = overlay_relevance(image, zero)
    assert result[0, 0].tolist() == [0, 0, 0] and result[0, 1].tolist() == [255, 255, 255]
    # the contrast between black and white: full with the new overlay, half with the fixed alpha of 0.5
    old = overlay(image, relevance_to_heatmap(zero), alpha=0.5)
    assert int(result[0, 1, 0]) - int(result[0, 0, 0]) == 255
    assert int(old[0, 1, 0]) - int(old[0, 0, 0]) <= 128
    # the most relevant pixel is fully the colour map's end, half of it half blended
    relevance = np.array([[2., 1.], [0., -2.]])
    result = overlay_relevance(image, relevance)
    assert result[0, 0].tolist() == relevance_to_heatmap(np.array([[1.]]))[0, 0].tolist()
    assert result[1, 1].tolist() == relevance_to_heatmap(np.array([[-1.]]))[0, 0].tolist()
    red = relevance_to_heatmap(np.array([[0.5, 1.]]))[0, 0].astype(float)
    np.testing.assert_allclose(result[0, 1], np.floor(0.5 * 255. + 0.5 * red + 0.5), atol=1)


def test_overlay_base_is_luminance_and_patch_maps_are_upsampled():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red: BT.601 luminance 0.299 * 255 = 76.2
    assert (luminance(image) == 76).all()
    assert (overlay_relevance(image, np.zeros((4, 4)))[..., 1] == 76).all()
    assert (overlay_relevance(image, np.zeros((4, 4)), grey=False) == image).all()
    patches = np.array([[1., 0.], [0., 0.]])
    result = overlay_relevance(image, patches)
    # each patch value covers its 2 x 2 block; the non-negative map uses the sequential map's top colour there
    top = colorize_map(np.array([[1.]]), 'inferno', sequential=True)[0, 0]
    assert (result[:2, :2] == top).all() and (result[2:, 2:, 1] == 76).all()
    with pytest.raises(ValueError, match='tile'):
        overlay_relevance(image, np.zeros((3, 3)))


def test_overlay_of_a_non_negative_map_in_a_diverging_column_keeps_the_diverging_range():
    '''A grid column drawn with 'bwr' (some of its maps are negative) may hold a non-negative map: its overlay must put
    0 at white and positive values in red, as the column's colour bar says, not stretch [0, 1] over blue to red.'''
    image = np.full((1, 3, 3), 255, dtype=np.uint8)
    values = np.array([[0.2, 0.5, 1.0]])
    column = overlay_relevance(image, values, scale=1., cmap='bwr', sequential=False)
    # the diverging map's colour of each value on its [-1, 1] range, from matplotlib directly
    expected = [np.array(colormaps['bwr']((value + 1.) / 2.)[:3]) * 255. for value in values[0]]
    for pixel, value, colour in zip(column[0], values[0], expected):
        # over white the blend is white + |R| * (colour - white): red grows, green and blue fall, never bluish
        blend = np.floor((1. - value) * 255. + value * colour + 0.5)
        np.testing.assert_allclose(pixel, blend, atol=2)
        assert pixel[0] == 255 and pixel[2] <= pixel[0]
    # the same map through a grid column whose other map is negative
    rows = [[image[0], values], [image[0], -values]]
    _, info = relevance_grid(rows, ['input', 'method'], normalize='shared', overlay=True)
    assert info['cmaps'][1] == 'bwr' and info['sequential'] == [False, False]


def test_patch_map_equals_brute_force_sum():
    rng = np.random.default_rng(0)
    relevance = rng.normal(size=(3, 12, 8))
    patches = patch_relevance(torch.from_numpy(relevance), 4)
    expected = np.zeros((3, 2))
    for row in range(3):
        for col in range(2):
            for channel in range(3):
                for y in range(4):
                    for x in range(4):
                        expected[row, col] += relevance[channel, 4 * row + y, 4 * col + x]
    np.testing.assert_allclose(patches, expected, rtol=0, atol=1e-12)
    assert patches.sum() == pytest.approx(relevance.sum())
    with pytest.raises(ValueError, match='5x5 patches'):
        patch_relevance(relevance, 5)


def test_model_patch_size():
    from torchvision.models import VisionTransformer
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
    assert model_patch_size(vit) == 8
    embed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 7, stride=7))
    assert model_patch_size(embed) == 7
    with pytest.raises(ValueError, match='no patch embedding'):
        model_patch_size(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_raw_relevance_round_trips_with_sidecar(tmp_path):
    relevance = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    npy, sidecar = save_relevance(tmp_path / 'sub' / 'x_relevance.png', relevance, method='attnlrp',
                                  composite='attnlrp', model='m', target_index=2, target_name='cat',
                                  input_shape=[3, 5, 7], logit=1.5)
    loaded = np.load(npy)
    assert loaded.dtype == np.float32 and (loaded == relevance.numpy()).all()
    record = json.loads(open(sidecar, encoding='utf-8').read())
    assert npy.endswith('x_relevance.npy') and record['file'] == 'x_relevance.npy'
    assert record['shape'] == [3, 5, 7] and record['dtype'] == 'float32'
    assert record['normalisation'].startswith('none')
    assert record['relevance_sum'] == pytest.approx(float(relevance.double().sum()), rel=1e-12)
    for key, value in dict(method='attnlrp', composite='attnlrp', model='m', target_index=2, target_name='cat',
                           input_shape=[3, 5, 7], logit=1.5).items():
        assert record[key] == value


@pytest.mark.parametrize('suffix', ['png', 'pdf', 'svg'])
def test_grid_writes_formats_at_dpi(tmp_path, signed_map, suffix):
    rows = [[np.full((8, 12), 200, dtype=np.uint8), signed_map]]
    path = tmp_path / f'grid.{suffix}'
    fig, _ = relevance_grid(rows, ['input', 'lrp'], row_titles=['cat'], title='T', dpi=120, path=path)
    data = path.read_bytes()
    if suffix == 'png':
        with Image.open(path) as image:
            width, height = fig.get_size_inches()
            assert image.mode == 'RGB'
            assert abs(image.size[0] - width * 120) <= 1 and abs(image.size[1] - height * 120) <= 1
            assert image.info['dpi'][0] == pytest.approx(120, abs=0.1)
    elif suffix == 'pdf':
        assert data.startswith(b'%PDF-')
    else:
        assert b'<svg' in data[:2000]
    assert fig.dpi == 120


def test_grid_dpi_scales_png(tmp_path, signed_map):
    '''The same figure at twice the dpi has twice the pixels.'''
    sizes = {}
    for dpi in (50, 100):
        relevance_grid([[signed_map]], ['lrp'], dpi=dpi, path=tmp_path / f'{dpi}.png')
        with Image.open(tmp_path / f'{dpi}.png') as image:
            sizes[dpi] = image.size
    assert abs(sizes[100][0] - 2 * sizes[50][0]) <= 2 and abs(sizes[100][1] - 2 * sizes[50][1]) <= 2


def test_grid_errors(signed_map):
    with pytest.raises(ValueError, match='one entry per column'):
        relevance_grid([[signed_map]], ['a', 'b'])
    with pytest.raises(ValueError, match='overlay=True needs a uint8 image'):
        relevance_grid([[signed_map, signed_map]], ['a', 'b'], overlay=True)
    with pytest.raises(ValueError, match="normalize='max'"):
        relevance_grid([[signed_map]], ['a'], normalize='max')


def test_bfloat16_relevance_is_saved_exactly_as_float32(tmp_path):
    relevance = torch.randn(2, 3, 4).bfloat16()
    npy, _ = save_relevance(tmp_path / 'r', relevance)
    loaded = np.load(npy)
    assert loaded.dtype == np.float32 and torch.equal(torch.from_numpy(loaded).bfloat16(), relevance)
