'''Tests for zennit_attn.image: heatmap colours and normalisation, upsampling, overlays, PNG output and grids.'''
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from zennit.image import CMAPS

from zennit_attn.image import heatmap_grid, overlay, relevance_to_heatmap, save_png, to_uint8_image, upsample


def is_reddish(rgb):
    red, green, blue = (int(channel) for channel in rgb)
    return red > 200 and green < 80 and blue < 80


def is_bluish(rgb):
    red, green, blue = (int(channel) for channel in rgb)
    return blue > 200 and red < 80 and green < 80


def is_whitish(rgb):
    return all(int(channel) >= 250 for channel in rgb)


@pytest.fixture
def signed_map():
    '''A (H, W) map with a positive block, a weaker negative block and zero elsewhere; H != W to catch transposes.'''
    relevance = np.zeros((12, 16))
    relevance[1:4, 1:4] = 2.
    relevance[7:10, 10:14] = -2.
    relevance[5, 5] = -1.
    return relevance


def test_bwr_colours(signed_map):
    heatmap = relevance_to_heatmap(signed_map, cmap='bwr')
    assert heatmap.shape == (12, 16, 3) and heatmap.dtype == np.uint8
    assert is_reddish(heatmap[2, 2])
    assert is_bluish(heatmap[8, 11])
    # zero relevance is the neutral centre of 'bwr': white
    assert tuple(heatmap[0, 0]) == (255, 255, 255)
    # half the maximum magnitude is a half-saturated blue
    half = heatmap[5, 5].astype(int)
    assert half[2] == 255 and 100 < half[0] < 160 and half[0] == half[1]


def test_matches_zennit_colour_map(signed_map):
    relevance = signed_map + np.random.RandomState(0).randn(*signed_map.shape)
    normalized = relevance / np.abs(relevance).max()
    for cmap, level in (('bwr', 1.), ('bwr', 2.), ('coldnhot', 1.), ('coldnhot', .5)):
        expected = CMAPS[cmap](np.clip((normalized * level + 1.) / 2., 0., 1.)) * 255.
        heatmap = relevance_to_heatmap(relevance, cmap=cmap, level=level).astype(float)
        # the 256-entry palette quantises like zennit.image.imgify: at most one palette step, whose size in colour
        # units is the map's steepest slope per step ('bwr': 2, 'coldnhot': 6) times the level
        step = {'bwr': 2., 'coldnhot': 6.1}[cmap] * level
        assert np.abs(heatmap - expected).max() <= step


def test_all_zero_is_neutral_without_nan():
    heatmap = relevance_to_heatmap(torch.zeros(3, 5, 7))
    assert heatmap.shape == (5, 7, 3)
    assert (heatmap == 255).all()
    assert (relevance_to_heatmap(np.zeros((4, 4)), cmap='coldnhot') == 0).all()


def test_positive_scaling_gives_same_image(signed_map):
    heatmap = relevance_to_heatmap(signed_map)
    for factor in (1e-6, 0.3, 7., 1e5):
        np.testing.assert_array_equal(relevance_to_heatmap(signed_map * factor), heatmap)


def test_sign_flip_swaps_colours(signed_map):
    heatmap = relevance_to_heatmap(signed_map).astype(int)
    flipped = relevance_to_heatmap(-signed_map).astype(int)
    assert is_bluish(flipped[2, 2]) and is_reddish(flipped[8, 11])
    # 'bwr' is mirror-symmetric with red and blue exchanged, up to one palette step
    assert np.abs(flipped - heatmap[..., ::-1]).max() <= 2


def test_channel_sum_and_torch_input(signed_map):
    channels = np.stack([signed_map, 2. * signed_map, -signed_map])
    expected = relevance_to_heatmap(channels.sum(0))
    np.testing.assert_array_equal(relevance_to_heatmap(channels), expected)
    np.testing.assert_array_equal(relevance_to_heatmap(torch.from_numpy(channels).float()), expected)
    # channels that cancel carry no net relevance
    cancelling = np.stack([signed_map, -signed_map])
    assert (relevance_to_heatmap(cancelling) == 255).all()
    assert relevance_to_heatmap(cancelling, reduce='abs', cmap='wred')[2, 2].tolist() == [255, 0, 0]


