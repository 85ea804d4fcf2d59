'''Steering (zennit_attn.steering): removable unit edits during a forward and generate(), relevance-ranked units, and
the steering effect against random units.'''
import pytest
import torch

from zennit_attn.steering import UnitEdit, relevant_units, steer, steering_effect, target_probability

from toys import hook_count


pytestmark = pytest.mark.usefixtures('single_thread')

MLP = 'model.layers.0.mlp'
O_PROJ = 'model.layers.1.self_attn.o_proj'
HEADS, HIDDEN = 4, 32


def llama():
    '''A tiny random Llama in float64 (exact comparisons), with a key/value cache.'''
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, bos_token_id=3,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope='module')
def model():
    return llama()


def prompt():
    ids = torch.randint(4, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model):
    return dict(
        state={name: value.clone() for name, value in model.state_dict().items()},
        ids={name: id(parameter) for name, parameter in model.named_parameters()},
        hooks=hook_count(model),
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after['hooks'] == before['hooks']
    assert after['ids'] == before['ids']
    assert after['state'].keys() == before['state'].keys()
    assert all(torch.equal(after['state'][name], before['state'][name]) for name in before['state'])


# ------------------------------------------------------------------------------------------------ removal
def test_hooks_are_removed_and_the_model_is_bit_identical(model):
    inputs = prompt()
    before, reference = snapshot(model), logits(model, inputs)
    edits = {MLP: UnitEdit([0, 5, 7], scale=6.), O_PROJ: UnitEdit([1], value=0., num_heads=HEADS, on='input')}
    with steer(model, edits) as handle:
        assert handle.active and hook_count(model) == before['hooks'] + 2
        assert not torch.allclose(logits(model, inputs), reference)  # the edit is live
    assert not handle.active
    assert_unchanged(model, before)
    assert torch.equal(logits(model, inputs), reference)
    # the plain handle, removed twice
    handle = steer(model, edits)
    assert not torch.allclose(logits(model, inputs), reference)
    handle.remove()
    handle.remove()
    assert_unchanged(model, before)
    assert torch.equal(logits(model, inputs), reference)


def test_hooks_are_removed_after_an_exception(model):
    inputs = prompt()
    before, reference = snapshot(model), logits(model, inputs)
    with pytest.raises(RuntimeError, match='inside'):
        with steer(model, {MLP: UnitEdit([1, 2], scale=10.)}):
            logits(model, inputs)
            raise RuntimeError('inside')
    assert_unchanged(model, before)
    assert torch.equal(logits(model, inputs), reference)
    # an edit that fails inside the forward (unit out of range) is removed as well
    with pytest.raises(IndexError, match='out of range.*has 32'):
        with steer(model, {MLP: UnitEdit([40], scale=2.)}):
            logits(model, inputs)
    assert_unchanged(model, before)


def test_bad_edits_attach_nothing(model):
    before = hook_count(model)
    with pytest.raises(KeyError, match='model.layers.0.mlp'):
        steer(model, {MLP: UnitEdit([0], scale=2.), 'model.layers.0.mpl': UnitEdit([0], scale=2.)})
    with pytest.raises(TypeError, match='UnitEdit'):
        steer(model, {MLP: 2.})
    with pytest.raises(ValueError, match='exactly one'):
        UnitEdit([0], scale=2., value=1.)
    with pytest.raises(ValueError, match='exactly one'):
        UnitEdit([0])
    with pytest.raises(ValueError, match='duplicates'):
        UnitEdit([1, 1], scale=2.)
    with pytest.raises(ValueError, match='one per unit'):
        UnitEdit([1, 2], scale=[1., 2., 3.])
    with pytest.raises(TypeError, match='integer'):
        UnitEdit([0.5], scale=2.)
    assert hook_count(model) == before


def test_heads_must_divide_the_width(model):
    with pytest.raises(ValueError, match='not divisible by num_heads=5'):
        with steer(model, {O_PROJ: UnitEdit([0], scale=0., num_heads=5, on='input')}):
            logits(model, prompt())


# ------------------------------------------------------------------------------------------------ what is edited
def test_scale_one_is_a_no_op(model):
    inputs = prompt()
    reference = logits(model, inputs)
    edits = {
        MLP: UnitEdit(range(HIDDEN), scale=1.),
        O_PROJ: UnitEdit([0, 3], scale=1., num_heads=HEADS, on='input'),
        'model.layers.1.self_attn': UnitEdit([2, 4], scale=[1., 1.]),  # a tuple output
    }
    with steer(model, edits):
        assert torch.equal(logits(model, inputs), reference)


def capture(module, on, after_steering):
    '''Record the tensor an edit with ``on`` sees (before steering: register first) or produces (register last).'''
    seen = {}
    if on == 'output':
        def hook(module, args, output):
            seen['x'] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return module.register_forward_hook(hook), seen

    def pre_hook(module, args):
        seen['x'] = args[0].detach().clone()
    return module.register_forward_pre_hook(pre_hook), seen


@pytest.mark.parametrize('name, edit, expected', [
    (MLP, UnitEdit([3, 0, 17], scale=2.5), lambda x, f: 2.5 * x if f in (0, 3, 17) else x),
    (MLP, UnitEdit([3, 17], scale=[-1., 4.]), lambda x, f: {3: -x, 17: 4 * x}.get(f, x)),
    (MLP, UnitEdit([5, 6], value=0.25), lambda x, f: torch.full_like(x, 0.25) if f in (5, 6) else x),
    ('model.layers.1.self_attn', UnitEdit([9], value=-3.), lambda x, f: torch.full_like(x, -3.) if f == 9 else x),
    # heads: features h * 8 ... h * 8 + 7 of the output projection's input (HIDDEN / HEADS = 8)
    (O_PROJ, UnitEdit([2], value=0., num_heads=HEADS, on='input'),
     lambda x, f: torch.zeros_like(x) if 16 <= f < 24 else x),
    (O_PROJ, UnitEdit([0, 3], scale=[2., 3.], num_heads=HEADS, on='input'),
     lambda x, f: 2 * x if f < 8 else (3 * x if f >= 24 else x)),
])
def test_edits_change_exactly_the_chosen_units(model, name, edit, expected):
    module = dict(model.named_modules())[name]
    before_handle, original = capture(module, edit.on, False)
    handle = steer(model, {name: edit})
    after_handle, edited = capture(module, edit.on, True)
    try:
        logits(model, prompt())
    finally:
        for item in (after_handle, handle, before_handle):
            item.remove()
    x, y = original['x'], edited['x']
    assert x.shape == y.shape and x.shape[-1] == HIDDEN
    for feature in range(HIDDEN):  # one feature at a time, independently of the edit's indexing
        assert torch.equal(y[..., feature], expected(x[..., feature], feature)), feature


# ------------------------------------------------------------------------------------------------ generation
def test_generate_with_the_cache_edits_every_step(model):
    inputs = prompt()
    edits = {MLP: UnitEdit([1, 4, 9, 20], scale=8.), O_PROJ: UnitEdit([1], value=0., num_heads=HEADS, on='input')}
    steps = 5
    with steer(model, edits):
        generated = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, use_cache=True, output_scores=True,
            return_dict_in_generate=True,
        )
        # reference: a full forward over the whole sequence at every step, without a cache
        ids = inputs['input_ids']
        scores = []
        for _ in range(steps):
            with torch.no_grad():
                step = model(input_ids=ids, use_cache=False).logits[:, -1]
            scores.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated.sequences, ids)
    for cached, full in zip(generated.scores, scores):  # generate() returns its scores in float32
        torch.testing.assert_close(cached.double(), full, rtol=1e-6, atol=1e-6)
    # the edit matters at every step: unsteered logits of the same sequences differ at each generated position
    with torch.no_grad():
        plain = model(input_ids=ids[:, :-1]).logits[:, -steps:]
    for index, full in enumerate(scores):
        assert (plain[:, index] - full).abs().max() > 1e-3, index


