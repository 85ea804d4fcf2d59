'''Named AttnLRP composites, registered into :py:data:`zennit.composites.COMPOSITES` on import of ``zennit_attn``.'''
import torch
from zennit.composites import register_composite
from zennit.core import Composite
from zennit.types import Convolution

from . import layers, types
from .canonizers import detect_canonizers
from .rules import (
    AttentionRule, CPAttentionRule, CPMatMulRule, CPProductRule, Epsilon, Gamma, IdentityRule, LayerNormRule,
    MatMulRule, MeanRule, ProductRule, RMSNormRule, RoPERule, SoftmaxRule, StopRule, SumRule,
)


__all__ = ['AttentionComposite', 'AttnLRP', 'AttnLRPViT', 'CPLRP', 'CPLRPViT', 'UnsupportedModelError']


class UnsupportedModelError(TypeError):
    '''Raised when a model contains an operation that no canonizer or rule of the composite can attribute.'''


def attnlrp_layer_map(epsilon=1e-6):
    '''The AttnLRP layer map (ATTNLRP.md §2): ε on Linear/Conv, AttnLRP rules on the unfolded operations.'''
    return [
        (layers.AttentionCore, AttentionRule(epsilon=epsilon)),
        (layers.MatMul, MatMulRule(epsilon=epsilon)),
        (types.Softmax, SoftmaxRule()),
        (layers.Sum, SumRule(epsilon=epsilon)),
        (layers.Product, ProductRule()),
        (layers.Scale, IdentityRule()),
        ((layers.Mean, layers.MaskedMean), MeanRule(epsilon=epsilon)),
        (layers.RotaryEmbedding, RoPERule(epsilon=epsilon)),
        (types.LayerNorm, LayerNormRule(epsilon=epsilon)),
        (types.RMSNorm, RMSNormRule()),
        (types.Activation, IdentityRule()),
        (types.LinearLike, Epsilon(epsilon=epsilon)),
    ]


def cp_lrp_layer_map(epsilon=1e-6):
    '''CP-LRP inside attention (attention probabilities and gates constant); AttnLRP elsewhere.'''
    return [
        (layers.AttentionCore, CPAttentionRule(epsilon=epsilon)),
        (layers.AttentionContext, CPMatMulRule(epsilon=epsilon, constant=0)),
        (layers.AttentionScores, StopRule()),
        (layers.AttentionMask, StopRule()),
        (layers.AttentionSoftmax, StopRule()),
        (layers.GatedProduct, CPProductRule(constant=0)),
    ] + attnlrp_layer_map(epsilon=epsilon)


def vision_layer_map(conv_gamma=0.25, linear_gamma=0.05, stabilizer=1e-6):
    '''The paper's vision preset (Table B.5) for the layers outside attention: γ on the patch embedding and on the
    MLP/head Linear layers. Attention projections are matched first by role and keep ε.
    '''
    return [
        (Convolution, Gamma(gamma=conv_gamma, stabilizer=stabilizer)),
        (types.LinearLike, Gamma(gamma=linear_gamma, stabilizer=stabilizer)),
    ]


class AttentionComposite(Composite):
    '''A composite for transformers: detects and applies the canonizers of the supported families, then maps rules by
    (1) the user's ``layer_map``, (2) the role a canonizer gave a module (e.g. attention projections), (3) the
    composite's default layer map. Before any hook is registered it checks that every attention and normalisation
    module is covered, and raises :py:class:`UnsupportedModelError` naming the module otherwise.

    Parameters
    ----------
    layer_map: list[tuple[tuple[type, ...], Hook]]
        Default mapping from module types to rule templates.
    role_map: dict[str, Hook], optional
        Mapping from canonizer roles to rule templates.
    user_layer_map: list[tuple[tuple[type, ...], Hook]], optional
        The user's mapping, which takes precedence over everything else.
    canonizers: list[:py:obj:`zennit.canonizers.Canonizer`], optional
        Canonizers to apply. ``None`` (default) detects the supported model families in the model at registration.
    fused_attention: bool, optional
        With detected canonizers: run each attention core as one :py:class:`~zennit_attn.layers.AttentionCore`, whose
        rule recomputes scores and probabilities in the backward pass (default, least memory), or unfolded
        (``False``), which makes the relevance of the scores and probabilities observable. Same relevance either way.
    '''
    def __init__(self, layer_map, role_map=None, user_layer_map=None, canonizers=None, fused_attention=True):
        self.layer_map = list(layer_map)
        self.role_map = dict(role_map or {})
        self.user_layer_map = list(user_layer_map or [])
        self.detect = canonizers is None
        self.fused_attention = fused_attention
        self.roles = {}
        super().__init__(module_map=self.mapping, canonizers=canonizers)

    def mapping(self, ctx, name, module):
        '''Return the rule template for ``module``: user layer map, then role, then default layer map.'''
        user = next((hook for module_types, hook in self.user_layer_map if isinstance(module, module_types)), None)
        if user is not None:
            return user
        role = self.roles.get(module)
        if role in self.role_map:
            return self.role_map[role]
        return next((hook for module_types, hook in self.layer_map if isinstance(module, module_types)), None)

    def register(self, module):
        '''Apply the (detected) canonizers, check coverage and register the rules; on any error, restore the model.'''
        self.remove()
        try:
            canonizers = detect_canonizers(module, fused=self.fused_attention) if self.detect else self.canonizers
            for canonizer in canonizers:
                self.handles += canonizer.apply(module)
            self.roles = {}
            handled = set()
            for handle in self.handles:
                self.roles.update(getattr(handle, 'roles', {}))
                handled.update(id(handled_module) for handled_module in getattr(handle, 'handled', ()))

            ctx = {}
            templates = [(name, child, self.module_map(ctx, name, child)) for name, child in module.named_modules()]
            self._check_supported(module, templates, handled)
            for _, child, template in templates:
                if template is not None:
                    hook = template.copy()
                    self.hook_refs.add(hook)
                    self.handles.append(hook.register(child))
        except BaseException:
            self.remove()
            raise

    def remove(self):
        '''Remove all hooks and revert all canonizers, in the reverse order of their application.'''
        self.handles.reverse()
        super().remove()
        self.roles = {}

    @staticmethod
    def _check_supported(root, templates, handled):
        '''Raise :py:class:`UnsupportedModelError` for attention, fused transformer layers and normalisations that
        neither a canonizer unfolded nor a rule covers.
        '''
        for name, child, template in templates:
            kind = type(child).__name__
            where = f'module {name!r} ({kind})' if name else f'the model ({kind})'
            dropout = child.p if isinstance(child, torch.nn.modules.dropout._DropoutNd) else (
                getattr(child, 'dropout', 0.) if isinstance(child, torch.nn.MultiheadAttention) else
                getattr(child, 'attention_dropout', 0.)
            )
            if child.training and isinstance(dropout, float) and dropout > 0:
                raise UnsupportedModelError(
                    f'{where}: dropout p={dropout} is active because the model is in training mode, which makes '
                    'every heatmap random; call model.eval() first.'
                )
            if isinstance(child, types.FusedTransformer):
                raise UnsupportedModelError(
                    f'{where}: torch.nn.Transformer*Layer computes its residual sums and attention inline (and may use '
                    'a fused fast path), so relevance cannot be attributed; no canonizer supports it yet.'
                )
            if isinstance(child, types.Attention) and id(child) not in handled and template is None:
                raise UnsupportedModelError(
                    f'{where}: attention that no zennit-attn canonizer unfolds; its softmax, products and sums would '
                    'get plain gradients and a wrong heatmap. Supported families: see '
                    'zennit_attn.canonizers.FAMILIES; pass canonizers=[...] for your own.'
                )
            if isinstance(child, types.Normalization) and template is None:
                raise UnsupportedModelError(
                    f'{where}: normalisation without an AttnLRP rule; add it to layer_map (e.g. with '
                    'zennit_attn.rules.LayerNormRule or RMSNormRule) or merge it into a linear layer first.'
                )


