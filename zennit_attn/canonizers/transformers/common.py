'''Pieces shared by the Hugging Face canonizers.'''
import inspect

import torch
from zennit.canonizers import Canonizer

try:
    # transformers 5.x records attention weights through this context variable (private API)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover
    _active_collector = None


def attentions_requested():
    '''Whether the running Hugging Face forward records attention weights (``output_attentions=True``).

    transformers 5.x collects them with forward hooks while a context variable names the outputs to record; where that
    (private) mechanism is missing, assume they are requested, which keeps the unfolded attention and is always correct.
    '''
    if _active_collector is None:
        return True
    try:
        collected = _active_collector.get()
    except LookupError:
        # no model forward is recording anything
        return False
    return collected is not None and any(key.endswith('attentions') for key in collected)


def take_cache(owner, cache=None, past_key_values=None):
    '''The key/value cache of a call, under either keyword: ``cache`` (transformers >= 5.24, where models pass it
    by that name) or ``past_key_values`` (older releases, and callers using the deprecated name).

    Raises a :py:class:`TypeError` naming both if they are given as two different objects.
    '''
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise TypeError(f'{owner}: got both cache and past_key_values (two different caches); pass one of them.')
    return past_key_values if cache is None else cache


def cache_keyword(function):
    '''The keyword under which ``function`` (a transformers forward) takes the key/value cache: ``'cache'`` from
    transformers 5.24 on, ``'past_key_values'`` before.'''
    return 'cache' if 'cache' in inspect.signature(function).parameters else 'past_key_values'


#: keywords of transformers' attention call chain that the eager attention computation does not read: their effect is
#: carried by the (eager) mask and the position embeddings the model computes, or they only choose what is returned or
#: recorded
IGNORED_ATTENTION_KEYWORDS = frozenset({
    'position_ids', 'cache_position', 'use_cache', 'output_attentions', 'output_hidden_states', 'output_router_logits',
    'num_items_in_batch', 'return_dict',
})


def reject_unexpected(owner, kwargs, ignored=IGNORED_ATTENTION_KEYWORDS):
    '''Raise a :py:class:`TypeError` naming every keyword in ``kwargs`` that is not None and not in ``ignored``.

    The canonical forwards take ``**kwargs`` because transformers passes its whole keyword set down the module tree;
    a keyword they do not know (a new argument of a later release, e.g. a renamed cache) must not be dropped silently
    when it could change the result.
    '''
    unexpected = sorted(name for name, value in kwargs.items() if value is not None and name not in ignored)
    if unexpected:
        raise TypeError(
            f'{owner} (canonized) got unexpected keyword argument(s) {unexpected}, which its canonical forward does '
            'not implement; the installed transformers release may pass arguments this zennit-attn does not support.'
        )


def additive_mask(attention_mask, dtype, floor=None):
    '''The eager additive form of a 4-D attention mask: boolean masks (``True`` = attend, the ``sdpa`` format) become
    ``0`` / ``finfo(dtype).min``, float masks are cast to ``dtype``; ``None`` stays None.

    With ``floor`` (e.g. float32's minimum), mask values below it are raised to it: float64 models fill masks with
    float64's minimum, which turns into -inf in a float32 softmax and gives NaN for fully masked rows.
    '''
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f'attention mask of type {type(attention_mask).__name__} (e.g. a flex-attention BlockMask) is not '
            'supported by the zennit-attn canonizers; load the model with attn_implementation="eager" or "sdpa".'
        )
    if attention_mask.dtype == torch.bool:
        fill = torch.finfo(dtype).min if floor is None else max(torch.finfo(dtype).min, floor)
        return torch.where(attention_mask, torch.zeros((), dtype=dtype, device=attention_mask.device), fill)
    if floor is not None and torch.finfo(attention_mask.dtype).min < floor:
        attention_mask = attention_mask.clamp(min=floor)
    return attention_mask.to(dtype)


class EagerAttentionCanonizer(Canonizer):
    '''Temporarily switch every config of a model to ``attn_implementation='eager'``.

    Hugging Face models build their attention masks in the format of the configured implementation (``sdpa`` may pass
    a boolean mask or none at all and rely on ``is_causal``; ``flash_attention_2`` passes none). The canonical attention
    forwards consume the eager format (an additive float mask covering causality, padding and sliding windows), so
    while canonized the model's configs say ``eager``; removal restores the original values. This is model state, not
    process-global state.
    '''
    def __init__(self):
        super().__init__()
        self.saved = []

    def apply(self, root_module):
        instance = self.copy()
        instance.register(root_module)
        return [instance]

    @staticmethod
    def _configs(root_module):
        '''Every distinct config reachable from the model's modules, including sub-configs.'''
        seen, stack = {}, [module.config for module in root_module.modules() if hasattr(module, 'config')]
        while stack:
            config = stack.pop()
            if id(config) in seen or not hasattr(config, '_attn_implementation_internal'):
                continue
            seen[id(config)] = config
            for key in getattr(config, 'sub_configs', {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None:
                    stack.append(sub)
        return list(seen.values())

    def register(self, root_module):
        for config in self._configs(root_module):
            if vars(config)['_attn_implementation_internal'] == 'eager':
                # already eager (or switched by another family's canonizer, which restores it): nothing to undo
                continue
            self.saved.append((config, vars(config)['_attn_implementation_internal']))
            # set the stored value directly: the property setter also rewrites sub-configs and validates kernels
            vars(config)['_attn_implementation_internal'] = 'eager'

    def remove(self):
        for config, value in reversed(self.saved):
            vars(config)['_attn_implementation_internal'] = value
        self.saved = []
