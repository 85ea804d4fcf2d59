'''Tests of the AttnLRP rules in zennit_attn.rules.

Every rule is compared with a slow float64 reference twin written straight from the formulas of ATTNLRP.md §2 (einsum
and explicit Jacobians, sharing no code with the rules). The relevance of an input is the gradient autograd returns for
it while the rule is attached to the module.
'''
import math
from functools import partial

import pytest
import torch
import zennit.core
import zennit.rules
from zennit.core import Composite

from zennit_attn import layers, rules

from references import (  # noqa: F401
    EPSILONS, EPSILON_IDS, assert_close, attribute, clip_stabilizer, leaf, randn, random_cos_sin, reduce_to,
    ref_layernorm, ref_matmul, ref_mean, ref_product, ref_rope, ref_softmax, ref_sum, rope_jacobian, sign,
    softmax_ref, stabilize,
)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('epsilon', [1e-6, 0.25, 3])
def test_sign_stabilizer_equals_zennit_stabilize(generator, dtype, epsilon):
    '''The faster SignStabilizer gives bit-identical values to zennit.core.stabilize, also at 0, -0.0 and infinities,
    out of place and in place.
    '''
    z = torch.cat([randn(generator, 100), torch.tensor([0., -0., 1e-30, -1e-30, float('inf'), -float('inf')])])
    z = z.to(dtype)
    stabilizer = rules.SignStabilizer(epsilon=epsilon)
    expected = zennit.core.stabilize(z, epsilon)
    assert torch.equal(stabilizer(z), expected)
    copy = z.clone()
    assert stabilizer.stabilize_(copy) is copy and torch.equal(copy, expected)
    assert isinstance(rules.Epsilon(epsilon).stabilizer, rules.SignStabilizer)
    assert not isinstance(rules.Epsilon(clip_stabilizer).stabilizer, rules.SignStabilizer)


# ------------------------------------------------------------------------------------------------ reference twins


IDENTITY_MODULES = {
    'scale': lambda: layers.Scale(3.),
    'scale-divide': lambda: layers.Scale(7., divide=True),
    'gelu': torch.nn.GELU,
    'silu': torch.nn.SiLU,
    'tanh': torch.nn.Tanh,
}


@pytest.mark.parametrize('module_factory', IDENTITY_MODULES.values(), ids=IDENTITY_MODULES.keys())
def test_identity_rule_passes_relevance_unchanged(generator, module_factory):
    '''IdentityRule gives ``R_in = R_out`` exactly (conservative), where the plain gradient would differ.'''
    module = module_factory()
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    _, (rel,) = attribute(module, rules.IdentityRule(), (x,), relevance)
    assert torch.equal(rel, relevance)
    assert rel.sum() == relevance.sum()
    (grad,) = torch.autograd.grad(module(x), x, relevance)
    assert not torch.allclose(grad, relevance)


def test_identity_rule_rejects_non_elementwise_module(generator):
    '''IdentityRule on a shape-changing module raises a ValueError naming rule and module.'''
    x = leaf(generator, 2, 3, 5, 7)
    with pytest.raises(ValueError, match='IdentityRule on Mean'):
        attribute(layers.Mean(-1), rules.IdentityRule(), (x,), randn(generator, 2, 3, 5))


@pytest.mark.parametrize('normalized_shape', [(7,), (5, 7)])
def test_rmsnorm_rule_passes_relevance_unchanged(generator, normalized_shape):
    '''RMSNormRule gives ``R_x = R_y`` exactly (conservative) on torch.nn.RMSNorm with a random weight.'''
    module = torch.nn.RMSNorm(normalized_shape, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(randn(generator, *normalized_shape))
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    _, (rel,) = attribute(module, rules.RMSNormRule(), (x,), relevance)
    assert torch.equal(rel, relevance)
    assert torch.isclose(rel.sum(), relevance.sum(), rtol=1e-12)
    (grad,) = torch.autograd.grad(module(x), x, relevance)
    assert not torch.allclose(grad, relevance)


# ------------------------------------------------------------------------------------------------------ softmax


SOFTMAX_MODULES = {
    'layers': lambda dim: layers.Softmax(dim=dim),
    'torch': lambda dim: torch.nn.Softmax(dim=dim),
}


@pytest.mark.parametrize('dim', [-1, 0, 1, 2])
@pytest.mark.parametrize('module_factory', SOFTMAX_MODULES.values(), ids=SOFTMAX_MODULES.keys())
def test_softmax_rule_matches_reference(generator, dim, module_factory):
    '''SoftmaxRule equals ``x ⊙ (R − s ⊙ ΣR)`` along the module's dimension.'''
    x, relevance = 3 * leaf(generator, 2, 3, 5, 7).detach(), randn(generator, 2, 3, 5, 7)
    x.requires_grad_()
    _, (rel,) = attribute(module_factory(dim), rules.SoftmaxRule(), (x,), relevance)
    assert_close(rel, ref_softmax(x.detach(), relevance, dim))


@pytest.mark.parametrize('dim', [-1, 1])
def test_softmax_rule_sum_has_closed_form_and_is_not_conservative(generator, dim):
    '''SoftmaxRule satisfies ``Σ R_x = Σ_j R_j (x_j − Σ_i s_i x_i)`` per softmax row, and ``Σ R_x ≠ Σ R``.'''
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    _, (rel,) = attribute(layers.Softmax(dim=dim), rules.SoftmaxRule(), (x,), relevance)
    prob = torch.softmax(x.detach(), dim)
    expected = (relevance * (x.detach() - (prob * x.detach()).sum(dim, keepdim=True))).sum(dim)
    assert_close(rel.sum(dim), expected, rtol=1e-10)
    row_gap = (rel.sum(dim) - relevance.sum(dim)).abs()
    assert (row_gap > 1e-3).float().mean() > 0.9
    assert not torch.isclose(rel.sum(), relevance.sum(), rtol=1e-2)


def test_softmax_rule_is_invariant_to_masked_logits(generator):
    '''SoftmaxRule gives zero relevance to a masked position, whatever the (huge negative) fill value.'''
    x, relevance = randn(generator, 2, 7), randn(generator, 2, 7)
    results = []
    for fill in (-math.inf, torch.finfo(torch.float64).min, torch.finfo(torch.float32).min):
        masked = x.clone()
        masked[:, 2] = fill
        masked.requires_grad_()
        results.append(attribute(layers.Softmax(), rules.SoftmaxRule(), (masked,), relevance)[1][0])
    for rel in results:
        assert (rel[:, 2] == 0).all()
        assert_close(rel, results[0], rtol=1e-12)


def make_mask(shape):
    '''Causal mask over the last two dims plus two padded keys in the last batch element (True = masked).'''
    causal = torch.ones(shape[-2:], dtype=torch.bool).triu(1)
    mask = causal.expand(shape).clone()
    mask[-1, ..., -2:] = True
    return mask


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('fill', ['-inf', 'finfo.min', 'finfo.min-added'])
def test_softmax_rule_masked_input_is_finite_and_zero_at_mask(generator, dtype, fill):
    '''SoftmaxRule on inputs masked with ``-inf`` or ``torch.finfo(dtype).min`` (filled or added) gives finite
    relevance of the input dtype, exactly 0 at masked positions, and the reference elsewhere.
    '''
    shape = (2, 3, 7, 7)
    mask = make_mask(shape)
    x = (2 * randn(generator, *shape)).to(dtype)
    relevance = randn(generator, *shape).to(dtype)
    if fill == '-inf':
        masked = x.masked_fill(mask, -math.inf)
    elif fill == 'finfo.min':
        masked = x.masked_fill(mask, torch.finfo(dtype).min)
    else:
        masked = x + torch.zeros(shape, dtype=dtype).masked_fill(mask, torch.finfo(dtype).min)
    masked.requires_grad_()
    output, (rel,) = attribute(layers.Softmax(), rules.SoftmaxRule(), (masked,), relevance)
    assert (output[mask] == 0).all()
    assert rel.dtype == dtype
    assert torch.isfinite(rel).all()
    assert (rel[mask] == 0).all()
    expected = ref_softmax(x.double(), relevance.double(), -1, mask)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 3e-2)
    assert_close(rel, expected, rtol=rtol)


