'''Canonizers for Hugging Face ``transformers`` (5.x) model families, one module per family.

Importing this package registers the families with :py:func:`zennit_attn.canonizers.register_family`; composites
import it automatically when a model contains ``transformers`` modules.
'''
from importlib import import_module

from .common import EagerAttentionCanonizer  # noqa: F401

#: family modules of this package; each registers its CanonizerGroup subclasses on import
FAMILY_MODULES = ('bert', 'vit', 'gpt2', 'llama')

for _name in FAMILY_MODULES:
    try:
        import_module(f'{__name__}.{_name}')
    except ModuleNotFoundError as error:  # a family file not written yet must not break the others
        if error.name != f'{__name__}.{_name}':
            raise
