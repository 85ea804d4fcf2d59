'''The authors' reference library ``lxt`` (LRP eXplains Transformers, PyPI ``lxt`` 2.1, efficient mode) as an
independent whole-model reference on the families it patches, run against transformers 5.

lxt's efficient mode computes AttnLRP as a modified gradient × input: it replaces, class-wide, the forwards of the
norms (σ / rms detached), MLPs (identity rule on the activation, gradient ÷2 on the gate product) and wraps the
attention functions (gradient into q ÷4, k ÷4, v ÷2; CP-LRP: q and k detached); linear layers, sums, softmax and RoPE
keep their plain gradient, i.e. ε = 0 (lxt's only stabilizer: ``f(x) / (x + 1e-10)`` in the activations).

lxt 2.1 targets transformers 4.x; two shims make its efficient mode run on transformers 5, without changing a rule:

- ``import lxt.efficient`` fails: its package ``__init__`` imports every model patch, and ``models/bert.py`` (a full
  copy of transformers 4's ``modeling_bert``) imports ``transformers.modeling_attn_mask_utils``, which transformers 5
  removed (``ModuleNotFoundError``). :py:func:`load` registers empty packages for ``lxt.efficient`` and
  ``lxt.efficient.models`` so that ``rules``, ``patches`` and the per-family patch maps import without the BERT copy.
- lxt's ``patch_attention`` replaces a modeling module's ``ALL_ATTENTION_FUNCTIONS`` with a plain ``dict`` of wrapped
  functions; transformers 5 calls ``ALL_ATTENTION_FUNCTIONS.get_interface(...)`` on it. :py:func:`patched` puts the
  same wrapped functions into a private ``AttentionInterface`` (its local mapping), which also keeps lxt's CP-LRP patch
  (which assigns into the mapping) from changing the process-wide instance every modeling module shares.

lxt patches classes and modules for the whole process (``LlamaRMSNorm.forward``, ``torch.nn.LayerNorm.forward``,
``torch.nn.Dropout.forward``, ``zennit.core.BasicHook``, ...) and has no undo: :py:func:`patched` restores every
attribute it changed. lxt's Zennit patch (γ on a ViT: stock Zennit rules, relevance divided by ``stab(x, 1e-10)``)
runs on Zennit 1.0 as shipped. Not runnable here: lxt's BERT (the 4.x copy above) and its explicit mode
(``lxt.explicit.core`` imports ``transformers.utils.fx``, removed in transformers 5).
'''
import contextlib
import importlib
import os
import sys
import types

import torch


#: the families lxt 2.1's efficient mode patches and that run here (``lxt/efficient/models/<name>.py``; not ``bert``)
FAMILIES = ('llama', 'qwen2', 'qwen3', 'gemma3', 'gpt2', 'vit_torch')


def load():
    '''Import lxt's efficient-mode modules without ``lxt/efficient/__init__.py`` (see the module docstring).'''
    import lxt
    root = os.path.join(os.path.dirname(lxt.__file__), 'efficient')
    for name, path in (('lxt.efficient', root), ('lxt.efficient.models', os.path.join(root, 'models'))):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return importlib.import_module('lxt.efficient.patches')


def patch_map(family, variant):
    '''lxt's patch map ``{class or module: patch function}`` of ``family`` for ``variant`` ('attnLRP' or 'cp_LRP').'''
    if family not in FAMILIES:
        raise ValueError(f'lxt 2.1 has no patch map for {family!r} that runs on transformers 5 (have {FAMILIES})')
    load()
    return getattr(importlib.import_module(f'lxt.efficient.models.{family}'), variant)


@contextlib.contextmanager
def restored(*targets):
    '''Undo, on exit, every change to the attributes of the classes and modules ``targets``.'''
    saved = [(target, dict(vars(target))) for target in targets]
    try:
        yield
    finally:
        for target, before in saved:
            after = vars(target)
            for key in [key for key in after if key not in before]:
                delattr(target, key)
            for key, value in before.items():
                if after.get(key, _MISSING) is not value:
                    setattr(target, key, value)


_MISSING = object()


@contextlib.contextmanager
def patched(family, variant, zennit=False):
    '''Apply lxt's patch map of ``family`` (as lxt's ``monkey_patch`` does) and, if ``zennit``, lxt's patch of
    Zennit's ``BasicHook`` (``monkey_patch_zennit``: Zennit rules in lxt's gradient × input form); undo both on exit.'''
    from transformers.modeling_utils import AttentionInterface
    from zennit.core import BasicHook
    mapping = patch_map(family, variant)
    with restored(*mapping, BasicHook):
        for target, patch in mapping.items():
            if isinstance(target, types.ModuleType) and hasattr(target, 'ALL_ATTENTION_FUNCTIONS'):
                # a private interface: lxt's CP patch assigns into it, which would change the shared instance
                target.ALL_ATTENTION_FUNCTIONS = _interface(AttentionInterface, target.ALL_ATTENTION_FUNCTIONS)
            if not patch(target):
                raise RuntimeError(f'lxt could not patch {target.__name__} (already patched?)')
            functions = getattr(target, 'ALL_ATTENTION_FUNCTIONS', None)
            if isinstance(target, types.ModuleType) and isinstance(functions, dict):
                # lxt 2.1 replaced the interface by a dict (transformers 4); transformers 5 calls get_interface on it
                target.ALL_ATTENTION_FUNCTIONS = _interface(AttentionInterface, functions)
        if zennit:
            importlib.import_module('lxt.efficient.zennit_patches').monkey_patch_zennit()
        yield


def _interface(interface_type, functions):
    '''A fresh ``AttentionInterface`` whose local mapping holds ``functions``.'''
    interface = interface_type()
    for key, function in dict(functions.items()).items():
        interface[key] = function
    return interface


def relevance(family, variant, wrapper, x, target, composite=None):
    '''lxt's input relevance: with lxt's patches applied, ``x * d logit[target] / d x`` (lxt's documented usage; the
    output relevance is the target logit, as Zennit's seed ``y * onehot(target)``). ``composite``: a Zennit composite
    of stock Zennit rules, computed through lxt's Zennit patch (lxt's way of applying γ to a ViT).'''
    with patched(family, variant, zennit=composite is not None), contextlib.ExitStack() as stack:
        if composite is not None:
            stack.enter_context(composite.context(wrapper))
        x = x.detach().requires_grad_(True)
        logits = wrapper(x)
        logits[torch.arange(len(target)), target].sum().backward()
    return (x * x.grad).detach()