def test_softmax_rule_with_upcasting_dtype(generator):
    '''SoftmaxRule on ``Softmax(dtype=float32)`` with bfloat16 input returns bfloat16 relevance close to the twin.'''
    x = (2 * randn(generator, 2, 3, 5, 7)).to(torch.bfloat16).requires_grad_()
    relevance = randn(generator, 2, 3, 5, 7).float()
    output, (rel,) = attribute(layers.Softmax(dtype=torch.float32), rules.SoftmaxRule(), (x,), relevance)
    assert output.dtype == torch.float32
    assert rel.dtype == torch.bfloat16
    assert_close(rel, ref_softmax(x.detach().double(), relevance.double(), -1), rtol=2e-2)


# ------------------------------------------------------------------------------------------------------- matmul


MATMUL_SHAPES = [
    ((2, 3, 5, 7), (2, 3, 7, 4)),
    ((1, 1, 5, 7), (2, 3, 7, 4)),
    ((2, 3, 5, 7), (7, 4)),
    ((2, 1, 5, 7), (1, 3, 7, 4)),
]
MATMUL_SHAPE_IDS = ['batched', 'broadcast-a', 'matrix-b', 'cross-broadcast']
SCALES = [(1., False), (0.37, False), (0.37, True)]
SCALE_IDS = ['unscaled', 'scale-input', 'scale-output']


def output_shape(shape_a, shape_b):
    '''Shape of ``a @ b``.'''
    return (*torch.broadcast_shapes(shape_a[:-2], shape_b[:-2]), shape_a[-2], shape_b[-1])


@pytest.mark.parametrize('shapes', MATMUL_SHAPES, ids=MATMUL_SHAPE_IDS)
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
@pytest.mark.parametrize('scale, scale_output', SCALES, ids=SCALE_IDS)
def test_matmul_rule_matches_reference(generator, shapes, epsilon, scale, scale_output):
    '''MatMulRule equals the uniform-ε rule ``R_A = ½ A ⊙ (c r Bᵀ)``, ``R_B = ½ B ⊙ (c Aᵀ r)``.'''
    shape_a, shape_b = shapes
    a, b = leaf(generator, *shape_a), leaf(generator, *shape_b)
    relevance = randn(generator, *output_shape(shape_a, shape_b))
    module = layers.MatMul(scale, scale_output=scale_output)
    _, (rel_a, rel_b) = attribute(module, rules.MatMulRule(epsilon), (a, b), relevance)
    ref_a, ref_b = ref_matmul(a.detach(), b.detach(), relevance, epsilon, scale)
    assert_close(rel_a, ref_a)
    assert_close(rel_b, ref_b)


@pytest.mark.parametrize('shapes', MATMUL_SHAPES, ids=MATMUL_SHAPE_IDS)
@pytest.mark.parametrize('scale', [1., 0.37])
def test_matmul_rule_conserves(generator, shapes, scale):
    '''MatMulRule with tiny ε conserves relevance: ``Σ R_A + Σ R_B = Σ R``, each operand getting about half.'''
    shape_a, shape_b = shapes
    a, b = leaf(generator, *shape_a), leaf(generator, *shape_b)
    relevance = randn(generator, *output_shape(shape_a, shape_b))
    _, (rel_a, rel_b) = attribute(layers.MatMul(scale), rules.MatMulRule(1e-9), (a, b), relevance)
    assert torch.isclose(rel_a.sum() + rel_b.sum(), relevance.sum(), rtol=1e-6)
    assert torch.isclose(rel_a.sum(), relevance.sum() / 2, rtol=1e-6)
    assert torch.isclose(rel_b.sum(), relevance.sum() / 2, rtol=1e-6)


def test_matmul_rule_large_epsilon_absorbs_relevance(generator):
    '''MatMulRule with a large ε is not conservative (ε absorbs relevance), so the conservation test is meaningful.'''
    a, b = leaf(generator, 2, 3, 5, 7), leaf(generator, 2, 3, 7, 4)
    relevance = randn(generator, 2, 3, 5, 4).abs()
    _, (rel_a, rel_b) = attribute(layers.MatMul(), rules.MatMulRule(10.), (a, b), relevance)
    assert (rel_a.sum() + rel_b.sum()).abs() < 0.5 * relevance.sum()


@pytest.mark.parametrize('constant', [0, 1])
@pytest.mark.parametrize('kind', ['no-grad', 'parameter'])
@pytest.mark.parametrize('epsilon', [1e-9, 0.5, clip_stabilizer], ids=['1e-9', '0.5', 'clip'])
def test_matmul_rule_constant_operand(generator, constant, kind, epsilon):
    '''MatMulRule gives a constant operand (no grad, or nn.Parameter) no relevance and the other the full ε-rule.'''
    shapes = ((2, 3, 5, 7), (7, 4))
    args = [leaf(generator, *shape) for shape in shapes]
    args[constant] = args[constant].detach()
    if kind == 'parameter':
        args[constant] = torch.nn.Parameter(args[constant])
    relevance = randn(generator, 2, 3, 5, 4)
    _, rels = attribute(layers.MatMul(0.37), rules.MatMulRule(epsilon), tuple(args), relevance)
    shares = (0., 1.) if constant == 0 else (1., 0.)
    refs = ref_matmul(*(arg.detach() for arg in args), relevance, epsilon, 0.37, shares)
    assert rels[constant] is None
    assert_close(rels[1 - constant], refs[1 - constant])
    if epsilon == 1e-9:
        assert torch.isclose(rels[1 - constant].sum(), relevance.sum(), rtol=1e-6)


def test_matmul_rule_parameter_gets_no_gradient_with_backward(generator):
    '''A weight parameter multiplied with MatMulRule gets ``.grad is None`` after ``backward``.'''
    weight = torch.nn.Parameter(randn(generator, 7, 4))
    x = leaf(generator, 2, 5, 7)
    module = layers.MatMul()
    handles = rules.MatMulRule().register(module)
    try:
        module(x, weight).backward(randn(generator, 2, 5, 4))
    finally:
        handles.remove()
    assert weight.grad is None
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------- CP matmul


@pytest.mark.parametrize('shapes', MATMUL_SHAPES, ids=MATMUL_SHAPE_IDS)
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
@pytest.mark.parametrize('constant', [0, 1])
def test_cp_matmul_rule_matches_reference(generator, shapes, epsilon, constant):
    '''CPMatMulRule gives the ``constant`` operand no relevance (None) and the other the full, unhalved ε-rule.'''
    shape_a, shape_b = shapes
    a, b = leaf(generator, *shape_a), leaf(generator, *shape_b)
    relevance = randn(generator, *output_shape(shape_a, shape_b))
    _, rels = attribute(layers.MatMul(0.37), rules.CPMatMulRule(epsilon, constant=constant), (a, b), relevance)
    shares = (0., 1.) if constant == 0 else (1., 0.)
    refs = ref_matmul(a.detach(), b.detach(), relevance, epsilon, 0.37, shares)
    assert rels[constant] is None
    assert_close(rels[1 - constant], refs[1 - constant])


