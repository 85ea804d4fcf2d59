'''Figures of relevance maps as a paper needs them: stated normalisation, colour bars with units, sign modes,
sequential colour maps for non-negative maps, overlays that keep the image's contrast, patch-level maps, and the raw
relevance saved next to every figure.

A relevance map is shown as ``R / s``, clipped to [-1, 1] ([0, 1] for non-negative maps), where the scale ``s`` (the
value drawn as 1.0) comes from the normalisation (see :py:data:`NORMALIZATIONS`):

* ``'panel'``: ``s = max|R|`` of each panel; panels are comparable in shape only.
* ``'column'``: ``s = max|R|`` over a column (one method on all images); the colour bars are in raw relevance.
* ``'shared'``: ``s = max|R|`` over the whole grid; one colour bar in raw relevance. Methods with different units
  (rollout sums to 1, LRP to about the logit) are then drawn on one scale, which is only fair among comparable maps.
* ``'percentile'``: ``s`` = the given percentile (default 99.5) of ``|R|`` of each panel; larger values are clipped,
  so that a few extreme pixels do not wash out the rest.

Figures are drawn on matplotlib's Agg canvas (never through pyplot) and written as PNG (with dpi metadata), PDF or
SVG by :py:func:`zennit_attn.image.save_figure`.
'''
import json
import os

import numpy as np
import torch

from .image import _text_size, _wrap, mpl, save_figure, to_numpy, to_uint8_image, upsample

#: normalisation modes: what the colour bar's 1.0 means (see the module docstring)
NORMALIZATIONS = ('panel', 'column', 'shared', 'percentile')
#: sign modes: 'signed' keeps ``R``, 'positive' keeps ``max(R, 0)``, 'absolute' shows ``|R|``
SIGNS = ('signed', 'positive', 'absolute')
#: output formats of :py:func:`zennit_attn.image.save_figure`
FORMATS = ('png', 'pdf', 'svg')
#: default colour map of signed relevance: Zennit's diverging 'bwr' (blue < 0 < red, white at 0)
DIVERGING = 'bwr'
#: default colour map of non-negative maps (e.g. attention rollout, or ``sign='absolute'``): matplotlib's 'inferno'
SEQUENTIAL = 'inferno'
#: default percentile of ``|R|`` drawn as 1.0 with ``normalize='percentile'``
DEFAULT_PERCENTILE = 99.5
FONT_SIZE = 8


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f'Unknown {name}={value!r}; choose one of {", ".join(choices)}.')


def pixel_relevance(relevance):
    '''The relevance of every pixel: a (C, H, W) map summed over channels (LRP conserves sums), or a (H, W) map.

    Parameters
    ----------
    relevance : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        Relevance of shape (C, H, W) or (H, W).

    Returns
    -------
    :py:obj:`numpy.ndarray`
        float64 array of shape (H, W).

    Raises
    ------
    ValueError
        If the shape is neither, or the relevance contains NaN or infinity.
    '''
    values = to_numpy(relevance).astype(np.float64)
    if values.ndim == 3:
        values = values.sum(axis=0)
    if values.ndim != 2:
        raise ValueError(f'Relevance must have shape (C, H, W) or (H, W), got {values.shape}.')
    if not np.isfinite(values).all():
        # a broken attribution should be loud, not drawn as a plausible-looking picture
        raise ValueError('Relevance contains NaN or infinite values.')
    return values


