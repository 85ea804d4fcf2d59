'''zennit_attn.methods: one interface for the baselines and the AttnLRP composites.'''
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import VisionTransformer
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRPViT
from zennit_attn.methods import METHODS, RecordAttention, UnknownMethodError, attribute, available_methods

pytestmark = pytest.mark.usefixtures('single_thread')


TINY = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7)
ALL_METHODS = [
    'gradient', 'input_x_gradient', 'integrated_gradients', 'smoothgrad', 'attention_rollout', 'grad_x_attn_rollout',
    'random', 'attnlrp', 'attnlrp_vit', 'cp_lrp', 'cp_lrp_vit',
]


def make_vit(dtype=torch.float64, seed=0, **overrides):
    '''A small random torchvision ViT with a random (not zero-initialised) head.'''
    torch.manual_seed(seed)
    model = VisionTransformer(**{**TINY, **overrides})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = model.heads.head
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / head.in_features ** 0.5)
        head.bias.copy_(torch.randn(head.bias.shape, generator=generator) * 0.1)
    return model.to(dtype).eval()


def images(batch=2, size=32, dtype=torch.float64, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_registry_lists_baselines_and_composites():
    assert set(ALL_METHODS) <= set(METHODS)
    assert set(METHODS) <= set(available_methods())
    assert 'epsilon_plus' in available_methods()  # any other Zennit composite by name


@pytest.mark.parametrize('method', ALL_METHODS)
def test_every_method_returns_input_shape_and_finite_values(method):
    model = make_vit(torch.float32)
    x = images(dtype=torch.float32)
    modules = [name for name, _ in model.named_modules()]
    before = hooks(model)
    relevance = attribute(model, x, torch.tensor([1, 4]), method)
    assert relevance.shape == x.shape
    assert relevance.dtype == x.dtype
    assert torch.isfinite(relevance).all()
    assert relevance.abs().sum() > 0
    assert not relevance.requires_grad
    # the model is left as it was: same modules, no instance forward, no hooks
    assert [name for name, _ in model.named_modules()] == modules
    assert not any('forward' in vars(module) for module in model.modules())
    assert hooks(model) == before


def plain_forward(model, x):
    '''Hand-written forward of a torchvision ViT that returns the logits and the attention probabilities of every
    layer (per head, still attached to the graph).'''
    batch = x.shape[0]
    conv = model.conv_proj
    h = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride).reshape(batch, model.hidden_dim, -1).permute(0, 2, 1)
    h = torch.cat([model.class_token.expand(batch, -1, -1), h], 1) + model.encoder.pos_embedding
    probabilities = []
    for block in model.encoder.layers:
        mha = block.self_attention
        y = block.ln_1(h)
        heads, width = mha.num_heads, y.shape[-1]
        q, k, v = (
            F.linear(y, w, b).reshape(batch, -1, heads, width // heads).transpose(1, 2)
            for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))
        )
        attention = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, -1)
        probabilities.append(attention)
        context = (attention @ v).transpose(1, 2).reshape(batch, -1, width)
        h = h + F.linear(context, mha.out_proj.weight, mha.out_proj.bias)
        h = h + block.mlp(block.ln_2(h))
    logits = model.heads(model.encoder.ln(h)[:, 0])
    return logits, probabilities


def upsample(patches, model, channels=3):
    '''(B, patches) -> (B, C, H, W): nearest upsampling by hand, divided by the number of channels.'''
    batch = patches.shape[0]
    grid = model.image_size // model.patch_size
    out = torch.zeros(batch, channels, model.image_size, model.image_size, dtype=patches.dtype)
    for index in range(grid * grid):
        row, col = divmod(index, grid)
        size = model.patch_size
        out[:, :, row * size:(row + 1) * size, col * size:(col + 1) * size] = patches[:, index, None, None, None]
    return out / channels