def test_level_raises_contrast(signed_map):
    # with level 2, half the maximum magnitude already saturates
    assert relevance_to_heatmap(signed_map, level=2.)[5, 5].tolist() == [0, 0, 255]


def test_non_symmetric_maps_min_and_max_to_the_ends():
    relevance = np.array([[1., 2.], [3., 5.]])
    heatmap = relevance_to_heatmap(relevance, symmetric=False)
    assert heatmap[0, 0].tolist() == [0, 0, 255]
    assert heatmap[1, 1].tolist() == [255, 0, 0]
    assert (relevance_to_heatmap(np.ones((2, 2)), symmetric=False) == 255).all()


def test_heatmap_rejects_bad_input():
    with pytest.raises(ValueError):
        relevance_to_heatmap(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match='NaN'):
        relevance_to_heatmap(np.array([[0., np.nan]]))
    with pytest.raises(ValueError):
        relevance_to_heatmap(np.zeros((2, 3, 3)), reduce='max')


def test_upsample_integer_factor():
    patches = np.arange(6, dtype=np.float32).reshape(2, 3)
    pixels = upsample(patches, (8, 12))
    assert pixels.shape == (8, 12) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, np.kron(patches, np.ones((4, 4), dtype=np.float32)))
    assert upsample(torch.from_numpy(patches), 6).shape == (6, 6)


def test_upsample_matches_torch_nearest_and_keeps_leading_axes():
    patches = torch.randn(2, 3, 5)
    expected = torch.nn.functional.interpolate(patches[None], size=(7, 11), mode='nearest')[0].numpy()
    np.testing.assert_array_equal(upsample(patches, (7, 11)), expected)


def test_to_uint8_image_undoes_normalisation():
    rng = np.random.RandomState(1)
    image = rng.randint(0, 256, size=(6, 5, 3)).astype(np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tensor = (torch.from_numpy(image).permute(2, 0, 1).double() / 255. - torch.tensor(mean)[:, None, None])
    tensor = tensor / torch.tensor(std)[:, None, None]
    np.testing.assert_array_equal(to_uint8_image(tensor.float(), mean=mean, std=std), image)
    np.testing.assert_array_equal(to_uint8_image(tensor[None], mean=mean, std=std), image)
    np.testing.assert_array_equal(to_uint8_image(image), image)


def test_to_uint8_image_grey():
    grey = torch.linspace(0., 1., 12).reshape(1, 3, 4)
    rgb = to_uint8_image(grey)
    assert rgb.shape == (3, 4, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_overlay_blends():
    image = np.full((4, 6, 3), 100, dtype=np.uint8)
    heatmap = np.zeros((4, 6, 3), dtype=np.uint8)
    heatmap[..., 0] = 255
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.), image)
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=1.), heatmap)
    blend = overlay(image, heatmap, alpha=0.5)
    assert blend.shape == (4, 6, 3) and blend.dtype == np.uint8
    assert blend[0, 0].tolist() == [178, 50, 50]
    grey = overlay(np.full((4, 6), 100, dtype=np.uint8), heatmap, alpha=0.25)
    assert grey[0, 0].tolist() == [139, 75, 75]


def test_overlay_float_tensor_and_errors():
    mean, std = 0.5, 0.25
    tensor = (torch.full((3, 4, 6), 0.2) - mean) / std
    white = np.full((4, 6, 3), 255, dtype=np.uint8)
    blend = overlay(tensor, white, alpha=0.5, mean=mean, std=std)
    assert blend[0, 0].tolist() == [153, 153, 153]
    with pytest.raises(ValueError, match='upsample'):
        overlay(tensor, np.zeros((2, 3, 3), dtype=np.uint8), mean=mean, std=std)
    with pytest.raises(TypeError):
        overlay(white, np.zeros((4, 6)))


def test_save_png_roundtrip(tmp_path, signed_map):
    heatmap = relevance_to_heatmap(signed_map)
    path = save_png(heatmap, tmp_path / 'sub' / 'heatmap.png')
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.mode == 'RGB'
        assert image.size == (16, 12)
        np.testing.assert_array_equal(np.asarray(image), heatmap)
    save_png(np.zeros((3, 5), dtype=np.uint8), tmp_path / 'grey.png')
    with Image.open(tmp_path / 'grey.png') as image:
        assert image.mode == 'RGB' and image.size == (5, 3)
    with pytest.raises(TypeError):
        save_png(signed_map, tmp_path / 'float.png')


