'''Safe by default: every case that used to give a plausible but wrong heatmap without an error now either gets the
right relevance (checked by conservation or a closed form) or raises a clear error naming the module and the op.'''
import pytest
import torch
import torch.nn.functional as F
import torchvision
from zennit.attribution import Gradient

import zennit_attn

from zennit_attn.composites import AttnLRP, CPLRP, UnsupportedModelError
from zennit_attn.engine import UnsupportedOperationError

from restoration import assert_restored, snapshot

pytestmark = pytest.mark.usefixtures('single_thread')


def tiny_vit(seed=0, bias=True):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12, num_classes=3,
    ).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or 'pos_embedding' in name or 'class_token' in name:
                param.copy_(0.1 * torch.randn(param.shape) if bias else torch.zeros(param.shape))
            elif 'head' in name:
                param.copy_(torch.randn(param.shape))
    return model


def images(seed=1):
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def logit_relevance(model, composite, x, target=(0, 2)):
    onehot = torch.nn.functional.one_hot(torch.tensor(target), 3).double()
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * onehot)
    return (output * onehot).sum(1), relevance


class InlineBlock(torch.nn.Module):
    '''A pre-norm transformer block with attention written inline, or with ``F.scaled_dot_product_attention``.'''
    def __init__(self, dim=8, heads=2, sdpa=False):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * dim), torch.nn.Linear(2 * dim, dim)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        x = x + self.proj(out.transpose(1, 2).reshape(batch, length, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class InlineViT(torch.nn.Module):
    def __init__(self, sdpa=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)
        self.blocks = torch.nn.Sequential(InlineBlock(sdpa=sdpa), InlineBlock(sdpa=sdpa))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def zero_biases(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias'):
                param.zero_()
    return model


@pytest.mark.parametrize('sdpa', [False, True], ids=['inline', 'sdpa'])
def test_custom_attention_blocks_are_attributed(sdpa):
    '''A custom block with attention inline (or through F.scaled_dot_product_attention) and residual ``+``: CP-LRP on
    the bias-free model is exactly conservative (it was -8310 / -31618 times the logit before), and AttnLRP gives the
    same relevance inline and fused.'''
    model = zero_biases(InlineViT(sdpa=sdpa).double().eval())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.zero_()
    logit, relevance = logit_relevance(model, CPLRP(epsilon=1e-12), images())
    assert torch.allclose(relevance.sum((1, 2, 3)), logit, rtol=1e-8)
    inline = logit_relevance(InlineViT(sdpa=False).double().eval(), AttnLRP(epsilon=1e-12), images())[1]
    fused = logit_relevance(InlineViT(sdpa=True).double().eval(), AttnLRP(epsilon=1e-12), images())[1]
    assert torch.allclose(inline, fused, rtol=1e-7, atol=1e-12)


def test_custom_multihead_attention_vit_is_attributed_even_with_an_explicit_canonizer_list():
    '''A custom ViT from nn.MultiheadAttention with inline residual sums, also when ``canonizers=[]`` is passed
    explicitly (which used to switch detection off and leave the residual sums plain: 12.9-14.9 instead of 1.0).'''
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.norm = torch.nn.LayerNorm(8)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

        def forward(self, x):
            x = x + self.attention(x, x, x, need_weights=False)[0]
            return x + self.mlp(self.norm(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Linear(5, 8)
            self.blocks = torch.nn.Sequential(Block(), Block())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.blocks(self.embed(x))[:, 0])

    model = zero_biases(Model().double().eval())
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    for canonizers in (None, []):
        logit, relevance = logit_relevance(model, CPLRP(epsilon=1e-12, canonizers=canonizers), x)
        assert torch.allclose(relevance.sum((1, 2)), logit, rtol=1e-8)


class ToySSM(torch.nn.Module):
    '''A tiny state-space (Mamba-style) mixer: no attention, an exponential decay and a scan.'''
    def __init__(self, dim=8):
        super().__init__()
        self.embed = torch.nn.Linear(4, dim)
        self.dt = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        decay = torch.exp(-F.softplus(self.dt(h)))
        return self.head(torch.cumsum(h * decay, dim=1)[:, -1])


def test_state_space_model_is_refused_with_the_op_and_module():
    model = ToySSM().double().eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedOperationError, match=r"the model \(ToySSM\): operation 'exp'"):
        logit_relevance(model, AttnLRP(), torch.randn(2, 5, 4, dtype=torch.float64))
    assert_restored(model, before)


def test_hooks_that_change_a_ruled_module_are_refused_observers_are_not():
    '''Steering/patching hooks change what a rule attributes: refused. Hooks that only look are fine.'''
    model = tiny_vit()
    layer = model.encoder.layers[0].mlp[0]
    seen = []
    handles = [layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))]
    logit_relevance(model, AttnLRP(), images())
    assert seen
    for hook in (
        layer.register_forward_hook(lambda module, args, output: output * 2),
        layer.register_forward_hook(lambda module, args, output: output.mul_(2)),
        layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,)),
    ):
        handles.append(hook)
        with pytest.raises(UnsupportedOperationError, match=r"'encoder\.layers\.encoder_layer_0\.mlp\.0' \(Linear\)"):
            logit_relevance(model, AttnLRP(), images())
        hook.remove()
    logit_relevance(model, AttnLRP(), images())
    for handle in handles:
        handle.remove()


def test_compiled_and_exported_graphs_are_refused():
    '''torch.jit and torch.export graphs run no Python forward to intercept: refused, not a plain gradient.'''
    model = tiny_vit().float()
    x = images().float()
    traced = torch.jit.trace(model, x, check_trace=False)
    exported = torch.export.export(model, (x,)).module()
    for graph in (traced, exported):
        with pytest.raises(UnsupportedModelError, match='compiled or exported'):
            logit_relevance(graph, AttnLRP(), x)


