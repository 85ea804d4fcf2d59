'''The interception engine (zennit_attn.engine): every glue operation of a forward gets the rule of ATTNLRP.md §2/§7,
checked against the rules' formulas written plainly (float64), and the forward is unchanged.'''
import pytest
import torch
import torch.nn.functional as F
from zennit.attribution import Gradient

import zennit_attn.rules

from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.engine import UnsupportedOperationError, op_listeners

from restoration import assert_restored, snapshot

pytestmark = pytest.mark.usefixtures('single_thread')


EPS = 1e-12


class Ops(torch.nn.Module):
    '''``fn(a(x), b(x))`` with two Linear branches (input-dependent operands) and a pluggable inline function.'''
    def __init__(self, fn, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(dim, dim, bias=False)
        self.b = torch.nn.Linear(dim, dim, bias=False)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.a(x), self.b(x))


def relevance_at(model, x, seed, composite=None):
    '''Relevance at the outputs of ``model.a`` and ``model.b`` (the operands of the inline function), and the output.'''
    recorded = {}

    def keep(name):
        def hook(module, args, output):
            output.register_hook(lambda grad: recorded.__setitem__(name, grad))
        return hook

    composite = composite or AttnLRP(epsilon=EPS)
    with composite.context(model):
        # registered after the composite: the hooks see the outputs of the rules
        handles = [model.a.register_forward_hook(keep('a')), model.b.register_forward_hook(keep('b'))]
        try:
            x = x.detach().requires_grad_(True)
            output = model(x)
            torch.autograd.grad(output, x, seed * output.detach())
        finally:
            for handle in handles:
                handle.remove()
    return recorded.get('a'), recorded.get('b'), output


def operands(model, x):
    with torch.no_grad():
        return model.a(x), model.b(x)


X = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def esum(terms, total, relevance):
    '''ε-sum reference: each term's share ``term * R / total``.'''
    return [term * relevance / total for term in terms]


# (name, inline function, reference (a, b, R) -> (R_a, R_b)); R is the relevance of the output (the seed)
ELEMENTWISE = [
    ('add', lambda a, b: a + b, lambda a, b, r: esum([a, b], a + b, r)),
    ('radd_number', lambda a, b: 2.0 + a, lambda a, b, r: (a * r / (a + 2.0), None)),
    ('sub', lambda a, b: a - b, lambda a, b, r: esum([a, -b], a - b, r)),
    ('torch_sub_alpha', lambda a, b: torch.sub(a, b, alpha=3.), lambda a, b, r: esum([a, -3 * b], a - 3 * b, r)),
    ('rsub_number', lambda a, b: 1.5 - a, lambda a, b, r: (-a * r / (1.5 - a), None)),
    ('add_constant_tensor', lambda a, b: a + torch.ones(6, dtype=a.dtype), lambda a, b, r: (a * r / (a + 1), None)),
    ('mul', lambda a, b: a * b, lambda a, b, r: (r / 2, r / 2)),
    ('mul_number', lambda a, b: a * 0.5, lambda a, b, r: (r, None)),
    ('rmul_number', lambda a, b: 3 * a, lambda a, b, r: (r, None)),
    ('mul_constant_tensor', lambda a, b: a * torch.arange(6, dtype=a.dtype), lambda a, b, r: (r, None)),
    ('div_number', lambda a, b: a / 4, lambda a, b, r: (r, None)),
    ('div_constant_tensor', lambda a, b: a / torch.arange(1, 7, dtype=a.dtype), lambda a, b, r: (r, None)),
    ('neg', lambda a, b: -a, lambda a, b, r: (r, None)),
    ('torch_neg', lambda a, b: torch.neg(a) + b, lambda a, b, r: (-a * r / (b - a), b * r / (b - a))),
    ('gelu', lambda a, b: F.gelu(a), lambda a, b, r: (r, None)),
    ('torch_tanh', lambda a, b: torch.tanh(a), lambda a, b, r: (r, None)),
    ('silu_inline', lambda a, b: a * torch.sigmoid(a), lambda a, b, r: (r, None)),
    ('gated', lambda a, b: F.silu(a) * b, lambda a, b, r: (r / 2, r / 2)),
    ('iadd', lambda a, b: a.clone().__iadd__(b), lambda a, b, r: esum([a, b], a + b, r)),
    ('add_', lambda a, b: (a * 1.0).add_(b), lambda a, b, r: esum([a, b], a + b, r)),
    ('mul_', lambda a, b: (a * 1.0).mul_(2.0), lambda a, b, r: (r, None)),
    ('sub_', lambda a, b: (a * 1.0).sub_(b), lambda a, b, r: esum([a, -b], a - b, r)),
    ('cat_select', lambda a, b: torch.cat([a, b], -1)[..., 3:9] * 1.0, lambda a, b, r: (
        torch.cat([torch.zeros_like(a[..., :3]), r[..., :3]], -1),
        torch.cat([r[..., 3:], torch.zeros_like(b[..., 3:])], -1),
    )),
]


