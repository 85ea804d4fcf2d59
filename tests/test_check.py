'''Coverage lint (zennit_attn.check): silent on the supported architectures, and finds each planted error with the
right op and module name.'''
import importlib

import pytest
import torch
import torch.nn.functional as F
import zennit.rules
from zennit.composites import LayerMapComposite

from zennit_attn import layers
from zennit_attn.check import CoverageError, CoverageReport, check, op_name
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError
from zennit_attn.rules import Epsilon, IdentityRule, LayerNormRule

from test_torchvision_vit import image, make_vit


def hook_count(model):
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
        for module in model.modules()
    )


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
    importlib.import_module(f'zennit_attn.canonizers.transformers.{family}')  # a broken family fails, never skips
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

class Residual(torch.nn.Module):
    '''Unhooked residual sum.'''
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(x)


class HalfScale(torch.nn.Module):
    '''Unhooked constant scale.'''
    def forward(self, x):
        return x * 0.5


class Standardize(torch.nn.Module):
    '''A LayerNorm that no type group matches (functional, class name without "Norm").'''
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class FunctionalGELU(torch.nn.Module):
    '''A functional GELU inside a module forward.'''
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return F.gelu(self.fc(x))


class TokenMixer(torch.nn.Module):
    '''Hand-written attention: ``softmax(q @ k^T * scale) @ v`` inline.'''
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.scale = dim ** -0.5

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return torch.softmax(scores, -1) @ self.v(x)


class Toy(torch.nn.Module):
    '''``head(body(embed(x))[:, 0])`` with a pluggable body.'''
    def __init__(self, body, dim=8, classes=3):
        super().__init__()
        self.embed = torch.nn.Linear(dim, dim)
        self.body = body
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.body(self.embed(x))[:, 0])


def toy_input(dim=8):
    return torch.randn(2, 4, dim, generator=torch.Generator().manual_seed(0))


PLANTED = {
    'residual': (Residual, {('add', 'body')}, 'layers.Sum with SumRule'),
    'scale': (HalfScale, {('mul', 'body')}, 'layers.Scale with IdentityRule'),
    'layernorm': (Standardize, {('layer_norm', 'body')}, 'LayerNormRule'),
    'gelu': (FunctionalGELU, {('gelu', 'body')}, 'IdentityRule'),
    'attention': (TokenMixer, {('bmm', 'body'), ('mul', 'body'), ('softmax', 'body')}, 'SoftmaxRule'),
}


@pytest.mark.parametrize('case', sorted(PLANTED))
def test_planted_error_is_found(case):
    body_type, expected, hint = PLANTED[case]
    torch.manual_seed(0)
    model = Toy(body_type() if body_type is HalfScale else body_type(8)).eval()
    before = hook_count(model)
    report = check(model, AttnLRP(), toy_input())
    assert {(finding.op, finding.module) for finding in report.findings} == expected, str(report)
    assert all(finding.module_type == body_type.__name__ for finding in report.findings)
    assert any(hint in finding.hint for finding in report.findings)
    assert not report.ok and 'FAILED' in str(report) and 'body' in str(report)
    assert hook_count(model) == before


def test_attention_findings_count_and_hints():
    model = Toy(TokenMixer(8)).eval()
    findings = {finding.op: finding for finding in check(model, AttnLRP(), toy_input()).findings}
    assert findings['bmm'].count == 2 and 'MatMul' in findings['bmm'].hint
    assert 'Scale' in findings['mul'].hint
    assert 'Softmax' in findings['softmax'].hint


def test_product_of_two_tensors_gets_the_product_hint():
    class Gate(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    findings = check(Toy(Gate()).eval(), AttnLRP(), toy_input()).findings
    ops = {finding.op: finding for finding in findings}
    assert set(ops) == {'mul', 'sigmoid'}
    assert 'Product with ProductRule' in ops['mul'].hint


def test_fixed_models_pass():
    '''The same bodies written with hookable modules are covered.'''
    class FixedResidual(Residual):
        def __init__(self, dim):
            super().__init__(dim)
            self.add = layers.Sum()

        def forward(self, x):
            return self.add(x, self.fc(x))

    class FixedMixer(TokenMixer):
        def __init__(self, dim):
            super().__init__(dim)
            self.scores = layers.AttentionScores(scale=self.scale, scale_output=True)
            self.softmax = layers.AttentionSoftmax(dim=-1)
            self.context = layers.AttentionContext()

        def forward(self, x):
            return self.context(self.softmax(self.scores(self.q(x), self.k(x).transpose(-1, -2))), self.v(x))

    for body in (FixedResidual(8), layers.Scale(0.5), torch.nn.LayerNorm(8), torch.nn.GELU(), FixedMixer(8)):
        report = check(Toy(body).eval(), AttnLRP(), toy_input())
        assert report.ok, str(report)


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
    model = Toy(Residual(8)).eval()
    with pytest.raises(CoverageError, match='add') as error:
        check(model, AttnLRP(), toy_input(), strict=True)
    assert isinstance(error.value, ValueError)
    assert isinstance(error.value.report, CoverageReport)
    assert 'body' in str(error.value) and 'SumRule' in str(error.value)
    check(Toy(layers.Scale(2.)).eval(), AttnLRP(), toy_input(), strict=True)


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
    tupled = Toy(Residual(8)).eval()
    tupled.forward = lambda x: {'logits': (Toy.forward(tupled, x),)}
    assert {finding.op for finding in check(tupled, AttnLRP(), x).findings} == {'add'}


def test_op_name():
    assert op_name('AddBackward0') == 'add'
    assert op_name('NativeLayerNormBackward0') == 'layer_norm'
    assert op_name('ScaledDotProductFlashAttentionForCpuBackward0') == 'scaled_dot_product_attention'
    assert op_name('UnsafeViewBackward0') == 'unsafe_view'
    assert op_name('CopySlices') == 'copy_slices'
    assert op_name('_RelevanceFunctionBackward') == '_relevance_function'


def test_adding_constant_zeros_is_not_a_finding_but_a_constant_bias_is():
    '''x + 0 (a constant zero tensor) passes relevance unchanged; x + c with c != 0 absorbs relevance and is
    reported.
    '''
    class AddConstant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.value = value

        def forward(self, x):
            return self.linear(x + torch.full((4,), self.value))

    zero = check(AddConstant(0.), AttnLRP(), torch.randn(2, 4))
    assert zero.ok, str(zero)
    bias = check(AddConstant(0.5), AttnLRP(), torch.randn(2, 4))
    assert [finding.op for finding in bias.findings] == ['add']
