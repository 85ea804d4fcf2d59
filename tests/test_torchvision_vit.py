'''torchvision ViT end to end through the engine: composites, operation sites, restoration, and agreement with the
independent oracle.'''
import pytest
import torch
import zennit.composites
import zennit.rules
from torchvision.models import VisionTransformer, vit_b_16
from zennit.attribution import Gradient
from zennit.core import Composite

from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError
from zennit_attn.conservation import conservation_report
from zennit_attn.engine import UnsupportedOperationError
from zennit_attn.rules import Epsilon

from helpers import recorded_sites, rule_runs
from oracle_vit import vit_oracle
from restoration import assert_restored, relative_difference, snapshot
from tiny_vit import SMALL_CONFIGS, attribute, image, make_vit, randomize_head


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
    '''The model's own forward runs while registered (float32, with gradients, so that every rule applies):
    bit-identical with the fused attention core (the engine calls torch's own functions), ≤1e-6 relative to the
    output scale with the unfolded chain (a different summation order than the fused kernel).'''
    model = make_vit('uneven', dtype=torch.float32)
    x = image(model, dtype=torch.float32)
    expected = model(x)
    for fused in (True, False):
        with composite_type(fused_attention=fused).context(model) as modified:
            actual = modified(x.clone().requires_grad_(True))
            without_grad = modified(x)
        assert torch.equal(without_grad, expected)
        if fused:
            assert torch.equal(actual, expected)
        else:
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
    '''An exception inside the composite context (after a forward with rule nodes, or raised inside the forward by a
    hook of the user) still restores the model and leaves no function mode active.'''
    model = make_vit('tiny', dtype=torch.float32)
    before = snapshot(model)
    x = image(model, dtype=torch.float32)
    expected = model(x)
    with pytest.raises(RuntimeError, match='boom'):
        with AttnLRPViT().context(model):
            model(x.clone().requires_grad_(True))
            raise RuntimeError('boom')
    assert_restored(model, before)

    def fail(module, args):
        raise RuntimeError('boom inside')

    handle = model.encoder.layers[1].mlp.register_forward_pre_hook(fail)
    hooks = snapshot(model)['hooks']
    with pytest.raises(RuntimeError, match='boom inside'):
        attribute(model, AttnLRPViT(), x, torch.tensor([0, 1]))
    assert snapshot(model)['hooks'] == hooks
    handle.remove()
    assert_restored(model, before)
    assert not torch.overrides._get_current_function_mode_stack()
    assert torch.equal(model(x), expected)


def test_failed_registration_restores_model():
    '''If registration fails (an unsupported module), nothing stays applied.'''
    model = make_vit('tiny', dtype=torch.float32)
    model.heads.add_module('norm', torch.nn.BatchNorm1d(7))
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"heads\.norm.*BatchNorm1d"):
        AttnLRP().register(model)
    assert_restored(model, before)


def test_model_is_not_modified_while_registered():
    '''The model's own forward runs: while registered, the modules, their names, parameter objects and forwards are
    those of the plain model (nothing is inserted, nothing replaced).'''
    model = make_vit('tiny', dtype=torch.float32)
    before = snapshot(model)
    with AttnLRP(fused_attention=False).context(model):
        during = snapshot(model)
        model(image(model, dtype=torch.float32).requires_grad_(True))
        assert [(name, module) for name, module in model.named_modules()] == before['modules']
    for key in ('modules', 'forwards', 'parameters'):
        assert during[key] == before[key]
    assert not any(name.startswith('attnlrp_') or '.attnlrp_' in name for name, _ in during['modules'])
    assert not any('forward' in vars(module) for module in model.modules())
    assert_restored(model, before)