def test_plain_forward_matches_the_model():
    model = make_vit(num_layers=1)
    x = images()
    logits, _ = plain_forward(model, x)
    assert torch.allclose(logits, model(x), atol=1e-10)


def test_record_attention_records_every_layer_without_changing_the_model():
    '''The rollouts' recorder (the engine's ProbabilityRecorder, no composite) records the probabilities of every
    layer in forward order, per head, still attached to the graph; the forward is unchanged up to rounding (attention
    runs unfolded), nothing is inserted, and everything is removed afterwards, also after an error.'''
    model = make_vit(num_layers=2)
    x = images()
    expected_logits, expected = plain_forward(model, x)
    modules = [(name, module) for name, module in model.named_modules()]
    before = hooks(model)
    plain = model(x)
    recorder = RecordAttention(model)
    with recorder:
        assert [(name, module) for name, module in model.named_modules()] == modules
        logits = model(x.clone().requires_grad_(True))
    assert torch.allclose(logits, expected_logits, rtol=1e-12, atol=1e-12)
    assert len(recorder.attentions) == 2
    for actual, reference in zip(recorder.attentions, expected):
        assert actual.shape == (2, 4, 17, 17)
        assert torch.allclose(actual, reference, rtol=1e-12, atol=1e-14)
    # differentiable: the logits depend on the recorded probabilities
    grads = torch.autograd.grad(logits[:, 0].sum(), recorder.attentions)
    assert all(grad.abs().sum() > 0 for grad in grads)
    assert hooks(model) == before
    assert not torch.overrides._get_current_function_mode_stack()
    with pytest.raises(RuntimeError, match='boom'):
        with RecordAttention(model):
            model(x)
            raise RuntimeError('boom')
    assert hooks(model) == before
    assert not torch.overrides._get_current_function_mode_stack()
    assert torch.equal(model(x), plain)


def test_attention_rollout_on_one_layer_equals_hand_computation():
    '''One layer: rollout = rownorm(mean_h A + I) = (mean_h A + I) / 2; the class-token row over the patches.'''
    model = make_vit(num_layers=1)
    x = images()
    _, (attention,) = plain_forward(model, x)
    mean = attention.mean(1)
    expected = upsample(((mean + torch.eye(mean.shape[-1])) / 2)[:, 0, 1:], model)
    actual = attribute(model, x, 0, 'attention_rollout')
    assert torch.allclose(actual, expected, atol=1e-12)
    assert torch.allclose(actual.sum(1)[:, 0, 0], mean[:, 0, 1] / 2)  # channel sum at a pixel = its patch value


def test_attention_rollout_on_two_layers_multiplies_through_layers():
    model = make_vit(num_layers=2)
    x = images()
    _, attentions = plain_forward(model, x)
    eye = torch.eye(attentions[0].shape[-1], dtype=x.dtype)
    first, second = ((a.mean(1) + eye) / 2 for a in attentions)
    expected = upsample((second @ first)[:, 0, 1:], model)
    assert torch.allclose(attribute(model, x, 0, 'attention_rollout'), expected, atol=1e-12)


@pytest.mark.parametrize('num_layers', [1, 2])
def test_grad_x_attn_rollout_equals_hand_computation(num_layers):
    '''Chefer et al. (2021b): Ā = E_h[(∇A ⊙ A)^+], R = I, R <- R + Ā R; class-token row over the patches.'''
    model = make_vit(num_layers=num_layers)
    x = images()
    target = torch.tensor([2, 5])
    logits, attentions = plain_forward(model, x)
    # gradients w.r.t. the intermediate probabilities (including, for layer 1, the path through layer 2)
    gradients = torch.autograd.grad(logits[torch.arange(2), target].sum(), attentions)
    attentions = [a.detach() for a in attentions]
    relevance = torch.eye(attentions[0].shape[-1], dtype=x.dtype).expand(2, -1, -1)
    for attention, grad in zip(attentions, gradients):
        relevance = relevance + (grad * attention).clamp(min=0).mean(1) @ relevance
    expected = upsample(relevance[:, 0, 1:], model)
    actual = attribute(model, x, target, 'grad_x_attn_rollout')
    assert torch.allclose(actual, expected, atol=1e-12)
    # class dependent, unlike attention rollout
    assert not torch.allclose(actual, attribute(model, x, torch.tensor([0, 1]), 'grad_x_attn_rollout'))


