'''torchvision ViT end to end: canonizer, composites, and agreement with the independent oracle.'''
import pytest
import torch
import zennit.composites
import zennit.rules
from torchvision.models import VisionTransformer, vit_b_16
from zennit.attribution import Gradient
from zennit.core import Composite

from zennit_attn import layers
from zennit_attn.canonizers import VisionTransformerCanonizer
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError

from helpers import expected_calls, hooked_call_counts
from oracle_vit import vit_oracle
from restoration import assert_restored, relative_difference, snapshot


SMALL_CONFIGS = {
    'tiny': dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7),
    'uneven': dict(image_size=30, patch_size=6, num_layers=3, num_heads=3, hidden_dim=24, mlp_dim=40, num_classes=5),
    'representation': dict(
        image_size=24, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4,
        representation_size=12,
    ),
}


def randomize_head(model, seed=0):
    '''torchvision initialises the head to zeros; give it random weights so relevance is not trivially zero.'''
    generator = torch.Generator().manual_seed(seed)
    for module in model.heads.modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def make_vit(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomize_head(VisionTransformer(**SMALL_CONFIGS[config]), seed).to(dtype).eval()


def image(model, batch=2, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=generator).to(dtype)


def attribute(model, composite, x, target):
    '''Zennit's Gradient attributor seeded with ``logit * onehot(target)``.'''
    with Gradient(model, composite) as attributor:
        onehot = torch.nn.functional.one_hot(target, model.heads.head.out_features).to(x.dtype)
        output, relevance = attributor(x, lambda y: y * onehot)
    return output, relevance


@pytest.mark.parametrize('config', sorted(SMALL_CONFIGS))
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_relevance_matches_oracle_on_small_vits(config, composite_type, cp_lrp, fused):
    '''AttnLRP/CP-LRP relevance equals the hand-written modified gradient × input (float64, ε tiny), with the fused
    attention core and with the unfolded chain.
    '''
    model = make_vit(config)
    x = image(model)
    target = torch.tensor([1, 3])
    expected, logits = vit_oracle(model, x, target, cp_lrp=cp_lrp)
    output, relevance = attribute(model, composite_type(epsilon=1e-12, fused_attention=fused), x, target)
    assert torch.allclose(output, logits, rtol=1e-10, atol=1e-10)
    assert relative_difference(relevance, expected) < 1e-6


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)])
def test_relevance_matches_oracle_on_vit_b_16(composite_type, cp_lrp):
    '''The oracle agreement holds on the full vit_b_16 architecture.'''
    torch.manual_seed(0)
    model = randomize_head(vit_b_16(weights=None)).double().eval()
    x = image(model, batch=1)
    target = torch.tensor([417])
    expected, _ = vit_oracle(model, x, target, cp_lrp=cp_lrp)
    _, relevance = attribute(model, composite_type(epsilon=1e-12), x, target)
    assert relative_difference(relevance, expected) < 1e-6


def test_oracle_detects_a_wrong_rule():
    '''Sanity check of the oracle comparison: plain gradient × input does not match it.'''
    model = make_vit('tiny')
    x = image(model)
    target = torch.tensor([1, 3])
    expected, _ = vit_oracle(model, x, target)
    _, gradient = attribute(model, Composite(), x, target)
    assert relative_difference(gradient * x, expected) > 1e-2


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP, AttnLRPViT, CPLRPViT])
def test_forward_unchanged_while_registered(composite_type):
    '''The canonized model computes the same output (float32, ≤1e-6 relative to the output scale).'''
    model = make_vit('uneven', dtype=torch.float32)
    x = image(model, dtype=torch.float32)
    expected = model(x)
    with composite_type().context(model) as modified:
        actual = modified(x)
    assert (actual - expected).abs().max() <= 1e-6 * max(1., expected.abs().max().item())


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRPViT])
def test_removal_restores_model_bit_identically(composite_type):
    '''After an attribution the model has the same modules, forwards, parameter objects, state_dict and hooks.'''
    model = make_vit('representation', dtype=torch.float32)
    before = snapshot(model)
    x = image(model, dtype=torch.float32)
    expected = model(x)
    attribute(model, composite_type(), x, torch.tensor([0, 1]))
    assert_restored(model, before)
    assert torch.equal(model(x), expected)


def test_removal_after_exception_inside_context():
    '''An exception inside the composite context still restores the model.'''
    model = make_vit('tiny', dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match='boom'):
        with AttnLRPViT().context(model):
            model(image(model, dtype=torch.float32))
            raise RuntimeError('boom')
    assert_restored(model, before)


def test_failed_registration_restores_model():
    '''If registration fails midway (an unsupported module after canonization), nothing stays applied.'''
    model = make_vit('tiny', dtype=torch.float32)
    model.heads.add_module('norm', torch.nn.BatchNorm1d(7))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"heads\.norm.*BatchNorm1d"):
        AttnLRP().register(model)
    assert_restored(model, before)