# ------------------------------------------------------------------------------------------------ relevance and effect
class Driven(torch.nn.Module):
    '''``logits = head(relu(hidden(x)))`` where only hidden units 0..3 feed class 0 (all with positive weights); the
    other classes read the other units. Amplifying units 0..3 must raise p(class 0); random units mostly do not.'''
    def __init__(self, features=6, hidden=32, classes=3):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = torch.nn.Linear(features, hidden)
        self.act = torch.nn.ReLU()
        self.head = torch.nn.Linear(hidden, classes, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.rand(hidden, features, generator=generator) * 0.5)
            self.hidden.bias.fill_(0.1)
            weight = torch.zeros(classes, hidden)
            weight[0, :4] = 0.3
            weight[1:, 4:] = torch.rand(classes - 1, hidden - 4, generator=generator) * 0.2
            self.head.weight.copy_(weight)

    def forward(self, x):
        return self.head(self.act(self.hidden(x)))


def test_relevant_units_find_the_units_that_drive_the_target():
    model = Driven().double().eval()
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    found = relevant_units(model, x, 0, 'act', 4)
    assert sorted(found.indices.tolist()) == [0, 1, 2, 3]
    assert found.relevance.shape == (32,)
    # the head is linear without bias: each unit's relevance is its contribution a_j * w_0j, summed over the batch
    contribution = (model.act(model.hidden(x)) * model.head.weight[0]).sum(0).detach()
    torch.testing.assert_close(found.relevance, contribution, rtol=1e-6, atol=1e-9)

    effect = steering_effect(model, x, 0, 'act', found.indices, scale=3., trials=12, seed=0)
    assert effect.width == 32 and effect.k == 4 and len(effect.random) == 12
    assert effect.after > effect.before + 0.2
    assert effect.after > max(effect.random)
    assert effect.gain > 5 * abs(effect.random_gain)
    assert 'random-4' in str(effect) and '| act |' in effect.markdown()
    # seeded: the same random draws again
    again = steering_effect(model, x, 0, 'act', found.indices, scale=3., trials=12, seed=0)
    assert again.random == effect.random and again.random_units == effect.random_units


