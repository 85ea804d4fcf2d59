'''AttnLRP and CP-LRP as Inseq attribution methods: ``inseq.load_model(model, 'attnlrp')`` (or ``'cp_lrp'``).

Inseq finds its attribution methods by subclass discovery: every subclass of
:py:class:`inseq.attr.feat.FeatureAttribution` with a ``method_name`` is a method. :py:class:`AttnLRPAttribution` and
:py:class:`CPLRPAttribution` are such subclasses (of Inseq's ``GradientAttributionRegistry``, like its Captum
wrappers); they exist once this module is imported, which ``import zennit_attn`` arranges for the moment Inseq is
imported (see :py:mod:`zennit_attn.integrations`).

One attribution step (one generated token) is one forward of the model on the current prefix with the composite
registered, and one modified backward. Inseq's step function (``attributed_fn``: ``'probability'`` by default,
``'logit'``, ``'contrast_prob_diff'``, ...) says what is explained; it is evaluated on the logits with ordinary
autograd and turned into the initial relevance at the logits of the last position:

* the probability step functions (``probability``, ``contrast_prob``, ``contrast_prob_diff``, without
  ``logprob=True``), any ``s = sum_k a_k p_k``: relevance ``a_k p_k`` at the logit of token ``k`` ("the probability is
  distributed like the logit", as :py:func:`zennit_attn.explain_generation` with ``target='probability'``); computed
  as ``ds/dz + s * softmax(z)``, which is exactly that for such ``s``;
* every other step function ``s``: ``z * ds/dz`` (gradient x input at the logits): ``z_t`` at the target logit for
  ``'logit'``, ``z_t - z_c`` for ``'contrast_logits_diff'``, ``z * (onehot - p)`` for log-probabilities (=
  ``target='log_probability'``).

The modified backward then gives the relevance at the input embeddings (the rules' output *is* relevance, nothing is
multiplied by the input again), summed over the embedding dimension: one signed score per token. The steps are
returned as Inseq's coarse (per-token) outputs, so Inseq shows and aggregates the relevance itself, not an L2 norm of
it, and does not normalise it. See docs/inseq.md.
'''
import inspect

import torch
from inseq.attr.feat import GradientAttributionRegistry
from inseq.attr.feat.attribution_utils import get_source_target_attributions
from inseq.attr.step_functions import contrast_prob_diff_fn, contrast_prob_fn, probability_fn
from inseq.data import CoarseFeatureAttributionStepOutput

from ..composites import AttnLRP, CPLRP


__all__ = ['AttnLRPAttribution', 'CPLRPAttribution', 'LRPRelevance']

#: Inseq step functions whose value is a linear combination of probabilities (unless called with ``logprob=True``)
PROBABILITY_FUNCTIONS = (probability_fn, contrast_prob_fn, contrast_prob_diff_fn)