@pytest.mark.parametrize('name,fn,reference', ELEMENTWISE, ids=[case[0] for case in ELEMENTWISE])
def test_elementwise_operations_get_their_rules(name, fn, reference):
    model = Ops(fn).double().eval()
    a, b = operands(model, X)
    expected_output = fn(a, b)
    seed = torch.randn(expected_output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rel_a, rel_b, output = relevance_at(model, X, seed)
    assert torch.equal(output.detach(), expected_output)  # the original op ran
    ref_a, ref_b = reference(a, b, seed * expected_output)
    for actual, wanted in ((rel_a, ref_a), (rel_b, ref_b)):
        if wanted is None:
            assert actual is None or actual.abs().max() == 0
        else:
            assert torch.allclose(actual, wanted, rtol=1e-8, atol=1e-12), (actual, wanted)


def test_cp_lrp_treats_a_gate_as_constant():
    model = Ops(lambda a, b: F.silu(a) * b).double().eval()
    a, b = operands(model, X)
    seed = torch.ones(2, 3, 6, dtype=torch.float64)
    rel_a, rel_b, output = relevance_at(model, X, seed, CPLRP(epsilon=EPS))
    assert rel_a is None or rel_a.abs().max() == 0
    assert torch.allclose(rel_b, output.detach(), rtol=1e-10)


def test_matmul_gets_the_uniform_epsilon_rule():
    '''``A @ B`` of two input-dependent tensors: ``R_A = 1/2 A (r B^T)``, ``R_B = 1/2 B (A^T r)``, ``r = R / (A B)``.'''
    model = Ops(lambda a, b: a @ b.transpose(-1, -2)).double().eval()
    a, b = operands(model, X)
    output = a @ b.transpose(-1, -2)
    seed = torch.randn(output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rel_a, rel_b, _ = relevance_at(model, X, seed)
    ratio = seed * output / output
    assert torch.allclose(rel_a, 0.5 * a * (ratio @ b), rtol=1e-8)
    assert torch.allclose(rel_b, 0.5 * b * (ratio.transpose(-1, -2) @ a), rtol=1e-8)


def SOFTMAX_FLOAT32(x):
    return torch.softmax(x, -1, dtype=torch.float32).to(x.dtype)


@pytest.mark.parametrize('softmax', [
    lambda x: torch.softmax(x, -1), lambda x: F.softmax(x, dim=-1), lambda x: x.softmax(-1), SOFTMAX_FLOAT32,
], ids=['torch', 'functional', 'method', 'float32'])
def test_softmax_gets_the_bias_absorbing_rule(softmax):
    '''``R_x = x (R - s sum(R))`` (Prop. 3.1), whichever way the softmax is called.'''
    model = Ops(lambda a, b: softmax(a + b)).double().eval()
    a, b = operands(model, X)
    x = a + b
    s = torch.softmax(x, -1)
    seed = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rel_a, rel_b, output = relevance_at(model, X, seed)
    relevance = seed * output.detach()
    rel_x = x * (relevance - s * relevance.sum(-1, keepdim=True))
    # the float32 softmax is checked at float32 precision
    tolerance = 1e-5 if softmax is SOFTMAX_FLOAT32 else 1e-8
    assert torch.allclose(rel_a + rel_b, rel_x, rtol=tolerance, atol=tolerance * 1e-2)


@pytest.mark.parametrize('reduce', ['sum', 'mean'])
def test_reductions_get_the_epsilon_rule(reduce):
    model = Ops(lambda a, b: getattr(a * b, reduce)(1)).double().eval()
    a, b = operands(model, X)
    terms = a * b
    total = terms.sum(1, keepdim=True)
    seed = torch.ones(2, 6, dtype=torch.float64)
    rel_a, rel_b, output = relevance_at(model, X, seed)
    expected = terms * output.detach().unsqueeze(1) / total
    assert torch.allclose(rel_a + rel_b, expected, rtol=1e-8)


def test_functional_linear_with_keywords_and_conv_get_epsilon():
    '''``F.linear(x, weight=..., bias=...)`` (timm EVA) and a functional conv: the ε-rule, the bias absorbing.'''
    weight = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    model = Ops(lambda a, b: F.linear(a, weight=weight, bias=bias)).double().eval()
    a, _ = operands(model, X)
    z = F.linear(a, weight, bias)
    seed = torch.ones_like(z)
    rel_a, _, _ = relevance_at(model, X, seed)
    assert torch.allclose(rel_a, a * ((z / z) @ weight), rtol=1e-8)

    kernel = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    class Conv(torch.nn.Module):
        def forward(self, x):
            return F.conv2d(x * 1.0, kernel, None, 2, 0, 1, 1).flatten(1)

    images = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with Gradient(Conv(), AttnLRP(epsilon=EPS)) as attributor:
        output, relevance = attributor(images, lambda y: y)
    assert relevance.sum().item() == pytest.approx(output.sum().item(), rel=1e-8)  # no bias: conservative


def test_fused_attention_equals_the_unfolded_chain_and_inline_attention():
    '''``F.scaled_dot_product_attention`` (boolean mask, causal, grouped-query) gets the same relevance fused and
    unfolded, and the same as attention written inline with matmul and softmax.'''
    class Attention(torch.nn.Module):
        def __init__(self, inline, causal, gqa):
            super().__init__()
            torch.manual_seed(0)
            self.q = torch.nn.Linear(8, 8)
            self.kv = torch.nn.Linear(8, 8 if not gqa else 4)
            self.inline, self.causal, self.gqa = inline, causal, gqa

        def forward(self, x):
            batch, length, _ = x.shape
            q = self.q(x).view(batch, length, 4, 2).transpose(1, 2)
            k = self.kv(x).view(batch, length, -1, 2).transpose(1, 2)
            v = k * 1.0
            if self.inline:
                if self.gqa:
                    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
                scores = q @ k.transpose(-1, -2) / 2 ** 0.5
                if self.causal:
                    scores = scores + torch.full((length, length), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
                out = torch.softmax(scores, -1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.gqa)
            return out.transpose(1, 2).reshape(batch, length, -1).sum(-1)

    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for causal in (False, True):
        for gqa in (False, True):
            results = []
            for inline, fused in ((False, True), (False, False), (True, True)):
                model = Attention(inline, causal, gqa).double().eval()
                with Gradient(model, AttnLRP(epsilon=EPS, fused_attention=fused)) as attributor:
                    output, relevance = attributor(x, lambda y: y)
                results.append((output, relevance))
            for output, relevance in results[1:]:
                assert torch.allclose(output, results[0][0], rtol=1e-10)
                assert torch.allclose(relevance, results[0][1], rtol=1e-7, atol=1e-12), (causal, gqa)


def test_operation_sites_are_named_per_module_call():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x) + x * 2

    model = torch.nn.Sequential(Block(), Block()).double().eval()
    sites = []
    token = op_listeners.set(op_listeners.get() + (lambda site, tensor: sites.append(site),))
    try:
        with Gradient(model, AttnLRP()) as attributor:
            attributor(torch.randn(2, 4, dtype=torch.float64), lambda y: y)
    finally:
        op_listeners.reset(token)
    assert sites == ['0.add', '0.mul', '0.add_1', '1.add', '1.mul', '1.add_1']


UNSUPPORTED = [
    ('exp', lambda a, b: torch.exp(a)),
    ('pow', lambda a, b: a.pow(2)),
    ('div', lambda a, b: a / b),
    ('rtruediv', lambda a, b: 1 / a),
    ('einsum', lambda a, b: torch.einsum('bij,bkj->bik', a, b)),
    ('log_softmax', lambda a, b: F.log_softmax(a, -1)),
    ('matmul of a vector', lambda a, b: a @ b[0, 0]),
    ('cumsum', lambda a, b: a.cumsum(1)),
]


@pytest.mark.parametrize('op,fn', UNSUPPORTED, ids=[case[0] for case in UNSUPPORTED])
def test_operation_without_rule_raises_and_restores(op, fn):
    model = Ops(fn).double().eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedOperationError, match=r"module 'fn'|the model \(Ops\)"):
        with Gradient(model, AttnLRP()) as attributor:
            attributor(X, lambda y: y)
    assert_restored(model, before)
    assert not torch.overrides._get_current_function_mode_stack()
    # without gradients (no attribution) the forward runs unchanged
    with AttnLRP().context(model), torch.no_grad():
        model(X)


def test_operations_on_constants_need_no_rule():
    '''Mask arithmetic, position tables and anything else computed without the input keep the plain ops.'''
    model = Ops(lambda a, b: a + torch.exp(torch.arange(6.)).to(a.dtype).pow(0.5) / 7).double().eval()
    with Gradient(model, AttnLRP(epsilon=EPS)) as attributor:
        output, relevance = attributor(X, lambda y: y)
    assert torch.isfinite(relevance).all()


def test_forward_unchanged_and_engine_scoped_to_the_forward():
    '''The forward under the composite is bit-identical, and no function mode is active outside it.'''
    model = Ops(lambda a, b: torch.softmax(a * b + a, -1) @ b.transpose(-1, -2)).double().eval()
    with torch.no_grad():
        plain = model(X)
    with AttnLRP().context(model):
        assert not torch.overrides._get_current_function_mode_stack()
        output = model(X.requires_grad_(True))
        assert not torch.overrides._get_current_function_mode_stack()
    assert torch.equal(output.detach(), plain)


def test_in_place_on_a_kept_output():
    '''A rule that keeps its output for the backward pass cannot let an in-place method modify it: a clear error. An
    augmented assignment (``x += c``, as T5 adds its position bias to the scores) rebinds the name, so it gets a new
    tensor with the right rule.'''
    model = Ops(lambda a, b: (a + 1.0).mul_(2.0)).double().eval()
    with pytest.raises(UnsupportedOperationError, match="in-place 'mul_'"):
        with Gradient(model, AttnLRP()) as attributor:
            attributor(X, lambda y: y)

    def augmented(a, b):
        scores = a + 1.0
        scores += b
        return scores

    model = Ops(augmented).double().eval()
    a, b = operands(model, X)
    seed = torch.ones(2, 3, 6, dtype=torch.float64)
    rel_a, rel_b, output = relevance_at(model, X, seed)
    total = a + 1.0 + b
    assert torch.equal(output.detach(), total)
    assert torch.allclose(rel_a, a * ((a + 1.0) / total * total) / (a + 1.0), rtol=1e-8)
    assert torch.allclose(rel_b, b, rtol=1e-8)


@pytest.mark.parametrize('inplace', [False, True])
def test_index_add_gets_the_epsilon_sum_rule(inplace):
    '''Mixture-of-experts style scatter-sums: every row of the source gets its ε-share of the place it is added to
    (the formula written plainly, row by row).'''
    index = torch.tensor([2, 0, 2])

    def scatter(a, b):
        target = a[:, :, :4] * 1.0
        if inplace:
            target.index_add_(1, index, b[:, :, :4], alpha=2.0)
            return target
        return target.index_add(1, index, b[:, :, :4], alpha=2.0)

    model = Ops(scatter).double().eval()
    a, b = operands(model, X)
    seed = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    rel_a, rel_b, output = relevance_at(model, X, seed)
    expected_output = a[:, :, :4].clone()
    for row, place in enumerate(index.tolist()):
        expected_output[:, place] += 2.0 * b[:, row, :4]
    assert torch.equal(output.detach(), expected_output)
    ratio = seed * expected_output / expected_output
    assert torch.allclose(rel_a[..., :4], a[:, :, :4] * ratio, rtol=1e-8)
    for row, place in enumerate(index.tolist()):
        assert torch.allclose(rel_b[:, row, :4], 2.0 * b[:, row, :4] * ratio[:, place], rtol=1e-8)
    assert (rel_b[..., 4:] == 0).all()


def test_a_submodule_called_directly_is_attributed_too():
    '''Registered on a container whose child is then called on its own: the engine is active in that call too.'''
    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    class Box(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

    torch.manual_seed(0)
    box = Box().double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    totals = []
    for root in (box, box.inner):
        with AttnLRP(epsilon=EPS).context(root):
            y = box.inner(x)
            (relevance,) = torch.autograd.grad(y, x, y)
        totals.append(relevance)
    assert torch.allclose(totals[0], totals[1], rtol=1e-12)
    assert totals[0].sum().item() == pytest.approx(y.sum().item(), rel=1e-9)  # bias-free: conservative


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_fused_and_unfolded_attention_apply_epsilon_alike(dtype):
    '''At the default ε the unfolded chain stabilises the scaled scores as the fused rule does: equal up to rounding.'''
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum((1, 3))

    x = torch.randn(2, 5, 8, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(dtype)
    model = Attention().to(dtype).eval()
    results = []
    for fused in (True, False):
        with Gradient(model, AttnLRP(fused_attention=fused)) as attributor:
            results.append(attributor(x, lambda y: y)[1])
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(results[0], results[1], rtol=tolerance, atol=tolerance * 1e-3)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_stacked(x):
    '''The same rotation written another way (no cat(-x2, x1) pattern): decomposed into products, negation and sum.'''
    half = x.shape[-1] // 2
    return torch.stack((-x[..., half:], x[..., :half]), dim=-2).flatten(-2)


@pytest.mark.parametrize('rotation', [rotate_half, rotate_half_stacked], ids=['rotate_half', 'stacked'])
def test_rotary_embedding_written_inline_gets_the_rope_rule(rotation):
    '''``x * cos + rotate_half(x) * sin`` is recognised as one rotary node (RoPERule, which keeps only x); written
    another way it is decomposed, and both give the ε-rule of the rotation (ATTNLRP.md §7) computed plainly.'''
    angles = torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    model = Ops(lambda a, b: a * cos + rotation(a) * sin).double().eval()
    a, _ = operands(model, X)
    seed = torch.randn(2, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    rules = []
    token = op_listeners.set(op_listeners.get() + (lambda site, tensor: rules.append(type(tensor.grad_fn.hook)),))
    try:
        rel_a, _, output = relevance_at(model, X, seed)
    finally:
        op_listeners.reset(token)
    assert (rules.count(zennit_attn.rules.RoPERule) == 1) == (rotation is rotate_half)
    # the rotation is linear, y = J a: R_a = a * J^T (R / y)
    ratio = seed * output.detach() / output.detach()
    expected = a * (ratio * cos - rotate_half(ratio * sin))
    assert torch.allclose(rel_a, expected, rtol=1e-8, atol=1e-12)
