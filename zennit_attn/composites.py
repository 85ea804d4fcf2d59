'''Named AttnLRP composites, registered into :py:data:`zennit.composites.COMPOSITES` on import of ``zennit_attn``.'''
import torch
from zennit.composites import register_composite
from zennit.core import Composite
from zennit.types import Convolution

from . import layers, types
from .engine import Engine, UnsupportedOperationError
from .families import declared_norm, detect_families, refusal
from .rules.linear import _LinearOp
from .rules import (
    AttnHook, AttentionRule, CPAttentionRule, CPMatMulRule, CPProductRule, Epsilon, Gamma, IdentityRule, IndexAddRule,
    LayerNormRule, MatMulRule, MeanRule, PoolRule, ProductRule, RenormalizeRule, RMSNormRule, RoPERule,
    SDPAAttentionRule, SDPACPAttentionRule, SoftmaxRule, StopRule, SumRule,
)


__all__ = ['AttentionComposite', 'AttnLRP', 'AttnLRPViT', 'CPLRP', 'CPLRPViT', 'UnsupportedModelError']


class UnsupportedModelError(TypeError):
    '''Raised when a model contains a module or operation that no rule of the composite can attribute.'''


#: the rule of a fused attention core (AttnLRP, CP-LRP) for each ``attention`` option of the composites: the exact
#: closed form, or PyTorch's fused attention backward with the input gradients scaled (equal up to the scores' ε terms)
ATTENTION_RULES = {
    'exact': (AttentionRule, CPAttentionRule),
    'sdpa': (SDPAAttentionRule, SDPACPAttentionRule),
}


def _attention_rule(attention, cp_lrp, epsilon):
    '''The rule of :py:class:`~zennit_attn.layers.AttentionCore` for the ``attention`` option.'''
    if attention not in ATTENTION_RULES:
        raise ValueError(f'attention={attention!r}; expected one of {sorted(ATTENTION_RULES)}.')
    return ATTENTION_RULES[attention][int(cp_lrp)](epsilon=epsilon)


def attnlrp_layer_map(epsilon=1e-6, attention='exact'):
    '''The AttnLRP layer map (ATTNLRP.md §2): ε on Linear/Conv, AttnLRP rules on the unfolded operations.'''
    return [
        (layers.AttentionCore, _attention_rule(attention, False, epsilon)),
        (layers.MatMul, MatMulRule(epsilon=epsilon)),
        # softmax modules of the model (torch.nn.Softmax) get no module rule: the engine sees their softmax call and
        # chooses its rule by the role of the input (attention scores: AttentionSoftmax, which CP-LRP stops)
        (layers.Softmax, SoftmaxRule()),
        (layers.Sum, SumRule(epsilon=epsilon)),
        (layers.IndexAdd, IndexAddRule(epsilon=epsilon)),
        (layers.Renormalize, RenormalizeRule()),
        (layers.Product, ProductRule()),
        (layers.Scale, IdentityRule()),
        ((layers.Mean, layers.MaskedMean), MeanRule(epsilon=epsilon)),
        (layers.AveragePool, PoolRule(epsilon=epsilon)),
        (layers.RotaryEmbedding, RoPERule(epsilon=epsilon)),
        (types.LayerNorm, LayerNormRule(epsilon=epsilon)),
        (types.RMSNorm, RMSNormRule()),
        (types.Activation, IdentityRule()),
        (types.LinearLike, Epsilon(epsilon=epsilon)),
    ]


def cp_lrp_layer_map(epsilon=1e-6, attention='exact'):
    '''CP-LRP inside attention (attention probabilities and gates constant); AttnLRP elsewhere.'''
    return [
        (layers.AttentionCore, _attention_rule(attention, True, epsilon)),
        (layers.AttentionContext, CPMatMulRule(epsilon=epsilon, constant=0)),
        (layers.AttentionScores, StopRule()),
        (layers.AttentionMask, StopRule()),
        (layers.AttentionSoftmax, StopRule()),
        (layers.GatedProduct, CPProductRule(constant=0)),
    ] + attnlrp_layer_map(epsilon=epsilon, attention=attention)


