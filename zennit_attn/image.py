'''Render relevance maps as RGB images, overlays and figure grids.

Zennit's own :py:func:`zennit.image.imgify` returns palette ('P') images, which fail to save with Pillow 13 and
numpy 2.4. Everything here therefore builds plain ``uint8`` RGB arrays with Zennit's colour maps
(:py:data:`zennit.image.CMAPS`: 'bwr', 'coldnhot', 'france', 'seismic', 'coolio', 'coleus', 'gray', 'hot', ...) and
writes them as RGB PNGs.
'''
import os
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from zennit.image import get_cmap


def mpl():
    '''The matplotlib classes used for figures, imported on first use.

    Heatmaps, overlays and PNGs need only numpy and Pillow, so importing this module does not import matplotlib.
    Figures are built on the Agg canvas directly, never through pyplot, so no global backend is switched and no figure
    needs closing.

    Returns
    -------
    :py:obj:`types.SimpleNamespace`
        ``Figure``, ``FigureCanvasAgg``, ``FontProperties`` and ``Rectangle``.

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    '''
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.font_manager import FontProperties
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ImportError('Figures need matplotlib: pip install matplotlib.') from err
    return SimpleNamespace(Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, FontProperties=FontProperties,
                           Rectangle=Rectangle)


def to_numpy(obj):
    '''Convert a torch tensor (detached, on the CPU) or an array-like to a numpy array.

    Parameters
    ----------
    obj : :py:obj:`torch.Tensor` or array-like
        The object to convert.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        The data as a numpy array.
    '''
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).numpy()
    return np.asarray(obj)


def normalize_symmetric(values):
    '''Divide by the maximum absolute value, so that the result lies in [-1, 1] and 0 stays 0.

    Parameters
    ----------
    values : :py:obj:`numpy.ndarray`
        Signed relevance of any shape.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``values / max(|values|)`` as float64; an all-zero input stays all-zero (no division by zero, no NaN).
    '''
    values = np.asarray(values, dtype=np.float64)
    scale = np.abs(values).max(initial=0.)
    # an all-zero map carries no evidence either way: keep it at 0, which renders as the colour map's neutral centre
    return values / scale if scale > 0. else np.zeros_like(values)


def normalize_interval(values):
    '''Map the minimum to 0 and the maximum to 1 (Zennit's non-symmetric norm), rescaled to [-1, 1].

    Parameters
    ----------
    values : :py:obj:`numpy.ndarray`
        Relevance of any shape.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        The values affinely mapped so that the minimum becomes -1 and the maximum +1; a constant input becomes 0.
    '''
    values = np.asarray(values, dtype=np.float64)
    vmin, vmax = values.min(initial=np.inf), values.max(initial=-np.inf)
    if not vmax > vmin:
        return np.zeros_like(values)
    return (values - vmin) / (vmax - vmin) * 2. - 1.


def colorize(normalized, cmap='bwr', level=1.0):
    '''Map values in [-1, 1] to RGB with a Zennit colour map, exactly as Zennit's palette images would.

    Parameters
    ----------
    normalized : :py:obj:`numpy.ndarray`
        Values in [-1, 1] (values outside are clipped), of any shape; -1 is the colour map's low end, 0 its centre and
        +1 its high end.
    cmap : str or :py:obj:`zennit.cmap.ColorMap`
        Name of a built-in Zennit colour map (see :py:data:`zennit.image.CMAPS`), colour-map source code, or a
        ColorMap.
    level : float
        Contrast, as in Zennit: values are multiplied by ``level`` before clipping to [-1, 1], so ``level > 1``
        saturates earlier and ``level < 1`` uses less of the colour range.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``uint8`` array with the shape of ``normalized`` plus a trailing axis of 3 (RGB).
    '''
    # Zennit's 256-entry palette already applies `level`; indexing it reproduces zennit.image.imgify colour for colour
    palette = get_cmap(cmap).palette(level=level)
    unit = (np.clip(np.asarray(normalized, dtype=np.float64), -1., 1.) + 1.) / 2.
    # round half up, so that 0 lands on index 128, the centre node of Zennit's diverging maps (pure white for 'bwr')
    index = np.floor(unit * 255. + 0.5).astype(np.intp)
    return palette[index]


