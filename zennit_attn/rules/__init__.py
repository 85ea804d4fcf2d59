'''AttnLRP rules (Achtibat et al., ICML 2024) as Zennit hooks.

All rules are closed forms: they store in the forward what the backward needs and never re-run the module or modify
its parameters. Each returns one relevance per positional tensor argument of the module call.

Operands that are constants (tensors that do not require a gradient, and :py:class:`torch.nn.Parameter` objects such
as learned position embeddings) receive no relevance: their share is absorbed like a bias, and for bilinear operations
the other operand then receives the full, unhalved relevance.
Tensors computed from parameters alone (``param.expand(...)``, ``param[:, :n]``) are constants too: the rules
follow their autograd graph back to its leaves.
'''
from .machinery import (  # noqa: F401
    AttnHook, SignStabilizer, _RelevanceFunction, _compute_dtype, _is_variable, _mask_threshold, _unbroadcast,
)
from .attention import AttentionRule, CPAttentionRule, CPMatMulRule, MatMulRule, SoftmaxRule
from .elementwise import (
    CPProductRule, IdentityRule, IndexAddRule, LayerNormRule, MeanRule, PoolRule, ProductRule, RenormalizeRule,
    RMSNormRule, RoPERule, StopRule, SumRule,
)
from .linear import Epsilon, Gamma
from .fast_attention import SDPAAttentionRule, SDPACPAttentionRule


__all__ = [
    'AttnHook', 'IdentityRule', 'SoftmaxRule', 'MatMulRule', 'ProductRule', 'SumRule', 'LayerNormRule', 'RMSNormRule',
    'RoPERule', 'MeanRule', 'PoolRule', 'CPMatMulRule', 'CPProductRule', 'IndexAddRule', 'RenormalizeRule', 'StopRule',
    'AttentionRule', 'CPAttentionRule', 'Epsilon', 'Gamma', 'SignStabilizer', 'SDPAAttentionRule',
    'SDPACPAttentionRule',
]