def test_target_probability_is_the_softmax_at_the_last_real_token(model):
    inputs = prompt()
    inputs['attention_mask'][1, -2:] = 0  # right padding in the second sample
    full = logits(model, inputs).softmax(-1)
    probability = target_probability(model, inputs, [7, 11])
    torch.testing.assert_close(probability, torch.stack([full[0, -1, 7], full[1, -3, 11]]))
    with pytest.raises(ValueError, match='not in \\[0, 50\\)'):
        target_probability(model, inputs, 50)


def test_relevant_units_and_effect_on_a_language_model(model):
    inputs = prompt()
    found = relevant_units(model, inputs, 7, MLP, 5)
    assert found.indices.shape == (5,) and found.relevance.shape == (HIDDEN,)
    assert torch.equal(found.values, found.relevance[found.indices])
    assert torch.equal(found.values, found.relevance.sort(descending=True).values[:5])
    effect = steering_effect(model, inputs, 7, MLP, found.indices, scale=4., trials=3)
    assert effect.before == pytest.approx(target_probability(model, inputs, 7).mean().item(), rel=1e-12)
    with steer(model, {MLP: UnitEdit(found.indices, scale=4.)}):
        assert effect.after == pytest.approx(target_probability(model, inputs, 7).mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match='no relevance reached'):
        relevant_units(model, inputs, 7, 'model.layers.0.mlpp', 5)
    with pytest.raises(ValueError, match='k must be an int in \\[1, 32\\]'):
        steering_effect(model, inputs, 7, MLP, [0], scale=2., k=33)


def test_relevant_units_at_an_input_conserve_the_output_relevance(model):
    '''The neurons entering the (bias-free) down projection: the ε-rule conserves, so their relevance sums to the
    relevance at the projection's output, recorded independently.'''
    from zennit_attn.composites import AttnLRP
    from zennit_attn.latent import record_relevance
    inputs = prompt()
    before = hook_count(model)
    with record_relevance(model, f'{MLP}.down_proj') as recorded:
        found = relevant_units(model, inputs, 7, f'{MLP}.down_proj', 6, on='input', composite=AttnLRP(epsilon=1e-12))
        output_relevance = recorded[f'{MLP}.down_proj'].sum().item()
    assert hook_count(model) == before
    assert found.relevance.shape == (40,)  # intermediate_size
    assert found.relevance.sum().item() == pytest.approx(output_relevance, rel=1e-9)
    # heads entering the output projection: per-head sums of the same kind of input relevance
    heads = relevant_units(model, inputs, 7, O_PROJ, 2, on='input', num_heads=HEADS)
    features = relevant_units(model, inputs, 7, O_PROJ, 1, on='input').relevance
    torch.testing.assert_close(heads.relevance, features.reshape(HEADS, -1).sum(1))


@pytest.mark.parametrize('name,sibling', [('self_attn.q_proj', 'self_attn.k_proj'), ('mlp.up_proj', 'mlp.gate_proj')])
def test_relevant_units_refuse_an_input_shared_with_another_module(model, name, sibling):
    '''q, k and v projections (gate and up) receive one tensor: its gradient sums what all of them return, which is
    not the relevance of one module's input units.'''
    layer = O_PROJ.rsplit('.', 2)[0]
    before = hook_count(model)
    with pytest.raises(ValueError, match=f'also the input of .*{sibling}'):
        relevant_units(model, prompt(), 7, f'{layer}.{name}', 3, on='input')
    assert hook_count(model) == before