def expected_sites(model, fused):
    '''The operation sites of one forward of a torchvision ViT: the position embedding, per block the packed
    in-projection, the attention core (fused) or its unfolded chain (no mask sum: torchvision passes no mask), the
    out-projection and the two residual sums.'''
    core = ['attention'] if fused else ['matmul', 'softmax', 'matmul_1']
    sites = ['encoder.add']
    for index in range(len(model.encoder.layers)):
        block = f'encoder.layers.encoder_layer_{index}'
        sites += [f'{block}.self_attention.{op}' for op in ['linear'] + core + ['linear_1']]
        sites += [f'{block}.add', f'{block}.add_1']
    return sites


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_every_rule_and_operation_site_runs_once_per_forward(fused):
    '''Every module rule runs exactly once per attribution, forward and backward (MultiheadAttention's out_proj module
    is never called: its computation is the functional ``linear_1`` site), and every expected operation site is
    attributed once per forward, numbered afresh in every forward; the conservation report has one row per site.'''
    model = make_vit('uneven', dtype=torch.float32)
    x = image(model, dtype=torch.float32)
    target = torch.tensor([0, 1])

    def run():
        inputs = x.clone().requires_grad_(True)
        output = model(inputs)
        torch.autograd.grad(output, inputs, output * torch.nn.functional.one_hot(target, 5))

    with recorded_sites() as sites, AttnLRPViT(fused_attention=fused).context(model):
        runs = rule_runs(model, run)
        run()
    assert len(runs) > 20
    out_proj = {name for name in runs if name.endswith('self_attention.out_proj')}
    assert len(out_proj) == 3
    assert {name: calls for name, calls in runs.items() if calls != ((0, 0) if name in out_proj else (1, 1))} == {}
    assert sites == expected_sites(model, fused) * 2

    report = conservation_report(
        model, AttnLRPViT(fused_attention=fused), x, lambda y: y * torch.nn.functional.one_hot(target, 5)
    )
    rows = {row.name: row for row in report.modules}
    assert {site: rows[site].calls for site in expected_sites(model, fused)} == dict.fromkeys(
        expected_sites(model, fused), 1)
    assert rows['encoder.layers.encoder_layer_0.self_attention.linear'].rule == 'Epsilon'


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
    '''attnlrp_vit equals AttnLRP with Zennit's own Gamma on conv/MLP/head and ε on the attention projections.'''
    model = make_vit('representation')
    x = image(model)
    target = torch.tensor([1, 2])
    _, ours = attribute(model, AttnLRPViT(epsilon=1e-9, stabilizer=1e-9, conv_gamma=0.25, linear_gamma=0.05), x, target)

    class ZennitPreset(AttnLRP):
        '''Zennit's own Gamma on the convolution and every Linear module; the attention projections are functional
        calls inside nn.MultiheadAttention, which get AttnLRP's ε (the out_proj module is never called).'''
        def mapping(self, ctx, name, module):
            if isinstance(module, torch.nn.Conv2d):
                return zennit.rules.Gamma(gamma=0.25, stabilizer=1e-9)
            if isinstance(module, torch.nn.Linear):
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


class CountingEpsilon(Epsilon):
    '''The ε-rule, logging the carrier type of every call it attributes (the log is shared by its copies).'''
    def __init__(self, epsilon=1e-6, zero_params=None, log=None):
        super().__init__(epsilon=epsilon, zero_params=zero_params)
        self.log = [] if log is None else log

    def _copy_kwargs(self):
        return {**super()._copy_kwargs(), 'log': self.log}

    def relevance(self, module, inputs, output, relevance, variable):
        self.log.append('functional' if type(module).__module__ == 'zennit_attn.engine' else type(module).__name__)
        return super().relevance(module, inputs, output, relevance, variable)


def test_user_layer_map_takes_precedence():
    '''A user's layer_map entry overrides the preset on Linear modules (MLP, head: γ otherwise) and on the functional
    projections inside MultiheadAttention (the attention-projection role: ε otherwise).'''
    model = make_vit('tiny', dtype=torch.float32)
    rule = CountingEpsilon()
    attribute(model, AttnLRPViT(layer_map=[(torch.nn.Linear, rule)]), image(model, dtype=torch.float32),
              torch.tensor([0, 1]))
    # per block: packed in-projection and out-projection (functional), fc1 and fc2 (modules); and the head
    assert sorted(rule.log) == sorted(['functional'] * 4 + ['Linear'] * 5)