@pytest.mark.parametrize('shapes', MATMUL_SHAPES, ids=MATMUL_SHAPE_IDS)
def test_cp_matmul_rule_conserves(generator, shapes):
    '''CPMatMulRule with tiny ε conserves relevance in the variable operand: ``Σ R_V = Σ R``.'''
    shape_a, shape_b = shapes
    a, b = leaf(generator, *shape_a), leaf(generator, *shape_b)
    relevance = randn(generator, *output_shape(shape_a, shape_b))
    _, (rel_a, rel_b) = attribute(layers.MatMul(), rules.CPMatMulRule(1e-9), (a, b), relevance)
    assert rel_a is None
    assert torch.isclose(rel_b.sum(), relevance.sum(), rtol=1e-6)


def test_cp_matmul_rule_rejects_invalid_constant():
    '''CPMatMulRule and CPProductRule accept only operand index 0 or 1.'''
    with pytest.raises(ValueError, match='CPMatMulRule'):
        rules.CPMatMulRule(constant=2)
    with pytest.raises(ValueError, match='CPProductRule'):
        rules.CPProductRule(constant=-1)


# ------------------------------------------------------------------------------------------------------ product


PRODUCT_SHAPES = [
    ((2, 3, 5, 7), (2, 3, 5, 7)),
    ((2, 3, 5, 7), (1, 1, 5, 7)),
    ((2, 1, 5, 7), (3, 1, 7)),
    ((7,), (2, 3, 5, 7)),
]
PRODUCT_SHAPE_IDS = ['same', 'broadcast-b', 'cross-broadcast', 'vector-a']


@pytest.mark.parametrize('shapes', PRODUCT_SHAPES, ids=PRODUCT_SHAPE_IDS)
def test_product_rule_matches_reference_and_conserves(generator, shapes):
    '''ProductRule gives each factor ``R / 2`` summed over its broadcast dims; ``Σ R_a + Σ R_b = Σ R``.'''
    a, b = (leaf(generator, *shape) for shape in shapes)
    relevance = randn(generator, *torch.broadcast_shapes(*shapes))
    _, (rel_a, rel_b) = attribute(layers.Product(), rules.ProductRule(), (a, b), relevance)
    ref_a, ref_b = ref_product(a, b, relevance)
    assert_close(rel_a, ref_a, rtol=1e-12)
    assert_close(rel_b, ref_b, rtol=1e-12)
    assert torch.isclose(rel_a.sum() + rel_b.sum(), relevance.sum(), rtol=1e-12)


@pytest.mark.parametrize('constant', [0, 1])
@pytest.mark.parametrize('kind', ['no-grad', 'parameter'])
def test_product_rule_constant_factor(generator, constant, kind):
    '''ProductRule gives a constant factor (no grad, or nn.Parameter) nothing and the other factor all of ``R``.'''
    shapes = ((2, 3, 5, 7), (1, 1, 5, 7))
    args = [leaf(generator, *shape) for shape in shapes]
    args[constant] = args[constant].detach()
    if kind == 'parameter':
        args[constant] = torch.nn.Parameter(args[constant])
    relevance = randn(generator, 2, 3, 5, 7)
    _, rels = attribute(layers.Product(), rules.ProductRule(), tuple(args), relevance)
    shares = (0., 1.) if constant == 0 else (1., 0.)
    assert rels[constant] is None
    assert_close(rels[1 - constant], ref_product(*args, relevance, shares)[1 - constant], rtol=1e-12)
    assert torch.isclose(rels[1 - constant].sum(), relevance.sum(), rtol=1e-12)