def test_registered_model_structure():
    '''While registered, every attention is unfolded into hookable op modules and q/k/v views share storage.'''
    model = make_vit('tiny', dtype=torch.float32)
    attention = model.encoder.layers[0].self_attention
    with AttnLRP().context(model):
        assert isinstance(attention.attnlrp_scores, layers.AttentionScores)
        assert isinstance(attention.attnlrp_softmax, layers.AttentionSoftmax)
        assert isinstance(attention.attnlrp_context, layers.AttentionContext)
        assert attention.attnlrp_scores.scale == pytest.approx(1 / 8 ** 0.5)
        assert attention.attnlrp_q_proj.weight.data_ptr() == attention.in_proj_weight.data_ptr()
        assert attention.attnlrp_in_proj.weight.data_ptr() == attention.in_proj_weight.data_ptr()
        assert isinstance(attention.attnlrp_attention, layers.AttentionCore)
        assert isinstance(model.encoder.attnlrp_position_embedding, layers.Sum)
        assert isinstance(model.encoder.layers[1].attnlrp_residual_mlp, layers.Sum)


@pytest.mark.parametrize('fused', [True, False])
def test_every_hooked_module_called_once_per_forward(fused):
    '''One module instance per call site: each hooked module runs exactly once per forward (the fused attention core or
    the unfolded chain; the mask sum only with a mask, and torchvision's ViT passes none).
    '''
    model = make_vit('uneven', dtype=torch.float32)
    composite = AttnLRPViT(fused_attention=fused)
    with composite.context(model):
        counts = hooked_call_counts(model, lambda: model(image(model, dtype=torch.float32)))
    assert len(counts) > 20
    assert sum(name.endswith('attnlrp_attention') for name in counts) == (3 if fused else 0)
    # self-attention runs the packed q/k/v projection, not the three views
    separate = ('attnlrp_q_proj', 'attnlrp_k_proj', 'attnlrp_v_proj')
    expected = {name: 0 if name.endswith(separate) else expected_calls(name, fused, masked=False) for name in counts}
    assert {name: value for name, value in counts.items() if value != expected[name]} == {}


def zero_constants(model):
    '''Zero every bias (Linear, LayerNorm β), the position embedding and the class token: the sources of relevance
    absorption other than the softmax.
    '''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('bias') or name.endswith(('pos_embedding', 'class_token')):
                param.zero_()
    return model


def test_cp_lrp_conserves_on_bias_free_vit():
    '''CP-LRP on a ViT without biases and constant tokens conserves the logit (float64, ≤1e-5 relative).'''
    model = zero_constants(make_vit('uneven'))
    x = image(model)
    target = torch.tensor([0, 2])
    output, relevance = attribute(model, CPLRP(epsilon=1e-12), x, target)
    logits = output[torch.arange(2), target]
    assert torch.allclose(relevance.sum((1, 2, 3)), logits, rtol=1e-5)


def test_attnlrp_is_not_conservative_through_softmax():
    '''Sanity check of the conservation test: AttnLRP's softmax rule absorbs relevance on the same model.'''
    model = zero_constants(make_vit('uneven'))
    x = image(model)
    target = torch.tensor([0, 2])
    output, relevance = attribute(model, AttnLRP(epsilon=1e-12), x, target)
    logits = output[torch.arange(2), target]
    assert not torch.allclose(relevance.sum((1, 2, 3)), logits, rtol=1e-5)


def test_vision_preset_matches_zennit_gamma_and_epsilon():
    '''attnlrp_vit equals AttnLRP with Zennit's own Gamma on conv/MLP/head and Epsilon on attention projections.'''
    model = make_vit('representation')
    x = image(model)
    target = torch.tensor([1, 2])
    _, ours = attribute(model, AttnLRPViT(epsilon=1e-9, stabilizer=1e-9, conv_gamma=0.25, linear_gamma=0.05), x, target)

    attention_projection = (torch.nn.modules.linear.NonDynamicallyQuantizableLinear,)

    class ZennitPreset(AttnLRP):
        def mapping(self, ctx, name, module):
            if isinstance(module, torch.nn.Conv2d):
                return zennit.rules.Gamma(gamma=0.25, stabilizer=1e-9)
            if isinstance(module, torch.nn.Linear):
                projection = name.split('.')[-1].endswith(('in_proj', 'q_proj', 'k_proj', 'v_proj'))
                if isinstance(module, attention_projection) or projection:
                    return zennit.rules.Epsilon(epsilon=1e-9)
                return zennit.rules.Gamma(gamma=0.05, stabilizer=1e-9)
            return super().mapping(ctx, name, module)

    _, reference = attribute(model, ZennitPreset(epsilon=1e-9), x, target)
    assert relative_difference(ours, reference) < 1e-10
    _, plain = attribute(model, AttnLRP(epsilon=1e-9), x, target)
    assert relative_difference(ours, plain) > 1e-3


