'''Coverage lint (zennit_attn.check): silent on the supported architectures, and finds each planted error with the
right op and module name.'''
import pytest
import torch
import zennit.rules
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite

import zennit_attn
from zennit_attn import layers
from zennit_attn.check import CoverageError, CoverageReport, check, op_name
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError
from zennit_attn.engine import UnsupportedOperationError
from zennit_attn.rules import Epsilon, IdentityRule, LayerNormRule

from tiny_vit import image, make_vit
from toys import FunctionalGELU, HalfScale, Residual, Standardize, TokenMixer, Toy, hook_count, toy_input


# --- supported architectures: nothing to report ------------------------------------------------------------------

@pytest.mark.parametrize('config,composite_type', [
    ('tiny', AttnLRP), ('tiny', CPLRP), ('tiny', AttnLRPViT), ('representation', AttnLRP),
    ('representation', CPLRPViT),
])
def test_torchvision_vit_is_fully_covered(config, composite_type):
    model = make_vit(config, dtype=torch.float32)
    before = hook_count(model)
    report = check(model, composite_type(), image(model, dtype=torch.float32))
    assert report.ok, str(report)
    assert report.rule_nodes > 0
    assert 'passed' in str(report)
    assert hook_count(model) == before
    assert not any(name.startswith('attnlrp_') for name, _ in model.named_children())


def test_plain_vit_is_reported():
    '''Without a composite every layer, residual and the fused attention are findings, each in its module.'''
    model = make_vit('tiny', dtype=torch.float32)
    report = check(model, None, image(model, dtype=torch.float32))
    found = {(finding.op, finding.module) for finding in report.findings}
    block = 'encoder.layers.encoder_layer_0'
    assert {
        ('addmm', 'heads.head'), ('layer_norm', 'encoder.ln'), ('add', block), ('gelu', f'{block}.mlp.1'),
        ('scaled_dot_product_attention', f'{block}.self_attention'), ('add', 'encoder'), ('convolution', 'conv_proj'),
    } <= found
    # the class token is a parameter: ops on it alone never carry input relevance
    assert not any(finding.module == '' for finding in report.findings)


class Embeds(torch.nn.Module):
    '''``inputs_embeds -> logits`` (the last position for causal LMs).'''
    def __init__(self, model, mask, last=False):
        super().__init__()
        self.model = model
        self.mask = mask
        self.last = last

    def forward(self, inputs_embeds):
        logits = self.model(inputs_embeds=inputs_embeds, attention_mask=self.mask).logits
        return logits[:, -1] if self.last else logits


@pytest.mark.parametrize('family', ['bert', 'llama'])
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_hugging_face_families_are_fully_covered(family, composite_type):
    import transformers
    torch.manual_seed(0)
    mask = torch.ones(2, 5, dtype=torch.long)
    if family == 'bert':
        config = transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
            max_position_embeddings=16, num_labels=3,
        )
        model, last = transformers.BertForSequenceClassification(config), False
        mask[1, 3:] = 0
    else:
        config = transformers.LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, use_cache=False,
        )
        model, last = transformers.LlamaForCausalLM(config), True
        mask[1, :2] = 0
    wrapper = Embeds(model.eval(), mask, last=last)
    before = hook_count(wrapper)
    report = check(wrapper, composite_type(), torch.randn(2, 5, 16))
    assert report.ok, str(report)
    assert hook_count(wrapper) == before


# --- planted errors ------------------------------------------------------------------------------------------------

class Exponential(torch.nn.Module):
    '''``exp`` on the relevance path: no AttnLRP rule exists for it.'''
    def forward(self, x):
        return torch.exp(x)


class CumulativeSum(torch.nn.Module):
    '''A running sum over tokens (as in state-space models): no rule.'''
    def forward(self, x):
        return torch.cumsum(x, dim=1)


class Rescale(torch.nn.Module):
    '''An RMS normalisation written inline in a module that no type group or declaration recognises.'''
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


#: bodies whose operations have no AttnLRP rule: the engine refuses them while attributing, and check() lists them
PLANTED = {
    'exp': (Exponential, {('exp', 'body')}),
    'cumsum': (CumulativeSum, {('cumsum', 'body')}),
    'rescale': (Rescale, {('pow', 'body'), ('rsqrt', 'body')}),
}


