'''explain_similarity: image-text similarities of CLIP and SigLIP explained on both sides (zennit_attn.similarity).

References: the model's own ``logits_per_image`` (the explained values), exact conservation of each side on bias-free
models with CP-LRP, the zero-shot wrappers of the conformance suite (the already-tested path: the engine forms the
normalised dot product with the other side constant itself) and the hand-written float64 oracles of the towers
(ATTNLRP.md §3).
'''
import pytest
import torch

pytest.importorskip('transformers')

from zennit_attn import explain_similarity  # noqa: E402
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT  # noqa: E402
from zennit_attn.rules import IdentityRule  # noqa: E402

from conformance import bias_free  # noqa: E402
from conformance_multimodal import (  # noqa: E402
    ZeroShot, image_features_oracle, pixels, text_features_oracle, text_inputs, two_tower, zero_shot_logits,
)
from oracle_hf import oracle_relevance  # noqa: E402
from restoration import assert_restored, relative_difference, snapshot  # noqa: E402
from test_conformance import attribute  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')

KINDS = ['clip', 'siglip']
#: (image, text) pairs of 3 images x 3 texts: every image once, texts permuted
PAIRS = [(0, 2), (2, 0), (1, 1)]


def inputs(model, images=3, texts=3):
    ids, mask, _ = text_inputs(model, texts)
    return pixels(images), ids, mask


def absorbing(kind):
    return ('class_embedding',) if kind == 'clip' else ()


@pytest.mark.parametrize('kind', KINDS)
def test_similarity_is_the_models_logit(kind):
    '''``similarity`` is the model's own ``logits_per_image`` entry of each pair (image-major for "all");
    ``explained`` is it minus SigLIP's logit bias.'''
    model = two_tower(kind)()
    images, ids, mask = inputs(model, images=2, texts=3)
    result = explain_similarity(model, AttnLRP(), images, ids, mask, pairs='all')
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=images, attention_mask=mask).logits_per_image
    assert result.image_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert result.text_index.tolist() == [0, 1, 2] * 2
    assert torch.allclose(result.similarity, logits.flatten(), rtol=1e-12, atol=0)
    bias = model.logit_bias.item() if kind == 'siglip' else 0.
    assert torch.allclose(result.explained, logits.flatten() - bias, rtol=1e-12, atol=0)


@pytest.mark.parametrize('implementation', ['sdpa', 'eager'])
@pytest.mark.parametrize('kind', KINDS)
def test_each_side_conserves_on_bias_free_model(kind, implementation):
    '''CP-LRP on the bias-free model: the pixel relevance, the patch relevance and the token relevance each sum to
    the explained similarity (ATTNLRP.md §2), for every pair.'''
    model = bias_free(two_tower(kind, implementation)(), absorbing(kind))
    images, ids, mask = inputs(model)
    result = explain_similarity(model, CPLRP(epsilon=1e-12), images, ids, mask, pairs=PAIRS)
    assert result.explained.abs().min() > 1e-4  # non-trivial (random weights differ between transformers releases)
    # the ε-stabilisers absorb an absolute amount: relative to the largest similarity, not to a tiny one
    atol = 1e-8 * result.explained.abs().max().item()
    for relevance in (result.image_relevance, result.patch_relevance, result.embedding_relevance):
        totals = relevance.flatten(1).sum(1)
        assert torch.allclose(totals, result.explained, rtol=1e-8, atol=atol), (totals, result.explained)
    assert torch.allclose(result.token_relevance.sum(1), result.explained, rtol=1e-8, atol=atol)