def patch_relevance(relevance, patch_size):
    '''Sum the relevance over channels and over each ``patch_size`` x ``patch_size`` patch: one value per ViT token.

    Parameters
    ----------
    relevance : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        Relevance of shape (C, H, W) or (H, W).
    patch_size : int
        The ViT's patch size p; H and W must be multiples of it.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        float64 array of shape (H / p, W / p); its sum is the sum of ``relevance``.
    '''
    values = pixel_relevance(relevance)
    patch_size = int(patch_size)
    height, width = values.shape
    if patch_size < 1 or height % patch_size or width % patch_size:
        raise ValueError(f'A {height}x{width} map cannot be split into {patch_size}x{patch_size} patches; pass the '
                         'patch size of the model that made it.')
    return values.reshape(height // patch_size, patch_size, width // patch_size, patch_size).sum(axis=(1, 3))


def model_patch_size(model):
    '''The patch size of a vision transformer: torchvision's ``patch_size``, timm's ``patch_embed``, a Hugging Face
    ``config.patch_size``, or else the first square convolution whose stride equals its kernel (a patch embedding).

    Raises
    ------
    ValueError
        If the model has no patch embedding (e.g. a CNN), for which patch maps are undefined.
    '''
    candidates = [getattr(model, 'patch_size', None), getattr(getattr(model, 'config', None), 'patch_size', None),
                  getattr(getattr(model, 'patch_embed', None), 'patch_size', None)]
    for candidate in candidates:
        if candidate is not None:
            size = tuple(candidate) if isinstance(candidate, (tuple, list)) else (candidate, candidate)
            if size[0] == size[1]:
                return int(size[0])
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == module.stride and \
                module.kernel_size[0] == module.kernel_size[1] and module.kernel_size[0] > 1:
            return int(module.kernel_size[0])
    raise ValueError(f'{type(model).__name__} has no patch embedding (a convolution with stride = kernel size), so '
                     'patch-level maps are undefined for it; drop --patches.')


def apply_sign(values, sign='signed'):
    '''Select what is shown of signed relevance: 'signed' (``R``), 'positive' (``max(R, 0)``) or 'absolute'
    (``|R|``).'''
    _check_choice(sign, SIGNS, 'sign')
    values = np.asarray(values, dtype=np.float64)
    if sign == 'positive':
        return np.maximum(values, 0.)
    if sign == 'absolute':
        return np.abs(values)
    return values


def panel_scale(values, normalize='panel', percentile=DEFAULT_PERCENTILE):
    '''The own scale of one map: ``max|R|``, or for 'percentile' the ``percentile`` of ``|R|``.

    A map whose percentile is 0 (e.g. a sparse map, zero at more than 99.5 % of its pixels) falls back to ``max|R|``,
    so that its few non-zero values stay visible instead of dividing by zero. An all-zero map has scale 0.
    '''
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    largest = magnitude.max(initial=0.)
    if normalize == 'percentile':
        if not 0. < percentile <= 100.:
            raise ValueError(f'percentile must be in (0, 100], got {percentile}.')
        clip = float(np.percentile(magnitude, percentile)) if magnitude.size else 0.
        return clip if clip > 0. else largest
    return largest


def display_scales(maps, normalize='panel', percentile=DEFAULT_PERCENTILE):
    '''The scale ``s`` of every panel of a grid: the relevance drawn as 1.0.

    Parameters
    ----------
    maps : sequence of sequences
        ``maps[i][j]`` a 2-D float array (already sign-selected) or None.
    normalize : str
        One of :py:data:`NORMALIZATIONS`.
    percentile : float
        Percentile of ``|R|`` for ``normalize='percentile'``.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        float64 array (rows, columns); NaN where a panel is None.
    '''
    _check_choice(normalize, NORMALIZATIONS, 'normalize')
    n_rows, n_cols = len(maps), max((len(row) for row in maps), default=0)
    own = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(maps):
        for j, values in enumerate(row):
            if values is not None:
                own[i, j] = panel_scale(values, normalize, percentile)
    if normalize == 'column':
        column = np.nanmax(np.where(np.isnan(own), -np.inf, own), axis=0) if n_rows else np.zeros(n_cols)
        return np.where(np.isnan(own), np.nan, column[None, :])
    if normalize == 'shared':
        shared = np.nanmax(own) if np.isfinite(own).any() else 0.
        return np.where(np.isnan(own), np.nan, shared)
    return own


def normalize_map(values, scale):
    '''``values / scale`` clipped to [-1, 1]; a map with scale 0 stays 0 (no NaN).'''
    values = np.asarray(values, dtype=np.float64)
    if not scale > 0.:
        return np.zeros_like(values)
    return np.clip(values / scale, -1., 1.)


def colormap(name):
    '''A matplotlib colour map by name: Zennit's maps (:py:data:`zennit.image.CMAPS`, drawn with Zennit's palette, so
    colours match :py:func:`zennit_attn.image.relevance_to_heatmap`) or any matplotlib map (e.g. 'inferno', 'hot').
    '''
    from zennit.image import CMAPS, get_cmap
    if name in CMAPS:
        from matplotlib.colors import ListedColormap
        return ListedColormap(get_cmap(name).palette() / 255., name=name)
    from matplotlib import colormaps
    if name not in colormaps:
        raise ValueError(f'Unknown colour map {name!r}; use a Zennit map ({", ".join(CMAPS)}) or a matplotlib map.')
    return colormaps[name]


def colorize_map(normalized, cmap, sequential):
    '''RGB ``uint8`` of a normalised map: a diverging map spans [-1, 1], a sequential one [0, 1].'''
    unit = np.clip(normalized, 0., 1.) if sequential else (np.clip(normalized, -1., 1.) + 1.) / 2.
    return np.floor(colormap(cmap)(unit)[..., :3] * 255. + 0.5).astype(np.uint8)


def luminance(image):
    '''Grey-scale luminance (ITU-R BT.601) of a ``uint8`` RGB image, as a ``uint8`` RGB image.'''
    rgb = to_uint8_image(image).astype(np.float64)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    return np.repeat(np.floor(grey + 0.5).astype(np.uint8)[..., None], 3, axis=-1)


def overlay_relevance(image, relevance, scale=None, sign='signed', cmap=None, grey=True, max_alpha=1.,
                      sequential=None):
    '''Colour an image by relevance, keeping the image's contrast where relevance is small.

    Every pixel is ``(1 - a) * base + a * colour`` with opacity ``a = max_alpha * |R| / s`` (clipped to 1): pixels
    without relevance show the image unchanged (black stays black, white stays white), strongly relevant pixels show
    the colour map. ``base`` is the image's grey-scale luminance (``grey=True``), so the colours of the map are not
    confused with those of the image.

    Parameters
    ----------
    image : :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        ``uint8`` image (H, W, 3) or (H, W) (see :py:func:`zennit_attn.image.to_uint8_image`).
    relevance : :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        Relevance (C, H, W) or (H, W); a coarser (h, w) map (e.g. per patch) is upsampled by repetition.
    scale : float, optional
        The relevance drawn fully opaque (default: ``max|R|`` of the map after ``sign``).
    sign : str
        One of :py:data:`SIGNS`.
    cmap : str, optional
        Colour map (default: :py:data:`DIVERGING` for signed maps with negative values, else :py:data:`SEQUENTIAL`).
    grey : bool
        Use the image's luminance as the base (default), else the image's own colours.
    max_alpha : float
        Opacity of the colour at ``|R| = s``, in [0, 1].
    sequential : bool, optional
        Whether ``cmap`` spans [0, 1] (sequential) rather than [-1, 1] (diverging); default: whether this map is
        non-negative. Pass it with a ``cmap`` chosen for several maps (a grid column), where one non-negative map must
        still be drawn on the diverging range.

    Returns
    -------
    :py:obj:`numpy.ndarray`
        ``uint8`` RGB array (H, W, 3).
    '''
    if not 0. <= max_alpha <= 1.:
        raise ValueError(f'max_alpha must be in [0, 1], got {max_alpha}.')
    base = luminance(image) if grey else to_uint8_image(image)
    values = apply_sign(pixel_relevance(relevance), sign)
    if values.shape != base.shape[:2]:
        if base.shape[0] % values.shape[0] or base.shape[1] % values.shape[1]:
            raise ValueError(f'Relevance {values.shape} does not tile the image {base.shape[:2]}.')
        values = upsample(values, base.shape[:2])
    if sequential is None:
        sequential = bool((values >= 0.).all())
    cmap = cmap or (SEQUENTIAL if sequential else DIVERGING)
    normalized = normalize_map(values, panel_scale(values) if scale is None else scale)
    colour = colorize_map(normalized, cmap, sequential).astype(np.float64)
    alpha = (max_alpha * np.abs(normalized))[..., None]
    blend = (1. - alpha) * base.astype(np.float64) + alpha * colour
    return np.floor(blend + 0.5).astype(np.uint8)


def scale_label(normalize, sign='signed', percentile=DEFAULT_PERCENTILE):
    '''The colour bar's label: what is drawn and what 1.0 means.'''
    quantity = {'signed': 'relevance R', 'positive': 'positive relevance max(R, 0)', 'absolute': '|R|'}[sign]
    if normalize == 'panel':
        return f'{quantity} / max|R| of each panel'
    if normalize == 'percentile':
        return f'{quantity} / P{percentile:g}(|R|) of each panel, clipped'
    if normalize == 'column':
        return f'{quantity} (raw; one scale per column)'
    return f'{quantity} (raw; one scale for all panels)'


def _is_image(entry):
    return entry is not None and to_numpy(entry).dtype == np.uint8


def relevance_grid(rows, column_titles, row_titles=None, title=None, normalize='panel', sign='signed',
                   percentile=DEFAULT_PERCENTILE, patch_size=None, overlay=False, diverging=DIVERGING,
                   sequential=SEQUENTIAL, panel_inches=1.1, dpi=150, path=None):
    '''A grid of images and relevance maps (rows: images, columns: methods) with titles and colour bars.

    A column is drawn with the ``sequential`` colour map (range [0, 1]) when ``sign`` is not 'signed' or all its
    maps are non-negative (e.g. attention rollout), else with the ``diverging`` map (range [-1, 1], 0 in the centre).

    Parameters
    ----------
    rows : sequence of sequences
        ``rows[i][j]``: a ``uint8`` image (H, W, 3) or (H, W) shown as it is, a float relevance (C, H, W) or (H, W),
        or None (empty). Maps of one grid may differ in size (e.g. patch maps next to pixel maps).
    column_titles : sequence of str
        One title per column (e.g. method names).
    row_titles : sequence of str, optional
        One title per row (e.g. the explained class).
    title : str, optional
        Figure title.
    normalize : str
        One of :py:data:`NORMALIZATIONS`.
    sign : str
        One of :py:data:`SIGNS`.
    percentile : float
        Percentile of ``|R|`` for ``normalize='percentile'``.
    patch_size : int, optional
        If given, every relevance map is summed over ``patch_size`` x ``patch_size`` patches (one value per ViT token)
        and drawn as blocks.
    overlay : bool
        If True, draw every relevance map over the row's first image with :py:func:`overlay_relevance` (opacity
        proportional to ``|R|``) instead of as a heatmap.
    diverging, sequential : str
        Colour maps for signed and for non-negative columns (see :py:func:`colormap`).
    panel_inches : float
        Width of one panel in inches.
    dpi : int
        Resolution of the figure (and of the PNG written to ``path``).
    path : str or :py:obj:`os.PathLike`, optional
        If given, the figure is saved there (format from the suffix: .png, .pdf or .svg).

    Returns
    -------
    fig : :py:obj:`matplotlib.figure.Figure`
        The figure (Agg canvas, needs no closing).
    info : dict
        ``scales`` (rows x columns list, the relevance drawn as 1.0, None for images), ``cmaps`` (per column, None
        for image columns), ``sequential`` (per column, whether its map spans [0, 1]), ``label`` (the colour bar's
        label).
    '''
    _check_choice(normalize, NORMALIZATIONS, 'normalize')
    _check_choice(sign, SIGNS, 'sign')
    n_cols = len(column_titles)
    if not rows or any(len(row) != n_cols for row in rows):
        raise ValueError(f'Every row needs one entry per column title ({n_cols}).')
    if row_titles is not None and len(row_titles) != len(rows):
        raise ValueError(f'Got {len(row_titles)} row titles for {len(rows)} rows.')
    if overlay and not all(_is_image(row[0]) for row in rows):
        raise ValueError('overlay=True needs a uint8 image as the first entry of every row.')

    def prepare(entry):
        if entry is None or _is_image(entry):
            return None
        values = pixel_relevance(entry) if patch_size is None else patch_relevance(entry, patch_size)
        return apply_sign(values, sign)

    maps = [[prepare(entry) for entry in row] for row in rows]
    scales = display_scales(maps, normalize, percentile)
    relevance_columns = [j for j in range(n_cols) if any(row[j] is not None for row in maps)]
    cmaps = [None] * n_cols
    for j in relevance_columns:
        non_negative = all((row[j] >= 0.).all() for row in maps if row[j] is not None)
        cmaps[j] = sequential if sign != 'signed' or non_negative else diverging
    raw = normalize in ('column', 'shared')

    plot = mpl()
    font = plot.FontProperties(size=FONT_SIZE)
    small = plot.FontProperties(size=FONT_SIZE - 2)
    char_in = max(_text_size('n', font)[0], 1) / 100.
    titles = [_wrap(str(text), max(int(panel_inches / char_in), 4)) for text in column_titles]
    # layout in inches, top-down; _text_size measures in pixels at 100 dpi
    pad, bar_h, bar_w = 0.08, 0.09, 0.1
    title_h = max(_text_size(text, font)[1] for text in titles) / 100. + pad
    labels = [str(text) for text in row_titles] if row_titles is not None else None
    label_w = max(_text_size(text, font)[0] for text in labels) / 100. + 2 * pad if labels else 0.
    # the per-panel scale is printed under each panel when it differs between panels
    note_h = _text_size('0', small)[1] / 100. + 0.02 if not raw else 0.
    panel_h = panel_inches * max(_panel_aspect(rows, maps), 0.2)
    row_h = panel_h + note_h + pad
    legends = _legends(cmaps, scales, normalize, raw)
    label = scale_label(normalize, sign, percentile) + ('; opacity ∝ |R|' if overlay else '')
    grid_w = label_w + n_cols * (panel_inches + pad) + pad
    bar_height = max(len(rows) * row_h - pad, 0.6)
    if normalize == 'column':
        # one horizontal bar under each column, the label once below them
        label = _wrap(label, max(int(grid_w / char_in), 10))
        bottom_h = bar_h + 0.3 + _text_size(label, font)[1] / 100.
        right_w = pad
    else:
        # vertical bars side by side right of the grid, the (shared) label on the last one, wrapped to its height
        label = _wrap(label, max(int(bar_height / char_in), 10))
        bottom_h = 0.
        bar_step = bar_w + 0.42
        right_w = bar_step * len(legends) + _text_size(label, font)[1] / 100. if legends else pad
    fig_w = grid_w + right_w
    title = _wrap(str(title), max(int(fig_w / char_in), 10)) if title else None
    fig_title_h = _text_size(title, plot.FontProperties(size=FONT_SIZE + 1))[1] / 100. + pad if title else 0.
    fig_h = fig_title_h + title_h + len(rows) * row_h + pad + bottom_h
    fig = plot.Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor='white')
    plot.FigureCanvasAgg(fig)

    def box(left, top, width, height):
        # matplotlib's figure coordinates run bottom-up in fractions; the layout above is top-down in inches
        return [left / fig_w, 1. - (top + height) / fig_h, width / fig_w, height / fig_h]

    if title:
        fig.text(0.5, 1. - pad / 2 / fig_h, title, ha='center', va='top', fontsize=FONT_SIZE + 1)
    for j, text in enumerate(titles):
        center = label_w + pad + j * (panel_inches + pad) + panel_inches / 2
        fig.text(center / fig_w, 1. - (fig_title_h + title_h - pad / 2) / fig_h, text, ha='center', va='bottom',
                 fontproperties=font)
    for i, row in enumerate(rows):
        top = fig_title_h + title_h + i * row_h
        if labels:
            fig.text((label_w - pad) / fig_w, 1. - (top + panel_h / 2) / fig_h, labels[i], ha='right', va='center',
                     fontproperties=font)
        for j, entry in enumerate(row):
            left = label_w + pad + j * (panel_inches + pad)
            axes = fig.add_axes(box(left, top, panel_inches, panel_h))
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                # a thin frame, so that a heatmap's white (zero) background does not merge with the page
                spine.set_edgecolor('0.75')
                spine.set_linewidth(0.5)
            if entry is None:
                continue
            if maps[i][j] is None:
                axes.imshow(to_uint8_image(entry), interpolation='nearest', aspect='auto')
                continue
            normalized = normalize_map(maps[i][j], scales[i, j])
            is_sequential = cmaps[j] == sequential
            if overlay:
                picture = overlay_relevance(rows[i][0], maps[i][j], scale=scales[i, j], cmap=cmaps[j],
                                            sequential=is_sequential)
            else:
                picture = colorize_map(normalized, cmaps[j], is_sequential)
            axes.imshow(picture, interpolation='nearest', aspect='auto')
            if not raw:
                fig.text((left + panel_inches) / fig_w, 1. - (top + panel_h + 0.01) / fig_h,
                         f'1.0 = {scales[i, j]:.3g}', ha='right', va='top', fontproperties=small, color='0.35')

    grid_bottom = fig_title_h + title_h + len(rows) * row_h
    if normalize == 'column':
        for j in relevance_columns:
            left = label_w + pad + j * (panel_inches + pad)
            # inset, so that the end labels of neighbouring bars do not run into each other
            _colorbar(fig, box(left + 0.15, grid_bottom + 0.02, panel_inches - 0.3, bar_h), cmaps[j],
                      cmaps[j] == sequential, float(np.nanmax(scales[:, j])), 'horizontal')
        fig.text(0.5, 1. - (grid_bottom + bar_h + 0.2) / fig_h, label, ha='center', va='top', fontproperties=font)
    else:
        top = fig_title_h + title_h
        for k, (cmap, unit) in enumerate(legends):
            left = grid_w + 0.1 + k * bar_step
            bar = _colorbar(fig, box(left, top, bar_w, bar_height), cmap, cmap == sequential, unit, 'vertical',
                            clipped=normalize == 'percentile')
            if k == len(legends) - 1:
                bar.set_label(label, fontsize=FONT_SIZE)
    info = {
        'scales': [[None if np.isnan(value) else float(value) for value in row] for row in scales],
        'cmaps': cmaps, 'sequential': [cmap == sequential for cmap in cmaps], 'label': ' '.join(label.split()),
        'normalize': normalize, 'sign': sign,
    }
    if normalize == 'percentile':
        info['percentile'] = percentile
    if path is not None:
        save_figure(fig, path, dpi=dpi)
    return fig, info