def test_gradient_methods_seed_the_target_logit():
    '''Gradient = ∂y_t/∂x (seed onehot); input × gradient = x ⊙ that; integrated gradients with n_iter=1 from a zero
    baseline = x ⊙ ∂y_t/∂x; smoothgrad with n_iter=1 = gradient.'''
    model = make_vit()
    x = images()
    target = torch.tensor([3, 0])
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf)[torch.arange(2), target].sum(), leaf)
    assert torch.allclose(attribute(model, x, target, 'gradient'), grad)
    assert torch.allclose(attribute(model, x, target, 'input_x_gradient'), x * grad)
    assert torch.allclose(attribute(model, x, target, 'integrated_gradients', n_iter=1), x * grad)
    assert torch.allclose(attribute(model, x, target, 'smoothgrad', n_iter=1), grad)


def test_integrated_gradients_on_linear_model_is_input_x_gradient():
    '''Zennit's defaults: zero baseline; on a linear model IG is exact: w ⊙ x.'''
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3).double()
    x = torch.randn(4, 10, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    expected = model.weight[target].detach() * x
    assert torch.allclose(attribute(model, x, target, 'integrated_gradients'), expected)
    assert torch.allclose(attribute(model, x, target, 'input_x_gradient'), expected)


def test_composites_use_logit_seed_and_options():
    '''Composite names run Zennit's Gradient seeded with y * onehot; options go to the constructor.'''
    model = make_vit()
    x = images()
    target = torch.tensor([1, 2])
    with Gradient(model, AttnLRPViT(conv_gamma=0.5, linear_gamma=0.1)) as attributor:
        onehot = F.one_hot(target, 7).to(x.dtype)
        _, expected = attributor(x, lambda y: y * onehot)
    actual = attribute(model, x, target, 'attnlrp_vit', conv_gamma=0.5, linear_gamma=0.1)
    assert torch.allclose(actual, expected)
    assert torch.allclose(attribute(model, x, target, AttnLRPViT(conv_gamma=0.5, linear_gamma=0.1)), expected)
    assert not torch.allclose(actual, attribute(model, x, target, 'attnlrp_vit'))


def test_seeded_methods_are_reproducible():
    model = make_vit(torch.float32)
    x = images(dtype=torch.float32)
    for method in ('random', 'smoothgrad'):
        first = attribute(model, x, 0, method, n_iter=3) if method == 'smoothgrad' else attribute(model, x, 0, method)
        again = attribute(model, x, 0, method, n_iter=3) if method == 'smoothgrad' else attribute(model, x, 0, method)
        assert torch.equal(first, again)
        other = attribute(model, x, 0, method, seed=1, **({'n_iter': 3} if method == 'smoothgrad' else {}))
        assert not torch.equal(first, other)
    noise = attribute(model, x, 0, 'random')
    assert noise.min() >= 0 and noise.max() < 1


def test_registry_errors_are_clear():
    model = make_vit(torch.float32)
    x = images(dtype=torch.float32)
    with pytest.raises(UnknownMethodError, match="unknown attribution method 'lime'.*available: .*attention_rollout"):
        attribute(model, x, 0, 'lime')
    with pytest.raises(KeyError):
        attribute(model, x, 0, 'lime')
    with pytest.raises(TypeError, match="invalid options .*'n_steps'.* 'integrated_gradients'"):
        attribute(model, x, 0, 'integrated_gradients', n_steps=5)
    with pytest.raises(TypeError, match="'attnlrp_vit'"):
        attribute(model, x, 0, 'attnlrp_vit', gamma=0.1)
    with pytest.raises(TypeError, match='Composite instance'):
        attribute(model, x, 0, AttnLRPViT(), conv_gamma=0.1)
    with pytest.raises(TypeError, match='method must be a name'):
        attribute(model, x, 0, 42)
    with pytest.raises(ValueError, match=r'target must be an int or have shape \(2,\)'):
        attribute(model, x, torch.tensor([0, 1, 2]), 'gradient')


@pytest.mark.parametrize('method', ['attention_rollout', 'grad_x_attn_rollout'])
def test_rollout_on_non_vit_raises_not_implemented(method):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    with pytest.raises(NotImplementedError, match='torchvision VisionTransformer'):
        attribute(model, torch.randn(2, 3, 8, 8), 0, method)


# ------------------------------------------------------------------------------------------------ generation targets
def generation_model(kind='llama'):
    from conformance import decoder, t5
    return t5() if kind == 't5' else decoder('llama')()


def generation_prompt(length=5, seed=7):
    from conformance import generator
    return torch.randint(2, 50, (length,), generator=generator(seed))


def hand_value(logits, token, target):
    '''The explained value written out independently of zennit_attn.methods.generation_target.'''
    if target == 'logit':
        return logits[token]
    if target == 'probability':
        return logits.exp()[token] / logits.exp().sum()
    return logits[token] - logits.exp().sum().log()


def prefix_input_x_gradient(model, source_ids, position, token, target, zero=False, encoder_length=None):
    '''(x ⊙ ∂f/∂x summed over the hidden size, f(x)) on the prefix before ``position``, by its own forward pass.'''
    embed = model.get_input_embeddings()
    with torch.no_grad():
        if encoder_length is None:
            x = embed(source_ids[None, :position])
        else:
            x = torch.cat([embed(source_ids[None, :encoder_length]),
                           model.get_decoder().embed_tokens(source_ids[None, encoder_length:position])], 1)
    x = (torch.zeros_like(x) if zero else x).requires_grad_(True)
    if encoder_length is None:
        logits = model(inputs_embeds=x).logits[0, -1]
    else:
        logits = model(inputs_embeds=x[:, :encoder_length], decoder_inputs_embeds=x[:, encoder_length:]).logits[0, -1]
    value = hand_value(logits, token, target)
    (grad,) = torch.autograd.grad(value, x)
    return (x * grad).sum(-1)[0].detach(), float(value.detach())


@pytest.mark.parametrize('target', ['logit', 'probability', 'log_probability'])
def test_generation_input_x_gradient_rows_are_gradient_times_input_of_each_token(target):
    '''Row i == x ⊙ ∂f_i/∂x of a hand loop (its own forward on the prefix before token i); nothing on later tokens.'''
    from zennit_attn import explain_generation
    model = generation_model()
    result = explain_generation(model, input_ids=generation_prompt(), max_new_tokens=3, method='input_x_gradient',
                                target=target)
    assert result.relevance.shape == (3, 8) and result.composite == 'InputXGradient'
    for row in range(3):
        position = int(result.target_positions[row])
        expected, value = prefix_input_x_gradient(model, result.source_ids, position, int(result.target_ids[row]),
                                                  target)
        assert torch.allclose(result.relevance[row, :position], expected, rtol=1e-9, atol=1e-14)
        assert torch.all(result.relevance[row, position:] == 0)
        assert float(result.target_values[row]) == pytest.approx(value, rel=1e-10)


def test_generation_input_x_gradient_contrast_and_encoder_decoder():
    '''A contrast explains f_t − f_c; for T5 the source is the encoder input followed by the decoder input.'''
    from zennit_attn import explain_generation
    model = generation_model()
    ids = generation_prompt()
    contrastive = explain_generation(model, input_ids=ids, continuation=[7, 8], contrast=9, method='input_x_gradient')
    for row, token in enumerate((7, 8)):
        position = int(contrastive.target_positions[row])
        first, _ = prefix_input_x_gradient(model, contrastive.source_ids, position, token, 'logit')
        second, _ = prefix_input_x_gradient(model, contrastive.source_ids, position, 9, 'logit')
        # one backward of z_t − z_c vs two: LlamaRMSNorm computes in float32 even for float64 models
        assert torch.allclose(contrastive.relevance[row, :position], first - second, rtol=1e-6, atol=1e-9)

    t5 = generation_model('t5')
    result = explain_generation(t5, input_ids=ids, max_new_tokens=2, method='input_x_gradient')
    for row in range(len(result.target_tokens)):
        position = int(result.target_positions[row])
        expected, _ = prefix_input_x_gradient(t5, result.source_ids, position, int(result.target_ids[row]), 'logit',
                                              encoder_length=5)
        assert torch.allclose(result.relevance[row, :position], expected, rtol=1e-9, atol=1e-14)


def test_generation_input_x_gradient_left_padded_batch_equals_one_prompt_at_a_time():
    from conformance import generator
    from zennit_attn import explain_generation
    model = generation_model()
    ids = torch.randint(2, 50, (2, 5), generator=generator(7))
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0
    batched = explain_generation(model, input_ids=ids, attention_mask=mask, max_new_tokens=2,
                                 method='input_x_gradient')
    for index in range(2):
        single = explain_generation(model, input_ids=ids[index, mask[index].bool()], max_new_tokens=2,
                                    method='input_x_gradient')
        assert batched[index].source_ids.tolist() == single.source_ids.tolist()
        assert torch.allclose(batched[index].relevance, single.relevance, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize('target', ['logit', 'log_probability'])
def test_generation_integrated_gradients_complete_from_the_zero_embedding(target):
    '''Completeness: row i sums to f_i(x) − f_i(0), with f_i(0) from the model run on zero embeddings (an independent
    forward); 20 Gauss-Legendre steps are accurate to < 1e-4 relative, the right Riemann sum only converges like 1/n.'''
    from zennit_attn import explain_generation
    model = generation_model()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # converged: no completeness warning
        result = explain_generation(model, input_ids=generation_prompt(4), max_new_tokens=2, target=target,
                                    method='integrated_gradients')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        riemann = explain_generation(model, input_ids=generation_prompt(4), continuation=result.target_ids,
                                     target=target, method='integrated_gradients', rule='riemann')
    assert result.composite == 'IntegratedGradients(zero embeddings, 20 gauss-legendre steps)'
    for row in range(2):
        position = int(result.target_positions[row])
        token = int(result.target_ids[row])
        _, at_input = prefix_input_x_gradient(model, result.source_ids, position, token, target)
        _, at_zero = prefix_input_x_gradient(model, result.source_ids, position, token, target, zero=True)
        difference = at_input - at_zero
        assert abs(difference) > 1e-3  # the check is not vacuous
        assert float(result.target_values[row]) == pytest.approx(at_input, rel=1e-10)
        assert float(result.relevance[row].sum()) == pytest.approx(difference, rel=1e-4)
        assert torch.all(result.relevance[row, position:] == 0)
        # the right Riemann sum approximates the same integral, much less accurately
        error = abs(float(riemann.relevance[row].sum()) - difference)
        assert error < 0.5 * abs(difference)
        assert error > 10 * abs(float(result.relevance[row].sum()) - difference)


def test_generation_integrated_gradients_with_one_riemann_step_is_input_x_gradient_and_warns():
    '''One right-Riemann step is x ⊙ ∇f(x); far from converged, so the completeness check warns and records the
    largest relative error, equal to the one computed from the hand loop's f(x) − f(0).'''
    from zennit_attn import explain_generation
    from zennit_attn.methods import GenerationGradients
    model = generation_model()
    ids = generation_prompt()
    ixg = explain_generation(model, input_ids=ids, max_new_tokens=2, method='input_x_gradient')
    method = GenerationGradients('integrated_gradients', n_iter=1, rule='riemann')
    with pytest.warns(UserWarning, match='integrated gradients did not converge with n_iter=1'):
        one = explain_generation(model, input_ids=ids, max_new_tokens=2, method=method)
    assert torch.allclose(one.relevance, ixg.relevance, rtol=1e-12, atol=1e-15)
    errors = []
    for row in range(2):
        position, token = int(one.target_positions[row]), int(one.target_ids[row])
        _, at_input = prefix_input_x_gradient(model, one.source_ids, position, token, 'logit')
        _, at_zero = prefix_input_x_gradient(model, one.source_ids, position, token, 'logit', zero=True)
        scale = max(abs(at_input - at_zero), float(one.relevance[row].abs().sum()))
        errors.append(abs(float(one.relevance[row].sum()) - (at_input - at_zero)) / scale)
    assert method.completeness_error == pytest.approx(max(errors), rel=1e-6)
    assert method.completeness_error > GenerationGradients.TOLERANCE


@pytest.mark.filterwarnings('ignore:integrated gradients did not converge')
def test_compare_generation_explains_one_generation_with_every_method(tmp_path):
    '''Every method explains the same tokens; the composites' rows equal explain_generation with that composite;
    the comparison figures are written.'''
    from PIL import Image
    from zennit_attn import explain_generation
    from zennit_attn.methods import GENERATION_COMPARISON, compare_generation, plot_generation_comparison
    model = generation_model()
    ids = generation_prompt()
    results = compare_generation(model, input_ids=ids, max_new_tokens=3,
                                 options={'integrated_gradients': {'n_iter': 4}, 'attnlrp': {'epsilon': 1e-12}})
    assert list(results) == list(GENERATION_COMPARISON)
    assert len({tuple(result.source_ids.tolist()) for result in results.values()}) == 1
    lrp = explain_generation(model, input_ids=ids, max_new_tokens=3, composite='cp_lrp')
    assert torch.equal(results['cp_lrp'].relevance, lrp.relevance)
    # the methods differ: the comparison is not of one method with itself
    assert not torch.allclose(results['attnlrp'].relevance, results['input_x_gradient'].relevance)
    with Image.open(plot_generation_comparison(results, tmp_path / 'matrices.png')) as image:
        assert image.size[1] > 4 * 200
    with Image.open(plot_generation_comparison(results, tmp_path / 'top.png', row=-1, k=4)) as image:
        assert image.size[0] > 4 * 300
    with pytest.raises(ValueError, match='different token sequences'):
        plot_generation_comparison({'a': results['attnlrp'], 'b': explain_generation(model, input_ids=ids[:4])})
    with pytest.raises(ValueError, match='row 3 is out of range'):
        plot_generation_comparison(results, row=3)


def test_generation_method_errors_are_clear():
    from zennit_attn import explain_generation
    from zennit_attn.methods import compare_generation
    model = generation_model()
    ids = generation_prompt()
    with pytest.raises(UnknownMethodError, match="unknown generation method 'smoothgrad'"):
        explain_generation(model, input_ids=ids, method='smoothgrad')
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['n_iter'\]"):
        explain_generation(model, input_ids=ids, n_iter=5)
    with pytest.raises(TypeError, match='takes no n_iter'):
        explain_generation(model, input_ids=ids, method='input_x_gradient', n_iter=5)
    with pytest.raises(TypeError, match='uses no composite'):
        explain_generation(model, input_ids=ids, method='integrated_gradients', composite='attnlrp')
    with pytest.raises(ValueError, match='rule must be one of'):
        explain_generation(model, input_ids=ids, method='integrated_gradients', rule='simpson')
    with pytest.raises(ValueError, match='one prompt'):
        compare_generation(model, input_ids=torch.stack([ids, ids]))
    with pytest.raises(UnknownMethodError, match='unknown or unused'):
        compare_generation(model, input_ids=ids, methods=['attnlrp'], options={'integrated_gradients': {}})