def test_plain_zennit_rules_in_the_layer_map():
    '''A plain Zennit rule still applies to modules (Gamma on the patch convolution equals the preset's), but cannot
    attribute an intercepted functional call (the projections of nn.MultiheadAttention): a clear error during the
    forward, and the model is restored.'''
    model = make_vit('tiny')
    x = image(model)
    target = torch.tensor([1, 3])
    _, preset = attribute(model, AttnLRPViT(epsilon=1e-9, stabilizer=1e-9, conv_gamma=0.25), x, target)
    zennit_conv = AttnLRPViT(
        epsilon=1e-9, stabilizer=1e-9, conv_gamma=0.9,
        layer_map=[(torch.nn.Conv2d, zennit.rules.Gamma(gamma=0.25, stabilizer=1e-9))],
    )
    _, relevance = attribute(model, zennit_conv, x, target)
    assert relative_difference(relevance, preset) < 1e-10

    before = snapshot(model)
    composite = AttnLRPViT(layer_map=[(torch.nn.Linear, zennit.rules.Pass())])
    with composite.context(model):
        # registration applies the Zennit rule to every Linear module
        assert sum(isinstance(hook, zennit.rules.Pass) for hook in composite.hook_refs) == sum(
            isinstance(module, torch.nn.Linear) for module in model.modules()
        )
    with pytest.raises(UnsupportedModelError, match=r'Pass \(from the layer map\) cannot attribute an intercepted '
                                                    r'LinearCall call \(e\.g\. the projections inside '
                                                    r'nn\.MultiheadAttention'):
        attribute(model, composite, x, target)
    assert_restored(model, before)


def test_operation_without_rule_raises_during_the_forward():
    '''A standardisation written inline (in a module that does not look like a norm, so registration accepts it) has no
    rule: the forward raises, naming the op and the module, and the model is restored; without gradients (no
    attribution) the forward runs.'''
    class Standardize(torch.nn.Module):
        def forward(self, x):
            centered = x - x.mean(-1, keepdim=True)
            return centered / centered.std(-1, keepdim=True)

    model = make_vit('tiny')
    model.encoder.ln = Standardize()
    before = snapshot(model)
    with pytest.raises(UnsupportedOperationError, match=r"module 'encoder\.ln' \(Standardize\): operation 'std'"):
        attribute(model, AttnLRP(), image(model), torch.tensor([1, 3]))
    assert_restored(model, before)
    assert not torch.overrides._get_current_function_mode_stack()
    with AttnLRP().context(model), torch.no_grad():
        model(image(model))


def test_an_explicit_canonizer_list_keeps_the_engine():
    '''Passing ``canonizers`` (here none) only adds Zennit canonizers: the engine still attributes every operation, so
    the relevance is bit-identical to the default and matches the oracle.'''
    model = make_vit('tiny')
    x = image(model)
    target = torch.tensor([1, 3])
    _, default = attribute(model, AttnLRP(epsilon=1e-12), x, target)
    _, explicit = attribute(model, AttnLRP(epsilon=1e-12, canonizers=[]), x, target)
    assert torch.equal(default, explicit)
    expected, _ = vit_oracle(model, x, target)
    assert relative_difference(explicit, expected) < 1e-6


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


def test_registration_failing_midway_leaves_nothing_behind():
    '''If registration fails after some rules are registered (a rule that cannot register on the third Linear), the
    rules and engine hooks already installed are removed before the error propagates.'''
    class Failing(Epsilon):
        calls = 0

        def register(self, module):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError('cannot register')
            return super().register(module)

    model = make_vit('tiny', dtype=torch.float32)
    before = snapshot(model)
    composite = AttnLRP(layer_map=[(torch.nn.Linear, Failing())])
    with pytest.raises(RuntimeError, match='cannot register'):
        composite.register(model)
    assert Failing.calls == 3
    assert_restored(model, before)
    # the composite is usable again (only the third registration fails)
    x = image(model, dtype=torch.float32)
    _, relevance = attribute(model, composite, x, torch.tensor([0, 1]))
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_restored(model, before)
