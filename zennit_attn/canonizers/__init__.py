'''Canonizers that unfold transformers into hookable operations, and detection of the supported model families.'''
from importlib import import_module

from .attention import AttentionCanonizer, attend, attention_ops
from .base import ForwardCanonizer
from .group import CanonizerGroup
from .torchvision import (
    MultiheadAttentionCanonizer, EncoderBlockCanonizer, EncoderCanonizer, VisionTransformerCanonizer,
)

__all__ = [
    'ForwardCanonizer', 'AttentionCanonizer', 'attention_ops', 'attend', 'CanonizerGroup',
    'MultiheadAttentionCanonizer', 'EncoderBlockCanonizer', 'EncoderCanonizer',
    'VisionTransformerCanonizer', 'FAMILIES', 'register_family', 'detect_canonizers',
]

#: canonizer groups of the supported model families, tried in order by :py:func:`detect_canonizers`
FAMILIES = [VisionTransformerCanonizer]


def register_family(canonizer_class):
    '''Add a :py:class:`CanonizerGroup` subclass to the families that composites detect automatically.'''
    if canonizer_class not in FAMILIES:
        FAMILIES.append(canonizer_class)
    return canonizer_class


def detect_canonizers(root_module, fused=True):
    '''Return a canonizer instance for every supported model family found inside ``root_module``.

    Families whose module types are found are returned in registration order; a model without any supported family
    yields an empty list (composites then check that it contains no attention they cannot handle). Family groups are
    constructed as ``family(fused=fused)``: ``fused`` chooses between the fused attention core and the unfolded chain
    (see :py:mod:`zennit_attn.canonizers.attention`).
    '''
    if any(type(module).__module__.startswith('transformers.') for module in root_module.modules()):
        # registers the Hugging Face families; imported lazily because transformers is an optional dependency
        import_module(f'{__name__}.transformers')
    return [family(fused=fused) for family in FAMILIES if family.detect(root_module)]
