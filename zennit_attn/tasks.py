'''Image classifiers for the command line: the model, its own preprocessing and its class names.

``--model`` of ``zennit-attn explain | compare`` names one of

* ``default``: the embedded Fashion-MNIST ViT (28×28 grey; ``--resize`` squashes an image to 28×28, bilinear);
* a torchvision builder (``vit_b_16``, ``swin_t``, ...) or a model class of :py:mod:`torchvision.models`
  (``VisionTransformer``, with ``--model-args``), with torchvision's pretrained ``--weights`` or your own
  ``--checkpoint FILE``; preprocessing: the weights' transforms (resize the shorter side, centre-crop, normalise);
* a timm model name (``vit_tiny_patch16_224``; ``timm:NAME`` when torchvision has the same name), built with
  ``timm.create_model(name, pretrained=False, num_classes=...)`` and loaded from ``--checkpoint``; preprocessing:
  ``timm.data.resolve_data_config`` and ``create_transform`` (eval);
* a local Hugging Face image classifier directory (``AutoModelForImageClassification``, class names from
  ``config.id2label``); preprocessing: its ``AutoImageProcessor``;
* ``package.module:callable``, your own builder (called with ``--model-args``), preprocessed as a torchvision model
  without weights (ImageNet mean and std, shorter side resized to 8/7 of the input size, centre crop); the input size
  is the model's ``image_size`` attribute, else 224.

An image of the model's input size is only normalised; ``--resize`` brings another size to it as the model's own
preprocessing does (the embedded default keeps squashing to 28×28). Colours are converted explicitly, with a note on
stderr: a colour photo to grey for a grey model, a grey image to RGB for an RGB model.

Checkpoints are state dicts, or dicts holding one under ``'state_dict'``, ``'model'`` or ``'model_state_dict'``;
``module.`` prefixes (DataParallel, DistributedDataParallel) and ``_orig_mod.`` prefixes (:py:func:`torch.compile`)
are stripped; missing, unexpected or mis-shaped keys are refused, never silently left at random values.

A composite is used only if :py:func:`zennit_attn.check` passes on the model and the image
(:py:meth:`ImageTask.require_coverage`): a composite that leaves operations with their plain gradient (e.g. Zennit's
CNN composites on a ViT) gives a wrong heatmap, so it is refused with the lint's reason.
'''
import ast
import importlib
import inspect
import sys
from pathlib import Path

import torch


