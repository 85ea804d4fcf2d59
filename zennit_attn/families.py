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


def eager_experts(model):
    '''Refuse transformers' expert modules (``@use_experts_implementation``) that run with another implementation than
    the per-expert ``'eager'`` loop, or with router jitter (training mode).

    ``'grouped_mm'`` (the default) has no rule; ``'batched_mm'`` runs (its products have rules), but its expert
    products are matmuls, not Linear calls, so the γ presets would not give them their γ.
    '''
    from .composites import UnsupportedModelError
    for name, module in model.named_modules():
        implementation = getattr(getattr(module, 'config', None), '_experts_implementation', None)
        if hasattr(module, 'has_gate') and hasattr(module, 'is_transposed') and implementation != 'eager':
            raise UnsupportedModelError(
                f'module {name!r} ({type(module).__name__}) runs its experts with experts_implementation='
                f'{implementation!r}: grouped/batched matrix products instead of one Linear call per expert, which '
                'have no rule of the expert layers; load the model with experts_implementation="eager" or call '
                'model.set_experts_implementation("eager").'
            )
        if module.training and getattr(module, 'jitter_noise', 0) > 0:
            raise UnsupportedModelError(
                f'module {name!r} ({type(module).__name__}): router jitter noise is active because the model is in '
                'training mode, which makes every heatmap random; call model.eval() first.'
            )


# the sparse blocks need no rules of their own: the engine attributes the router softmax (AttnLRP Prop. 3.1), the
# re-normalisation of the top-k weights, the products of routing weights and expert outputs (uniform; CP-LRP treats
# the weights as constant) and the scatter-sum of the experts (index_add_, ε-sum) of the per-expert loop
register_family(Family('Mixtral', (_HF + 'mixtral.',), check=eager_experts))
register_family(Family('Qwen3-MoE', (_HF + 'qwen3_moe.',), check=eager_experts))

# ------------------------------------------------------------------------------------------------ encoders
# MPNet adds a relative position bias (constant, absorbs its share of the ε-sum) to the scores, in place (x += bias)
register_family(Family('MPNet', (_HF + 'mpnet.',)))
# DeBERTa-v2/v3's disentangled attention maps onto the engine's rules: content-to-position q·pos_kᵀ and
# position-to-content k·pos_qᵀ are matmuls with a constant operand (projections of the relative embeddings: ε, the full
# relevance to q resp. k), torch.gather picks their entries per relative position (a selection), the three score terms
# are an ε-sum (and stay attention scores), masked_fill(finfo.min) right before the softmax gives the masked inputs
# zero relevance as an additive mask would
register_family(Family('DeBERTa-v2', (_HF + 'deberta_v2.',)))

# -------------------------------------------------------------------------------------------------- vision


def no_stochastic_depth(model):
    '''Refuse stochastic depth (timm ``DropPath``, torchvision ``StochasticDepth``, transformers' ``*DropPath``) that
    is active because the model is in training mode: it drops residual branches at random (a product with a random
    constant, which no dropout check sees), so every heatmap would be random.'''
    from .composites import UnsupportedModelError
    for name, module in model.named_modules():
        probability = getattr(module, 'drop_prob', getattr(module, 'p', 0.))
        if type(module).__name__.endswith(('DropPath', 'StochasticDepth')) and module.training and probability:
            raise UnsupportedModelError(
                f'module {name!r} ({type(module).__name__}): stochastic depth p={probability} is active because the '
                'model is in training mode, which makes every heatmap random; call model.eval() first.'
            )


# no rules of their own: LayerScale is a product with a constant (identity rule); relative position biases and
# shifted-window masks are constants added to the scores; window partitions, cyclic shifts (roll), padding, register
# tokens and patch merging are re-arrangements; Swin's average pooling gets the ε-rule of its linear map (PoolRule)
register_family(Family('Hugging Face DINOv2', (_HF + 'dinov2.', _HF + 'dinov2_with_registers.'),
                       check=no_stochastic_depth))
register_family(Family('Hugging Face BEiT', (_HF + 'beit.',), check=no_stochastic_depth))
register_family(Family('Hugging Face Swin', (_HF + 'swin.',), check=no_stochastic_depth))
register_family(Family(
    'timm ViT / DINOv2 / EVA-02 / SigLIP / BEiT / Swin',
    tuple('timm.models.' + name for name in ('vision_transformer', 'eva', 'beit', 'swin_transformer')),
    # the attention-pool head (global_pool='map', SigLIP): a learned query attends to the tokens; its class name does
    # not end in Attention
    projections=('AttentionPoolLatent',), check=no_stochastic_depth,
))
register_family(Family(
    'torchvision Swin', ('torchvision.models.swin_transformer',),
    refuse={'ShiftedWindowAttentionV2': 'Swin V2\'s cosine attention normalises queries and keys (F.normalize, a '
                                        'division by input-dependent norms), which has no AttnLRP rule; use Swin V1 '
                                        '(swin_t/s/b).'},
    check=no_stochastic_depth,
))

# ------------------------------------------------------------------------------------------- vision-language
# CLIP's quick_gelu is a QuickGELUActivation module (identity rule, not a product x * sigmoid(1.702 x)); SigLIP's
# attention-pooling head is an nn.MultiheadAttention, which the engine decomposes; the image-text similarity (division
# by input-dependent norms) is explained by zennit_attn.similarity, not by the models' own forward
register_family(Family('CLIP / SigLIP', (_HF + 'clip.', _HF + 'siglip.')))
