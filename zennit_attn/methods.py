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

Generation targets
------------------
``explain_generation(model, tokenizer, prompt, method='input_x_gradient' | 'integrated_gradients')`` returns the same
:py:class:`~zennit_attn.GenerationAttribution` as the composites, computed by :py:class:`GenerationGradients` through
the plain model: row ``i`` is ``Σ_h x ⊙ ∂f_i/∂x`` over the input embeddings (prompt and generated tokens), where
``f_i`` is generated token ``i``'s logit, probability or log-probability (:py:func:`generation_target`). Integrated
gradients use the zero embedding as baseline and 20 Gauss-Legendre steps, so a row sums to ``f_i(x) − f_i(0)``.
:py:func:`compare_generation` explains one generation with several methods and
:py:func:`plot_generation_comparison` draws them side by side (the matrices, or the top source tokens of one
generated token).
'''
import warnings

import torch
import zennit.composites
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
from zennit.core import Composite

from . import composites as _composites  # noqa: F401 (registers the composites)
from .engine import ProbabilityRecorder
from .attribution import first_non_finite, logits_of, per_sample


__all__ = [
    'METHODS', 'register_method', 'attribute', 'available_methods', 'UnknownMethodError', 'target_logits',
    'GENERATION_METHODS', 'GenerationGradients', 'generation_target', 'compare_generation',
    'plot_generation_comparison',
]


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


# -------------------------------------------------------------------------------------------- generation targets
#: gradient baselines for :py:func:`zennit_attn.explain_generation` (``method=``); name -> display name
GENERATION_METHODS = {
    'input_x_gradient': 'Input × gradient',
    'integrated_gradients': 'Integrated gradients',
}
#: the methods compared by default by :py:func:`compare_generation`
GENERATION_COMPARISON = ('attnlrp', 'cp_lrp', 'input_x_gradient', 'integrated_gradients')


def generation_target(logits, tokens, target, contrast=None):
    '''The explained value of one generation step as a differentiable function of its logits, shape ``(batch,)``.

    ``'logit'``: ``z_t``; ``'probability'``: ``p_t = softmax(z)_t``; ``'log_probability'``: ``log p_t``; minus the same
    quantity of the ``contrast`` token if given. A callable target (which returns the initial relevance at the logits
    for the LRP composites) explains the sum of what it returns over the vocabulary, differentiated through it.
    '''
    rows = torch.arange(len(tokens), device=logits.device)
    if callable(target):
        return target(logits, tokens).sum(-1)
    # softmax in float32 at least (float16 overflows), in float64 for float64 models
    precise = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if target == 'logit':
        scores = logits
    elif target == 'probability':
        scores = precise.softmax(-1).to(logits.dtype)
    else:
        scores = precise.log_softmax(-1).to(logits.dtype)
    value = scores[rows, tokens]
    if contrast is not None:
        value = value - scores[rows, contrast]
    return value


class GenerationGradients:
    '''Input × gradient or integrated gradients of every generated token's target with respect to the input embeddings
    of the plain model (no composite), summed over the embedding dimension.

    Integrated gradients use the **zero embedding** as baseline (every input embedding, prompt and generated, replaced
    by zeros; what the model adds itself, e.g. rotary or learned position embeddings, is kept):
    ``R_j = Σ_h x_jh ∫_0^1 ∂f_i/∂x_jh(α x) dα``, so that row ``i`` sums to ``f_i(x) − f_i(0)`` up to the quadrature
    error, where ``f_i`` is the explained value of generated token ``i``. The integral uses ``n_iter`` Gauss-Legendre
    nodes by default (as Captum does; exact for polynomials of degree < 2·n_iter) or the right Riemann sum
    ``α ∈ {1/n, ..., 1}`` of :py:class:`zennit.attribution.IntegratedGradients` (``rule='riemann'``), whose error
    decreases only like ``1/n``. Cost: ``n_iter + 2`` forward passes and ``n_iter`` backward passes per generated
    token. The completeness is checked after every call (:py:attr:`completeness_error`, a warning above 5 %): on
    real language models the integrand has sharp features (on Gemma-3-270M the logit of " Paris" jumps from 0 at the
    zero embedding to −29 at ``α = 1e-7`` and rises steeply around ``α ≈ 0.35``; the relative completeness error
    is 226 % with 20 steps, 46 % with 100 and 110 % with 200), so the result can be far off.

    Parameters
    ----------
    name: str
        ``'input_x_gradient'`` or ``'integrated_gradients'``.
    n_iter: int, optional
        Integration steps (integrated gradients only; default 20).
    rule: str, optional
        ``'gauss_legendre'`` (default) or ``'riemann'`` (integrated gradients only).
    '''
    RULES = ('gauss_legendre', 'riemann')
    #: largest relative completeness error of integrated gradients that passes without a warning
    TOLERANCE = 0.05
    #: after a call with integrated gradients: the largest relative error ``|Σ_j R_ij − (f_i(x) − f_i(0))| /
    #: max(|f_i(x) − f_i(0)|, Σ_j |R_ij|)`` over the rows
    completeness_error = None

    def __init__(self, name, n_iter=None, rule=None):
        if name not in GENERATION_METHODS:
            raise UnknownMethodError(
                f'unknown generation method {name!r}; available: {", ".join(GENERATION_METHODS)} and the composites '
                f'{", ".join(sorted(zennit.composites.COMPOSITES))}'
            )
        if name == 'input_x_gradient' and (n_iter is not None or rule is not None):
            raise TypeError('input_x_gradient takes no n_iter or rule (it is one gradient at the input)')
        if name == 'integrated_gradients':
            n_iter = 20 if n_iter is None else n_iter
            rule = 'gauss_legendre' if rule is None else rule
            if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
                raise ValueError(f'integrated_gradients: n_iter must be a positive int, got {n_iter!r}')
            if rule not in self.RULES:
                raise ValueError(f'integrated_gradients: rule must be one of {self.RULES}, got {rule!r}')
        self.method, self.n_iter, self.rule = name, n_iter, rule

    @property
    def name(self):
        '''The name shown in results (``GenerationAttribution.composite``).'''
        if self.method == 'integrated_gradients':
            return f'IntegratedGradients(zero embeddings, {self.n_iter} {self.rule.replace("_", "-")} steps)'
        return 'InputXGradient'

    def nodes(self):
        '''The integration nodes ``α`` and their weights (summing to 1).'''
        if self.method == 'input_x_gradient':
            return [1.], [1.]
        if self.rule == 'riemann':
            return [(index + 1) / self.n_iter for index in range(self.n_iter)], [1. / self.n_iter] * self.n_iter
        import numpy as np
        nodes, weights = np.polynomial.legendre.leggauss(self.n_iter)
        return ((nodes + 1) / 2).tolist(), (weights / 2).tolist()

    def _logits(self, wrapper, point, steps):
        logits = wrapper(point)
        if not torch.isfinite(logits).all():
            where = first_non_finite(wrapper, point.detach())
            raise ValueError(
                f'explain_generation: the model\'s logits are not finite (first non-finite hidden state: '
                f'{where or "unknown"}); in float16 this is usually an overflow: use bfloat16 or float32.'
            )
        return logits[:, -steps - 1:-1]

    def __call__(self, wrapper, embeds, generated, target, contrast=None):
        '''Attribute the ``steps`` generated tokens.

        Parameters
        ----------
        wrapper: callable
            ``inputs_embeds -> logits (batch, positions, vocabulary)`` whose last ``steps + 1`` positions include the
            ones that predict the generated tokens (all but the last).
        embeds: :py:obj:`torch.Tensor`
            Input embeddings ``(batch, source, hidden)``.
        generated: :py:obj:`torch.Tensor`
            Generated token ids ``(batch, steps)``.
        target, contrast:
            As in :py:func:`generation_target`.

        Returns
        -------
        tuple
            Relevance ``(batch, steps, source)``, explained values ``(batch, steps)`` and the probabilities of the
            generated tokens ``(batch, steps)``, all detached.
        '''
        steps, batch = generated.shape[1], generated.shape[0]
        x = embeds.detach()
        summed = torch.float64 if x.dtype == torch.float64 else torch.float32
        alphas, weights = self.nodes()
        if 1. not in alphas:
            # Gauss-Legendre has no node at α = 1: one more forward for the explained values at the input
            with torch.no_grad():
                values, probabilities = self._values(self._logits(wrapper, x, steps), generated, target, contrast)
        relevance = torch.zeros(batch, steps, x.shape[1], dtype=summed, device=x.device)
        for alpha, weight in zip(alphas, weights):
            # zero baseline: the path is α·x, and x − baseline = x
            point = (alpha * x).requires_grad_(True)
            with torch.enable_grad():
                logits = self._logits(wrapper, point, steps)
                if alpha == 1.:
                    values, probabilities = self._values(logits.detach(), generated, target, contrast)
                for step in range(steps):
                    value = generation_target(logits[:, step], generated[:, step], target, contrast)
                    (grad,) = torch.autograd.grad(value.sum(), point, retain_graph=step < steps - 1)
                    # reduced over the hidden size at once: no (steps, source, hidden) tensor is kept
                    relevance[:, step] += weight * (x * grad).to(summed).sum(-1)
        if self.method == 'integrated_gradients':
            self._check_completeness(wrapper, x, generated, target, contrast, relevance, values)
        return relevance, values, probabilities

    def _check_completeness(self, wrapper, x, generated, target, contrast, relevance, values):
        '''Compare every row's sum with ``f(x) − f(0)`` (one more forward, at the baseline); store the largest relative
        error in :py:attr:`completeness_error` and warn when it exceeds :py:attr:`TOLERANCE`: the path integral of a
        transformer can have sharp features (attention switching, norms near zero) that ``n_iter`` nodes miss.'''
        with torch.no_grad():
            at_zero, _ = self._values(self._logits(wrapper, torch.zeros_like(x), generated.shape[1]), generated,
                                      target, contrast)
        expected = (values - at_zero).to(relevance.dtype)
        # relative to the larger of |f(x) − f(0)| and Σ|R|: a row whose value barely changes is judged by its mass
        scale = torch.maximum(expected.abs(), relevance.abs().sum(-1)).clamp(min=1e-12)
        error = (relevance.sum(-1) - expected).abs() / scale
        self.completeness_error = float(error.max())
        if self.completeness_error > self.TOLERANCE:
            sample, step = divmod(int(error.argmax()), error.shape[1])
            warnings.warn(
                f'integrated gradients did not converge with n_iter={self.n_iter}: generated token {step} (sample '
                f'{sample}) has relevance sum {float(relevance[sample, step].sum()):.4g} but f(x) − f(0) = '
                f'{float(expected[sample, step]):.4g} (relative error {self.completeness_error:.0%}); raise n_iter.',
                stacklevel=4,
            )

    @staticmethod
    def _values(logits, generated, target, contrast):
        '''The explained values and the probabilities of the generated tokens, ``(batch, steps)`` each.'''
        values = torch.stack([generation_target(logits[:, step], generated[:, step], target, contrast)
                              for step in range(generated.shape[1])], 1)
        probabilities = torch.softmax(logits.float(), -1).gather(-1, generated[..., None])[..., 0]
        return values, probabilities


def generation_method(method, composite=None, options=None):
    '''Resolve ``explain_generation(..., method=method, **options)``: ``(baseline, composite)`` where ``baseline`` is a
    :py:class:`GenerationGradients` (None for a composite name, which is returned as ``composite``).'''
    options = dict(options or {})
    if isinstance(method, GenerationGradients):
        if options:
            raise TypeError('options cannot be passed with a GenerationGradients instance; configure the instance')
        return method, composite
    if isinstance(method, str) and method in zennit.composites.COMPOSITES and method not in GENERATION_METHODS:
        if composite is not None:
            raise TypeError(f'explain_generation: method={method!r} names a composite and composite= is given too; '
                            'pass one of them')
        return None, zennit.composites.COMPOSITES[method](**options)
    if not isinstance(method, str):
        raise TypeError(f'method must be a name or a GenerationGradients instance, got {type(method).__name__}')
    if composite is not None:
        raise TypeError(f'explain_generation: composite= is given but method={method!r} is a gradient baseline that '
                        'uses no composite; pass one of them')
    try:
        return GenerationGradients(method, **options), None
    except TypeError as error:
        raise TypeError(f'invalid options {sorted(options)} for method {method!r}: {error}') from error


def compare_generation(model, tokenizer=None, prompt=None, methods=GENERATION_COMPARISON, options=None, **kwargs):
    '''Explain one generation with several methods side by side: the first method generates the continuation (or
    takes ``continuation=``), the others explain exactly the same tokens.

    Parameters
    ----------
    model, tokenizer, prompt:
        As in :py:func:`zennit_attn.explain_generation` (one prompt, not a batch).
    methods: sequence of str
        Composite names (``'attnlrp'``, ``'cp_lrp'``, ...) and gradient baselines (:py:data:`GENERATION_METHODS`).
    options: dict, optional
        Per method name, its options, e.g. ``{'integrated_gradients': {'n_iter': 50}, 'attnlrp': {'epsilon': 1e-6}}``.
    **kwargs:
        Further arguments of :py:func:`~zennit_attn.explain_generation` (``max_new_tokens``, ``target``,
        ``contrast``, ``input_ids``, ``continuation``, ...). Note that for ``target='log_probability'`` the
        composites explain ``z_t − E_p[z]`` and the baselines ``log p_t``.

    Returns
    -------
    dict
        Method name -> :py:class:`~zennit_attn.GenerationAttribution`, in the order of ``methods``.
    '''
    from .generation import explain_generation
    options = dict(options or {})
    methods = list(methods)
    input_ids = kwargs.get('input_ids')
    if not isinstance(prompt, (str, type(None))) or (input_ids is not None and input_ids.ndim == 2
                                                     and input_ids.shape[0] != 1):
        raise ValueError('compare_generation explains one prompt; call it once per prompt')
    if 'composite' in kwargs or 'method' in kwargs:
        raise TypeError('compare_generation: name the composites and baselines in methods=, not composite=/method=')
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f'compare_generation: methods must be distinct names, got {methods}')
    unknown = [name for name in methods if name not in GENERATION_METHODS and name not in zennit.composites.COMPOSITES]
    if unknown or set(options) - set(methods):
        raise UnknownMethodError(
            f'unknown or unused method(s) {sorted(set(unknown) | (set(options) - set(methods)))}; available: '
            f'{", ".join(GENERATION_METHODS)} and the composites {", ".join(sorted(zennit.composites.COMPOSITES))}'
        )
    results = {}
    for name in methods:
        result = explain_generation(model, tokenizer, prompt, method=name, **options.get(name, {}), **kwargs)
        if isinstance(result, list):
            result = result[0]
        if not results and kwargs.get('continuation') is None:
            # the first method's generation is explained by all the others
            kwargs = dict(kwargs, continuation=result.target_ids)
        results[name] = result
    return results


def plot_generation_comparison(results, path=None, row=None, k=8, exclude_special=True, title=None, dpi=150):
    '''A figure comparing the results of :py:func:`compare_generation` (method name -> result).

    ``row=None``: one relevance matrix per method, stacked (each with its own symmetric colour scale, since the
    methods' units differ); ``row=i``: for generated token ``i`` only, the ``k`` most relevant source tokens of every
    method as bars, side by side.

    Parameters
    ----------
    results: dict
        Method name -> :py:class:`~zennit_attn.GenerationAttribution` of the same generation.
    path: str or :py:obj:`os.PathLike`, optional
        Write the figure as PNG there (and return the path); otherwise return the matplotlib figure.
    row: int, optional
        The generated token whose top sources are compared.
    k: int
        Source tokens per method (``row`` mode).
    exclude_special: bool
        Leave special tokens (``<bos>``) out of the colour scales and the top-k.
    '''
    import numpy as np
    from .image import mpl, save_figure
    from .text import clean_tokens
    results = dict(results)
    if not results:
        raise ValueError('plot_generation_comparison: no results')
    first = next(iter(results.values()))
    if any(result.source_ids.tolist() != first.source_ids.tolist() for result in results.values()):
        raise ValueError('plot_generation_comparison: the results explain different token sequences; use '
                         'compare_generation (which makes every method explain the same generation)')
    sources = [token.text for token in clean_tokens(first.source_tokens)]
    targets = [token.text for token in clean_tokens(first.target_tokens)]
    matplotlib = mpl()
    count = len(results)
    if row is None:
        width = min(4 + 0.32 * len(sources), 40)
        fig = matplotlib.Figure(figsize=(width, count * min(2.2 + 0.3 * len(targets), 12)), dpi=dpi)
        mask = np.arange(len(sources))[None] >= first.target_positions.numpy()[:, None]
        for index, (name, result) in enumerate(results.items()):
            axes = fig.add_subplot(count, 1, index + 1)
            scale = result._scale(exclude_special)
            image = axes.imshow(np.ma.masked_array(result.relevance.double().numpy(), mask), cmap='bwr',
                                vmin=-scale, vmax=scale, aspect='auto', interpolation='nearest')
            axes.set_xticks(range(len(sources)), sources, rotation=90, fontsize=7)
            axes.set_yticks(range(len(targets)), targets, fontsize=7)
            axes.axvline(result.prompt_length - 0.5, color='black', linewidth=0.8)
            axes.set_title(f'{name}: {result.composite}', fontsize=9)
            fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02).set_label(f'relevance ({result.target})', fontsize=7)
    else:
        if not -len(targets) <= row < len(targets):
            raise ValueError(f'plot_generation_comparison: row {row} is out of range: {len(targets)} generated tokens')
        row = row % len(targets)
        fig = matplotlib.Figure(figsize=(3.2 * count + 1, 1.2 + 0.3 * k), dpi=dpi)
        for index, (name, result) in enumerate(results.items()):
            axes = fig.add_subplot(1, count, index + 1)
            # excluded special tokens come back as -inf when k exceeds the visible tokens
            top = [item for item in result.top(row, k, exclude_special=exclude_special) if np.isfinite(item[2])]
            values = [value for _, _, value in top]
            axes.barh(range(len(top)), values, color=['#d62728' if value > 0 else '#1f77b4' for value in values])
            axes.set_yticks(range(len(top)), [repr(sources[column]) for column, _, _ in top], fontsize=8)
            axes.invert_yaxis()
            axes.axvline(0, color='black', linewidth=0.6)
            axes.set_title(f'{name}', fontsize=9)
            axes.tick_params(axis='x', labelsize=7)
        fig.suptitle(title or f'top {k} source tokens of generated token {row}: {targets[row]!r}', fontsize=10)
    if title and row is None:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path) if path is not None else fig