@pytest.mark.parametrize('shapes', PRODUCT_SHAPES, ids=PRODUCT_SHAPE_IDS)
@pytest.mark.parametrize('constant', [0, 1])
def test_cp_product_rule_matches_reference(generator, shapes, constant):
    '''CPProductRule gives the ``constant`` factor nothing and the other factor all of ``R`` (conservative).'''
    a, b = (leaf(generator, *shape) for shape in shapes)
    relevance = randn(generator, *torch.broadcast_shapes(*shapes))
    _, rels = attribute(layers.Product(), rules.CPProductRule(constant=constant), (a, b), relevance)
    shares = (0., 1.) if constant == 0 else (1., 0.)
    assert rels[constant] is None
    assert_close(rels[1 - constant], ref_product(a, b, relevance, shares)[1 - constant], rtol=1e-12)
    assert torch.isclose(rels[1 - constant].sum(), relevance.sum(), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------- sum


SUM_SHAPES = [
    ((2, 3, 5, 7), (2, 3, 5, 7)),
    ((2, 3, 5, 7), (1, 1, 5, 7)),
    ((2, 1, 5, 7), (3, 1, 7)),
    ((5, 7), (2, 3, 5, 7)),
]
SUM_SHAPE_IDS = ['same', 'broadcast-b', 'cross-broadcast', 'matrix-a']


@pytest.mark.parametrize('fill', [float('-inf'), torch.finfo(torch.float64).min], ids=['-inf', 'finfo.min'])
def test_sum_rule_with_a_mask_constant_keeps_the_sum_and_stays_finite(generator, fill):
    '''scores + mask keeps the sum and the mask and recovers the scores as their difference, which is NaN for -inf
    (-inf - -inf): the masked positions get 0, as the reference gives.
    '''
    scores = leaf(generator, 2, 5, 5)
    mask = torch.zeros(1, 5, 5, dtype=torch.float64).masked_fill(torch.ones(5, 5).triu(1).bool(), fill)
    relevance = torch.where(mask == 0, randn(generator, 2, 5, 5), torch.zeros(()))
    _, (rel_scores, rel_mask) = attribute(layers.Sum(), rules.SumRule(epsilon=1e-3), (scores, mask), relevance)
    assert rel_mask is None
    expected = torch.where(mask == 0, scores.detach() * relevance / stabilize(scores.detach(), 1e-3), 0.)
    assert_close(rel_scores, expected, rtol=1e-12)


@pytest.mark.parametrize('shapes', SUM_SHAPES, ids=SUM_SHAPE_IDS)
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
def test_sum_rule_matches_reference(generator, shapes, epsilon):
    '''SumRule equals ``R_a = a ⊙ R / stab(a + b)``, ``R_b = b ⊙ R / stab(a + b)`` summed over broadcast dims.'''
    a, b = (leaf(generator, *shape) for shape in shapes)
    relevance = randn(generator, *torch.broadcast_shapes(*shapes))
    _, (rel_a, rel_b) = attribute(layers.Sum(), rules.SumRule(epsilon), (a, b), relevance)
    ref_a, ref_b = ref_sum(a.detach(), b.detach(), relevance, epsilon)
    assert_close(rel_a, ref_a)
    assert_close(rel_b, ref_b)


@pytest.mark.parametrize('shapes', SUM_SHAPES, ids=SUM_SHAPE_IDS)
def test_sum_rule_conserves(generator, shapes):
    '''SumRule with tiny ε and two variable operands conserves relevance: ``Σ R_a + Σ R_b = Σ R``.'''
    a, b = (leaf(generator, *shape) for shape in shapes)
    relevance = randn(generator, *torch.broadcast_shapes(*shapes))
    _, (rel_a, rel_b) = attribute(layers.Sum(), rules.SumRule(1e-9), (a, b), relevance)
    assert torch.isclose(rel_a.sum() + rel_b.sum(), relevance.sum(), rtol=1e-6)


@pytest.mark.parametrize('constant', [0, 1])
@pytest.mark.parametrize('kind', ['no-grad', 'parameter'])
def test_sum_rule_constant_operand_absorbs_its_share(generator, constant, kind):
    '''SumRule gives a constant operand (mask, nn.Parameter position embedding) no relevance; its share ``c ⊙ R /
    stab(y)`` is absorbed, and the variable operand keeps ``x ⊙ R / stab(y)`` (no renormalisation).
    '''
    shapes = [(2, 5, 7), (2, 5, 7)]
    shapes[constant] = (1, 5, 7)
    args = [leaf(generator, *shape) for shape in shapes]
    args[constant] = args[constant].detach()
    if kind == 'parameter':
        args[constant] = torch.nn.Parameter(args[constant])
    relevance = randn(generator, 2, 5, 7)
    _, rels = attribute(layers.Sum(), rules.SumRule(1e-9), tuple(args), relevance)
    refs = ref_sum(*(arg.detach() for arg in args), relevance, 1e-9)
    assert rels[constant] is None
    assert_close(rels[1 - constant], refs[1 - constant])
    absorbed = refs[constant].sum()
    assert torch.isclose(rels[1 - constant].sum(), relevance.sum() - absorbed, rtol=1e-6)
    assert absorbed.abs() > 1e-3


def test_sum_rule_zero_parameter_conserves(generator):
    '''SumRule with a zero position-embedding parameter and tiny ε passes all relevance to the variable operand.'''
    x, embedding = leaf(generator, 2, 5, 7), torch.nn.Parameter(torch.zeros(1, 5, 7, dtype=torch.float64))
    relevance = randn(generator, 2, 5, 7)
    _, (rel_x, rel_embedding) = attribute(layers.Sum(), rules.SumRule(1e-9), (x, embedding), relevance)
    assert rel_embedding is None
    assert torch.isclose(rel_x.sum(), relevance.sum(), rtol=1e-6)


# --------------------------------------------------------------------------------------------------------- mean


@pytest.mark.parametrize('dim', [1, -1, (1, 2), (-2, -1)], ids=['1', '-1', '(1,2)', '(-2,-1)'])
@pytest.mark.parametrize('keepdim', [False, True])
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
def test_mean_rule_matches_reference(generator, dim, keepdim, epsilon):
    '''MeanRule equals ``R_i = x_i R / stab(Σ_k x_k)``.'''
    module = layers.Mean(dim, keepdim=keepdim)
    x = leaf(generator, 2, 3, 5, 7)
    relevance = randn(generator, *x.detach().mean(dim, keepdim=keepdim).shape)
    _, (rel,) = attribute(module, rules.MeanRule(epsilon), (x,), relevance)
    assert_close(rel, ref_mean(x.detach(), relevance, dim, keepdim, epsilon))


@pytest.mark.parametrize('dim', [1, (-2, -1)], ids=['1', '(-2,-1)'])
@pytest.mark.parametrize('keepdim', [False, True])
def test_mean_rule_conserves(generator, dim, keepdim):
    '''MeanRule with tiny ε conserves relevance per pooled output: ``Σ_i R_i = R``.'''
    module = layers.Mean(dim, keepdim=keepdim)
    x = leaf(generator, 2, 3, 5, 7)
    relevance = randn(generator, *x.detach().mean(dim, keepdim=keepdim).shape)
    _, (rel,) = attribute(module, rules.MeanRule(1e-9), (x,), relevance)
    assert_close(rel.sum(dim, keepdim=keepdim), relevance, rtol=1e-6)


def test_mean_rule_requires_dim_attribute(generator):
    '''MeanRule on a module without ``dim`` raises a TypeError naming rule and module.'''
    with pytest.raises(TypeError, match='MeanRule on GELU'):
        attribute(torch.nn.GELU(), rules.MeanRule(), (leaf(generator, 2, 7),), randn(generator, 2, 7))


# ---------------------------------------------------------------------------------------------------- layernorm


def make_layernorm(generator, normalized_shape, affine=True, bias=True):
    '''Float64 LayerNorm with random weight and bias.'''
    module = torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=affine, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(1 + randn(generator, *normalized_shape))
        if module.bias is not None:
            module.bias.copy_(randn(generator, *normalized_shape))
    return module


@pytest.mark.parametrize('normalized_shape', [(7,), (5, 7)], ids=['(7,)', '(5,7)'])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
def test_layernorm_rule_matches_reference(generator, normalized_shape, affine, epsilon):
    '''LayerNormRule equals the ε-rule on the linear map of LayerNorm with σ held constant.'''
    module = make_layernorm(generator, normalized_shape, affine)
    x, relevance = 2 * leaf(generator, 2, 3, 5, 7).detach() + 1, randn(generator, 2, 3, 5, 7)
    x.requires_grad_()
    output, (rel,) = attribute(module, rules.LayerNormRule(epsilon), (x,), relevance)
    ref, ref_output = ref_layernorm(
        x.detach(), relevance, module.weight, module.bias, len(normalized_shape), module.eps, epsilon
    )
    assert_close(output.detach(), ref_output, rtol=1e-12)
    assert_close(rel, ref)


@pytest.mark.parametrize('normalized_shape', [(7,), (5, 7)], ids=['(7,)', '(5,7)'])
def test_layernorm_rule_conserves_without_bias(generator, normalized_shape):
    '''LayerNormRule with tiny ε and no bias conserves relevance per normalised group.'''
    module = make_layernorm(generator, normalized_shape, bias=False)
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    _, (rel,) = attribute(module, rules.LayerNormRule(1e-9), (x,), relevance)
    dims = tuple(range(-len(normalized_shape), 0))
    assert_close(rel.sum(dims), relevance.sum(dims), rtol=1e-6)


def test_layernorm_rule_bias_absorbs_its_share(generator):
    '''LayerNormRule with tiny ε and a bias ``β``: ``Σ R_x = Σ R − Σ β ⊙ R / y`` (the bias absorbs its share).'''
    module = make_layernorm(generator, (7,))
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    output, (rel,) = attribute(module, rules.LayerNormRule(1e-9), (x,), relevance)
    absorbed = (module.bias.detach() * relevance / output.detach()).sum(-1)
    assert_close(rel.sum(-1), relevance.sum(-1) - absorbed, rtol=1e-6)
    assert absorbed.abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------- rope


ROPE_SHAPES = [
    ((2, 3, 5, 8), (2, 1, 5, 8)),
    ((2, 3, 5, 8), (1, 1, 5, 8)),
    ((2, 3, 5, 8), (5, 8)),
    ((2, 3, 5, 10), (2, 1, 5, 4)),
    ((2, 3, 5, 6), (1, 1, 5, 2)),
]
ROPE_SHAPE_IDS = ['batch-cos', 'shared-cos', 'matrix-cos', 'partial-4-of-10', 'partial-2-of-6']


@pytest.mark.parametrize('shapes', ROPE_SHAPES, ids=ROPE_SHAPE_IDS)
@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
def test_rope_rule_matches_reference(generator, shapes, epsilon):
    '''RoPERule equals ``R_x = x ⊙ Jᵀ (R / stab(J x))`` with the explicit rotation Jacobian; cos/sin get nothing.'''
    shape_x, shape_cos = shapes
    x, relevance = leaf(generator, *shape_x), randn(generator, *shape_x)
    cos, sin = random_cos_sin(generator, *shape_cos)
    module, rule = layers.RotaryEmbedding(), rules.RoPERule(epsilon)
    output, (rel, rel_cos, rel_sin) = attribute(module, rule, (x, cos, sin), relevance)
    rotary_dim = shape_cos[-1]
    jacobian = rope_jacobian(cos, sin)
    expected_output = torch.einsum('...ed,...d->...e', jacobian, x.detach()[..., :rotary_dim])
    assert_close(output[..., :rotary_dim].detach(), expected_output)
    assert rel_cos is None and rel_sin is None
    assert_close(rel, ref_rope(x.detach(), cos, sin, relevance, epsilon))


@pytest.mark.parametrize('shapes', ROPE_SHAPES, ids=ROPE_SHAPE_IDS)
def test_rope_rule_conserves(generator, shapes):
    '''RoPERule with tiny ε conserves relevance: ``Σ R_x = Σ R``.'''
    shape_x, shape_cos = shapes
    x, relevance = leaf(generator, *shape_x), randn(generator, *shape_x)
    cos, sin = random_cos_sin(generator, *shape_cos)
    _, (rel, _, _) = attribute(layers.RotaryEmbedding(), rules.RoPERule(1e-9), (x, cos, sin), relevance)
    assert torch.isclose(rel.sum(), relevance.sum(), rtol=1e-6)


def test_rope_rule_variable_cos_sin_get_no_relevance(generator):
    '''RoPERule gives cos and sin no relevance even when they require a gradient (computed from positions).'''
    x, relevance = leaf(generator, 2, 3, 5, 8), randn(generator, 2, 3, 5, 8)
    angles = leaf(generator, 2, 1, 5, 4)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    _, (rel, rel_cos, rel_sin) = attribute(layers.RotaryEmbedding(), rules.RoPERule(1e-9), (x, cos, sin), relevance)
    assert rel_cos is None and rel_sin is None
    assert_close(rel, ref_rope(x.detach(), cos.detach(), sin.detach(), relevance, 1e-9))


# --------------------------------------------------------------------------------------------------- stop and CP


def test_stop_rule_only_path_gives_no_gradient(generator):
    '''StopRule as the only path: autograd accepts the None relevance and the input gets no gradient.'''
    x, relevance = leaf(generator, 2, 3, 5, 7), randn(generator, 2, 3, 5, 7)
    _, (rel,) = attribute(layers.Softmax(), rules.StopRule(), (x,), relevance)
    assert rel is None
    module = layers.Softmax()
    handles = rules.StopRule().register(module)
    try:
        module(x).backward(relevance)
    finally:
        handles.remove()
    assert x.grad is None


def test_stop_rule_on_two_inputs(generator):
    '''StopRule on a two-input module (the CP-LRP score product) gives both inputs no gradient.'''
    q, k = leaf(generator, 2, 3, 5, 4), leaf(generator, 2, 3, 7, 4)
    _, rels = attribute(layers.MatMul(0.5), rules.StopRule(), (q, k.transpose(-1, -2)), randn(generator, 2, 3, 5, 7))
    assert rels == (None, None)


def test_stop_rule_branch_beside_residual(generator):
    '''A stopped branch summed with a residual: the input receives exactly the residual's ε-sum share.'''
    x, relevance = leaf(generator, 2, 5, 7), randn(generator, 2, 5, 7)
    softmax, add = layers.Softmax(), layers.Sum()
    handles = [rules.StopRule().register(softmax), rules.SumRule(1e-2).register(add)]
    try:
        output = add(softmax(x), x)
        (rel,) = torch.autograd.grad(output, x, relevance)
    finally:
        for handle in handles:
            handle.remove()
    prob = softmax_ref(x.detach(), -1)
    _, ref = ref_sum(prob, x.detach(), relevance, 1e-2)
    assert_close(rel, ref)


@pytest.mark.parametrize('epsilon', [1e-9, 0.5], ids=['1e-9', '0.5'])
def test_cp_lrp_attention_gives_all_relevance_to_values(generator, epsilon):
    '''CP-LRP attention (StopRule on scores and softmax, CPMatMulRule on ``A @ V``): Q and K get nothing, V the full
    ε-rule, conservative for tiny ε.
    '''
    q, k, v = leaf(generator, 2, 3, 5, 4), leaf(generator, 2, 3, 7, 4), leaf(generator, 2, 3, 7, 6)
    relevance = randn(generator, 2, 3, 5, 6)
    scores, softmax, context = layers.MatMul(0.5), layers.Softmax(), layers.MatMul()
    handles = [
        rules.StopRule().register(scores),
        rules.StopRule().register(softmax),
        rules.CPMatMulRule(epsilon).register(context),
    ]
    try:
        output = context(softmax(scores(q, k.transpose(-1, -2))), v)
        rel_q, rel_k, rel_v = torch.autograd.grad(output, (q, k, v), relevance, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    assert rel_q is None and rel_k is None
    prob = softmax_ref(0.5 * torch.einsum('...id,...jd->...ij', q.detach(), k.detach()), -1)
    _, ref_v = ref_matmul(prob, v.detach(), relevance, epsilon, shares=(0., 1.))
    assert_close(rel_v, ref_v)
    if epsilon == 1e-9:
        assert torch.isclose(rel_v.sum(), relevance.sum(), rtol=1e-6)


# -------------------------------------------------------------------------------------------- generic rule cases


class Case:
    '''A rule attached to a module, float64 inputs and the reference twin ``reference(module, args, R)``.'''
    def __init__(self, rule, module, args, reference):
        self.rule, self.module, self.args, self.reference = rule, module, args, reference


def make_case(name, generator):
    '''Build the generic case ``name``; inputs are float64 without gradient.'''
    g = generator
    if name == 'identity':
        return Case(rules.IdentityRule(), torch.nn.GELU(), (randn(g, 2, 3, 5, 7),), lambda m, args, rel: (rel,))
    if name == 'rmsnorm':
        module = torch.nn.RMSNorm(7, eps=1e-6, dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(randn(g, 7))
        return Case(rules.RMSNormRule(), module, (randn(g, 2, 3, 5, 7),), lambda m, args, rel: (rel,))
    if name == 'softmax':
        return Case(
            rules.SoftmaxRule(), layers.Softmax(dim=2), (2 * randn(g, 2, 3, 5, 7),),
            lambda m, args, rel: (ref_softmax(args[0], rel, 2),),
        )
    if name == 'matmul':
        return Case(
            rules.MatMulRule(0.1), layers.MatMul(0.37), (randn(g, 2, 3, 5, 7), randn(g, 1, 3, 7, 4)),
            lambda m, args, rel: ref_matmul(*args, rel, 0.1, 0.37),
        )
    if name == 'cp-matmul':
        return Case(
            rules.CPMatMulRule(clip_stabilizer, constant=1), layers.MatMul(0.37),
            (randn(g, 2, 3, 5, 7), randn(g, 2, 3, 7, 4)),
            lambda m, args, rel: (ref_matmul(*args, rel, clip_stabilizer, 0.37, (1., 0.))[0], None),
        )
    if name == 'product':
        return Case(
            rules.ProductRule(), layers.Product(), (randn(g, 2, 3, 5, 7), randn(g, 1, 1, 5, 7)),
            lambda m, args, rel: ref_product(*args, rel),
        )
    if name == 'cp-product':
        return Case(
            rules.CPProductRule(constant=1), layers.Product(), (randn(g, 2, 3, 5, 7), randn(g, 2, 3, 5, 7)),
            lambda m, args, rel: (ref_product(*args, rel, (1., 0.))[0], None),
        )
    if name == 'sum':
        return Case(
            rules.SumRule(0.1), layers.Sum(), (randn(g, 2, 3, 5, 7), randn(g, 1, 1, 5, 7)),
            lambda m, args, rel: ref_sum(*args, rel, 0.1),
        )
    if name == 'mean':
        return Case(
            rules.MeanRule(0.1), layers.Mean((1, 2)), (randn(g, 2, 3, 5, 7),),
            lambda m, args, rel: (ref_mean(args[0], rel, (1, 2), False, 0.1),),
        )
    if name == 'layernorm':
        return Case(
            rules.LayerNormRule(0.1), make_layernorm(g, (7,)), (randn(g, 2, 3, 5, 7),),
            lambda m, args, rel: (ref_layernorm(args[0], rel, m.weight, m.bias, 1, m.eps, 0.1)[0],),
        )
    if name == 'rope':
        cos, sin = random_cos_sin(g, 2, 1, 5, 8)
        return Case(
            rules.RoPERule(0.1), layers.RotaryEmbedding(), (randn(g, 2, 3, 5, 8), cos, sin),
            lambda m, args, rel: (ref_rope(*args, rel, 0.1), None, None),
        )
    if name == 'stop':
        return Case(rules.StopRule(), layers.Softmax(), (randn(g, 2, 3, 5, 7),), lambda m, args, rel: (None,))
    raise KeyError(name)


CASES = [
    'identity', 'rmsnorm', 'softmax', 'matmul', 'cp-matmul', 'product', 'cp-product', 'sum', 'mean', 'layernorm',
    'rope', 'stop',
]
GRAD_ARGS = {'rope': (0,)}


def run_case(case, dtype, rule=None, requires_grad=None):
    '''Run ``case`` in ``dtype`` (with ``rule`` instead of the case's), and return the relevances and the twin's
    relevances computed in float64 from the same (rounded) inputs and parameters.
    '''
    module = case.module.to(dtype)
    args = tuple(arg.to(dtype) for arg in case.args)
    args = tuple(
        arg.requires_grad_() if requires_grad is None or index in requires_grad else arg
        for index, arg in enumerate(args)
    )
    with torch.no_grad():
        shape = module(*args).shape
    relevance = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    _, rels = attribute(module, case.rule if rule is None else rule, args, relevance)
    module.double()
    refs = case.reference(module, tuple(arg.detach().double() for arg in args), relevance.double())
    return rels, refs, args


@pytest.mark.parametrize('name', CASES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rule_dtype_finite_and_close_to_reference(generator, name, dtype):
    '''Every rule gives finite relevance of the input's dtype in float64, float32 and bfloat16, close to the float64
    twin (tight for float64, loose for bfloat16, which is computed in float32 internally).
    '''
    case = make_case(name, generator)
    rels, refs, args = run_case(case, dtype, requires_grad=GRAD_ARGS.get(name))
    rtol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    assert len(rels) == len(refs)
    for rel, ref, arg in zip(rels, refs, args):
        if ref is None:
            assert rel is None
            continue
        assert rel.dtype == arg.dtype == dtype
        assert torch.isfinite(rel).all()
        assert_close(rel, ref, rtol=rtol)


# --------------------------------------------------------------------------------------------------------- copy


COPY_RULES = {
    'identity': rules.IdentityRule,
    'rmsnorm': rules.RMSNormRule,
    'softmax': rules.SoftmaxRule,
    'product': rules.ProductRule,
    'stop': rules.StopRule,
    'matmul-float': partial(rules.MatMulRule, 0.3),
    'matmul-callable': partial(rules.MatMulRule, clip_stabilizer),
    'cp-matmul-float': partial(rules.CPMatMulRule, 0.3, constant=1),
    'cp-matmul-callable': partial(rules.CPMatMulRule, epsilon=clip_stabilizer, constant=0),
    'cp-product': partial(rules.CPProductRule, constant=1),
    'sum': partial(rules.SumRule, 0.3),
    'mean': partial(rules.MeanRule, clip_stabilizer),
    'layernorm': partial(rules.LayerNormRule, 0.3),
    'rope': partial(rules.RoPERule, clip_stabilizer),
}


@pytest.mark.parametrize('factory', COPY_RULES.values(), ids=COPY_RULES.keys())
def test_rule_copy_keeps_parameters(factory):
    '''``copy()`` returns a new instance of the same class with the same epsilon (the very callable), constant index
    and an equivalent stabilizer, and its own storage.
    '''
    rule = factory()
    copy = rule.copy()
    assert type(copy) is type(rule)
    assert copy is not rule
    assert copy.stored_tensors is not rule.stored_tensors
    for attribute_name in ('epsilon', 'constant'):
        if hasattr(rule, attribute_name):
            assert getattr(copy, attribute_name) is getattr(rule, attribute_name) or (
                getattr(copy, attribute_name) == getattr(rule, attribute_name)
            )
    if callable(rule.epsilon):
        assert copy.epsilon is rule.epsilon
        assert copy.stabilizer is rule.stabilizer
    z = torch.linspace(-1, 1, 9, dtype=torch.float64)
    assert torch.equal(copy.stabilizer(z), rule.stabilizer(z))


@pytest.mark.parametrize('expected', [
    {'epsilon': 0.3},
    {'epsilon': clip_stabilizer},
])
@pytest.mark.parametrize('rule_type', [rules.MatMulRule, rules.SumRule, rules.MeanRule, rules.LayerNormRule,
                                       rules.RoPERule, rules.CPMatMulRule])
def test_epsilon_rule_copy_keeps_epsilon(rule_type, expected):
    '''Copies of ε-rules keep a non-default float or callable epsilon, and a non-default constant index.'''
    kwargs = dict(expected, constant=1) if rule_type is rules.CPMatMulRule else expected
    copy = rule_type(**kwargs).copy().copy()
    for key, value in kwargs.items():
        assert getattr(copy, key) is value or getattr(copy, key) == value
    z = torch.tensor([-0.05, 0., 0.05, 2.], dtype=torch.float64)
    assert torch.equal(copy.stabilizer(z), stabilize(z, expected['epsilon']))


@pytest.mark.parametrize('name', CASES)
def test_rule_copy_gives_reference_relevance(generator, name):
    '''A copy of each case's rule (with non-default parameters) gives the twin's relevance.'''
    case = make_case(name, generator)
    rels, refs, _ = run_case(case, torch.float64, rule=case.rule.copy(), requires_grad=GRAD_ARGS.get(name))
    for rel, ref in zip(rels, refs):
        if ref is None:
            assert rel is None
        else:
            assert_close(rel, ref, rtol=1e-9)


# -------------------------------------------------------------------------------------------------- composite


class TwoMatMuls(torch.nn.Module):
    '''``(0.5 * a @ b) @ c`` with one MatMul instance per call site.'''
    def __init__(self):
        super().__init__()
        self.first = layers.MatMul(0.5)
        self.second = layers.MatMul()

    def forward(self, a, b, c):
        '''Chain the two products.'''
        return self.second(self.first(a, b), c)


@pytest.mark.parametrize('epsilon', [1e-2, clip_stabilizer], ids=['1e-2', 'clip'])
def test_composite_registers_one_rule_copy_per_module(generator, epsilon):
    '''A Composite with one template registers distinct copies on two MatMuls, both giving the right relevance.'''
    template = rules.MatMulRule(epsilon)
    composite = Composite(module_map=lambda ctx, name, module: template if isinstance(module, layers.MatMul) else None)
    model = TwoMatMuls()
    a, b, c = leaf(generator, 2, 3, 5, 7), leaf(generator, 2, 3, 7, 4), leaf(generator, 4, 6)
    relevance = randn(generator, 2, 3, 5, 6)
    with composite.context(model):
        hooks = list(composite.hook_refs)
        output = model(a, b, c)
        rel_a, rel_b, rel_c = torch.autograd.grad(output, (a, b, c), relevance)
    assert len(hooks) == 2
    assert hooks[0] is not hooks[1]
    assert all(hook is not template and type(hook) is rules.MatMulRule for hook in hooks)
    assert all(hook.epsilon is epsilon for hook in hooks)
    hidden = 0.5 * a.detach() @ b.detach()
    rel_hidden, ref_c = ref_matmul(hidden, c.detach(), relevance, epsilon)
    ref_a, ref_b = ref_matmul(a.detach(), b.detach(), rel_hidden, epsilon, 0.5)
    assert_close(rel_a, ref_a)
    assert_close(rel_b, ref_b)
    assert_close(rel_c, ref_c)


def test_composite_removes_hooks_on_exit(generator):
    '''After the Composite context exits, the module computes the plain gradient again.'''
    composite = Composite(module_map=lambda ctx, name, module: rules.ProductRule() if name == '' else None)
    module = layers.Product()
    a, b = leaf(generator, 2, 7), leaf(generator, 2, 7)
    relevance = randn(generator, 2, 7)
    with composite.context(module):
        rel_a, _ = torch.autograd.grad(module(a, b), (a, b), relevance)
    grad_a, _ = torch.autograd.grad(module(a, b), (a, b), relevance)
    assert_close(rel_a, relevance / 2, rtol=1e-12)
    assert_close(grad_a, relevance * b.detach(), rtol=1e-12)


# ------------------------------------------------------------------------------------------------------- errors


def test_error_non_tensor_positional_argument(generator):
    '''MatMulRule on a module called with a non-tensor positional argument raises a TypeError naming both.'''
    module = layers.MatMul()
    handles = rules.MatMulRule().register(module)
    try:
        with pytest.raises(TypeError, match=r'MatMulRule on MatMul: non-tensor positional argument.*float'):
            module(leaf(generator, 5, 7), 2.0)
    finally:
        handles.remove()


def test_error_tensor_keyword_argument(generator):
    '''MatMulRule on a module called with a tensor keyword argument raises a TypeError naming both and the key.'''
    module = layers.MatMul()
    handles = rules.MatMulRule().register(module)
    try:
        with pytest.raises(TypeError, match=r"MatMulRule on MatMul: tensor keyword argument\(s\) \['b'\]"):
            module(leaf(generator, 5, 7), b=leaf(generator, 7, 4))
    finally:
        handles.remove()


@pytest.mark.parametrize('rule_type, module, args, message', [
    (rules.MatMulRule, layers.Softmax(), ((2, 7),), 'MatMulRule on Softmax: expected 2 positional'),
    (rules.SumRule, layers.RotaryEmbedding(), ((2, 8), (2, 8), (2, 8)), 'SumRule on RotaryEmbedding: expected 2'),
    (rules.SoftmaxRule, layers.Sum(), ((2, 7), (2, 7)), 'SoftmaxRule on Sum: expected 1'),
    (rules.RoPERule, layers.Product(), ((2, 8), (2, 8)), 'RoPERule on Product: expected 3'),
])
def test_error_wrong_arity(generator, rule_type, module, args, message):
    '''A rule attached to a module called with the wrong number of tensors raises a ValueError naming both.'''
    handles = rule_type().register(module)
    try:
        with pytest.raises(ValueError, match=message):
            module(*(leaf(generator, *shape) for shape in args))
    finally:
        handles.remove()


def test_error_softmax_rule_without_dim(generator):
    '''SoftmaxRule on ``torch.nn.Softmax(dim=None)`` raises a TypeError naming rule and module.'''
    module = torch.nn.Softmax(dim=None)
    handles = rules.SoftmaxRule().register(module)
    try:
        with pytest.raises(TypeError, match='SoftmaxRule on Softmax: .*dim'):
            module(leaf(generator, 2, 7))
    finally:
        handles.remove()


@pytest.mark.parametrize('shapes', [((5, 7), (7,)), ((7,), (7, 4))], ids=['vector-b', 'vector-a'])
def test_error_matmul_rule_vector_operand(generator, shapes):
    '''MatMulRule with a 1-D operand raises a ValueError naming rule and module.'''
    module = layers.MatMul()
    handles = rules.MatMulRule().register(module)
    try:
        with pytest.raises(ValueError, match='MatMulRule on MatMul: operands need at least 2 dimensions'):
            module(*(leaf(generator, *shape) for shape in shapes))
    finally:
        handles.remove()


def test_error_layernorm_rule_on_module_without_normalized_shape(generator):
    '''LayerNormRule on a module without ``normalized_shape``/``eps`` raises a TypeError naming rule and module.'''
    module = torch.nn.GELU()
    handles = rules.LayerNormRule().register(module)
    try:
        with pytest.raises(TypeError, match='LayerNormRule on GELU'):
            module(leaf(generator, 2, 7))
    finally:
        handles.remove()


# ------------------------------------------------------------------------------- closed-form epsilon / gamma


LINEAR_LAYERS = {
    'linear': (lambda: torch.nn.Linear(7, 5), (3, 4, 7)),
    'conv1d': (lambda: torch.nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 11)),
    'conv2d': (lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 9)),
    'conv2d_groups_dilation': (lambda: torch.nn.Conv2d(4, 6, 3, dilation=2, groups=2), (2, 4, 9, 8)),
    'conv3d': (lambda: torch.nn.Conv3d(2, 3, 2, stride=2), (2, 2, 4, 4, 6)),
    # outputs more than 4x the input are recomputed in the backward pass instead of kept
    'linear_widening': (lambda: torch.nn.Linear(3, 17), (3, 4, 3)),
    'conv2d_widening': (lambda: torch.nn.Conv2d(1, 6, 3, padding=1), (2, 1, 5, 5)),
}


def linear_relevance(module, rule, x, relevance_out):
    x = x.clone().requires_grad_()
    handles = rule.register(module)
    try:
        output = module(x)
        (relevance,) = torch.autograd.grad(output, x, relevance_out)
    finally:
        handles.remove()
    return relevance


@pytest.mark.parametrize('layer', sorted(LINEAR_LAYERS))
@pytest.mark.parametrize('zero_params', [None, 'bias'])
def test_closed_form_epsilon_and_gamma_equal_zennit_rules(layer, zero_params):
    '''The parameter-preserving Epsilon/Gamma give exactly Zennit's BasicHook relevance (float64).'''
    torch.manual_seed(0)
    factory, shape = LINEAR_LAYERS[layer]
    module = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    relevance_out = torch.randn_like(module(x))
    pairs = [
        (zennit.rules.Epsilon(1e-3, zero_params=zero_params), rules.Epsilon(1e-3, zero_params=zero_params)),
        (zennit.rules.Gamma(0.25, 1e-3, zero_params=zero_params), rules.Gamma(0.25, 1e-3, zero_params=zero_params)),
        (zennit.rules.Gamma(1.5, 0.1), rules.Gamma(1.5, 0.1)),
    ]
    for reference_rule, rule in pairs:
        expected = linear_relevance(module, reference_rule, x, relevance_out)
        actual = linear_relevance(module, rule, x, relevance_out)
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-12), type(rule).__name__


@pytest.mark.parametrize('rule', [rules.Epsilon(1e-3), rules.Gamma(0.25, 1e-3)], ids=['epsilon', 'gamma'])
def test_widening_layer_keeps_no_output_and_recomputes_rows_with_relevance(rule):
    '''A vocabulary-head-like layer (output 17/3 times its input) keeps only its input; with relevance on a few tokens
    only (a language model's last position) the recomputed rows give Zennit's relevance.
    '''
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 17).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    relevance_out = torch.zeros(2, 5, 17, dtype=torch.float64)
    relevance_out[:, -1] = torch.randn(2, 17, dtype=torch.float64)
    relevance_out[0, 1, 3] = 0.5
    reference = zennit.rules.Gamma(0.25, 1e-3) if isinstance(rule, rules.Gamma) else zennit.rules.Epsilon(1e-3)
    expected = linear_relevance(module, reference, x, relevance_out)
    assert torch.allclose(linear_relevance(module, rule, x, relevance_out), expected, rtol=1e-10, atol=1e-12)
    handles = rule.register(module)
    try:
        output = module(x.clone().requires_grad_())
    finally:
        handles.remove()
    kept = [tensor for tensor in output.grad_fn.saved_tensors if tensor is not None]
    assert [tuple(tensor.shape) for tensor in kept] == [(2, 5, 3)]


