'''Attribution baselines behind one interface with the AttnLRP composites.

:py:func:`attribute` computes an attribution of shape ``inputs.shape`` for a batch of inputs and one target class per
sample, for any method in :py:data:`METHODS` or any composite registered in :py:data:`zennit.composites.COMPOSITES`
(``'attnlrp'``, ``'attnlrp_vit'``, ``'cp_lrp'``, ``'cp_lrp_vit'``, Zennit's own ``'epsilon_plus'`` ...). Positive
values are evidence *for* the target.

Output seeds
------------
* Composites (LRP): Zennit's :py:class:`~zennit.attribution.Gradient` seeded with ``lambda y: y * onehot(target)``,
  so the relevance (approximately) conserves the target logit and ``R_i > 0`` means feature ``i`` raises it.
* Gradient-based baselines: the plain gradient of the target logit, i.e. seeded with ``onehot(target)``. (Seeding a
  gradient with ``y * onehot`` would multiply it by the logit and flip its sign wherever the logit is negative, which
  would break "positive = evidence for the target"; for ``'input_x_gradient'`` on a linear model ``y = w·x`` the
  onehot seed gives exactly the contributions ``w ⊙ x``, the same as LRP-ε with the ``y * onehot`` seed.)

Methods
-------
``'gradient'``
    ``∂y_t/∂x`` (:py:class:`zennit.attribution.Gradient`).
``'input_x_gradient'``
    ``x ⊙ ∂y_t/∂x``.
``'integrated_gradients'``
    :py:class:`zennit.attribution.IntegratedGradients`, Zennit's defaults: zero baseline
    (``baseline_fn=torch.zeros_like``), ``n_iter=20`` right-Riemann steps ``α ∈ {1/20, ..., 1}``; the result already
    includes ``× (x − baseline)``.
    Options: ``n_iter``, ``baseline_fn``.
``'smoothgrad'``
    :py:class:`zennit.attribution.SmoothGrad` with ``noise_level=0.1`` (σ = 0.1 · (max − min) of each sample) and
    ``n_iter=20`` (the last of which is noise-free). Options: ``noise_level``, ``n_iter``, ``seed`` (default 0; the
    noise is drawn under :py:func:`torch.random.fork_rng` so the global RNG is untouched).
``'attention_rollout'``
    Abnar & Zuidema (2020): per layer ``Ã = rownorm(mean_heads(A) + I)``, rollout ``Ã_L ⋯ Ã_1``, class-token row over
    the patches. Class independent.
``'grad_x_attn_rollout'``
    Chefer, Gur & Wolf (2021b), "Generic Attention-model Explainability": ``Ā = E_h[(∇_A y_t ⊙ A)^+]`` per layer,
    ``R ← R + Ā R`` from ``R = I``, class-token row over the patches.
``'random'``
    Uniform noise in ``[0, 1)`` from a generator seeded with ``seed`` (default 0).
any composite name
    ``zennit.composites.COMPOSITES[name](**options)``, e.g. ``attribute(model, x, t, 'attnlrp_vit', conv_gamma=0.1)``.
    A :py:class:`zennit.core.Composite` instance may be passed as ``method`` as well.

The rollout methods support torchvision's :py:class:`~torchvision.models.VisionTransformer` only (they raise
:py:class:`NotImplementedError` otherwise). They run the model under
:py:class:`zennit_attn.engine.ProbabilityRecorder` (no composite; the forward is unchanged), which computes the
attention probabilities of every ``nn.MultiheadAttention`` call with plain operations. The patch map is upsampled
(nearest) to the input resolution and broadcast over the channels divided by the number of channels, so that the
channel sum of a pixel equals its patch's value.
'''
import torch
import zennit.composites
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.core import Composite

from . import composites as _composites  # noqa: F401 (registers the composites)
from .engine import ProbabilityRecorder
from .attribution import logits_of, per_sample


__all__ = ['METHODS', 'register_method', 'attribute', 'available_methods', 'UnknownMethodError', 'target_logits']


#: name -> factory; a factory takes the method's options as keyword arguments and returns a function
#: ``explain(model, inputs, target) -> relevance`` (``target`` a long tensor of shape ``(batch,)``). Holds the baselines
#: and the four AttnLRP composites; :py:func:`attribute` also accepts any other name in Zennit's ``COMPOSITES``.
METHODS = {}


class UnknownMethodError(KeyError):
    '''Raised for a method name that is neither in :py:data:`METHODS` nor a registered Zennit composite.'''
    def __str__(self):
        return self.args[0]