def _reduce_channels(relevance, reduce):
    '''Reduce a (C, H, W) relevance to (H, W); pass a (H, W) relevance through.'''
    if relevance.ndim == 2:
        return relevance
    if relevance.ndim != 3:
        raise ValueError(f'Relevance must have shape (C, H, W) or (H, W), got {relevance.shape}.')
    if reduce == 'sum':
        # the relevance of a pixel is the total relevance of its channels (LRP conserves sums, not means)
        return relevance.sum(axis=0)
    if reduce == 'abs':
        return np.abs(relevance).sum(axis=0)
    raise ValueError(f"Unknown reduce={reduce!r}, expected 'sum' or 'abs'.")


def relevance_to_heatmap(relevance, cmap='bwr', level=1.0, symmetric=True, reduce='sum'):
    '''Render a relevance map as an RGB heatmap.

    Parameters
    ----------
    relevance : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        Relevance of shape (C, H, W) (channel-first, as Zennit returns it for one sample) or (H, W).
    cmap : str or :py:obj:`zennit.cmap.ColorMap`
        Zennit colour map, e.g. 'bwr' (default: blue negative, white zero, red positive), 'coldnhot', 'france',
        'seismic', 'coolio', 'coleus'.
    level : float
        Contrast, as Zennit's ``level``: the normalised relevance is multiplied by it before clipping to [-1, 1].
    symmetric : bool
        If True (default), divide by the maximum absolute relevance, so 0 maps to the colour map's centre and the
        signs keep their colours; the image is invariant to scaling the relevance by a positive constant. If False,
        map the minimum to the low end and the maximum to the high end (Zennit's ``symmetric=False``).
    reduce : str
        Channel reduction for (C, H, W) input: 'sum' (default) sums the signed relevance over channels, which is the
        pixel's total relevance; 'abs' sums absolute values (magnitude only, use with a sequential colour map).

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``uint8`` RGB array of shape (H, W, 3). An all-zero map is uniformly the colour map's neutral centre.

    Raises
    ------
    ValueError
        If the shape is not (C, H, W) or (H, W), or the relevance contains NaN or infinity.
    '''
    values = _reduce_channels(to_numpy(relevance).astype(np.float64), reduce)
    if not np.isfinite(values).all():
        # a broken attribution should be loud, not rendered as a plausible-looking picture
        raise ValueError('Relevance contains NaN or infinite values.')
    normalized = normalize_symmetric(values) if symmetric else normalize_interval(values)
    return colorize(normalized, cmap=cmap, level=level)


def upsample(relevance_map, size):
    '''Upsample a patch-level map (e.g. one value per ViT patch) to image size by nearest-neighbour repetition.

    Every output pixel takes the value of the patch that covers it (torch's ``mode='nearest'`` indexing), so patch
    borders stay visible and no value is invented by interpolation. This is for display: the sum grows by the
    number of pixels per patch; divide by it if per-pixel relevance must sum to the patch relevance.

    Parameters
    ----------
    relevance_map : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        Map of shape (..., h, w); leading axes (e.g. channels) are kept.
    size : int or tuple of int
        Output size (H, W), or a single int for a square output.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        The map of shape (..., H, W), same dtype as the input.
    '''
    values = to_numpy(relevance_map)
    if values.ndim < 2:
        raise ValueError(f'Map must have at least 2 axes (h, w), got shape {values.shape}.')
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    in_height, in_width = values.shape[-2:]
    # floor(out_index * in / out) is the source index of torch's 'nearest' mode, exact for integer factors
    rows = np.arange(height) * in_height // height
    cols = np.arange(width) * in_width // width
    return values[..., rows[:, None], cols[None, :]]


def _channels_last(array):
    '''Move a channel axis of size 1 or 3 to the end.

    An ambiguous shape such as (3, H, 3) is read as channel-first for float data (torch's convention for tensors)
    and as channel-last for ``uint8`` data (the convention of image arrays).
    '''
    first, last = array.shape[0] in (1, 3), array.shape[-1] in (1, 3)
    if first and (not last or array.dtype != np.uint8):
        return array.transpose(1, 2, 0)
    return array