@pytest.mark.parametrize('layer', sorted(LINEAR_LAYERS))
def test_closed_form_rules_keep_parameter_objects(layer):
    '''Unlike Zennit's ParamMod-based rules, the closed forms never replace the module's nn.Parameter objects.'''
    factory, shape = LINEAR_LAYERS[layer]
    module = factory().double()
    before = dict(module.named_parameters())
    for rule in (rules.Epsilon(), rules.Gamma()):
        x = torch.randn(shape, dtype=torch.float64)
        linear_relevance(module, rule, x, torch.ones_like(module(x)))
    assert all(param is before[name] for name, param in module.named_parameters())


def test_epsilon_conserves_without_bias():
    '''The ε-rule on a bias-free layer conserves relevance (ε tiny).'''
    torch.manual_seed(0)
    module = torch.nn.Linear(6, 4, bias=False).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    relevance_out = torch.randn(5, 4, dtype=torch.float64)
    relevance = linear_relevance(module, rules.Epsilon(1e-12), x, relevance_out)
    assert torch.allclose(relevance.sum(), relevance_out.sum(), rtol=1e-8)


def test_epsilon_rejects_unsupported_layers():
    '''Epsilon on a transposed convolution fails with a clear error naming the layer.'''
    module = torch.nn.ConvTranspose2d(2, 2, 3)
    rules.Epsilon().register(module)
    with pytest.raises(TypeError, match='Epsilon on ConvTranspose2d'):
        module(torch.randn(1, 2, 5, 5, requires_grad=True))