def _panel_aspect(rows, maps):
    '''Height / width of the panels (of the first image or map).'''
    for row, row_maps in zip(rows, maps):
        for entry, values in zip(row, row_maps):
            if values is not None:
                return values.shape[0] / values.shape[1]
            if entry is not None:
                shape = to_uint8_image(entry).shape
                return shape[0] / shape[1]
    return 1.


def _legends(cmaps, scales, normalize, raw):
    '''The distinct colour bars of a grid: (colour map, value at the end of the bar).'''
    legends = []
    for j, cmap in enumerate(cmaps):
        if cmap is None:
            continue
        unit = float(np.nanmax(scales[:, j])) if raw else 1.
        if all(existing != cmap for existing, _ in legends):
            legends.append((cmap, unit))
    return legends


def _colorbar(fig, rect, cmap, sequential, unit, orientation, clipped=False):
    '''A colour bar in ``rect`` spanning [0, unit] (sequential) or [-unit, unit] (diverging); ``clipped`` adds the
    arrow ends that mark clipped values.'''
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    unit = unit if unit > 0. else 1.
    norm = Normalize(0. if sequential else -unit, unit)
    axes = fig.add_axes(rect)
    extend = ('max' if sequential else 'both') if clipped else 'neither'
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colormap(cmap)), cax=axes, orientation=orientation,
                       extend=extend)
    ticks = [0., unit / 2, unit] if sequential else [-unit, 0., unit]
    bar.set_ticks(ticks, labels=[f'{tick:.2g}' if tick else '0' for tick in ticks])
    bar.ax.tick_params(labelsize=FONT_SIZE - 2, length=2, pad=1)
    bar.outline.set_linewidth(0.5)
    return bar