@register_composite('attnlrp')
class AttnLRP(AttentionComposite):
    '''AttnLRP (Achtibat et al., 2024): ε on every Linear/Conv layer, the AttnLRP rules everywhere else.

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of the ε-rules (Linear/Conv, sums, matmuls, LayerNorm, RoPE, mean).
    stabilizer: callable or float, optional
        Unused by this composite (kept for the constructor shape of Zennit's composites).
    layer_map: list[tuple[tuple[type, ...], Hook]], optional
        The user's mapping, which takes precedence.
    canonizers: list[Canonizer], optional
        Canonizers to apply; ``None`` detects them.
    fused_attention: bool, optional
        Fused attention cores (default) or the unfolded chain, see :py:class:`AttentionComposite`.
    '''
    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, fused_attention=True):
        super().__init__(
            attnlrp_layer_map(epsilon), user_layer_map=layer_map, canonizers=canonizers,
            fused_attention=fused_attention,
        )


@register_composite('cp_lrp')
class CPLRP(AttentionComposite):
    '''CP-LRP (Ali et al., 2022) inside attention: the attention probabilities are constant, so the value path gets all
    relevance, and gates of gated MLPs are constant; ε on Linear/Conv and AttnLRP rules elsewhere.

    Parameters are as for :py:class:`AttnLRP`.
    '''
    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, fused_attention=True):
        super().__init__(
            cp_lrp_layer_map(epsilon), user_layer_map=layer_map, canonizers=canonizers,
            fused_attention=fused_attention,
        )


@register_composite('attnlrp_vit')
class AttnLRPViT(AttentionComposite):
    '''AttnLRP with the paper's vision preset (Table B.5): ``Gamma(conv_gamma)`` on the patch-embedding convolution,
    ``Gamma(linear_gamma)`` on the MLP and head Linear layers, ε on the attention q/k/v and output projections, and the
    AttnLRP rules everywhere else.

    Parameters
    ----------
    epsilon: callable or float, optional
        Stabilizer of the ε-rules.
    stabilizer: callable or float, optional
        Stabilizer of the γ-rules.
    layer_map: list[tuple[tuple[type, ...], Hook]], optional
        The user's mapping, which takes precedence.
    canonizers: list[Canonizer], optional
        Canonizers to apply; ``None`` detects them.
    conv_gamma, linear_gamma: float, optional
        γ of the convolutions and of the Linear layers outside attention.
    fused_attention: bool, optional
        Fused attention cores (default) or the unfolded chain, see :py:class:`AttentionComposite`.
    '''
    attention_layer_map = staticmethod(attnlrp_layer_map)

    def __init__(
        self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, conv_gamma=0.25, linear_gamma=0.05,
        fused_attention=True,
    ):
        self.conv_gamma = conv_gamma
        self.linear_gamma = linear_gamma
        default = [
            entry for entry in self.attention_layer_map(epsilon) if entry[0] is not types.LinearLike
        ] + vision_layer_map(conv_gamma, linear_gamma, stabilizer)
        super().__init__(
            default,
            role_map={'attention_projection': Epsilon(epsilon=epsilon)},
            user_layer_map=layer_map,
            canonizers=canonizers,
            fused_attention=fused_attention,
        )


@register_composite('cp_lrp_vit')
class CPLRPViT(AttnLRPViT):
    '''CP-LRP inside attention with the paper's vision preset outside it; parameters as :py:class:`AttnLRPViT`.'''
    attention_layer_map = staticmethod(cp_lrp_layer_map)