def test_a_composite_instance_registers_on_one_model_at_a_time():
    first, second = tiny_vit(0), tiny_vit(1)
    before = snapshot(first)
    composite = AttnLRP()
    with composite.context(first):
        with pytest.raises(RuntimeError, match='already registered'):
            with composite.context(second):
                pass
        with pytest.raises(RuntimeError, match='already registered'):
            with composite.context(first):
                pass
        # the outer registration is intact: the relevance is still AttnLRP's, not a plain gradient
        x = images().requires_grad_(True)
        output = first(x)
        onehot = torch.nn.functional.one_hot(torch.tensor([0, 0]), 3).double()
        (inner,) = torch.autograd.grad(output, x, output * onehot)
    assert_restored(first, before)
    _, expected = logit_relevance(first, AttnLRP(), images(), target=(0, 0))
    assert torch.allclose(inner, expected, rtol=1e-10)
    with torch.enable_grad():
        x = images().requires_grad_(True)
        output = first(x)
        (plain,) = torch.autograd.grad(output, x, output * onehot)
    assert not torch.allclose(plain, expected, rtol=1e-3)


def test_preprocessing_arithmetic_gets_its_rules():
    '''``Sequential(Normalize, vit)``: Normalize's in-place ``sub_`` gets the ε-sum rule (the mean absorbs its share)
    and ``div_`` the identity, so ``R_x = x / (x - mean) * R_normalized``.'''
    vit = tiny_vit()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    model = torch.nn.Sequential(torchvision.transforms.Normalize(mean, std), vit)
    x = images().abs()
    centred = x - torch.tensor(mean, dtype=x.dtype)[:, None, None]
    _, relevance = logit_relevance(model, AttnLRP(epsilon=1e-12), x)
    scaled = centred / torch.tensor(std, dtype=x.dtype)[:, None, None]
    _, normalized = logit_relevance(vit, AttnLRP(epsilon=1e-12), scaled)
    assert torch.allclose(relevance, x / centred * normalized, rtol=1e-7, atol=1e-12)


def test_nan_input_is_refused():
    x = images()
    x[0, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        logit_relevance(tiny_vit(), AttnLRP(), x)


def test_model_is_restored_after_an_error_inside_the_forward():
    model = tiny_vit()
    before = snapshot(model)
    model.encoder.layers[1].register_forward_pre_hook(lambda module, args: 1 / 0)
    handle = list(model.encoder.layers[1]._forward_pre_hooks)[-1]
    with pytest.raises(ZeroDivisionError):
        logit_relevance(model, AttnLRP(), images())
    model.encoder.layers[1]._forward_pre_hooks.pop(handle)
    assert_restored(model, before)
    assert not torch.overrides._get_current_function_mode_stack()
    assert torch.isfinite(logit_relevance(model, AttnLRP(), images())[1]).all()


def test_invisible_attention_kernels_are_refused():
    transformers = pytest.importorskip('transformers')
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
    )
    model = transformers.BertModel(config).eval()
    before = snapshot(model)
    configs = {id(module.config): module.config for module in model.modules() if hasattr(module, 'config')}
    for implementation in ('flash_attention_2', 'flex_attention'):
        for config in configs.values():
            vars(config)['_attn_implementation_internal'] = implementation
        with pytest.raises(UnsupportedModelError, match=implementation):
            with AttnLRP().context(model):
                pass
    for config in configs.values():
        vars(config)['_attn_implementation_internal'] = before['configs'][0][0]
    assert_restored(model, before)


def test_batch_norm_merged_by_zennit_is_accepted_unmerged_is_refused():
    '''A batch norm Zennit's MergeBatchNorm canonizer merged into the preceding Linear computes the identity: accepted,
    with conservative relevance on a bias-free model; unmerged it is refused at registration.'''
    import zennit.canonizers
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.)
    model = model.double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(BatchNorm1d\)"):
        AttnLRP().register(model)
    before = snapshot(model)
    composite = CPLRP(epsilon=1e-12, canonizers=[zennit.canonizers.SequentialMergeBatchNorm()])
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).double()
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * onehot)
    assert torch.allclose(output, plain, rtol=1e-12)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_restored(model, before)


def test_timm_convit_is_refused_and_cait_is_attributed():
    '''ConViT's gated positional attention renormalises by an input-dependent sum (no rule): a clear error naming
    the module, where it used to give 1.4e7 times the logit. CaiT (class attention, talking heads, LayerScale; it used
    to give 0.000 silently) runs with every operation covered and CP-LRP on the bias-free model conserves up to the
    talking-heads projection of the probabilities (a Linear between softmax and context, so CP-LRP's constant
    probabilities do not apply there and the softmax rule absorbs a little).'''
    pytest.importorskip('timm')
    from timm.models.cait import Cait
    from timm.models.convit import ConVit
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    convit = ConVit(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                    local_up_to_layer=1).double().eval()
    with pytest.raises(UnsupportedOperationError, match=r"module 'blocks\.0\.attn' \(GPSA\): operation 'div'"):
        logit_relevance(convit, AttnLRP(), x)
    torch.manual_seed(0)
    cait = Cait(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                depth_token_only=1).double().eval()
    with torch.no_grad():
        for name, param in cait.named_parameters():
            if name.endswith('bias') or name in ('pos_embed', 'cls_token'):
                param.zero_()
    assert zennit_attn.check(cait, AttnLRP(), x).ok
    logit, relevance = logit_relevance(cait, CPLRP(epsilon=1e-12), x)
    assert torch.allclose(relevance.sum((1, 2, 3)), logit, rtol=1e-3)