def save_relevance(path, relevance, **metadata):
    '''Save raw relevance as ``.npy`` with a ``.json`` sidecar saying what it is.

    Parameters
    ----------
    path : str or :py:obj:`os.PathLike`
        Output path; the suffix is replaced by ``.npy`` and ``.json``. Missing directories are created.
    relevance : :py:obj:`torch.Tensor` or :py:obj:`numpy.ndarray`
        The relevance as the method returned it (not normalised), e.g. (C, H, W).
    **metadata
        What it is, e.g. ``method``, ``composite``, ``model``, ``target_index``, ``target_name``, ``input_shape``,
        ``logit``; stored as given (JSON-serialisable values).

    Returns
    -------
    tuple of str
        The ``.npy`` and the ``.json`` path.
    '''
    array = to_numpy(relevance)
    stem = os.path.splitext(os.fspath(path))[0]
    parent = os.path.dirname(stem)
    if parent:
        os.makedirs(parent, exist_ok=True)
    np.save(stem + '.npy', array, allow_pickle=False)
    record = {
        'file': os.path.basename(stem + '.npy'), 'shape': list(array.shape), 'dtype': str(array.dtype),
        'layout': '(channels, height, width)' if array.ndim == 3 else f'{array.ndim}-d',
        'normalisation': 'none (raw relevance as returned by the method)',
        # summed in float64, so that the sum does not depend on the order of a float32 reduction
        'relevance_sum': float(array.astype(np.float64).sum()),
    }
    record.update(metadata)
    with open(stem + '.json', 'w', encoding='utf-8') as handle:
        json.dump(record, handle, indent=2, ensure_ascii=False, default=str)
    return stem + '.npy', stem + '.json'