__all__ = [
    'ImageTask', 'image_task', 'default_image_task', 'torchvision_image_task', 'timm_image_task', 'hf_image_task',
    'load_checkpoint', 'load_state', 'parse_model_args', 'coverage_reason',
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: torchvision's resize-to-crop ratio of ImageNet evaluation (resize 256, crop 224)
RESIZE_RATIO = 256 / 224
#: what ``--model`` may be, in the error messages
MODELS_HINT = (
    'pass "default", a torchvision model name (e.g. vit_b_16) or class (VisionTransformer), a timm model name (e.g. '
    'vit_tiny_patch16_224, or timm:NAME), a local Hugging Face image classifier directory, or package.module:callable'
)
#: grey image modes of Pillow
GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')
#: keys under which training scripts commonly store the state dict in a checkpoint
STATE_KEYS = ('state_dict', 'model', 'model_state_dict')
#: prefixes of state dict keys added by wrappers: DataParallel/DistributedDataParallel and torch.compile
WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def _error(message):
    '''A :py:class:`zennit_attn.cli.CLIError` (imported here: the CLI imports this module).'''
    from .cli import CLIError
    return CLIError(message)


def note(message):
    '''A note for the user on stderr (stdout holds the written paths).'''
    print(f'note: {message}', file=sys.stderr)


def _shown(items, limit=3):
    '''``a, b, c and 4 more``.'''
    items = list(items)
    return ', '.join(items[:limit]) + (f' and {len(items) - limit} more' if len(items) > limit else '')


# ----------------------------------------------------------------------------------------------------- the task
class ImageTask:
    '''An image classifier with its own preprocessing and its class names.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        Maps a batch ``(B, C, H, W)`` to logits ``(B, classes)``; in eval mode.
    classes: list[str]
        Class names (index order).
    name: str
        Display name, e.g. ``'vit_b_16'``.
    image_size: tuple[int, int]
        ``(height, width)`` of the model input.
    transform: callable
        The model's own evaluation preprocessing: PIL image (``'L'`` for grey models, else ``'RGB'``) -> normalised
        tensor ``(C, H, W)``, resizing included.
    normalize: callable
        The same without resizing, for an image of ``image_size``.
    mean, std: sequence[float]
        Per-channel normalisation of ``normalize``, to recover the image the model sees for display.
    scale: float
        Pixel value 255 after rescaling (1 for torchvision/timm's ``/ 255``; 255 × ``rescale_factor`` for Hugging Face).
    gray: bool
        Whether the model takes grey images.
    resizing: str
        What ``--resize`` does, e.g. ``'resize the shorter side to 256 (bilinear) and centre-crop 224×224'``.
    '''
    def __init__(self, model, classes, name, image_size, transform, normalize, mean, std, scale=1., gray=False,
                 resizing=''):
        self.model, self.classes, self.name = model, list(classes), name
        self.image_size = tuple(image_size)
        self.transform, self.normalize = transform, normalize
        self.mean, self.std, self.scale = tuple(mean), tuple(std), scale
        self.gray, self.resizing = gray, resizing

    def open(self, path):
        '''Read ``path`` as a PIL image in the model's colour mode (``'L'`` or ``'RGB'``), with a note on stderr if
        colours are converted or an alpha channel is dropped.'''
        from PIL import Image, UnidentifiedImageError
        import numpy as np
        path = Path(path)
        if not path.is_file():
            raise _error(f'image file not found: {path}')
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise _error(f'cannot read {path} as an image ({error})') from None
        if image.mode in ('RGBA', 'LA', 'La', 'RGBa', 'PA') or 'transparency' in image.info:
            alpha = np.asarray(image.convert('RGBA'))[..., 3]
            if (alpha < 255).any():
                note(f'{path} has transparent pixels; the alpha channel is dropped (transparent pixels keep their '
                     'colour, not the background\'s)')
        grey = image.mode in GREY_MODES
        if not grey:
            rgb = np.asarray(image.convert('RGB'))
            grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
        if self.gray and not grey:
            note(f'{path} is a colour image, but {self.name} takes grey images: converting it to grey (luma '
                 'L = 0.299 R + 0.587 G + 0.114 B)')
        elif not self.gray and image.mode in GREY_MODES:
            note(f'{path} is a grey image, but {self.name} takes RGB images: repeating the grey channel')
        return image.convert('L' if self.gray else 'RGB')

    def load_image(self, path, resize):
        '''Read ``path`` and return (normalised input ``1×C×H×W``, uint8 RGB image ``H×W×3`` the model sees).

        An image of the model's input size is only normalised. Any other size needs ``resize``, which applies the
        model's own preprocessing (:py:attr:`resizing`, with a note).
        '''
        image = self.open(path)
        height, width = self.image_size
        if image.size == (width, height):
            inputs = self.normalize(image)
        elif not resize:
            raise _error(f'{path} is {image.size[0]}×{image.size[1]} pixels, but {self.name} expects {width}×{height}; '
                         f'pass --resize to {self.resizing}')
        else:
            note(f'{path} ({image.size[0]}×{image.size[1]}): {self.resizing}')
            inputs = self.transform(image)
        inputs = inputs[None].float()
        if tuple(inputs.shape[-2:]) != (height, width):
            raise _error(f'the preprocessing of {self.name} gave a {inputs.shape[-1]}×{inputs.shape[-2]} input, but '
                         f'the model expects {width}×{height}; check --model-args')
        return inputs, self.display(inputs[0])

    def display(self, inputs):
        '''The uint8 image ``H×W×3`` of a normalised input ``C×H×W`` (undoing the normalisation).'''
        mean = torch.tensor(self.mean, dtype=torch.float64)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float64)[:, None, None]
        pixels = (inputs.double() * std + mean) * (255. / self.scale)
        array = pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return array.repeat(3, -1) if array.shape[-1] == 1 else array

    def bounds(self, inputs):
        '''``(low, high)``: the inputs of an all-black and an all-white image, shaped like ``inputs`` (the input
        domain, for Zennit's ZBox rule).'''
        from PIL import Image
        height, width = self.image_size
        mode = 'L' if self.gray else 'RGB'
        # an int colour of an RGB image sets the red channel only
        low, high = (self.normalize(Image.new(mode, (width, height), value if self.gray else (value,) * 3))[None]
                     for value in (0, 255))
        return low.to(inputs).expand_as(inputs), high.to(inputs).expand_as(inputs)

    def method_options(self, method, inputs):
        '''Constructor options a composite needs from the data: ``low`` and ``high`` (Zennit's ``epsilon_gamma_box``)
        are the input bounds; a composite needing anything else is refused.'''
        import zennit.composites
        composite = zennit.composites.COMPOSITES.get(method) if isinstance(method, str) else None
        if composite is None:
            return {}
        required = [name for name, parameter in inspect.signature(composite).parameters.items()
                    if parameter.default is parameter.empty and parameter.kind in (
                        parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)]
        unknown = [name for name in required if name not in ('low', 'high')]
        if unknown:
            raise _error(f'composite {method} needs the argument(s) {", ".join(unknown)}, which the command line '
                         'cannot give; call zennit_attn.methods.attribute with them from Python')
        low, high = self.bounds(inputs)
        return {name: value for name, value in (('low', low), ('high', high)) if name in required}

    def require_coverage(self, method, inputs):
        '''Refuse (a CLIError naming the lint's reason) a composite whose coverage check fails on the model at
        ``inputs``: some operations would run with their plain gradient and the relevance would be wrong.'''
        import zennit.composites
        from .check import check
        composite = zennit.composites.COMPOSITES[method](**self.method_options(method, inputs))
        report = check(self.model, composite, inputs)
        if not report.ok:
            raise _error(f'composite {method} does not cover {self.name}: {coverage_reason(report)}')
        return method

    def usable_methods(self, methods, inputs, explicit):
        '''The ``methods`` (names) that apply to the model: composites whose coverage check passes, attention rollouts
        on torchvision ViTs only. Given ``explicit``\\ ly, one that does not apply is refused; from the default list it
        is dropped with a note.'''
        import zennit.composites
        from .cli import CLIError
        from .composites import UnsupportedModelError
        from .engine import UnsupportedOperationError
        from .methods import _vision_transformer
        usable = []
        for method in methods:
            try:
                if method in zennit.composites.COMPOSITES:
                    self.require_coverage(method, inputs)
                elif 'rollout' in method:
                    try:
                        _vision_transformer(self.model)
                    except NotImplementedError as error:
                        raise _error(f'method {method} does not apply to {self.name}: {error}') from None
            except (CLIError, UnsupportedModelError, UnsupportedOperationError) as error:
                if explicit:
                    raise
                note(f'skipping {method}: {error}')
                continue
            usable.append(method)
        if not usable:
            raise _error(f'none of the methods {", ".join(methods)} applies to {self.name}')
        return usable