@pytest.mark.parametrize('activation', [torch.nn.ReLU, torch.nn.SiLU, torch.nn.LeakyReLU, torch.nn.Hardtanh])
def test_in_place_activation_gets_the_relevance_of_its_out_of_place_twin(activation):
    '''``ReLU(inplace=True)`` after a hooked layer would modify a rule node's output (forbidden by autograd, and it
    would change what the layer's rule kept): it works on a copy, with the same output and relevance as
    ``inplace=False``, and the module keeps its flag.
    '''
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for inplace in (True, False):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), activation(inplace=inplace), torch.nn.Linear(5, 2)).double()
        with Composite(module_map=lambda ctx, name, module: {
            torch.nn.Linear: rules.Epsilon(1e-6), activation: rules.IdentityRule()
        }.get(type(module))).context(model):
            inputs = x.clone().requires_grad_()
            output = model(inputs)
            (relevance,) = torch.autograd.grad(output, inputs, output)
        assert model[1].inplace is inplace
        results.append((output, relevance))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_module_called_twice_gets_relevance_of_each_call():
    '''Each call of a hooked module keeps its own inputs, so reusing a module instance stays correct.'''
    torch.manual_seed(0)
    product = layers.Product()
    rules.ProductRule().register(product)
    a, b, c = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    first = product(a, b)
    second = product(first, c)
    relevance_out = torch.randn(3, 4, dtype=torch.float64)
    grads = torch.autograd.grad(second, (a, b, c), relevance_out)
    assert torch.allclose(grads[2], relevance_out / 2)
    assert torch.allclose(grads[0], relevance_out / 4) and torch.allclose(grads[1], relevance_out / 4)