@pytest.mark.parametrize('kind', KINDS)
def test_biases_absorb_on_the_perturbed_model(kind):
    '''With biases, class and position embeddings (and SigLIP's logit bias) the sides no longer sum to the similarity:
    the conservation above is not trivially true.'''
    model = two_tower(kind)()
    images, ids, mask = inputs(model)
    result = explain_similarity(model, CPLRP(epsilon=1e-12), images, ids, mask, pairs=PAIRS)
    for relevance in (result.image_relevance, result.embedding_relevance):
        assert relative_difference(relevance.flatten(1).sum(1), result.explained) > 1e-3


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRPViT])
@pytest.mark.parametrize('kind', KINDS)
def test_sides_equal_the_zero_shot_classifiers(kind, composite_type):
    '''The image side of pair (i, j) equals explaining the conformance suite's zero-shot classifier of image i over the
    texts (target j), and the text side the classifier of text j over the images (target i): there the engine forms
    ``scale * (u / |u|) @ (v / |v|)^T (+ bias)`` itself, with the other side and the norms constant.'''
    model = two_tower(kind)()
    images, ids, mask = inputs(model)
    result = explain_similarity(model, composite_type(epsilon=1e-12), images, ids, mask, pairs=PAIRS)
    image_index, text_index = result.image_index, result.text_index

    image_side = ZeroShot(model, 'image', None, ids, mask)
    _, expected = attribute(image_side, composite_type(epsilon=1e-12), images[image_index], text_index)
    assert relative_difference(result.image_relevance, expected) < 1e-8

    _, _, embeds = text_inputs(model, 3)
    text_side = ZeroShot(model, 'text', images, ids[text_index], mask[text_index])
    _, expected = attribute(text_side, composite_type(epsilon=1e-12), embeds[text_index], image_index)
    assert relative_difference(result.embedding_relevance, expected) < 1e-8


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('kind', KINDS)
def test_sides_equal_the_oracle(kind, composite_type, cp_lrp):
    '''Both sides equal the hand-written float64 oracle (modified gradient × input of the towers, ATTNLRP.md §3) of
    ``scale * <u / |u|, v / |v|>`` with the norms and the other side's embedding detached.'''
    model = two_tower(kind)()
    images, ids, mask = inputs(model)
    result = explain_similarity(model, composite_type(epsilon=1e-12), images, ids, mask, pairs=PAIRS)
    image_index, text_index = result.image_index, result.text_index
    _, _, embeds = text_inputs(model, 3)
    embeds, ids, mask = embeds[text_index], ids[text_index], mask[text_index]
    with torch.no_grad():
        image_embeds = image_features_oracle(model, images[image_index], cp_lrp)
        text_embeds = text_features_oracle(model, embeds, ids, mask, cp_lrp)
    diagonal = torch.eye(len(PAIRS), dtype=torch.float64)
    # zero_shot_logits(own, other) is (pairs, pairs): the diagonal seed picks each pair's own similarity
    expected_image, _ = oracle_relevance(
        lambda x: zero_shot_logits(model, image_features_oracle(model, x, cp_lrp), text_embeds), images[image_index],
        diagonal)
    expected_text, _ = oracle_relevance(
        lambda x: zero_shot_logits(model, text_features_oracle(model, x, ids, mask, cp_lrp), image_embeds), embeds,
        diagonal)
    assert relative_difference(result.image_relevance, expected_image) < 1e-6
    assert relative_difference(result.embedding_relevance, expected_text) < 1e-6


@pytest.mark.parametrize('kind', KINDS)
def test_pairs_are_explained_independently(kind):
    '''Each row is the explanation of its own pair: equal to explaining that image and that text alone (a 3-D image and
    1-D ids), and the default pairs are image i with text i.'''
    model = two_tower(kind)()
    images, ids, mask = inputs(model)
    composite = AttnLRP(epsilon=1e-12)
    batch = explain_similarity(model, composite, images, ids, mask, pairs=PAIRS)
    for row, (image, text) in enumerate(PAIRS):
        alone = explain_similarity(model, composite, images[image], ids[text], mask[text])
        assert alone.image_index.tolist() == alone.text_index.tolist() == [0]
        for field in ('image_relevance', 'patch_relevance', 'embedding_relevance', 'similarity'):
            assert relative_difference(getattr(batch, field)[row], getattr(alone, field)[0]) < 1e-10, field
    default = explain_similarity(model, composite, images, ids, mask)
    matching = explain_similarity(model, composite, images, ids, mask, pairs=[(0, 0), (1, 1), (2, 2)])
    assert default.image_index.tolist() == default.text_index.tolist() == [0, 1, 2]
    assert torch.equal(default.image_relevance, matching.image_relevance)
    assert torch.equal(default.embedding_relevance, matching.embedding_relevance)
    assert not torch.allclose(default.image_relevance[0], batch.image_relevance[0])