def to_uint8_image(tensor, mean=None, std=None):
    '''Convert an image tensor or array to a ``uint8`` RGB array, undoing input normalisation.

    Parameters
    ----------
    tensor : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        Float image of shape (C, H, W) with C in (1, 3), (H, W, C), or (H, W), with values in [0, 1] after undoing
        the normalisation; a leading batch axis of size 1 is dropped. ``uint8`` input is taken as it is.
    mean : sequence of float or float, optional
        Per-channel mean that was subtracted when normalising (e.g. ImageNet's (0.485, 0.456, 0.406)).
    std : sequence of float or float, optional
        Per-channel standard deviation that was divided by when normalising.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``uint8`` RGB array of shape (H, W, 3); grey images are repeated over the three channels.
    '''
    array = to_numpy(tensor)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (2, 3):
        raise ValueError(f'Image must have shape (C, H, W), (H, W, C) or (H, W), got {array.shape}.')
    is_uint8 = array.dtype == np.uint8
    array = _channels_last(array if array.ndim == 3 else array[..., None])
    if array.shape[-1] not in (1, 3):
        raise ValueError(f'Image must have 1 or 3 channels, got shape {array.shape}.')
    if not is_uint8:
        array = array.astype(np.float64)
        # normalisation is x_norm = (x - mean) / std per channel, so undo it in reverse order
        if std is not None:
            array = array * np.asarray(std, dtype=np.float64)
        if mean is not None:
            array = array + np.asarray(mean, dtype=np.float64)
        array = np.floor(np.clip(array, 0., 1.) * 255. + 0.5).astype(np.uint8)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else np.ascontiguousarray(array)


def overlay(image, heatmap, alpha=0.5, mean=None, std=None):
    '''Blend a heatmap over an image: ``(1 - alpha) * image + alpha * heatmap``.

    Parameters
    ----------
    image : :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        ``uint8`` image of shape (H, W, 3) or grey (H, W), or a float tensor (C, H, W) normalised with ``mean`` and
        ``std`` (see :py:func:`to_uint8_image`).
    heatmap : :py:obj:`numpy.ndarray`
        ``uint8`` RGB heatmap of shape (H, W, 3), e.g. from :py:func:`relevance_to_heatmap` (use :py:func:`upsample`
        first for patch-level relevance).
    alpha : float
        Weight of the heatmap, in [0, 1]; 0 returns the image, 1 the heatmap.
    mean : sequence of float or float, optional
        Normalisation mean of a float ``image``.
    std : sequence of float or float, optional
        Normalisation standard deviation of a float ``image``.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``uint8`` RGB array of shape (H, W, 3).
    '''
    if not 0. <= alpha <= 1.:
        raise ValueError(f'alpha must be in [0, 1], got {alpha}.')
    base = to_uint8_image(image, mean=mean, std=std)
    heatmap = np.asarray(heatmap)
    if heatmap.dtype != np.uint8 or heatmap.ndim != 3 or heatmap.shape[-1] != 3:
        raise TypeError('heatmap must be a uint8 (H, W, 3) array; render relevance with relevance_to_heatmap first.')
    if heatmap.shape != base.shape:
        raise ValueError(
            f'Image {base.shape[:2]} and heatmap {heatmap.shape[:2]} differ in size; upsample the relevance first.'
        )
    blend = (1. - alpha) * base.astype(np.float64) + alpha * heatmap.astype(np.float64)
    return np.floor(blend + 0.5).astype(np.uint8)


def save_png(array, path, dpi=None):
    '''Write a ``uint8`` RGB (H, W, 3) or grey (H, W) array as an RGB PNG.

    Parameters
    ----------
    array : :py:obj:`numpy.ndarray`
        ``uint8`` image; grey images are stored as RGB.
    path : str or :py:obj:`os.PathLike`
        Output file; missing parent directories are created.
    dpi : float, optional
        Resolution stored in the PNG's metadata (pHYs), if given.

    Returns
    -------
    str or :py:obj:`os.PathLike`
        ``path``.
    '''
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f'save_png expects uint8, got {array.dtype}; use to_uint8_image or relevance_to_heatmap.')
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f'save_png expects shape (H, W, 3) or (H, W), got {array.shape}.')
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    # build an RGB image directly: palette images from zennit.image.imgify fail to save on Pillow 13 + numpy 2.4
    options = {} if dpi is None else {'dpi': (dpi, dpi)}
    Image.fromarray(np.ascontiguousarray(array)).convert('RGB').save(path, format='PNG', **options)
    return path


