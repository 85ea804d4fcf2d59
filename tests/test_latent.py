'''Latent relevance (zennit_attn.latent): relevance recorded at module outputs and at the operation sites of the
engine (``'<module>.<op>'``) during an attribution.'''
import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.engine import op_listeners
from zennit_attn.latent import per_head, per_neuron, per_token, record_relevance, top_k
from zennit_attn.rules import LayerNormRule

from helpers import Twice
from toys import Toy, hook_count, toy_input
from restoration import relative_difference
from tiny_vit import attribute, image, make_vit


TARGET = torch.tensor([1, 3])
BLOCK = 'encoder.layers.encoder_layer_0'
LAST = 'encoder.layers.encoder_layer_1'
# operation sites of the engine: the fused attention core's output is the attention context (batch, heads, tokens,
# head_dim); unfolded, the context is the second matmul; the out-projection is a functional linear call
ATTENTION = f'{BLOCK}.self_attention'
CONTEXT = f'{ATTENTION}.attention'
UNFOLDED_CONTEXT = f'{ATTENTION}.matmul_1'
OUT_PROJECTION = f'{ATTENTION}.linear_1'


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
    with record_relevance(model, ['encoder.layers.*.self_attention.attention', OUT_PROJECTION]) as recorded:
        attribute(model, AttnLRP(epsilon=1e-12), image(model), TARGET)
    assert sorted(recorded) == sorted([CONTEXT, f'{LAST}.self_attention.attention', OUT_PROJECTION])
    assert recorded.calls == dict.fromkeys(recorded, 1)
    context = recorded[CONTEXT]
    batch, heads, tokens, head_dim = context.shape
    assert (batch, heads, tokens, head_dim) == (2, 4, 17, 8)
    merged = context.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    assert torch.allclose(per_head(merged, num_heads=heads), per_head(context), rtol=1e-12)
    assert per_head(context).sum().item() == pytest.approx(context.sum().item(), rel=1e-12)
    assert per_head(context, keep_batch=True).shape == (batch, heads)
    # the context (the attention core's output) carries what arrives at the output projection's output, up to its ε
    # and its bias's share
    assert per_head(context).sum().item() == pytest.approx(recorded[OUT_PROJECTION].sum().item(), rel=1e-6)
    with pytest.raises(ValueError, match='num_heads'):
        per_head(merged)
    with pytest.raises(ValueError, match='divisible'):
        per_head(merged, num_heads=5)
    with pytest.raises(ValueError, match='heads=3'):
        per_head(context, num_heads=3)


def test_out_projection_site_carries_the_relevance_of_the_attention_output():
    '''The out-projection site's output is the attention module's output (tokens * batch, width): the relevance at
    the MultiheadAttention module (its first output) is the same, re-arranged.'''
    model = make_vit('tiny')
    with record_relevance(model, [OUT_PROJECTION, ATTENTION]) as recorded:
        attribute(model, AttnLRP(epsilon=1e-12), image(model), TARGET)
    module = recorded[ATTENTION]  # (batch, tokens, width), batch first
    site = recorded[OUT_PROJECTION]  # (tokens * batch, width), sequence first
    assert torch.equal(site.reshape(17, 2, 32).transpose(0, 1), module)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_fused_and_unfolded_attention_give_the_same_latent_relevance(composite_type):
    '''The context relevance of the fused core equals that of the unfolded chain's context matmul; unfolded, AttnLRP
    also records the probabilities (softmax) and the scores.'''
    model = make_vit('tiny')
    records = {}
    for fused in (True, False):
        with record_relevance(model, [f'{ATTENTION}.*', 'encoder.add']) as recorded:
            _, relevance = attribute(model, composite_type(epsilon=1e-12, fused_attention=fused), image(model), TARGET)
        records[fused] = dict(recorded), relevance
    (fused, fused_input), (unfolded, unfolded_input) = records[True], records[False]
    assert relative_difference(unfolded[UNFOLDED_CONTEXT], fused[CONTEXT]) < 1e-9
    assert relative_difference(unfolded_input, fused_input) < 1e-9
    for name in ('linear', 'linear_1'):
        assert relative_difference(unfolded[f'{ATTENTION}.{name}'], fused[f'{ATTENTION}.{name}']) < 1e-9
    assert relative_difference(unfolded['encoder.add'], fused['encoder.add']) < 1e-9
    probabilities = f'{ATTENTION}.softmax'
    if composite_type is AttnLRP:
        assert unfolded[probabilities].shape == (2, 4, 17, 17)
        assert unfolded[f'{ATTENTION}.matmul'].shape == (2, 4, 17, 17)
        # the uniform rule of the context matmul gives the probabilities half of the context's relevance (up to ε)
        assert unfolded[probabilities].sum().item() == pytest.approx(
            0.5 * unfolded[UNFOLDED_CONTEXT].sum().item(), rel=1e-6)
    else:
        # CP-LRP: the probabilities are constant, no relevance flows into them or the scores
        assert probabilities not in unfolded
        assert f'{ATTENTION}.matmul' not in unfolded  # no relevance reaches the scores


@pytest.mark.parametrize('inside', [False, True])
def test_works_with_the_gradient_attributor_in_either_order(inside):
    '''The context may be entered outside or inside the attributor's composite context, with the same records.'''
    model = make_vit('tiny')
    x = image(model)
    onehot = torch.nn.functional.one_hot(TARGET, 7).double()
    before = hook_count(model)
    patterns = ['encoder.add', f'{ATTENTION}.*']
    with record_relevance(model, patterns) as reference:
        attribute(model, CPLRP(fused_attention=False), x, TARGET)
    if inside:
        with Gradient(model, CPLRP(fused_attention=False)) as attributor, \
                record_relevance(model, patterns) as recorded:
            attributor(x, lambda y: y * onehot)
    else:
        with record_relevance(model, patterns) as recorded, \
                Gradient(model, CPLRP(fused_attention=False)) as attributor:
            attributor(x, lambda y: y * onehot)
    # CP-LRP: the (scaled) scores get no relevance (absent, but matched); the records do not depend on the order
    assert {f'{ATTENTION}.matmul', f'{ATTENTION}.softmax'} <= set(recorded.matched)
    assert f'{ATTENTION}.matmul' not in recorded and f'{ATTENTION}.softmax' not in recorded
    assert sorted(recorded) == sorted(reference)
    assert all(torch.equal(recorded[name], reference[name]) for name in reference)
    assert UNFOLDED_CONTEXT in recorded and 'encoder.add' in recorded
    assert hook_count(model) == before
    assert op_listeners.get() == ()
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


def test_watch_outputs_sees_modules_and_operation_sites_and_leaves_no_hooks():
    from zennit_attn.latent import watch_outputs
    model = make_vit('tiny')
    before, listeners = hook_count(model), op_listeners.get()
    seen, starts = [], []
    with watch_outputs(model, [f'{BLOCK}.mlp.1', CONTEXT], lambda name, tensor: seen.append((name, tensor.shape)),
                       on_start=starts.append) as matched:
        attribute(model, AttnLRP(), image(model), TARGET)
    assert seen == [(CONTEXT, (2, 4, 17, 8)), (f'{BLOCK}.mlp.1', (2, 17, 64))]
    assert starts == [[f'{BLOCK}.mlp.1']] and matched == [f'{BLOCK}.mlp.1', CONTEXT]
    assert hook_count(model) == before and op_listeners.get() == listeners
