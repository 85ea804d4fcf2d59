'''zennit-attn: AttnLRP for transformers, as a plugin for Zennit.

Importing the package registers the composites ``attnlrp``, ``attnlrp_vit``, ``cp_lrp`` and ``cp_lrp_vit`` in
:py:data:`zennit.composites.COMPOSITES`.
'''
from . import layers, rules, types, engine, families, composites  # noqa: F401
from .composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT  # noqa: F401
from .attribution import TokenRelevance, token_relevance  # noqa: F401
from .generation import GenerationAttribution, explain_generation  # noqa: F401
from .check import CoverageError, CoverageReport, check  # noqa: F401
from .conservation import conservation_report  # noqa: F401
from .latent import record_relevance  # noqa: F401
from .concepts import conditional_relevance, conditional_token_relevance  # noqa: F401
from .reference import ReferenceSamples, collect_references  # noqa: F401
from .steering import UnitEdit, relevant_units, steer, steering_effect  # noqa: F401
from .similarity import SimilarityRelevance, explain_similarity  # noqa: F401
# registers 'attnlrp' and 'cp_lrp' in Inseq when Inseq is imported (does not import it)
from . import integrations  # noqa: F401

__version__ = '0.1.0'