# layout constants of heatmap_grid, in output pixels at GRID_DPI
GRID_DPI = 100
GRID_FONT_SIZE = 10
GRID_PAD = 6


def _grid_panel(entry, cmap, level):
    '''Turn one grid entry into an RGB array: uint8 arrays are images, anything else is relevance.'''
    if entry is None:
        return None
    array = to_numpy(entry)
    if array.dtype == np.uint8:
        return to_uint8_image(array)
    return relevance_to_heatmap(array, cmap=cmap, level=level)


def _text_size(text, font):
    '''Width and height in pixels of (possibly multi-line) text, as matplotlib's Agg backend draws it at GRID_DPI.'''
    if not text:
        return 0, 0
    # measure a real Text artist: its line spacing and font metrics are exactly those of the final figure
    plot = mpl()
    scratch = plot.Figure(dpi=GRID_DPI)
    canvas = plot.FigureCanvasAgg(scratch)
    extent = scratch.text(0., 0., text, fontproperties=font).get_window_extent(renderer=canvas.get_renderer())
    return int(np.ceil(extent.width)), int(np.ceil(extent.height))


def _grid_shape(panels):
    '''Common (H, W) of all non-empty panels.'''
    shapes = {panel.shape[:2] for row in panels for panel in row if panel is not None}
    if len(shapes) != 1:
        raise ValueError(f'All grid entries must share one size (H, W), got {sorted(shapes)}.')
    return shapes.pop()