class LRPRelevance:
    '''The Captum-style ``method`` object of :py:class:`AttnLRPAttribution`: ``attribute(inputs,
    additional_forward_args)`` with the arguments that Inseq's input formatters build for its gradient methods.

    Parameters
    ----------
    attribution_model: :py:class:`inseq.models.AttributionModel`
        Its ``model`` (the Hugging Face model) gets the composite for the duration of each step.
    composite: :py:obj:`zennit.core.Composite`
        E.g. :py:class:`~zennit_attn.AttnLRP` or :py:class:`~zennit_attn.CPLRP`.
    '''
    def __init__(self, attribution_model, composite):
        self.attribution_model = attribution_model
        self.composite = composite

    @staticmethod
    def has_convergence_delta():
        return False

    def attribute(self, inputs, additional_forward_args=()):
        '''Relevance per token of every tensor in ``inputs`` (the embeddings Inseq attributes), a tuple of tensors of
        shape ``(batch, tokens)``, for the value of the step function.'''
        model = self.attribution_model
        network = model.model
        embeds = tuple(tensor.detach().requires_grad_(True) for tensor in inputs)
        extra = {}
        accepts = inspect.signature(network.forward).parameters
        if 'logits_to_keep' in accepts:
            # the step functions read the last position only; full-vocabulary logits elsewhere would be wasted memory
            extra['logits_to_keep'] = 1
        outputs = []
        handle = network.register_forward_hook(lambda module, args, output: outputs.append(output))
        try:
            with self.composite.context(network), torch.enable_grad():
                scores = model(*embeds, *additional_forward_args, **extra)
                if len(outputs) != 1:
                    raise ValueError(
                        f'attnlrp/cp_lrp in Inseq: the step function ran the model {len(outputs) - 1} more time(s) '
                        '(contrast_force_inputs=True, contrast_sources, kl_divergence, ...); relevance can only be '
                        'propagated from the logits of the attributed forward. Contrast targets without '
                        'contrast_force_inputs work.'
                    )
                logits = outputs[0].logits
                seed = self._seed(logits, scores, additional_forward_args)
                grads = torch.autograd.grad(logits, embeds, seed, allow_unused=True)
        finally:
            handle.remove()
        summed = torch.float64 if embeds[0].dtype == torch.float64 else torch.float32
        return tuple(
            torch.zeros(tensor.shape[:-1], dtype=summed, device=tensor.device) if grad is None else
            grad.to(summed).sum(-1)
            for tensor, grad in zip(embeds, grads)
        )

    @staticmethod
    def _seed(logits, scores, additional_forward_args):
        '''The initial relevance at ``logits`` (batch, tokens, vocabulary) for the step function values ``scores``.'''
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.shape[0] != logits.shape[0]:
            raise ValueError(
                f'attnlrp/cp_lrp in Inseq: the step function must return one value per sequence, shape '
                f'({logits.shape[0]},), got {getattr(scores, "shape", type(scores).__name__)}'
            )
        if not bool(torch.isfinite(scores.detach()).all()):
            raise ValueError(f'attnlrp/cp_lrp in Inseq: the step function value is not finite: {scores.tolist()}')
        (gradient,) = torch.autograd.grad(scores.sum(), logits, retain_graph=True, allow_unused=True)
        if gradient is None:
            raise ValueError('attnlrp/cp_lrp in Inseq: the step function does not depend on the model\'s logits')
        function, options = _step_function(additional_forward_args)
        if function in PROBABILITY_FUNCTIONS and not options.get('logprob', False):
            # s = sum_k a_k p_k: ds/dz = sum_k a_k p_k (e_k - p), so ds/dz + s p = sum_k a_k p_k e_k; the two terms
            # cancel off the target and contrast, so they are added in at least float32 (half-precision models)
            dtype = torch.promote_types(gradient.dtype, torch.float32)
            probabilities = torch.softmax(logits[:, -1].detach().to(dtype), -1)
            seed = torch.zeros_like(gradient)
            seed[:, -1] = gradient[:, -1].to(dtype) + scores.detach().to(dtype)[:, None] * probabilities
            return seed
        return logits.detach() * gradient


def _step_function(additional_forward_args):
    '''The step function and its keyword arguments from the arguments Inseq's formatters pass to the model's forward:
    ``(..., attributed_fn, masks..., use_embeddings, argnames, *values)``.'''
    for index, value in enumerate(additional_forward_args):
        if callable(value) and not isinstance(value, torch.Tensor):
            rest = additional_forward_args[index + 1:]
            for position, names in enumerate(rest):
                if isinstance(names, list):
                    return value, dict(zip(names, rest[position + 1:]))
            return value, {}
    return None, {}


class AttnLRPAttribution(GradientAttributionRegistry):
    '''AttnLRP (Achtibat et al., 2024) for Inseq: ``inseq.load_model(model, 'attnlrp', tokenizer=...)``.

    Parameters
    ----------
    attribution_model: :py:class:`inseq.models.AttributionModel`
        Passed by Inseq.
    composite: :py:obj:`zennit.core.Composite`, optional
        The composite to use instead of the default one (e.g. with other ε or extra canonizers); a
        ``inseq.load_model`` keyword argument.
    epsilon: float, optional
        ε of the default composite (``inseq.load_model(model, 'attnlrp', epsilon=1e-6)``).
    '''
    method_name = 'attnlrp'
    composite_class = AttnLRP

    def __init__(self, attribution_model, composite=None, epsilon=1e-6, **kwargs):
        super().__init__(attribution_model)
        self.method = LRPRelevance(attribution_model, composite or self.composite_class(epsilon=epsilon))

    def attribute_step(self, attribute_fn_main_args, attribution_args={}):
        '''One step: the relevance of the source (encoder-decoder) and target prefix tokens, as a coarse (one score
        per token) Inseq step output.'''
        relevance = self.method.attribute(**attribute_fn_main_args, **attribution_args)
        source, target = get_source_target_attributions(relevance, self.attribution_model.is_encoder_decoder)
        return CoarseFeatureAttributionStepOutput(source_attributions=source, target_attributions=target,
                                                  step_scores={})


class CPLRPAttribution(AttnLRPAttribution):
    '''CP-LRP (Ali et al., 2022) for Inseq: ``inseq.load_model(model, 'cp_lrp', tokenizer=...)``; parameters as for
    :py:class:`AttnLRPAttribution`.'''
    method_name = 'cp_lrp'
    composite_class = CPLRP