def coverage_reason(report, limit=3):
    '''One line from a failed :py:class:`~zennit_attn.check.CoverageReport`: how many operations are uncovered,
    the first few (op in module (type)) and the first hint.'''
    findings = report.findings
    shown = [f'{finding.op} in {finding.module or "<model>"} ({finding.module_type})' for finding in findings]
    return (f'{len(findings)} operation(s) would run with their plain gradient, so the relevance would be wrong '
            f'(e.g. {_shown(shown, limit)}; {findings[0].op}: {findings[0].hint}); choose a composite that covers '
            'the model (the AttnLRP composites attnlrp, attnlrp_vit, cp_lrp, cp_lrp_vit for transformers); '
            'zennit_attn.check(model, composite, x) prints the full table')


# ----------------------------------------------------------------------------------------------- preprocessing
def _tensor_normalize(mean, std, channels=3):
    '''PIL image -> ``(pixels / 255 - mean) / std``, ``C×H×W`` float32.'''
    import numpy as np

    def normalize(image):
        array = np.asarray(image, dtype=np.float32) / 255.
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return normalize


def _interpolation_name(interpolation):
    return str(getattr(interpolation, 'value', interpolation)).lower()


def torchvision_preprocessing(transforms):
    '''``(transform, image_size, mean, std, resizing)`` of a torchvision ``ImageClassification`` transform.'''
    crop = transforms.crop_size
    height, width = (crop[0], crop[-1])
    interpolation = _interpolation_name(transforms.interpolation)
    resizing = (f'resize the shorter side to {transforms.resize_size[0]} ({interpolation}) and centre-crop '
                f'{width}×{height}, as the model\'s torchvision transforms do')
    return transforms, (height, width), tuple(transforms.mean), tuple(transforms.std), resizing