def register_method(name):
    '''Decorator registering a method factory under ``name`` in :py:data:`METHODS`.'''
    def decorator(factory):
        METHODS[name] = factory
        return factory
    return decorator


def available_methods():
    '''Names accepted by :py:func:`attribute`: the baselines and all registered Zennit composites.'''
    return sorted(METHODS) + sorted(name for name in zennit.composites.COMPOSITES if name not in METHODS)


def _onehot(output, target):
    onehot = torch.zeros_like(output)
    onehot[torch.arange(output.shape[0], device=output.device), target] = 1.
    return onehot


def target_logits(output, target):
    '''The logit of ``target[b]`` for every sample ``b`` of a ``(batch, classes)`` output.'''
    output = logits_of(output)
    return output[torch.arange(output.shape[0], device=output.device), target]


def _zennit(attributor_type, seed_logit, **kwargs):
    '''A method running one of Zennit's attributors (no composite); ``seed_logit`` chooses ``y * onehot`` seeding.'''
    def explain(model, inputs, target, composite=None):
        def seed(output):
            onehot = _onehot(output, target)
            return output * onehot if seed_logit else onehot
        with attributor_type(model, composite, **kwargs) as attributor:
            _, relevance = attributor(inputs.detach().clone(), seed)
        return relevance.detach()
    return explain


@register_method('gradient')
def gradient():
    '''The gradient of the target logit.'''
    return _zennit(Gradient, seed_logit=False)


@register_method('input_x_gradient')
def input_x_gradient():
    '''Input × gradient of the target logit.'''
    explain = _zennit(Gradient, seed_logit=False)
    return lambda model, inputs, target: inputs.detach() * explain(model, inputs, target)


@register_method('integrated_gradients')
def integrated_gradients(n_iter=20, baseline_fn=None):
    '''Integrated gradients (Zennit): zero baseline and 20 steps by default.'''
    return _zennit(IntegratedGradients, seed_logit=False, n_iter=n_iter, baseline_fn=baseline_fn)


@register_method('smoothgrad')
def smoothgrad(noise_level=0.1, n_iter=20, seed=0):
    '''SmoothGrad (Zennit) with noise level 0.1 and 20 samples, seeded.'''
    explain = _zennit(SmoothGrad, seed_logit=False, noise_level=noise_level, n_iter=n_iter)

    def seeded(model, inputs, target):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return explain(model, inputs, target)
    return seeded


@register_method('random')
def random(seed=0):
    '''Seeded uniform noise in [0, 1) (a random ranking).'''
    def explain(model, inputs, target):
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(inputs.shape, generator=generator, dtype=torch.float64).to(inputs)
    return explain


def _composite_method(composite):
    explain = _zennit(Gradient, seed_logit=True)
    return lambda model, inputs, target: explain(model, inputs, target, composite=composite)


def _composite_factory(name):
    def factory(**options):
        return _composite_method(zennit.composites.COMPOSITES[name](**options))
    factory.__name__ = name
    factory.__doc__ = f'The {name!r} composite (Zennit Gradient seeded with y * onehot); options go to its constructor.'
    return factory


for _name in ('attnlrp', 'attnlrp_vit', 'cp_lrp', 'cp_lrp_vit'):
    METHODS[_name] = _composite_factory(_name)


# --------------------------------------------------------------------------------------------- attention rollouts
def _vision_transformer(model):
    '''The torchvision VisionTransformer in ``model``, or a NotImplementedError.'''
    from torchvision.models import VisionTransformer
    found = [module for module in model.modules() if isinstance(module, VisionTransformer)]
    if len(found) != 1:
        raise NotImplementedError(
            f'attention rollout methods support torchvision VisionTransformer models only (the attention '
            f'probabilities are read from its canonized nn.MultiheadAttention); {type(model).__name__} contains '
            f'{len(found)} VisionTransformer modules.'
        )
    return found[0]


class RecordAttention:
    '''Context manager: record the attention probabilities ``(batch, heads, tokens, tokens)`` of every layer of a
    torchvision ViT (in forward order) in :py:attr:`attentions`, without any composite.
    '''
    def __init__(self, model):
        self.vit = _vision_transformer(model)
        self.recorder = ProbabilityRecorder(model)

    @property
    def attentions(self):
        return self.recorder.attentions

    def __enter__(self):
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc):
        return self.recorder.__exit__(*exc)