def vision_layer_map(conv_gamma=0.25, linear_gamma=0.05, stabilizer=1e-6):
    '''The paper's vision preset (Table B.5) for the layers outside attention: γ on the patch embedding and on the
    MLP/head Linear layers. Attention projections are matched first by role and keep ε.
    '''
    return [
        (Convolution, Gamma(gamma=conv_gamma, stabilizer=stabilizer)),
        (types.LinearLike, Gamma(gamma=linear_gamma, stabilizer=stabilizer)),
    ]


class AttentionComposite(Composite):
    '''A composite for transformers: rules on modules (Linear/Conv, norms, activations) by type, and rules on the glue
    operations of the model's own, unmodified forward through the interception engine (:py:mod:`zennit_attn.engine`).

    Rules are chosen by (1) the user's ``layer_map``, (2) the role of a module (``'attention_projection'`` for Linear
    layers inside attention), (3) the composite's default layer map; operations of the forward (``a + b``, ``a @ b``,
    softmax, fused attention, ...) get the rule of their carrier module type (:py:class:`~zennit_attn.layers.Sum`,
    :py:class:`~zennit_attn.layers.AttentionCore`, ...) from the same maps. Registration refuses, with
    :py:class:`UnsupportedModelError` naming the module, what cannot be attributed (normalisations without a rule,
    compiled/exported graphs, attention kernels the engine cannot see); during a forward, an operation on the relevance
    path without a rule raises :py:class:`~zennit_attn.engine.UnsupportedOperationError`.

    Parameters
    ----------
    layer_map: list[tuple[tuple[type, ...], Hook]]
        Default mapping from module types to rule templates.
    role_map: dict[str, Hook], optional
        Mapping from roles to rule templates.
    user_layer_map: list[tuple[tuple[type, ...], Hook]], optional
        The user's mapping, which takes precedence over everything else.
    canonizers: list[:py:obj:`zennit.canonizers.Canonizer`], optional
        Additional canonizers to apply first (e.g. Zennit's ``MergeBatchNorm``); the engine always runs.
    fused_attention: bool, optional
        Attribute each fused attention call (``F.scaled_dot_product_attention``) with one
        :py:class:`~zennit_attn.rules.AttentionRule` node, which recomputes scores and probabilities in the backward
        pass (default, least memory), or unfolded (``False``) into its matmul, mask sum, softmax and matmul, which makes
        the relevance of the scores and probabilities observable. Same relevance either way.
    attention: str, optional
        ``'exact'`` (default): the closed-form rule of the fused attention core; ``'sdpa'``: the same rule through
        PyTorch's own fused attention backward (flash/memory-efficient kernels on GPUs) with the input gradients
        scaled, which drops the ε-stabilizers of the scores (:py:mod:`zennit_attn.rules.fast_attention`). Only fused
        attention calls can take it: ``'sdpa'`` refuses ``fused_attention=False`` and attention that the model computes
        unfolded (eager attention, soft-capped scores, ``nn.MultiheadAttention`` returning its weights), rather than
        silently running the exact rule there.
    '''
    def __init__(
        self, layer_map, role_map=None, user_layer_map=None, canonizers=None, fused_attention=True, attention='exact',
    ):
        if attention not in ATTENTION_RULES:
            raise ValueError(
                f'{type(self).__name__}: attention={attention!r}; expected one of {sorted(ATTENTION_RULES)}.'
            )
        if attention == 'sdpa' and not fused_attention:
            raise ValueError(
                f"{type(self).__name__}: attention='sdpa' runs the fused attention backward, but fused_attention=False "
                "unfolds every attention call; use one or the other."
            )
        self.attention = attention
        self.layer_map = list(layer_map)
        self.role_map = dict(role_map or {})
        self.user_layer_map = list(user_layer_map or [])
        self.fused_attention = fused_attention
        self.roles = {}
        self.families = []
        self.engine = None
        self._op_rules = {}
        super().__init__(module_map=self.mapping, canonizers=list(canonizers or []))

    def template(self, module, role=None):
        '''The rule template for ``module``: user layer map, then role, then declared norms, then default layer map.'''
        user = next((hook for module_types, hook in self.user_layer_map if isinstance(module, module_types)), None)
        if user is not None:
            return user
        if role in self.role_map:
            return self.role_map[role]
        norm = declared_norm(self.families, module)
        if norm is not None:
            return LayerNormRule() if norm == 'layer' else RMSNormRule()
        if _merged_batch_norm(module):
            # a batch norm merged into its linear layer by Zennit's MergeBatchNorm canonizers computes the identity
            return IdentityRule()
        return next((hook for module_types, hook in self.layer_map if isinstance(module, module_types)), None)

    def mapping(self, ctx, name, module):
        '''Return the rule template for ``module`` (Zennit's ``module_map`` signature).'''
        return self.template(module, self.roles.get(module))

    def rule_for(self, carrier, role=None):
        '''The rule instance of an intercepted operation, by the type of its carrier module (one per type and role).'''
        if self.attention == 'sdpa' and isinstance(carrier, layers.AttentionSoftmax):
            raise UnsupportedOperationError(
                f"{type(self).__name__}(attention='sdpa'): this model computes an attention softmax unfolded (eager "
                'attention, an nn.MultiheadAttention asked for its weights, or scores transformed before the softmax, '
                'e.g. soft-capping), which the fused attention backward cannot compute. Load the model with '
                "attn_implementation='sdpa' where it supports it, or use attention='exact'."
            )
        key = (type(carrier), role)
        rule = self._op_rules.get(key)
        if rule is None:
            template = self.template(carrier, role)
            if template is None:
                return None
            if not isinstance(template, AttnHook):
                raise UnsupportedModelError(
                    f'{type(template).__name__} (from the layer map) cannot attribute an intercepted '
                    f'{type(carrier).__name__.strip("_")} call (e.g. the projections inside nn.MultiheadAttention, '
                    'which are functional): use a zennit_attn.rules rule (Epsilon, Gamma, ...) for this type.'
                )
            rule = self._op_rules[key] = template.copy()
            self.hook_refs.add(rule)
        return rule

    def register(self, module):
        '''Check the model, apply extra canonizers, register the module rules and the engine; on any error, restore
        the model.'''
        if self.handles or self.engine is not None:
            raise RuntimeError(
                f'{type(self).__name__}: this composite is already registered on a model (nested or on two models at '
                'once); use a second composite instance for the second model.'
            )
        _check_model(module)
        try:
            for canonizer in self.canonizers:
                self.handles += canonizer.apply(module)
            self.families = detect_families(module)
            self.roles = _projection_roles(module, self.families)
            templates = [(name, child, self.module_map({}, name, child)) for name, child in module.named_modules()]
            _check_supported(module, templates, self.families)
            engine = self.engine = Engine(
                rule_for=self.rule_for, fused=self.fused_attention,
                ruled=lambda child, ruled={id(child) for _, child, template in templates if template is not None}:
                id(child) in ruled,
            )
            # first in the list, so that a failure below also removes the guards registered so far
            self.handles.append(engine)
            for name, child, template in templates:
                if template is not None:
                    engine.guard(child)
                    hook = template.copy()
                    if isinstance(hook, AttnHook):
                        # the parameters the forward computed with (offloading hooks replace them after the forward)
                        hook.forward_tensors = engine.forward_tensors
                    elif any(tensor.is_meta for tensor in child.parameters(recurse=False)):
                        raise UnsupportedModelError(
                            f'module {name!r} ({type(child).__name__}): its parameters are offloaded (meta tensors, '
                            f'e.g. by accelerate) and {type(hook).__name__} (from the layer map) reads them in the '
                            'backward pass; use a zennit_attn.rules rule (Epsilon, Gamma, ...) for this type.'
                        )
                    self.hook_refs.add(hook)
                    self.handles.append(hook.register(child))
            engine.register(module)
        except BaseException:
            self.remove()
            raise

    def remove(self):
        '''Remove the engine, all hooks and the extra canonizers, in the reverse order of their application.'''
        self.handles.reverse()
        super().remove()
        self.roles = {}
        self.families = []
        self.engine = None
        self._op_rules = {}


