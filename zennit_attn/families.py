'''Model families as declarations.

The interception engine (:py:mod:`zennit_attn.engine`) runs a model's own forward and routes its glue operations to
rules, so a family needs no code: a :py:class:`Family` only declares what cannot be read off the operations:

* ``norms``: normalisation modules the type groups of :py:mod:`zennit_attn.types` do not recognise, and their rule
  (``'rms'``: identity, AttnLRP Prop. 3.4; ``'layer'``: the LayerNorm rule);
* ``projections``: module classes whose Linear layers are attention projections (for the γ presets' roles), beyond
  the default (every Linear inside a module that :py:class:`zennit_attn.types.Attention` matches);
* ``refuse``: module classes (or a ``check(model)`` function) the family cannot be attributed with, and why.

Families built only from standard ops and recognised module types (``*LayerNorm``, ``*RMSNorm``, activations, Linear,
Conv) need an entry only to document them; :py:data:`FAMILIES` lists the supported ones.
'''
from dataclasses import dataclass, field


__all__ = ['Family', 'FAMILIES', 'register_family', 'detect_families', 'declared_norm', 'refusal']


@dataclass(frozen=True)
class Family:
    '''Declaration of a model family.

    Attributes
    ----------
    name: str
        Display name.
    modules: tuple[str]
        Python module prefixes of the family's classes (e.g. ``'transformers.models.llama.'``); a model containing a
        module of such a class belongs to the family.
    norms: dict[str, str]
        Class name -> ``'rms'`` or ``'layer'`` for normalisations without a recognised type.
    projections: tuple[str]
        Class names of modules whose Linear layers are attention projections (in addition to attention modules).
    refuse: dict[str, str]
        Class name -> reason, for modules the family cannot be attributed with.
    check: callable, optional
        ``check(model)`` raises :py:class:`~zennit_attn.composites.UnsupportedModelError` for unsupported
        configurations.
    '''
    name: str
    modules: tuple
    norms: dict = field(default_factory=dict)
    projections: tuple = ()
    refuse: dict = field(default_factory=dict)
    check: object = None

    def contains(self, module):
        '''Whether ``module`` is of a class of this family.'''
        return type(module).__module__.startswith(self.modules)


#: the declared families, see :py:func:`register_family`
FAMILIES = []


def register_family(family):
    '''Add (or replace, by name) a :py:class:`Family` declaration; returns it.'''
    FAMILIES[:] = [known for known in FAMILIES if known.name != family.name] + [family]
    return family


def detect_families(root):
    '''The declared families with a module inside ``root``.'''
    modules = list(root.modules())
    return [family for family in FAMILIES if any(family.contains(module) for module in modules)]


def declared_norm(families, module):
    '''The declared norm kind (``'rms'``/``'layer'``) of ``module`` in ``families``, or None.'''
    name = type(module).__name__
    return next((family.norms[name] for family in families if name in family.norms), None)


def refusal(families, module):
    '''The reason a family refuses ``module``, or None.'''
    name = type(module).__name__
    return next((family.refuse[name] for family in families if name in family.refuse), None)


_HF = 'transformers.models.'

# the supported families: all of them run through the engine with recognised module types and need no rules of their
# own; their entries document them, and their refusals name what the engine cannot attribute
register_family(Family('torchvision ViT', ('torchvision.models.vision_transformer',)))
register_family(Family('BERT family', tuple(_HF + name + '.' for name in (
    'bert', 'roberta', 'xlm_roberta', 'camembert', 'data2vec', 'electra'))))
register_family(Family('Hugging Face ViT', (_HF + 'vit.',)))
register_family(Family('GPT-2', (_HF + 'gpt2.',)))
register_family(Family('LLaMA family', tuple(_HF + name + '.' for name in (
    'llama', 'mistral', 'qwen2', 'qwen3', 'gemma3'))))
register_family(Family(
    'T5', (_HF + 't5.',),
    # T5's RMS normalisation is named *LayerNorm: without this line it would get the LayerNorm rule
    norms={'T5LayerNorm': 'rms'},
))

# ------------------------------------------------------------------------------------------------------- decoders
register_family(Family('Phi-3', (_HF + 'phi3.',)))
# attention logits soft-capped by tanh (an activation: identity rule), sandwich norms; eager attention only
register_family(Family('Gemma2', (_HF + 'gemma2.',)))
register_family(Family('GPT-NeoX / Pythia', (_HF + 'gpt_neox.',)))
register_family(Family('OPT', (_HF + 'opt.',)))
register_family(Family('Falcon', (_HF + 'falcon.',)))
register_family(Family('BART', (_HF + 'bart.',)))

# --------------------------------------------------------------------------------------- mixture of experts

# ------------------------------------------------------------------------------------------------ encoders

# -------------------------------------------------------------------------------------------------- vision

# ------------------------------------------------------------------------------------------- vision-language
