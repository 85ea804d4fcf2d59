'''Concept-conditional heatmaps (zennit_attn.concepts): the relevance through chosen units of a layer, checked against
the unconditional map (conservation over all units of a layer every path passes), the bypass of a residual connection
and an autograd reference for the plain gradient.'''
import warnings

import pytest
import torch
from torchvision.models import VisionTransformer

from zennit_attn.attribution import token_relevance
from zennit_attn.composites import AttnLRP
from zennit_attn.concepts import BypassWarning, conditional_relevance, conditional_token_relevance

from tiny_vit import attribute, randomize_head

pytestmark = pytest.mark.usefixtures('single_thread')

BLOCK = 'encoder.layers.encoder_layer_0'


def small_vit():
    '''A very small float64 ViT (5 tokens, width 8, 2 heads), so the batched copies stay cheap.'''
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                              num_classes=3)
    return randomize_head(model).double().eval()


def images(batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope='module')
def vit():
    model = small_vit()
    x = images()
    target = model(x).argmax(1)
    _, full = attribute(model, AttnLRP(epsilon=1e-12), x, target)
    return model, x, target, full


def test_maps_of_all_units_of_a_block_output_sum_to_the_full_map(vit):
    model, x, target, full = vit
    with warnings.catch_warnings():
        warnings.simplefilter('error', BypassWarning)
        result = conditional_relevance(model, x, target, AttnLRP(epsilon=1e-12), BLOCK)
    assert result.relevance.shape == (8, 2, 3, 16, 16)
    assert result.units == [[unit] for unit in range(8)]
    # every path from the logits to the pixels passes the residual stream after block 0
    assert torch.equal(result.bypass, torch.zeros_like(result.bypass))
    torch.testing.assert_close(result.relevance.sum(0), full, rtol=0, atol=1e-12 * full.abs().max().item())
    torch.testing.assert_close(result.full, full, rtol=0, atol=1e-12 * full.abs().max().item())
    # the maps differ from unit to unit (the mask is applied per copy, not to the whole batch)
    assert not torch.allclose(result.relevance[0], result.relevance[1])


def test_a_set_of_units_is_the_sum_of_its_units_and_batching_does_not_change_maps(vit):
    model, x, target, _ = vit
    result = conditional_relevance(model, x, target, AttnLRP(epsilon=1e-12), BLOCK, [[1, 4], 1, 4], batch_size=4)
    torch.testing.assert_close(result.relevance[0], result.relevance[1] + result.relevance[2], rtol=1e-10, atol=1e-14)
    single = conditional_relevance(model, x[1:], target[1:], AttnLRP(epsilon=1e-12), BLOCK, [4])
    torch.testing.assert_close(single.relevance[0, 0], result.relevance[2, 1], rtol=1e-10, atol=1e-14)


def test_mlp_neurons_are_bypassed_by_the_residual_connection(vit):
    model, x, target, full = vit
    layer = f'{BLOCK}.mlp.1'
    with pytest.warns(BypassWarning, match='does not pass through'):
        result = conditional_relevance(model, x, target, AttnLRP(epsilon=1e-12), layer)
    assert result.bypass.abs().sum() > 1e-3 * full.abs().sum()
    # the maps are the relevance through the neurons only: with the bypass they make up the full map
    torch.testing.assert_close(result.relevance.sum(0) + result.bypass, full, rtol=0,
                               atol=1e-12 * full.abs().max().item())
    with pytest.raises(ValueError, match='residual stream'):
        conditional_relevance(model, x, target, AttnLRP(epsilon=1e-12), layer, [0], bypass='raise')


def test_heads_at_the_attention_site(vit):
    model, x, target, full = vit
    site = 'encoder.layers.encoder_layer_1.self_attention.attention'
    result = conditional_relevance(model, x, target, AttnLRP(epsilon=1e-12), site, dim=1, bypass='ignore')
    assert result.relevance.shape[0] == 2
    torch.testing.assert_close(result.relevance.sum(0) + result.bypass, full, rtol=0,
                               atol=1e-12 * full.abs().max().item())


def test_plain_gradient_matches_an_autograd_reference():
    '''Without a composite the conditional map is the gradient through the masked units: compare with autograd.'''
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1, 2])
    result = conditional_relevance(model, x, target, None, '1', [[0, 3], 5], bypass='raise')
    for row, units in enumerate([[0, 3], [5]]):
        inputs = x.clone().requires_grad_()
        hidden = model[:2](inputs)
        output = model[2](hidden)
        seed = output.detach() * torch.nn.functional.one_hot(target, 3).double()
        upstream, = torch.autograd.grad(output, hidden, seed, retain_graph=True)
        mask = torch.zeros(6, dtype=torch.float64)
        mask[units] = 1.
        expected, = torch.autograd.grad(hidden, inputs, upstream * mask)
        torch.testing.assert_close(result.relevance[row], expected, rtol=1e-12, atol=1e-15)


def test_bad_layer_and_unit_are_refused(vit):
    model, x, target, _ = vit
    with pytest.raises(ValueError, match="'encoder.nothing' produced no output"):
        conditional_relevance(model, x, target, AttnLRP(), 'encoder.nothing', [0])
    with pytest.raises(IndexError, match=r'unit\(s\) \[8\] out of range'):
        conditional_relevance(model, x, target, AttnLRP(), BLOCK, [8])
    with pytest.raises(ValueError, match='bypass must be one of'):
        conditional_relevance(model, x, target, AttnLRP(), BLOCK, [0], bypass='maybe')


def test_token_maps_of_a_text_classifier_sum_to_token_relevance():
    import transformers
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 4, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    full = token_relevance(model, AttnLRP(epsilon=1e-12), ids, mask).relevance
    result = conditional_token_relevance(model, AttnLRP(epsilon=1e-12), ids, 'bert.encoder.layer.0',
                                         attention_mask=mask, bypass='raise')
    assert result.relevance.shape == (8, 2, 5)
    torch.testing.assert_close(result.relevance.sum(0), full, rtol=0, atol=1e-12 * full.abs().max().item())
    heads = conditional_token_relevance(model, AttnLRP(epsilon=1e-12), ids, 'bert.encoder.layer.1.attention.self',
                                        attention_mask=mask, num_heads=2, bypass='ignore')
    torch.testing.assert_close(heads.relevance.sum(0) + heads.bypass, full, rtol=0,
                               atol=1e-12 * full.abs().max().item())