def _merged_batch_norm(module):
    '''Whether ``module`` is a batch norm in eval mode that computes the identity (as Zennit's ``MergeBatchNorm``
    leaves it: weight 1, bias 0, mean 0, variance 1, eps 0).'''
    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or module.training or module.eps != 0:
        return False
    stats = (module.running_mean, module.running_var, module.weight, module.bias)
    if any(value is None for value in stats):
        return False
    mean, var, weight, bias = stats
    return bool((mean == 0).all() and (var == 1).all() and (weight == 1).all() and (bias == 0).all())


def _projection_roles(root, families):
    '''``{module: 'attention_projection'}`` for every Linear-like layer inside an attention module (or a module that a
    family declares as containing projections).'''
    declared = {name for family in families for name in family.projections}
    roles = {}

    def mark(module):
        for child in module.children():
            # an MLP inside an attention module (timm's attention-pool head) keeps the MLP's rule
            if type(child).__name__.endswith(_MLP_SUFFIXES):
                continue
            if isinstance(child, types.LinearLike):
                roles[child] = 'attention_projection'
            mark(child)

    for module in root.modules():
        if isinstance(module, types.Attention) or type(module).__name__ in declared:
            mark(module)
    return roles


#: class-name endings of MLP blocks (timm's Mlp/GluMlp/SwiGLU, Hugging Face *MLP)
_MLP_SUFFIXES = ('Mlp', 'MLP', 'SwiGLU', 'FeedForward')


