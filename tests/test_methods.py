'''zennit_attn.methods: one interface for the baselines and the AttnLRP composites.'''
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
