'''Canonizers that unfold transformers into hookable operations, and detection of the supported model families.'''
from importlib import import_module

from .base import ForwardCanonizer
from .group import CanonizerGroup
from .torchvision import (
    MultiheadAttentionCanonizer, EncoderBlockCanonizer, EncoderCanonizer, VisionTransformerCanonizer,
)

__all__ = [
    'ForwardCanonizer', 'CanonizerGroup', 'MultiheadAttentionCanonizer', 'EncoderBlockCanonizer', 'EncoderCanonizer',
    'VisionTransformerCanonizer', 'FAMILIES', 'register_family', 'detect_canonizers',
]

#: canonizer groups of the supported model families, tried in order by :py:func:`detect_canonizers`
FAMILIES = [VisionTransformerCanonizer]


def register_family(canonizer_class):
    '''Add a :py:class:`CanonizerGroup` subclass to the families that composites detect automatically.'''
    if canonizer_class not in FAMILIES:
        FAMILIES.append(canonizer_class)
    return canonizer_class


def detect_canonizers(root_module):
    '''Return a canonizer instance for every supported model family found inside ``root_module``.

    Families whose module types are found are returned in registration order; a model without any supported family
    yields an empty list (composites then check that it contains no attention they cannot handle).
    '''
    if any(type(module).__module__.startswith('transformers.') for module in root_module.modules()):
        # registers the Hugging Face families; imported lazily because transformers is an optional dependency
        import_module(f'{__name__}.transformers')
    return [family() for family in FAMILIES if family.detect(root_module)]
