'''Latent relevance (zennit_attn.latent): relevance recorded at module outputs during an attribution.'''
import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.latent import per_head, per_neuron, per_token, record_relevance, top_k
from zennit_attn.rules import LayerNormRule

from helpers import Twice
from test_check import Toy, hook_count, toy_input
from test_torchvision_vit import attribute, image, make_vit


TARGET = torch.tensor([1, 3])
BLOCK = 'encoder.layers.encoder_layer_0'
LAST = 'encoder.layers.encoder_layer_1'
# the fused attention core's output is the attention context
CONTEXT = f'{BLOCK}.self_attention.attnlrp_attention'


def vit_without_fc2_bias():
    model = make_vit('tiny')
    with torch.no_grad():
        model.encoder.layers[0].mlp[3].bias.zero_()
    return model


def test_mlp_neurons_sum_to_the_relevance_at_the_mlp_output():
    model = vit_without_fc2_bias()
    with record_relevance(model, f'{BLOCK}.mlp.*') as recorded:
        attribute(model, AttnLRP(epsilon=1e-12), image(model), TARGET)
    assert sorted(recorded) == [f'{BLOCK}.mlp.{index}' for index in range(5)]
    neurons = per_neuron(recorded[f'{BLOCK}.mlp.1'])
    assert neurons.shape == (model.encoder.layers[0].mlp[0].out_features,)
    # per-neuron relevance is a decomposition of the relevance at the GELU output, which the identity rule passes on
    assert neurons.sum().item() == pytest.approx(recorded[f'{BLOCK}.mlp.1'].sum().item(), rel=1e-12)
    assert torch.equal(recorded[f'{BLOCK}.mlp.0'], recorded[f'{BLOCK}.mlp.1'])
    # the bias-free ε-rule of fc2 conserves: the neurons carry exactly the relevance of the MLP output
    assert neurons.sum().item() == pytest.approx(recorded[f'{BLOCK}.mlp.3'].sum().item(), rel=1e-9)
    # eval-mode dropout returns its input: same tensor, same relevance
    assert torch.equal(recorded[f'{BLOCK}.mlp.4'], recorded[f'{BLOCK}.mlp.3'])


def test_residual_stream_of_the_last_block_is_what_flows_into_the_final_norm():
    model = make_vit('tiny')
    captured = {}
    handle = model.encoder.ln.register_forward_hook(lambda module, args, output: captured.update(x=args[0], y=output))
    try:
        with record_relevance(model, [LAST, 'encoder.layers', 'encoder.ln', 'heads']) as recorded:
            _, relevance = attribute(model, AttnLRP(epsilon=1e-12), image(model), TARGET)
    finally:
        handle.remove()
    onehot = torch.nn.functional.one_hot(TARGET, 7).double()
    assert torch.allclose(recorded['heads'], model(image(model)) * onehot, rtol=1e-12)  # the seed
    rule = LayerNormRule(epsilon=1e-12)
    (into_norm,) = rule.relevance(
        model.encoder.ln, (captured['x'].detach(),), captured['y'].detach(), recorded['encoder.ln'], (True,)
    )
    assert torch.allclose(recorded[LAST], into_norm, rtol=1e-10, atol=1e-14)
    assert torch.equal(recorded['encoder.layers'], recorded[LAST])
    # only the class token's row of the final norm carries relevance (the head reads x[:, 0])
    assert per_token(recorded['encoder.ln'])[:, 1:].abs().max() == 0


def test_per_head_relevance_of_the_attention_context():
    model = make_vit('tiny')
    with record_relevance(model, ['*.attnlrp_attention', f'{BLOCK}.self_attention.out_proj']) as recorded:
        attribute(model, AttnLRP(epsilon=1e-12), image(model), TARGET)
    context = recorded[CONTEXT]
    batch, heads, tokens, head_dim = context.shape
    assert heads == 4
    merged = context.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    assert torch.allclose(per_head(merged, num_heads=heads), per_head(context), rtol=1e-12)
    assert per_head(context).sum().item() == pytest.approx(context.sum().item(), rel=1e-12)
    assert per_head(context, keep_batch=True).shape == (batch, heads)
    # the context (the attention core's output) carries what arrives at the output projection's output, up to its ε
    assert per_head(context).sum().item() == pytest.approx(
        recorded[f'{BLOCK}.self_attention.out_proj'].sum().item(), rel=1e-6
    )
    with pytest.raises(ValueError, match='num_heads'):
        per_head(merged)
    with pytest.raises(ValueError, match='divisible'):
        per_head(merged, num_heads=5)
    with pytest.raises(ValueError, match='heads=3'):
        per_head(context, num_heads=3)


@pytest.mark.parametrize('inside', [False, True])
def test_works_with_the_gradient_attributor_in_either_order(inside):
    '''The context may be entered outside or inside the attributor's composite context, with the same records.'''
    model = make_vit('tiny')
    x = image(model)
    onehot = torch.nn.functional.one_hot(TARGET, 7).double()
    before = hook_count(model)
    with record_relevance(model, [CONTEXT]) as reference:
        attribute(model, CPLRP(), x, TARGET)
    if inside:
        with Gradient(model, CPLRP()) as attributor, record_relevance(model, ['*attnlrp_*']) as recorded:
            attributor(x, lambda y: y * onehot)
    else:
        with record_relevance(model, ['*attnlrp_*']) as recorded, Gradient(model, CPLRP()) as attributor:
            attributor(x, lambda y: y * onehot)
    # CP-LRP: the scores get no relevance (absent, but matched); the records do not depend on the order
    assert f'{BLOCK}.self_attention.attnlrp_scores' in recorded.matched
    assert f'{BLOCK}.self_attention.attnlrp_scores' not in recorded
    assert torch.equal(recorded[CONTEXT], reference[CONTEXT])
    assert 'encoder.attnlrp_position_embedding' in recorded
    assert hook_count(model) == before
    with pytest.raises(KeyError, match='no relevance recorded'):
        recorded['encoder.nothing']


def test_calls_are_summed_and_forwards_reset():
    model = Toy(Twice()).double().eval()
    x = toy_input().double()
    with record_relevance(model, ['body', 'body.act']) as recorded, Gradient(model, AttnLRP()) as attributor:
        attributor(x, lambda y: y)
        first = recorded['body.act'].clone()
        attributor(x, lambda y: y)
    assert recorded.calls == {'body': 1, 'body.act': 2}
    # identity rule: both calls of act carry the relevance of the body output
    assert torch.allclose(recorded['body.act'], 2 * recorded['body'], rtol=1e-12)
    assert torch.equal(recorded['body.act'], first)  # a new forward starts a new record


def test_helpers():
    relevance = torch.arange(24.).reshape(2, 3, 4)
    assert torch.equal(per_neuron(relevance), relevance.sum((0, 1)))
    assert torch.equal(per_neuron(relevance, dim=1), relevance.sum((0, 2)))
    assert torch.equal(per_token(relevance), relevance.sum(-1))
    indices, values = top_k(torch.tensor([0.1, -3., 2., 0.5]), 2)
    assert indices.tolist() == [2, 3] and values.tolist() == [2., 0.5]
    indices, values = top_k(torch.tensor([0.1, -3., 2., 0.5]), 2, absolute=True)
    assert indices.tolist() == [1, 2] and values.tolist() == [-3., 2.]
    assert len(top_k(torch.ones(3), 10).indices) == 3