@pytest.mark.parametrize('case', sorted(PLANTED))
def test_planted_error_is_found(case):
    '''check() lists every operation without a rule with its module; attributing raises, naming op and module.'''
    body_type, expected = PLANTED[case]
    torch.manual_seed(0)
    model = Toy(body_type()).eval()
    before = hook_count(model)
    report = check(model, AttnLRP(), toy_input())
    found = {(finding.op, finding.module) for finding in report.findings}
    assert expected <= found, str(report)
    assert all(finding.module_type == body_type.__name__ for finding in report.findings)
    assert not report.ok and 'FAILED' in str(report) and 'body' in str(report)
    assert hook_count(model) == before
    op = sorted(expected)[0][0]
    x = toy_input().requires_grad_(True)
    with AttnLRP().context(model):
        with pytest.raises(UnsupportedOperationError, match=rf"module 'body' \({body_type.__name__}\).*'{op}"):
            model(x)
    assert hook_count(model) == before


class FixedResidual(Residual):
    def __init__(self, dim):
        super().__init__(dim)
        self.add = layers.Sum()

    def forward(self, x):
        return self.add(x, self.fc(x))


class FixedMixer(TokenMixer):
    def __init__(self, dim):
        super().__init__(dim)
        self.scores = layers.MatMul()
        self.scale_op = layers.Scale(self.scale)
        self.softmax = layers.AttentionSoftmax(dim=-1)
        self.context = layers.AttentionContext()

    def forward(self, x):
        scores = self.scale_op(self.scores(self.q(x), self.k(x).transpose(-1, -2)))
        return self.context(self.softmax(scores), self.v(x))


class FixedGate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmoid = torch.nn.Sigmoid()
        self.product = layers.GatedProduct()

    def forward(self, x):
        return self.product(self.sigmoid(x), x)


class ModuleGELU(FunctionalGELU):
    def __init__(self, dim):
        super().__init__(dim)
        self.act = torch.nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))


class Gate(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


#: inline bodies and the same computation written with hookable op modules (the mechanism before the engine)
INLINE = {
    'residual': (lambda: Residual(8), lambda: FixedResidual(8)),
    'scale': (HalfScale, lambda: layers.Scale(0.5)),
    'layer_norm': (lambda: Standardize(8), lambda: torch.nn.LayerNorm(8)),
    'gelu': (lambda: FunctionalGELU(8), lambda: ModuleGELU(8)),
    'attention': (lambda: TokenMixer(8), lambda: FixedMixer(8)),
    'gate': (Gate, FixedGate),
}


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('case', sorted(INLINE))
def test_inline_operations_get_the_rules_of_their_op_modules(case, composite_type):
    '''Residual sums, scalings, a functional LayerNorm and GELU, hand-written attention and a gate written inline get
    exactly the relevance of the same computation written with hookable op modules, and check() finds nothing.'''
    inline_type, fixed_type = INLINE[case]
    torch.manual_seed(0)
    inline = Toy(inline_type()).double().eval()
    torch.manual_seed(0)
    fixed = Toy(fixed_type()).double().eval()
    fixed.load_state_dict(inline.state_dict())
    report = check(inline, composite_type(), toy_input().double())
    assert report.ok, str(report)
    assert report.rule_nodes >= 3
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
    relevances = []
    for model in (inline, fixed):
        with Gradient(model, composite_type(epsilon=1e-9)) as attributor:
            output, relevance = attributor(toy_input().double(), lambda y: y * onehot)
        relevances.append(relevance)
    assert relevance.abs().sum() > 0
    assert torch.allclose(relevances[0], relevances[1], rtol=1e-9, atol=1e-12)


def test_attention_written_inline_gets_the_attention_rules():
    '''CP-LRP recognises hand-written attention: the probabilities feed the context product, so q and k get nothing
    (their linear layers receive no relevance) and AttnLRP differs from CP-LRP.'''
    torch.manual_seed(0)
    model = Toy(TokenMixer(8)).double().eval()
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
    results = {}
    for composite_type in (AttnLRP, CPLRP):
        with zennit_attn.record_relevance(model, ['body.q', 'body.v']) as recorded:
            with Gradient(model, composite_type(epsilon=1e-9)) as attributor:
                _, results[composite_type] = attributor(toy_input().double(), lambda y: y * onehot)
        if composite_type is CPLRP:
            assert 'body.q' not in recorded and recorded['body.v'].abs().sum() > 0
        else:
            assert recorded['body.q'].abs().sum() > 0
    assert not torch.allclose(results[AttnLRP], results[CPLRP])


def test_layer_norm_without_rule_in_the_layer_map():
    '''A real nn.LayerNorm under a composite whose layer map has no entry for it.'''
    model = Toy(torch.nn.LayerNorm(8)).eval()
    composite = LayerMapComposite([(torch.nn.Linear, Epsilon())])
    report = check(model, composite, toy_input())
    assert [(finding.op, finding.module, finding.module_type) for finding in report.findings] == [
        ('layer_norm', 'body', 'LayerNorm')
    ]
    composite = LayerMapComposite([(torch.nn.Linear, Epsilon()), (torch.nn.LayerNorm, LayerNormRule())])
    assert check(model, composite, toy_input()).ok


def test_zennit_pass_rule_covers_an_activation_module():
    '''Nodes created inside a module with any Zennit hook (here zennit.rules.Pass) are covered.'''
    model = Toy(torch.nn.GELU()).eval()
    missing = check(model, LayerMapComposite([(torch.nn.Linear, Epsilon())]), toy_input())
    assert [(finding.op, finding.module) for finding in missing.findings] == [('gelu', 'body')]
    for rule in (zennit.rules.Pass(), IdentityRule()):
        composite = LayerMapComposite([(torch.nn.Linear, Epsilon()), (torch.nn.GELU, rule)])
        assert check(model, composite, toy_input()).ok


def test_training_mode_dropout_is_found():
    # zennit_attn's composites refuse active dropout at registration; with a plain Zennit composite the lint finds it
    with pytest.raises(UnsupportedModelError, match=r"module 'body' \(Dropout\): dropout p=0.5 is active"):
        check(Toy(torch.nn.Dropout(0.5)).train(), AttnLRP(), toy_input())
    composite = LayerMapComposite([(torch.nn.Linear, Epsilon())])
    findings = check(Toy(torch.nn.Dropout(0.5)).train(), composite, toy_input()).findings
    assert [(finding.op, finding.module, finding.module_type) for finding in findings] == [('mul', 'body', 'Dropout')]
    assert 'model.eval()' in findings[0].hint
    assert check(Toy(torch.nn.Dropout(0.5)).eval(), AttnLRP(), toy_input()).ok


def test_strict_raises_with_the_table():
    model = Toy(Exponential()).eval()
    with pytest.raises(CoverageError, match='exp') as error:
        check(model, AttnLRP(), toy_input(), strict=True)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value.report, CoverageReport)
    assert 'body' in str(error.value)
    check(Toy(HalfScale()).eval(), AttnLRP(), toy_input(), strict=True)