@pytest.mark.parametrize('composite_type', [AttnLRP, AttnLRPViT])
def test_batch_equals_per_sample(composite_type):
    '''Relevance of a batch equals the relevance of each sample on its own.'''
    model = make_vit('uneven')
    x = image(model, batch=3)
    target = torch.tensor([0, 4, 2])
    _, batched = attribute(model, composite_type(), x, target)
    for index in range(3):
        _, single = attribute(model, composite_type(), x[index:index + 1], target[index:index + 1])
        assert torch.allclose(batched[index:index + 1], single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('name', ['attnlrp', 'attnlrp_vit', 'cp_lrp', 'cp_lrp_vit'])
def test_composites_registered_in_zennit(name):
    '''The named composites are available through zennit's registry and work with its attributors.'''
    model = make_vit('tiny', dtype=torch.float32)
    composite = zennit.composites.COMPOSITES[name]()
    _, relevance = attribute(model, composite, image(model, dtype=torch.float32), torch.tensor([0, 1]))
    assert relevance.shape == (2, 3, 32, 32)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


def test_user_layer_map_takes_precedence():
    '''A user's layer_map entry overrides the preset, including the attention-projection role.'''
    model = make_vit('tiny', dtype=torch.float32)
    marker = zennit.rules.Pass()
    composite = AttnLRPViT(layer_map=[(torch.nn.Linear, marker)])
    with composite.context(model):
        rules = [hook for hook in composite.hook_refs]
        assert sum(isinstance(hook, zennit.rules.Pass) for hook in rules) == sum(
            isinstance(module, torch.nn.Linear) for module in model.modules()
        )


def test_unsupported_attention_raises_clear_error():
    '''A model with attention that no canonizer unfolds is rejected, naming the module.'''
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.TransformerEncoderLayer(4, 2, batch_first=True))
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(TransformerEncoderLayer\)"):
        AttnLRP().register(model)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x)[0] + x

    with pytest.raises(UnsupportedModelError, match=r"module 'attention' \(MultiheadAttention\)"):
        AttnLRP().register(Block())


def test_canonizer_works_when_passed_explicitly():
    '''Passing the canonizer explicitly gives the same relevance as auto-detection.'''
    model = make_vit('tiny')
    x = image(model)
    target = torch.tensor([1, 3])
    _, detected = attribute(model, AttnLRP(epsilon=1e-12), x, target)
    _, explicit = attribute(model, AttnLRP(epsilon=1e-12, canonizers=[VisionTransformerCanonizer()]), x, target)
    assert torch.equal(detected, explicit)


@pytest.mark.parametrize('builder', ['vit_b_16', 'vit_b_32', 'vit_l_16', 'vit_l_32', 'vit_h_14'])
def test_readme_snippet_runs_on_every_torchvision_vit(builder):
    '''The README snippet works on every torchvision ViT builder (full architecture; a 2×2-patch image keeps CI fast —
    vit_b_16 at 224 px is covered by the oracle test).
    '''
    import torchvision.models

    torch.manual_seed(0)
    patch = int(builder.rsplit('_', 1)[1])
    # build on the meta device and fill with plain normal values: torchvision's initialisers dominate the run time
    with torch.device('meta'):
        model = getattr(torchvision.models, builder)(weights=None, image_size=2 * patch)
    model = model.to_empty(device='cpu').eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('weight') and param.ndim == 1:  # LayerNorm scales
                param.fill_(1.)
            else:
                param.normal_(std=0.02)
    x = torch.randn(2, 3, 2 * patch, 2 * patch)
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 999]), 1000).float()
    expected = model(x)
    with Gradient(model, AttnLRPViT()) as attributor:
        output, relevance = attributor(x, lambda y: y * onehot)
    assert torch.allclose(output, expected, atol=1e-5)
    assert relevance.shape == x.shape
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


def test_training_mode_with_dropout_is_refused():
    '''Active dropout would make every heatmap random: registration fails with a clear error, the model is restored.'''
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL_CONFIGS['tiny'], dropout=0.1).train()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r'dropout p=0.1 is active .* call model.eval\(\)'):
        AttnLRP().register(model)
    assert_restored(model, before)
    AttnLRP().register(model.eval())


def test_canonizer_failing_midway_leaves_no_ops_behind():
    '''If a canonizer fails after inserting its op modules, they are removed before the error propagates.'''
    from zennit_attn.canonizers import MultiheadAttentionCanonizer

    class Failing(MultiheadAttentionCanonizer):
        def make_roles(self, module):
            raise AttributeError('no out_proj here')

    model = make_vit('tiny', dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(AttributeError, match='no out_proj here'):
        Failing().apply(model)
    assert_restored(model, before)