def _check_model(module):
    '''Refuse models whose forward the engine cannot see.'''
    kind = type(module).__name__
    if isinstance(module, torch.jit.ScriptModule) or isinstance(module, torch.fx.GraphModule):
        raise UnsupportedModelError(
            f'the model ({kind}) is a compiled or exported graph (torch.jit / torch.export / fx): its operations '
            'cannot be intercepted, so no rule would apply. Explain the original nn.Module instead.'
        )
    for name, child in module.named_modules():
        if name and isinstance(child, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            raise UnsupportedModelError(
                f'module {name!r} ({type(child).__name__}) is a compiled or exported graph whose operations cannot be '
                'intercepted; use the original nn.Module.'
            )
        config = getattr(child, 'config', None)
        implementation = getattr(config, '_attn_implementation', None) if config is not None else None
        if isinstance(implementation, str) and implementation not in ('eager', 'sdpa'):
            raise UnsupportedModelError(
                f'module {name or "<model>"!r} ({type(child).__name__}) uses attn_implementation={implementation!r}, '
                'whose kernels run outside PyTorch\'s function dispatch, so their relevance cannot be attributed; load '
                'the model with attn_implementation="sdpa" or "eager".'
            )


def _check_supported(root, templates, families):
    '''Raise :py:class:`UnsupportedModelError` for training-mode dropout, refused modules and normalisations without a
    rule (their inline arithmetic has no rule).'''
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
        reason = refusal(families, child)
        if reason is not None:
            raise UnsupportedModelError(f'{where}: {reason}')
        if type(child).__module__.startswith(('torch.ao.nn.quantized', 'torch.ao.nn.intrinsic.quantized')):
            # e.g. quantize_dynamic's Linear: packed weights and quantized kernels without autograd, no rule reads them
            raise UnsupportedModelError(
                f'{where}: a torch.ao quantized module, whose packed weights no rule can read; quantize with '
                'bitsandbytes (Linear8bitLt, Linear4bit: the ε/γ rules read their dequantized weights) or attribute '
                'the float model.'
            )
        if isinstance(child, types.LinearLike) and _LinearOp.is_quantized(child):
            # quantized weights (bitsandbytes): only the closed-form ε/γ rules dequantize them; any other rule (or
            # none) would read the raw codes, or leave the layer's plain gradient
            problem = _LinearOp.weight_problem(child)
            if problem is None and not isinstance(template, Epsilon):
                problem = (
                    f'its {child.weight.dtype} weight is quantized and only zennit_attn.rules.Epsilon / Gamma read its '
                    f'dequantized values, but the layer map gives it '
                    f'{"no rule" if template is None else type(template).__name__}'
                )
            if problem is not None:
                raise UnsupportedModelError(f'{where}: {problem}.')
        if isinstance(child, types.Normalization) and template is None:
            raise UnsupportedModelError(
                f'{where}: normalisation without an AttnLRP rule; add it to layer_map (e.g. with '
                'zennit_attn.rules.LayerNormRule or RMSNormRule), declare it in a zennit_attn.families.Family, or '
                'merge it into a linear layer first.'
            )
    for family in families:
        if family.check is not None:
            family.check(root)


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
        Additional canonizers to apply first.
    fused_attention: bool, optional
        Fused attention cores (default) or the unfolded chain, see :py:class:`AttentionComposite`.
    attention: str, optional
        ``'exact'`` (default) or ``'sdpa'`` (PyTorch's fused attention backward), see :py:class:`AttentionComposite`.
    '''
    def __init__(
        self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, fused_attention=True, attention='exact',
    ):
        super().__init__(
            attnlrp_layer_map(epsilon, attention), user_layer_map=layer_map, canonizers=canonizers,
            fused_attention=fused_attention, attention=attention,
        )


@register_composite('cp_lrp')
class CPLRP(AttentionComposite):
    '''CP-LRP (Ali et al., 2022) inside attention: the attention probabilities are constant, so the value path gets all
    relevance, and gates of gated MLPs are constant; ε on Linear/Conv and AttnLRP rules elsewhere.

    Parameters are as for :py:class:`AttnLRP`.
    '''
    def __init__(
        self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, fused_attention=True, attention='exact',
    ):
        super().__init__(
            cp_lrp_layer_map(epsilon, attention), user_layer_map=layer_map, canonizers=canonizers,
            fused_attention=fused_attention, attention=attention,
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
        Additional canonizers to apply first.
    conv_gamma, linear_gamma: float, optional
        γ of the convolutions and of the Linear layers outside attention.
    fused_attention: bool, optional
        Fused attention cores (default) or the unfolded chain, see :py:class:`AttentionComposite`.
    attention: str, optional
        ``'exact'`` (default) or ``'sdpa'`` (PyTorch's fused attention backward), see :py:class:`AttentionComposite`.
    '''
    attention_layer_map = staticmethod(attnlrp_layer_map)

    def __init__(
        self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, canonizers=None, conv_gamma=0.25, linear_gamma=0.05,
        fused_attention=True, attention='exact',
    ):
        self.conv_gamma = conv_gamma
        self.linear_gamma = linear_gamma
        default = [
            entry for entry in self.attention_layer_map(epsilon, attention) if entry[0] is not types.LinearLike
        ] + vision_layer_map(conv_gamma, linear_gamma, stabilizer)
        super().__init__(
            default,
            role_map={'attention_projection': Epsilon(epsilon=epsilon)},
            user_layer_map=layer_map,
            canonizers=canonizers,
            fused_attention=fused_attention,
            attention=attention,
        )


@register_composite('cp_lrp_vit')
class CPLRPViT(AttnLRPViT):
    '''CP-LRP inside attention with the paper's vision preset outside it; parameters as :py:class:`AttnLRPViT`.'''
    attention_layer_map = staticmethod(cp_lrp_layer_map)