def test_masked_mean_rule_matches_reference_and_ignores_padding():
    '''MaskedMean with MeanRule: R_i = x_i m_i R / stab(Σ x m); padded positions get 0, the mask gets nothing.'''
    torch.manual_seed(0)
    pool = layers.MaskedMean(1)
    rules.MeanRule(epsilon=1e-9).register(pool)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1., 1., 1., 0., 0.], [1., 1., 1., 1., 1.]], dtype=torch.float64)[..., None]
    output = pool(x, mask)
    assert torch.equal(output, (x * mask).sum(1) / mask.sum(1))
    relevance_out = torch.randn(2, 3, dtype=torch.float64)
    (relevance,) = torch.autograd.grad(output, x, relevance_out)
    expected = torch.zeros_like(relevance)
    for b in range(2):
        total = sum(x[b, t] * mask[b, t] for t in range(5))
        for t in range(5):
            expected[b, t] = x[b, t] * mask[b, t] * relevance_out[b] / (total + 1e-9 * torch.where(total >= 0, 1., -1.))
    assert torch.allclose(relevance, expected, rtol=1e-12)
    assert torch.all(relevance[0, 3:] == 0)
    assert torch.allclose(relevance.sum((1,)), relevance_out, rtol=1e-6)


def test_valid_padding_convolution_equals_zennit_and_unbatched_input_is_refused():
    '''padding='valid' works like padding=0; an unbatched convolution input gets a clear error.'''
    torch.manual_seed(0)
    module = torch.nn.Conv2d(2, 3, 3, padding='valid').double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    relevance_out = torch.randn_like(module(x))
    pairs = ((zennit.rules.Epsilon(1e-3), rules.Epsilon(1e-3)), (zennit.rules.Gamma(), rules.Gamma()))
    for reference_rule, rule in pairs:
        expected = linear_relevance(module, reference_rule, x, relevance_out)
        assert torch.allclose(linear_relevance(module, rule, x, relevance_out), expected, rtol=1e-10, atol=1e-12)
    rules.Epsilon().register(module)
    with pytest.raises(ValueError, match='Epsilon on Conv2d: expected a batched input with 4 dimensions'):
        module(torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True))


