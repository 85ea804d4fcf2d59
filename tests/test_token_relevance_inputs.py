'''token_relevance refuses what would silently give a wrong or empty explanation, and computes only the logits it
explains.'''
import pytest
import torch

import zennit_attn
from zennit_attn.composites import AttnLRP

from conformance import decoder, generator

pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def llama():
    return decoder('llama')()


def ids():
    return torch.randint(2, 50, (2, 6), generator=generator(3))


@pytest.mark.parametrize('position', [6, -7, [0, 9]])
def test_out_of_range_positions_are_refused(llama, position):
    with pytest.raises(ValueError, match='out of range for 6 tokens'):
        zennit_attn.token_relevance(llama, AttnLRP(), ids(), position=position)


@pytest.mark.parametrize('name,value', [('target', -1), ('target', 50), ('contrast', -1), ('contrast', [0, 50])])
def test_token_ids_outside_the_vocabulary_are_refused(llama, name, value):
    with pytest.raises(ValueError, match=rf'{name} .* is not in \[0, 50\)'):
        zennit_attn.token_relevance(llama, AttnLRP(), ids(), **{name: value})


def test_contrast_equal_to_the_target_is_refused(llama):
    with pytest.raises(ValueError, match=r'contrast equals the target for sample\(s\) \[1\]'):
        zennit_attn.token_relevance(llama, AttnLRP(), ids(), target=[3, 4], contrast=[5, 4])


def test_only_the_explained_positions_logits_are_computed(llama):
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    try:
        result = zennit_attn.token_relevance(llama, AttnLRP(), ids(), position=[2, 4])
    finally:
        handle.remove()
    assert seen == [(2, 2, 50)] and result.logits.shape == (2, 50)
    with torch.no_grad():
        full = llama(input_ids=ids()).logits
    assert torch.equal(result.logits, full[[0, 1], [2, 4]])


def test_non_finite_logits_name_the_first_bad_layer():
    model = decoder('llama')()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e308)
    with pytest.raises(ValueError, match=r'not finite \(first non-finite hidden state: layer 1'):
        zennit_attn.token_relevance(model, AttnLRP(), ids())