def _patch_map(vit, tokens_map, inputs):
    '''Class-token row over the patches ``(batch, patches)`` -> ``inputs``-shaped map, nearest upsampling, divided by
    the number of channels.'''
    batch, channels, height, width = inputs.shape
    rows, cols = height // vit.patch_size, width // vit.patch_size
    patches = tokens_map.reshape(batch, 1, rows, cols)
    pixels = patches.repeat_interleave(vit.patch_size, 2).repeat_interleave(vit.patch_size, 3)
    pixels = torch.nn.functional.pad(pixels, (0, width - pixels.shape[3], 0, height - pixels.shape[2]))
    return (pixels / channels).expand(batch, channels, height, width).to(inputs.dtype).contiguous()


def rollout(attentions):
    '''Abnar & Zuidema's rollout of a list of per-layer attentions ``(batch, heads, T, T)``: returns ``(batch, T, T)``.
    '''
    result = None
    for attention in attentions:
        mean = attention.mean(1)
        eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
        augmented = mean + eye
        augmented = augmented / augmented.sum(-1, keepdim=True)
        result = augmented if result is None else augmented @ result
    return result


def gradient_rollout(attentions, gradients):
    '''Chefer et al. (2021b): ``R = I``; per layer ``R ← R + E_h[(∇A ⊙ A)^+] R``; returns ``(batch, T, T)``.'''
    result = None
    for attention, grad in zip(attentions, gradients):
        mean = (grad * attention).clamp(min=0).mean(1)
        if result is None:
            result = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device).expand_as(mean)
        result = result + mean @ result
    return result


@register_method('attention_rollout')
def attention_rollout():
    '''Attention rollout (Abnar & Zuidema, 2020) for torchvision ViTs.'''
    def explain(model, inputs, target):
        recorder = RecordAttention(model)
        with torch.no_grad(), recorder:
            model(inputs)
        patches = rollout(recorder.attentions)[:, 0, 1:]
        return _patch_map(recorder.vit, patches, inputs)
    return explain


@register_method('grad_x_attn_rollout')
def grad_x_attn_rollout():
    '''Gradient-weighted attention rollout (Chefer et al., 2021b) for torchvision ViTs.'''
    def explain(model, inputs, target):
        recorder = RecordAttention(model)
        with torch.enable_grad(), recorder:
            leaf = inputs.detach().clone().requires_grad_(True)
            logits = logits_of(model(leaf))
            gradients = torch.autograd.grad(target_logits(logits, target).sum(), recorder.attentions)
        patches = gradient_rollout([a.detach() for a in recorder.attentions], gradients)[:, 0, 1:]
        return _patch_map(recorder.vit, patches, inputs)
    return explain


# ------------------------------------------------------------------------------------------------------ interface
def _resolve(method, options):
    '''The ``explain(model, inputs, target)`` function of ``method`` (a name or a Composite instance).'''
    if isinstance(method, Composite):
        if options:
            raise TypeError('options cannot be passed with a Composite instance; configure the instance instead')
        return _composite_method(method)
    if not isinstance(method, str):
        raise TypeError(f'method must be a name or a zennit Composite instance, got {type(method).__name__}')
    if method in METHODS:
        factory = METHODS[method]
    elif method in zennit.composites.COMPOSITES:
        factory = _composite_factory(method)
    else:
        raise UnknownMethodError(
            f'unknown attribution method {method!r}; available: {", ".join(available_methods())}'
        )
    try:
        return factory(**options)
    except TypeError as error:
        raise TypeError(f'invalid options {sorted(options)} for method {method!r}: {error}') from error


def attribute(model, inputs, target, method, **options):
    '''Attribute the target logits of ``model`` at a batch of ``inputs`` with ``method``.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        Returns logits ``(batch, classes)`` (or an output with ``logits``); in eval mode.
    inputs: :py:obj:`torch.Tensor`
        A batch of inputs, e.g. ``(batch, channels, height, width)``.
    target: int, sequence or :py:obj:`torch.Tensor`
        The explained class, per sample or for all.
    method: str or :py:obj:`zennit.core.Composite`
        A name in :py:data:`METHODS` or in :py:data:`zennit.composites.COMPOSITES`, or a composite instance.
    **options:
        Options of the method's factory (e.g. ``n_iter``, ``seed``) or the composite's constructor (e.g.
        ``conv_gamma``).

    Returns
    -------
    :py:obj:`torch.Tensor`
        The attribution, shape ``inputs.shape``, detached; positive values are evidence for the target.
    '''
    explain = _resolve(method, options)
    target = per_sample(target, inputs.shape[0], 'target', inputs.device)
    relevance = explain(model, inputs, target)
    if relevance.shape != inputs.shape:  # pragma: no cover (a bug in a method)
        raise RuntimeError(f'method {method!r} returned shape {tuple(relevance.shape)}, expected {tuple(inputs.shape)}')
    return relevance