def standard_transforms(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, ratio=RESIZE_RATIO):
    '''torchvision's ImageNet evaluation transforms for an input of ``size``: resize the shorter side to ``ratio ×
    size``, centre-crop, normalise.'''
    from torchvision.transforms._presets import ImageClassification
    return ImageClassification(crop_size=size, resize_size=int(round(size * ratio)), mean=mean, std=std)


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path):
    '''The state dict in the checkpoint file ``path``: a state dict, or a dict holding one under ``'state_dict'``,
    ``'model'`` or ``'model_state_dict'``; ``.safetensors`` files too. Wrapper prefixes (``module.``,
    ``_orig_mod.``) are stripped.'''
    path = Path(path)
    if not path.is_file():
        raise _error(f'checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as error:  # pylint: disable=broad-except
            raise _error(f'cannot read {path} as a safetensors file: {str(error).splitlines()[0]}') from None
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:  # pylint: disable=broad-except
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise _error(f'cannot read {path} as a checkpoint of tensors ({first}); save model.state_dict() with '
                         'torch.save (a pickled model object is not loaded, as it could run code)') from None
    if isinstance(state, dict):
        for key in STATE_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        kind = type(state).__name__ if not isinstance(state, dict) else \
            f'a dict with keys {_shown(map(str, state), 5)}'
        raise _error(f'{path} holds {kind}, not a state dict (names -> tensors), nor a dict with one under '
                     f'{", ".join(map(repr, STATE_KEYS))}')
    return {_strip_prefixes(key): value for key, value in state.items()}


def _strip_prefixes(key):
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_state(model, state, path, name):
    '''Load ``state`` into ``model``, refusing missing, unexpected and mis-shaped keys (listing a few of each).'''
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    mismatched = [f'{key} {tuple(state[key].shape)} (model: {tuple(own[key].shape)})' for key in own
                  if key in state and state[key].shape != own[key].shape]
    problems = [f'{label}: {_shown(keys)}' for label, keys in (
        ('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', mismatched)) if keys]
    if problems:
        raise _error(f'{path} does not fit {name} ({"; ".join(problems)}); check --model and --model-args (e.g. '
                     'num_classes, image_size)')
    model.load_state_dict(state)
    return model


def parse_model_args(items):
    '''``--model-args KEY=VALUE ...`` as a dict; values are Python literals (``32``, ``0.1``, ``(32, 32)``,
    ``True``), anything else a string.'''
    options = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise _error(f'--model-args expects KEY=VALUE (e.g. image_size=32), got {item!r}')
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _classifier_key(model):
    '''State dict key of the weight of ``model``'s classification head: timm's ``get_classifier()``, else the last
    module with a weight matrix or kernel (a Linear or Conv layer, e.g. squeezenet's final 1×1 convolution).'''
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    found = [name for name, module in model.named_modules()
             if module is head or (head is None and isinstance(getattr(module, 'weight', None), torch.nn.Parameter)
                                   and module.weight.ndim >= 2)]
    return f'{found[-1]}.weight' if found else None


def _infer_num_classes(build, options, state, path):
    '''``num_classes`` from the checkpoint's head when ``--model-args`` does not give it and it differs from the
    default; the model is built on the meta device (no memory, no initialisation) to find the head.'''
    if state is None or 'num_classes' in options:
        return options
    try:
        with torch.device('meta'):
            skeleton = build(**options)
    except Exception:  # pylint: disable=broad-except
        return options
    key = _classifier_key(skeleton)
    if key is None or key not in state or key not in skeleton.state_dict():
        return options
    classes = state[key].shape[0]
    if classes != skeleton.state_dict()[key].shape[0]:
        note(f'num_classes={classes} from {key} in {path}')
        options = dict(options, num_classes=classes)
    return options


def _count_classes(model, channels, size):
    '''Number of outputs of ``model`` (one forward pass on zeros).'''
    with torch.no_grad():
        output = model(torch.zeros(1, channels, *size))
    return getattr(output, 'logits', output).shape[-1]


def _random_weights_note(name, how):
    note(f'{name} has random weights ({how}); the explanation shows what an untrained model computes')


# -------------------------------------------------------------------------------------------------- the tasks
def default_image_task():
    '''The embedded default: the shipped Fashion-MNIST ViT (28×28 grey; ``--resize`` squashes to 28×28).'''
    from PIL import Image
    import numpy as np
    from .data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_transform
    from .models import load_fashion_mnist_vit

    def normalize(image):
        return fashion_mnist_transform(torch.from_numpy(np.asarray(image).copy())[None])[0]

    def transform(image):
        # the default keeps its historical preprocessing: squash to 28×28 (Fashion-MNIST images are 28×28 already)
        return normalize(image.resize((28, 28), Image.BILINEAR))
    mean, std = float(FASHION_MNIST_MEAN), float(FASHION_MNIST_STD)
    return ImageTask(
        load_fashion_mnist_vit(), list(FASHION_MNIST_CLASSES), 'the embedded Fashion-MNIST ViT', (28, 28), transform,
        normalize, (mean,) * 3, (std,) * 3, gray=True,
        resizing='squash it to 28×28 (bilinear; the aspect ratio is not kept)',
    )


def _builder(name):
    '''``(builder, display name, torchvision weights enum class or None)`` for a torchvision builder name, a model
    class of ``torchvision.models`` or ``package.module:callable``; None if ``name`` is none of them.'''
    import torchvision.models
    if ':' in name and not name.startswith(('timm:', 'torchvision:')):
        module_name, _, attribute = name.partition(':')
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise _error(f'--model {name}: cannot import {module_name} ({error})') from None
        builder = getattr(module, attribute, None)
        if not callable(builder):
            raise _error(f'--model {name}: {module_name} has no callable {attribute!r}')
        return builder, attribute, None
    name = name[len('torchvision:'):] if name.startswith('torchvision:') else name
    if name in torchvision.models.list_models():
        return torchvision.models.get_model_builder(name), name, torchvision.models.get_model_weights(name)
    found = getattr(torchvision.models, name, None)
    if inspect.isclass(found) and issubclass(found, torch.nn.Module):
        return found, name, None
    return None


def torchvision_image_task(name, weights=None, checkpoint=None, model_args=None):
    '''A torchvision classifier by builder name (or model class, or ``package.module:callable``), with torchvision's
    ``weights``, a ``checkpoint`` file or random weights.

    Preprocessing: the transforms of ``weights`` (or of the builder's default weights, if their crop fits the model),
    else torchvision's ImageNet evaluation transforms for the model's ``image_size``.
    '''
    import torchvision.models
    found = _builder(name)
    if found is None:
        raise _error(f'unknown model {name!r}; {MODELS_HINT}')
    builder, name, weight_enums = found
    if weights is not None and checkpoint is not None:
        raise _error('pass --weights (torchvision\'s pretrained weights) or --checkpoint (your file), not both')
    weight_enum = None
    if weights is not None:
        if Path(weights).suffix in ('.pth', '.pt', '.bin', '.ckpt', '.safetensors') or Path(weights).is_file():
            raise _error(f'--weights names torchvision\'s pretrained weights (e.g. IMAGENET1K_V1); for the file '
                         f'{weights} pass --checkpoint {weights}')
        try:
            weight_enum = torchvision.models.get_weight(weights) if '.' in weights else weight_enums[weights]
        except (KeyError, ValueError, AttributeError, TypeError):
            known = ', '.join(weight.name for weight in weight_enums) if weight_enums else 'none'
            raise _error(f'unknown weights {weights!r} for {name} (known: {known})') from None
    options = dict(model_args or {})
    if 'weights' in inspect.signature(builder).parameters:
        options['weights'] = weight_enum
    elif weights is not None:
        raise _error(f'{name} takes no torchvision weights; pass --checkpoint FILE')
    state = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        options = _infer_num_classes(builder, options, state, checkpoint)
    try:
        model = builder(**options)
    except (OSError, RuntimeError) as error:
        raise _error(f'could not load the {weights} weights of {name} (offline?): {error}') from None
    except (TypeError, ValueError, AssertionError) as error:
        raise _error(f'could not build {name} with --model-args {model_args or {}}: {error}') from None
    if state is not None:
        load_state(model, state, checkpoint, name)
    elif weight_enum is None:
        _random_weights_note(name, 'pass --weights, e.g. IMAGENET1K_V1, or --checkpoint FILE; torchvision '
                             'initialises some classification heads to zero, which gives empty heatmaps')
    model.eval()
    size = getattr(model, 'image_size', None)
    size = size if isinstance(size, int) else None
    chosen = weight_enum or (weight_enums.DEFAULT if weight_enums is not None else None)
    transforms = chosen.transforms() if chosen is not None else None
    if transforms is not None and size is not None and transforms.crop_size[0] != size:
        # the model was built for another input size than the weights' (e.g. --model-args image_size=32)
        transforms = standard_transforms(size, transforms.mean, transforms.std,
                                         transforms.resize_size[0] / transforms.crop_size[0])
    if transforms is None:
        transforms = standard_transforms(size or 224)
        note(f'{name}: no torchvision weights to take the preprocessing from; using ImageNet\'s (mean/std, resize '
             f'the shorter side to {transforms.resize_size[0]}, centre-crop {transforms.crop_size[0]})')
    transform, image_size, mean, std, resizing = torchvision_preprocessing(transforms)
    classes = list(weight_enum.meta.get('categories', [])) if weight_enum is not None else []
    if not classes:
        classes = [str(index) for index in range(_count_classes(model, 3, image_size))]
    return ImageTask(model, classes, name, image_size, transform, _tensor_normalize(mean, std), mean, std,
                     resizing=resizing)


def timm_image_task(name, checkpoint=None, model_args=None):
    '''A timm model built with ``timm.create_model(name, pretrained=False, ...)`` (``num_classes`` from the
    checkpoint's head unless ``model_args`` gives it), loaded from ``checkpoint``; preprocessing by
    ``timm.data.resolve_data_config`` and ``create_transform`` (evaluation).'''
    import timm
    import timm.data
    name = name[len('timm:'):] if name.startswith('timm:') else name
    if not timm.is_model(name):
        raise _error(f'unknown model {name!r}; {MODELS_HINT}')
    options = dict(model_args or {})

    def build(**kwargs):
        return timm.create_model(name, pretrained=False, **kwargs)
    state = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        options = _infer_num_classes(build, options, state, checkpoint)
    try:
        model = build(**options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise _error(f'could not build the timm model {name} with --model-args {model_args or {}}: {error}') from None
    if state is not None:
        load_state(model, state, checkpoint, name)
    else:
        _random_weights_note(name, 'pass --checkpoint FILE; pretrained timm weights come from the hub, which this '
                             'command does not download')
    model.eval()
    overrides = {}
    size = getattr(getattr(model, 'patch_embed', None), 'img_size', None) or options.get('img_size')
    if size is not None:
        # timm keeps the pretrained input size in the data config when img_size is given to create_model
        size = (size, size) if isinstance(size, int) else tuple(size)
        overrides['input_size'] = (options.get('in_chans', 3), *size)
    config = timm.data.resolve_data_config(overrides, model=model)
    transform = timm.data.create_transform(**config, is_training=False)
    channels, height, width = config['input_size']
    if channels not in (1, 3):
        raise _error(f'{name} takes {channels} channels; only grey (1) and RGB (3) images are supported')
    mean, std = tuple(config['mean']), tuple(config['std'])
    crop = config.get('crop_mode', 'center')
    resized = [step for step in getattr(transform, 'transforms', []) if type(step).__name__ == 'Resize']
    scale = getattr(resized[0], 'size', '?') if resized else '?'
    resizing = (f'resize to {scale} ({config["interpolation"]}) and {crop}-crop {width}×{height}, as timm\'s data '
                f'config (crop_pct {config.get("crop_pct")}) does')
    classes = [str(index) for index in range(_count_classes(model, channels, (height, width)))]
    return ImageTask(model, classes, name, (height, width), transform, _tensor_normalize(mean, std), mean, std,
                     gray=channels == 1, resizing=resizing)


def hf_image_task(directory):
    '''A local Hugging Face image classifier directory: ``AutoModelForImageClassification`` (refused if any weight
    would be newly initialised) and its ``AutoImageProcessor``; class names from ``config.id2label``.'''
    try:
        import transformers
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        raise _error('Hugging Face models need transformers: pip install "zennit-attn[transformers]"') from None
    from .cli import quiet_transformers, _class_names
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(directory)
        except (OSError, ValueError) as error:
            raise _error(f'could not load the Hugging Face model {directory}: {str(error).splitlines()[0]}') from None
        architecture = (list(getattr(config, 'architectures', None) or []) or [''])[0]
        if architecture not in _class_names(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES):
            text = any(architecture in _class_names(mapping) for mapping in (
                auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))
            raise _error(f'{directory} holds a {architecture or "model of unknown architecture"}, ' + (
                'a text model: pass --text TEXT' if text else
                'not an image classifier (*ForImageClassification); for images pass an image classifier directory'))
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(directory)
        except (OSError, ValueError, TypeError) as error:
            raise _error(f'{directory} has no usable image processor ({str(error).splitlines()[0]}); save one with '
                         'processor.save_pretrained(DIR) next to the model') from None
        model_class = getattr(transformers, architecture, transformers.AutoModelForImageClassification)
        try:
            model, info = model_class.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as error:
            raise _error(f'could not load the Hugging Face model {directory}: {str(error).splitlines()[0]}') from None
    fresh = sorted(set(info.get('missing_keys') or ()) | {str(key) for key in info.get('mismatched_keys') or ()})
    if fresh:
        raise _error(f'{directory}: the checkpoint has no weights for {_shown(fresh)} of {architecture}; they would be '
                     'randomly initialised and the explanation meaningless')
    channels = getattr(config, 'num_channels', 3)
    if channels not in (1, 3):
        raise _error(f'{directory} takes {channels} channels; only grey (1) and RGB (3) images are supported')
    gray = channels == 1

    def transform(image, **kwargs):
        # processors expect RGB; a grey model's processor gets the grey image repeated to RGB
        pixels = processor(images=image.convert('RGB'), return_tensors='pt', **kwargs)['pixel_values'][0]
        return pixels[:1] if gray and pixels.shape[0] == 3 else pixels

    def normalize(image):
        return transform(image, do_resize=False, do_center_crop=False)
    from PIL import Image
    side = getattr(config, 'image_size', 224)
    side = side if isinstance(side, int) else side[0]
    image_size = tuple(transform(Image.new('RGB', (side, side))).shape[-2:])
    mean = tuple(processor.image_mean) if getattr(processor, 'do_normalize', False) else (0.,) * channels
    std = tuple(processor.image_std) if getattr(processor, 'do_normalize', False) else (1.,) * channels
    scale = 255. * processor.rescale_factor if getattr(processor, 'do_rescale', False) else 255.
    labels = model.config.id2label
    classes = [str(labels.get(index, index)) for index in range(model.config.num_labels)]
    from .attribution import LogitsOnly
    return ImageTask(LogitsOnly(model.eval()), classes, Path(directory).name or str(directory), image_size,
                     transform, normalize, mean[:channels], std[:channels], scale=scale, gray=gray,
                     resizing=_hf_resizing(processor, image_size))


def _hf_resizing(processor, image_size):
    '''What a Hugging Face image processor's resizing does, in words.'''
    size = getattr(processor, 'size', None) or {}
    get = size.get if hasattr(size, 'get') else (lambda key: getattr(size, key, None))
    name = type(processor).__name__
    if not getattr(processor, 'do_resize', True):
        return f'leave it unresized ({name} does not resize)'
    if get('height') and get('width'):
        return f'resize it to {get("width")}×{get("height")} (the aspect ratio is not kept), as {name} does'
    if get('shortest_edge'):
        crop = ' and centre-crop {}×{}'.format(image_size[1], image_size[0]) if getattr(
            processor, 'do_center_crop', False) else ''
        return f'resize the shorter side to {get("shortest_edge")}{crop}, as {name} does'
    return f'resize it as {name} does (to {image_size[1]}×{image_size[0]})'


def image_task(name, weights=None, checkpoint=None, model_args=None):
    '''The :py:class:`ImageTask` of ``--model`` (see the module documentation for what it may name).'''
    model_args = parse_model_args(model_args) if isinstance(model_args, (list, tuple)) else model_args
    if name in (None, 'default'):
        given = [option for option, value in (('--weights', weights), ('--checkpoint', checkpoint),
                                              ('--model-args', model_args)) if value]
        if given:
            raise _error(f'{", ".join(given)} apply to --model NAME (torchvision, timm or your own builder), not the '
                         'embedded default')
        return default_image_task()
    path = Path(name)
    if path.is_dir():
        given = [option for option, value in (('--weights', weights), ('--checkpoint', checkpoint),
                                              ('--model-args', model_args)) if value]
        if given:
            raise _error(f'{", ".join(given)} do not apply to a Hugging Face directory ({name} holds the weights and '
                         'the config)')
        return hf_image_task(name)
    if path.is_file():
        raise _error(f'--model {name} is a file; pass the architecture as --model (e.g. vit_b_16) and the file as '
                     f'--checkpoint {name}')
    if not name.startswith('timm:') and _builder(name) is not None:
        return torchvision_image_task(name, weights, checkpoint, model_args)
    if name.startswith('timm:') or _is_timm_model(name):
        if weights is not None:
            raise _error('--weights names torchvision\'s pretrained weights; for a timm model pass --checkpoint FILE')
        return timm_image_task(name, checkpoint, model_args)
    raise _error(f'unknown model {name!r}; {MODELS_HINT}')


def _is_timm_model(name):
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)