def test_patch_relevance_sums_the_pixels_of_each_patch():
    model = two_tower('clip')()
    images, ids, mask = inputs(model)
    result = explain_similarity(model, AttnLRP(), images, ids, mask)
    size = model.config.vision_config.patch_size
    assert result.patch_relevance.shape == (3, 16 // size, 16 // size)
    # patch (1, 2): rows size..2*size, columns 2*size..3*size
    expected = result.image_relevance[:, :, size:2 * size, 2 * size:3 * size].sum((1, 2, 3))
    assert torch.allclose(result.patch_relevance[:, 1, 2], expected, rtol=1e-12)


def test_text_composite_applies_to_the_text_side_only():
    model = two_tower('clip')()
    images, ids, mask = inputs(model)
    mixed = explain_similarity(model, AttnLRPViT(), images, ids, mask, text_composite=AttnLRP())
    vision = explain_similarity(model, AttnLRPViT(), images, ids, mask)
    plain = explain_similarity(model, AttnLRP(), images, ids, mask)
    assert torch.equal(mixed.image_relevance, vision.image_relevance)
    assert torch.equal(mixed.embedding_relevance, plain.embedding_relevance)
    # the presets differ on both sides, so the comparisons above are not trivially true
    assert relative_difference(vision.embedding_relevance, plain.embedding_relevance) > 1e-3
    assert relative_difference(vision.image_relevance, plain.image_relevance) > 1e-3


def test_clip_quick_gelu_gets_the_identity_rule():
    '''CLIP's ``x * sigmoid(1.702 x)`` is one QuickGELUActivation module: the identity rule (AttnLRP Eq. 9) in every
    composite, so the engine never sees the product of x and the sigmoid.'''
    model = two_tower('clip')()
    activations = [module for module in model.modules() if type(module).__name__ == 'QuickGELUActivation']
    assert len(activations) == 4
    for composite_type in (AttnLRP, CPLRP, AttnLRPViT, CPLRPViT):
        composite = composite_type()
        assert all(type(composite.template(module)) is IdentityRule for module in activations)


@pytest.mark.parametrize('kind', KINDS)
def test_model_bit_identical_after_the_call_and_after_an_exception(kind):
    model = two_tower(kind)().eval()
    images, ids, mask = inputs(model)
    composite = AttnLRP()
    before = snapshot(model)
    explain_similarity(model, composite, images, ids, mask)
    assert_restored(model, before)
    # exceptions in the image pass and in the text pass (the latter after the image pass succeeded)
    for module in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
        handle = module.register_forward_pre_hook(lambda module, args: 1 / 0 if torch.is_grad_enabled() else None)
        before = snapshot(model)
        with pytest.raises(ZeroDivisionError):
            explain_similarity(model, composite, images, ids, mask)
        assert_restored(model, before)
        handle.remove()
        assert not torch.overrides._get_current_function_mode_stack()
        assert not composite.handles
    assert all(param.grad is None for param in model.parameters())
    # the composite is reusable
    explain_similarity(model, composite, images, ids, mask)


def test_refuses_bad_input():
    model = two_tower('clip')()
    images, ids, mask = inputs(model, images=3, texts=2)
    composite = AttnLRP()
    with pytest.raises(ValueError, match='3 images and 2 texts.*pairs='):
        explain_similarity(model, composite, images, ids, mask)
    with pytest.raises(ValueError, match='attention_mask has shape'):
        explain_similarity(model, composite, images[:2], ids, mask[:, :-1])
    with pytest.raises(ValueError, match='text index out of range'):
        explain_similarity(model, composite, images, ids, mask, pairs=[(0, 1), (1, 2)])
    with pytest.raises(ValueError, match='image index out of range'):
        explain_similarity(model, composite, images, ids, mask, pairs=(-1, 0))
    with pytest.raises(ValueError, match='integer indices'):
        explain_similarity(model, composite, images, ids, mask, pairs=[(0.5, 1)])
    with pytest.raises(ValueError, match='shape \\(pairs, 2\\)'):
        explain_similarity(model, composite, images, ids, mask, pairs=[(0, 1, 2)])
    with pytest.raises(ValueError, match='"all"'):
        explain_similarity(model, composite, images, ids, mask, pairs='every')
    with pytest.raises(ValueError, match='floating-point'):
        explain_similarity(model, composite, (images * 100).to(torch.uint8), ids, mask, pairs='all')
    with pytest.raises(ValueError, match='channels, height, width'):
        explain_similarity(model, composite, images[:, 0, 0], ids, mask, pairs='all')
    with pytest.raises(ValueError, match='integer tensor of token ids'):
        explain_similarity(model, composite, images, ids.double(), mask, pairs='all')
    with pytest.raises(TypeError, match='has no get_image_features'):
        explain_similarity(model.vision_model, composite, images, ids, mask, pairs='all')
    assert not composite.handles