def test_tensors_computed_from_parameters_are_constants():
    '''A learned query ``param.expand(...)`` is a constant: the input operand of the product gets all relevance.'''
    torch.manual_seed(0)
    query = torch.nn.Parameter(torch.randn(1, 1, 4, dtype=torch.float64))
    product = layers.MatMul()
    rules.MatMulRule(epsilon=1e-12).register(product)
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    hidden = x * 2.  # an input-dependent tensor that is not a leaf
    output = product(query.expand(3, 1, 4), hidden.transpose(-1, -2))
    (relevance,) = torch.autograd.grad(output, hidden, output)
    assert torch.allclose(relevance.sum(), output.sum(), rtol=1e-9)
    (direct,) = torch.autograd.grad(product(query, hidden.transpose(-1, -2)), hidden, output)
    assert torch.allclose(relevance, direct, rtol=1e-9)
    # a query that mixes in the input is variable: the two operands share the relevance
    mixed = product(query.expand(3, 1, 4) + hidden[:, :1], hidden.transpose(-1, -2))
    (shared,) = torch.autograd.grad(mixed, hidden, mixed)
    (only_key,) = torch.autograd.grad(product(query.expand(3, 1, 4), hidden.transpose(-1, -2)), hidden, mixed)
    assert not torch.allclose(shared, only_key)