def panel_pixels(fig, axes, array):
    '''Pixels of the saved figure array under one axes, from its position in figure coordinates.'''
    height, width = array.shape[:2]
    box = axes.get_position()
    left, top = round(box.x0 * width), round((1. - box.y1) * height)
    right, bottom = round(box.x1 * width), round((1. - box.y0) * height)
    return array[top:bottom, left:right]


def test_heatmap_grid_tiny_images_nearest(tmp_path, signed_map):
    rng = np.random.RandomState(2)
    digit = rng.randint(0, 256, size=(12, 16)).astype(np.uint8)
    rows = [[digit, signed_map, torch.from_numpy(-signed_map)], [digit, None, signed_map * 3.]]
    path = tmp_path / 'grid.png'
    fig = heatmap_grid(rows, ['Input', 'AttnLRP', 'Gradient x Input'], row_titles=['a', 'b'], path=path, scale=4)
    assert isinstance(fig, Figure)
    with Image.open(path) as image:
        assert image.mode == 'RGB'
        array = np.asarray(image)
    assert array.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    # 3 columns of 64 px plus titles; 2 rows of 48 px plus the column titles
    assert array.shape[1] > 3 * 64 and array.shape[0] > 2 * 48
    expected = {0: to_uint8_image(digit), 1: relevance_to_heatmap(signed_map), 2: relevance_to_heatmap(-signed_map)}
    for index, panel in expected.items():
        pixels = panel_pixels(fig, fig.axes[index], array)
        assert pixels.shape == (48, 64, 3)
        # every image pixel is a crisp 4x4 block; the outermost ring is covered by the thin frame
        blocks = np.kron(panel, np.ones((4, 4, 1), dtype=np.uint8))
        np.testing.assert_array_equal(pixels[1:-1, 1:-1], blocks[1:-1, 1:-1])


def test_heatmap_grid_scale_and_errors(signed_map):
    small = heatmap_grid([[signed_map, signed_map]], ['a', 'b'], scale=1)
    large = heatmap_grid([[signed_map, signed_map]], ['a', 'b'], scale=3)
    assert round((large.get_figwidth() - small.get_figwidth()) * large.dpi) == 2 * 16 * 2
    with pytest.raises(ValueError):
        heatmap_grid([[signed_map]], ['a', 'b'])
    with pytest.raises(ValueError):
        heatmap_grid([[signed_map, np.zeros((3, 3))]], ['a', 'b'])


def test_save_png_dpi_metadata(tmp_path):
    path = save_png(np.zeros((4, 5, 3), dtype=np.uint8), tmp_path / 'a.png', dpi=300)
    with Image.open(path) as image:
        assert image.size == (5, 4) and image.info['dpi'][0] == pytest.approx(300, abs=0.1)


def test_save_figure_formats_and_dpi(tmp_path):
    '''The suffix chooses the format; a PNG is rendered at the requested dpi (not the figure's) and records it.'''
    from zennit_attn.image import save_figure
    fig = Figure(figsize=(2., 1.), dpi=50)
    fig.add_axes([0.1, 0.1, 0.8, 0.8]).plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / 'f.png', dpi=200)
    with Image.open(tmp_path / 'f.png') as image:
        assert image.mode == 'RGB' and image.size == (400, 200)
        assert image.info['dpi'][0] == pytest.approx(200, abs=0.1)
    # the figure keeps its own dpi, and without dpi= it is rendered at it
    assert fig.dpi == 50
    save_figure(fig, tmp_path / 'own.png')
    with Image.open(tmp_path / 'own.png') as image:
        assert image.size == (100, 50)
    save_figure(fig, tmp_path / 'sub' / 'f.pdf', dpi=200)
    assert (tmp_path / 'sub' / 'f.pdf').read_bytes().startswith(b'%PDF-')
    save_figure(fig, tmp_path / 'f.svg')
    assert b'<svg' in (tmp_path / 'f.svg').read_bytes()[:2000]