def heatmap_grid(rows, column_titles, row_titles=None, path=None, scale=4, cmap='bwr', level=1.0):
    '''Compose images and heatmaps into a grid with one column per method, titled, e.g. for a paper figure.

    The layout is computed in pixels so that each image pixel becomes a crisp ``scale`` x ``scale`` block
    (nearest-neighbour, no smoothing): ``scale=4`` (default) suits 28x28 MNIST digits; use ``scale=1`` for
    224x224 images.

    Parameters
    ----------
    rows : sequence of sequences
        ``rows[i][j]`` is the panel in row i, column j: a ``uint8`` array (an image or a rendered heatmap, shown
        as it is), a float relevance map (C, H, W) or (H, W) rendered with :py:func:`relevance_to_heatmap`, or None
        for an empty panel. All panels share one size (H, W).
    column_titles : sequence of str
        One title per column, e.g. the method names; long titles wrap onto several lines.
    row_titles : sequence of str, optional
        One title per row, shown to the left of the row.
    path : str or :py:obj:`os.PathLike`, optional
        If given, the figure is saved there as PNG.
    scale : int
        Output pixels per image pixel.
    cmap : str or :py:obj:`zennit.cmap.ColorMap`
        Zennit colour map for relevance panels.
    level : float
        Contrast for relevance panels, as in :py:func:`relevance_to_heatmap`.

    Returns
    -------
    :py:obj:`matplotlib.figure.Figure`
        The figure (Agg canvas, not registered with pyplot, so it needs no closing).
    '''
    panels = [[_grid_panel(entry, cmap, level) for entry in row] for row in rows]
    n_cols = len(column_titles)
    if not panels or any(len(row) != n_cols for row in panels):
        raise ValueError(f'Every row needs one entry per column title ({n_cols}).')
    if row_titles is not None and len(row_titles) != len(panels):
        raise ValueError(f'Got {len(row_titles)} row titles for {len(panels)} rows.')
    height, width = _grid_shape(panels)
    panel_w, panel_h = width * scale, height * scale

    font = mpl().FontProperties(size=GRID_FONT_SIZE)
    char_w = max(_text_size('n', font)[0], 1)
    # wrap titles to the panel width, so names of neighbouring columns never run into each other
    titles = [_wrap(str(title), max(int(panel_w // char_w), 4)) for title in column_titles]
    # integer pixel sizes keep every panel on the pixel grid, so nearest-neighbour blocks stay exactly scale wide
    title_h = max(_text_size(title, font)[1] for title in titles) + GRID_PAD
    labels = [str(title) for title in row_titles] if row_titles is not None else None
    label_w = 0
    if labels:
        label_w = max(_text_size(label, font)[0] for label in labels) + 2 * GRID_PAD

    fig_w = label_w + n_cols * panel_w + (n_cols + 1) * GRID_PAD
    fig_h = title_h + len(panels) * panel_h + (len(panels) + 1) * GRID_PAD
    plot = mpl()
    fig = plot.Figure(figsize=(fig_w / GRID_DPI, fig_h / GRID_DPI), dpi=GRID_DPI, facecolor='white')
    plot.FigureCanvasAgg(fig)

    def box(left, top, w, h):
        # matplotlib's figure coordinates run bottom-up in fractions; the layout above is top-down in pixels
        return [left / fig_w, 1. - (top + h) / fig_h, w / fig_w, h / fig_h]

    for j, title in enumerate(titles):
        left = label_w + GRID_PAD + j * (panel_w + GRID_PAD) + panel_w / 2
        fig.text(left / fig_w, 1. - (title_h - GRID_PAD / 2) / fig_h, title, ha='center', va='bottom',
                 fontproperties=font)
    for i, row in enumerate(panels):
        top = title_h + GRID_PAD + i * (panel_h + GRID_PAD)
        if labels:
            fig.text((label_w - GRID_PAD) / fig_w, 1. - (top + panel_h / 2) / fig_h, labels[i], ha='right',
                     va='center', fontproperties=font)
        for j, panel in enumerate(row):
            axes = fig.add_axes(box(label_w + GRID_PAD + j * (panel_w + GRID_PAD), top, panel_w, panel_h))
            axes.set_xticks([])
            axes.set_yticks([])
            # a thin frame, because a heatmap's white (zero) background would otherwise merge with the page
            for spine in axes.spines.values():
                spine.set_edgecolor('0.75')
                spine.set_linewidth(0.5)
            if panel is not None:
                axes.imshow(panel, interpolation='nearest', aspect='auto')
    if path is not None:
        save_figure(fig, path)
    return fig


def save_figure(fig, path, dpi=None):
    '''Write a matplotlib figure as PNG (RGB, with dpi metadata), PDF or SVG, chosen by the suffix of ``path``.

    Parameters
    ----------
    fig : :py:obj:`matplotlib.figure.Figure`
        The figure.
    path : str or :py:obj:`os.PathLike`
        Output file ending in .png (also the default for any other suffix), .pdf or .svg; missing parent directories
        are created.
    dpi : int, optional
        Resolution (default: the figure's own): pixels per inch of a PNG, and of the images embedded in a PDF or SVG.

    Returns
    -------
    str or :py:obj:`os.PathLike`
        ``path``.
    '''
    agg = mpl().FigureCanvasAgg
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    dpi = fig.dpi if dpi is None else dpi
    if suffix in ('.pdf', '.svg'):
        parent = os.path.dirname(os.fspath(path))
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, format=suffix[1:], dpi=dpi, facecolor=fig.get_facecolor())
        return path
    # a figure on another backend's canvas (e.g. made with pyplot) is moved to an Agg canvas to be rendered
    canvas = fig.canvas if isinstance(fig.canvas, agg) else agg(fig)
    own_dpi = fig.dpi
    fig.set_dpi(dpi)
    try:
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        fig.set_dpi(own_dpi)
    # savefig would write RGBA; an RGB PNG with the dpi as metadata prints at the intended size
    return save_png(pixels, path, dpi=dpi)


def _wrap(text, width):
    '''Wrap text at spaces to lines of at most ``width`` characters (longer single words stay whole).'''
    lines, line = [], ''
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f'{line} {word}' if line else word
    return '\n'.join(lines + [line])