def test_nan_input_is_refused():
    '''NaN in the input would make every relevance NaN: registration passes, the forward says so.'''
    x = toy_input()
    x[0, 1, 2] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        check(Toy(HalfScale()).eval(), AttnLRP(), x)


def test_everything_is_removed_after_an_error():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError('boom')

    model = Toy(Broken()).eval()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match='boom'):
        check(model, AttnLRP(), toy_input())
    assert hook_count(model) == before
    assert not torch.overrides._get_current_function_mode_stack()


def test_inputs_and_keyword_arguments():
    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.add = layers.Sum()

        def forward(self, x, mask=None):
            return self.add(self.fc(x), mask)

    model = Masked().eval()
    x = toy_input()
    assert check(model, AttnLRP(), x, mask=torch.zeros(4, 8)).ok
    assert not x.requires_grad  # the caller's tensor is not modified
    with pytest.raises(ValueError, match='floating-point'):
        check(model, AttnLRP(), torch.ones(2, 3, dtype=torch.long))
    # outputs in tuples and dicts are walked
    tupled = Toy(Exponential()).eval()
    tupled.forward = lambda x: {'logits': (Toy.forward(tupled, x),)}
    assert {finding.op for finding in check(tupled, AttnLRP(), x).findings} == {'exp'}


def test_op_name():
    assert op_name('AddBackward0') == 'add'
    assert op_name('NativeLayerNormBackward0') == 'layer_norm'
    assert op_name('ScaledDotProductFlashAttentionForCpuBackward0') == 'scaled_dot_product_attention'
    assert op_name('UnsafeViewBackward0') == 'unsafe_view'
    assert op_name('CopySlices') == 'copy_slices'
    assert op_name('_RelevanceFunctionBackward') == '_relevance_function'


def test_a_constant_added_inline_absorbs_its_share():
    '''``linear(x + c)`` with the seed on output 0: the ε-rules give ``R_x = x * W[0]`` whatever ``c`` (the sum passes
    ``x / (x + c)`` of ``(x + c) * W[0]``; the constant keeps ``c * W[0]``), and check() finds nothing.'''
    class AddConstant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.value = value

        def forward(self, x):
            return self.linear(x + torch.full((4,), self.value, dtype=x.dtype))

    x = torch.randn(2, 4, dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0]), 4).double()
    for value in (0., 0.5):
        torch.manual_seed(0)
        model = AddConstant(value).double().eval()
        assert check(model, AttnLRP(), x).ok
        with Gradient(model, AttnLRP(epsilon=1e-12)) as attributor:
            _, relevance = attributor(x, lambda y: y * onehot)
        assert torch.allclose(relevance, x * model.linear.weight[0].detach(), rtol=1e-9, atol=1e-12)
