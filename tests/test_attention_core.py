'''The fused attention core: zennit_attn.layers.AttentionCore and its rules AttentionRule / CPAttentionRule.

The rules are compared with the composition of the float64 reference twins of test_rules (the formulas of ATTNLRP.md
§2 for the context matmul, the softmax, the mask sum and the score matmul), and with the separate rules on the unfolded
chain in lower precision.
'''
import pytest
import torch

from zennit_attn import layers, rules

from references import EPSILONS, EPSILON_IDS, assert_close, attribute, randn, ref_matmul, ref_softmax, ref_sum


SHAPES = {
    # (q, k, v): batched self-attention, cross-attention with more keys, keys/values shared by all heads (broadcast)
    'self': ((2, 3, 7, 4), (2, 3, 7, 4), (2, 3, 7, 5)),
    'cross': ((2, 3, 5, 4), (2, 3, 9, 4), (2, 3, 9, 4)),
    'shared-kv': ((2, 3, 6, 4), (2, 1, 6, 4), (2, 1, 6, 4)),
}
MASKS = ['none', 'causal-inf', 'causal-min', 'padding-min']
BLOCKS = {'row': 1, 'rows': 3 * 2 * 3 * 9, 'whole': 2 ** 20}  # queries per block: 1, 3 (of up to 9 keys), all


def additive_mask(kind, query_shape, key_shape, dtype):
    '''An additive mask and its boolean twin (True = masked): causal over (queries, keys) or padding of two keys.'''
    rows, cols = query_shape[-2], key_shape[-2]
    if kind == 'none':
        return None, None
    if kind.startswith('causal'):
        masked = torch.ones(rows, cols, dtype=torch.bool).triu(1 + cols - rows).expand(query_shape[0], 1, rows, cols)
    else:
        masked = torch.zeros(query_shape[0], 1, 1, cols, dtype=torch.bool)
        masked[-1, ..., -2:] = True
    fill = float('-inf') if kind.endswith('inf') else torch.finfo(dtype).min
    return torch.zeros(masked.shape, dtype=dtype).masked_fill(masked, fill), masked


def ref_attention(query, key, value, mask, masked, relevance, epsilon, scale, cp_lrp=False, variable=(1, 1, 1)):
    '''The rules of the unfolded chain composed: context matmul, softmax, mask sum, score matmul (float64).'''
    scores = scale * torch.einsum('...id,...jd->...ij', query, key)
    full = scores if mask is None else scores + mask
    masked = torch.zeros_like(full, dtype=torch.bool) if masked is None else masked.expand(full.shape)
    # masked keys get probability 0, queries with every key masked by a finite fill (left padding) uniform ones
    probabilities = torch.softmax(full, -1)
    var_query, var_key, var_value = variable
    var_probabilities = (var_query or var_key) and not cp_lrp
    shares = (0.5, 0.5) if var_probabilities and var_value else (float(var_probabilities), float(var_value))
    rel_probabilities, rel_value = ref_matmul(probabilities, value, relevance, epsilon, shares=shares)
    if not var_probabilities:
        return None, None, rel_value if var_value else None
    rel_full = ref_softmax(full, rel_probabilities, -1, masked)
    rel_scores = rel_full if mask is None else ref_sum(
        scores, torch.where(masked, 0., full - scores), rel_full, epsilon)[0]
    shares = (0.5, 0.5) if var_query and var_key else (float(var_query), float(var_key))
    rel_query, rel_key_t = ref_matmul(query, key.transpose(-1, -2), rel_scores, epsilon, scale=scale, shares=shares)
    return (
        rel_query if var_query else None, rel_key_t.transpose(-1, -2) if var_key else None,
        rel_value if var_value else None,
    )


def assert_relevances(actual, expected, rtol=1e-10):
    '''Each relevance is None where the reference is None, and close to it (and finite) otherwise.'''
    for rel, ref in zip(actual, expected):
        if ref is None:
            assert rel is None
        else:
            assert_close(rel, ref, rtol=rtol)


def core_inputs(generator, shapes, mask_kind, dtype=torch.float64, variable=(1, 1, 1)):
    '''Random (q, k, v[, mask]) for a core call; input-dependent ones require a gradient.'''
    tensors = [randn(generator, *shape).to(dtype).requires_grad_(bool(var)) for shape, var in zip(shapes, variable)]
    mask, masked = additive_mask(mask_kind, shapes[0], shapes[1], dtype)
    return tensors + ([] if mask is None else [mask]), mask, masked


def output_shape(shapes):
    query, key, value = shapes
    return torch.broadcast_shapes(query[:-2], key[:-2], value[:-2]) + (query[-2], value[-1])


# ------------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('scale, scale_output', [(1., False), (0.37, False), (0.37, True)])
@pytest.mark.parametrize('softmax_dtype', [None, torch.float32], ids=['same', 'float32'])
@pytest.mark.parametrize('mask_kind', ['none', 'causal-min'])
def test_core_computes_the_unfolded_chain(generator, dtype, scale, scale_output, softmax_dtype, mask_kind):
    '''Equal to AttentionScores -> AttentionMask -> AttentionSoftmax -> cast -> AttentionContext: up to rounding where
    PyTorch's fused attention runs (softmax in the input dtype), bit-identical where the chain's expressions run.
    '''
    shapes = SHAPES['self']
    args, mask, _ = core_inputs(generator, shapes, mask_kind, dtype)
    query, key, value = args[:3]
    core = layers.AttentionCore(scale=scale, scale_output=scale_output, softmax_dtype=softmax_dtype)
    scores = layers.AttentionScores(scale=scale, scale_output=scale_output)(query, key.transpose(-1, -2))
    if mask is not None:
        scores = layers.AttentionMask()(scores, mask)
    probabilities = layers.AttentionSoftmax(dim=-1, dtype=softmax_dtype)(scores).to(value.dtype)
    expected = layers.AttentionContext()(probabilities, value)
    fused = softmax_dtype in (None, dtype) or dtype == torch.bfloat16
    assert core.fusable(*args) == fused
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype] if fused else 0.
    assert_close(core(*args), expected, rtol=tolerance)
    assert torch.equal(core.probabilities(query, key, mask), probabilities.to(query.dtype))


# ------------------------------------------------------------------------------------------------------ the rules


@pytest.mark.parametrize('shapes', SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize('mask_kind', MASKS)
@pytest.mark.parametrize('block', BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize('cp_lrp', [False, True], ids=['attnlrp', 'cp_lrp'])
def test_attention_rule_matches_reference(generator, shapes, mask_kind, block, cp_lrp):
    '''Every block size gives the composed reference twins, for AttnLRP and CP-LRP.'''
    args, mask, masked = core_inputs(generator, shapes, mask_kind)
    relevance = randn(generator, *output_shape(shapes))
    rule = (rules.CPAttentionRule if cp_lrp else rules.AttentionRule)(epsilon=1e-2, block_elements=block)
    _, actual = attribute(layers.AttentionCore(scale=0.6), rule, args, relevance)
    expected = ref_attention(*args[:3], mask, masked, relevance, 1e-2, 0.6, cp_lrp=cp_lrp)
    assert_relevances(actual, expected)
    if mask is not None:
        assert actual[3] is None  # the mask is a constant


@pytest.mark.parametrize('epsilon', EPSILONS, ids=EPSILON_IDS)
@pytest.mark.parametrize('scale, scale_output', [(1., False), (0.37, False), (0.37, True)])
def test_attention_rule_epsilons_and_scales(generator, epsilon, scale, scale_output):
    shapes = SHAPES['cross']
    args, mask, masked = core_inputs(generator, shapes, 'causal-min')
    relevance = randn(generator, *output_shape(shapes))
    rule = rules.AttentionRule(epsilon=epsilon, block_elements=20)
    _, actual = attribute(layers.AttentionCore(scale=scale, scale_output=scale_output), rule, args, relevance)
    expected = ref_attention(*args[:3], mask, masked, relevance, epsilon, scale)
    assert_relevances(actual, expected)


@pytest.mark.parametrize('variable', [(0, 1, 1), (1, 0, 1), (1, 1, 0), (0, 0, 1), (1, 0, 0)])
def test_attention_rule_constant_operands(generator, variable):
    '''Constants get no relevance and their partners the unhalved share, as the separate rules give.'''
    shapes = SHAPES['self']
    args, mask, masked = core_inputs(generator, shapes, 'causal-inf', variable=variable)
    relevance = randn(generator, *output_shape(shapes))
    _, actual = attribute(layers.AttentionCore(scale=0.5), rules.AttentionRule(epsilon=1e-3), args, relevance)
    expected = ref_attention(*args[:3], mask, masked, relevance, 1e-3, 0.5, variable=variable)
    assert_relevances(actual, expected)


def test_attention_rule_sum_has_the_softmax_closed_form(generator):
    '''Without a mask and with ε → 0, ``ΣR_q + ΣR_k = Σ_j R_P,j (S_j − Σ_i P_i S_i)`` (Prop. 3.1 on the scores, which
    the score matmul conserves) and ``ΣR_v + ΣR_P = ΣR`` (the context matmul conserves).
    '''
    shapes = SHAPES['self']
    args, _, _ = core_inputs(generator, shapes, 'none')
    query, key, value = args
    relevance = randn(generator, *output_shape(shapes))
    _, (rel_query, rel_key, rel_value) = attribute(
        layers.AttentionCore(scale=0.5), rules.AttentionRule(epsilon=1e-12), args, relevance
    )
    scores = 0.5 * query.detach() @ key.detach().transpose(-1, -2)
    probabilities = scores.softmax(-1)
    rel_probabilities = 0.5 * probabilities * ((relevance / (probabilities @ value.detach())) @ value.detach().mT)
    assert (rel_value.sum() + rel_probabilities.sum()).item() == pytest.approx(relevance.sum().item(), rel=1e-9)
    closed_form = (rel_probabilities * (scores - (probabilities * scores).sum(-1, keepdim=True))).sum()
    assert (rel_query.sum() + rel_key.sum()).item() == pytest.approx(closed_form.item(), rel=1e-9)


def test_cp_attention_rule_conserves(generator):
    shapes = SHAPES['shared-kv']
    args, _, _ = core_inputs(generator, shapes, 'padding-min')
    relevance = randn(generator, *output_shape(shapes))
    _, (rel_query, rel_key, rel_value, _) = attribute(
        layers.AttentionCore(scale=0.5), rules.CPAttentionRule(epsilon=1e-12), args, relevance
    )
    assert rel_query is None and rel_key is None
    assert rel_value.sum().item() == pytest.approx(relevance.sum().item(), rel=1e-9)


class Unfolded(torch.nn.Module):
    '''The unfolded chain with its own op modules, for comparison with the separate rules.'''
    def __init__(self, scale, softmax_dtype):
        super().__init__()
        self.scores = layers.AttentionScores(scale=scale, scale_output=True)
        self.mask = layers.AttentionMask()
        self.softmax = layers.AttentionSoftmax(dim=-1, dtype=softmax_dtype)
        self.context = layers.AttentionContext()

    def forward(self, query, key, value, mask):
        probabilities = self.softmax(self.mask(self.scores(query, key.transpose(-1, -2)), mask)).to(value.dtype)
        return self.context(probabilities, value)


def unfolded_relevance(args, relevance, cp_lrp=False, epsilon=1e-6, softmax_dtype=None):
    '''Output and relevance of (q, k, v) from the separate rules on the unfolded chain (scale 0.5).'''
    unfolded = Unfolded(0.5, softmax_dtype)
    chain = {
        'scores': rules.StopRule() if cp_lrp else rules.MatMulRule(epsilon=epsilon),
        'mask': rules.StopRule() if cp_lrp else rules.SumRule(epsilon=epsilon),
        'softmax': rules.StopRule() if cp_lrp else rules.SoftmaxRule(),
        'context': rules.CPMatMulRule(epsilon=epsilon) if cp_lrp else rules.MatMulRule(epsilon=epsilon),
    }
    handles = [rule.register(getattr(unfolded, name)) for name, rule in chain.items()]
    try:
        output = unfolded(*args)
        return output, torch.autograd.grad(output, args[:3], relevance, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize('cp_lrp', [False, True], ids=['attnlrp', 'cp_lrp'])
def test_attention_rule_equals_the_separate_rules_in_low_precision(generator, dtype, cp_lrp):
    '''Half-precision masks (finfo.min of the dtype) stay finite, and the fused rule is as close to the float64
    reference as the four separate rules on the unfolded chain are (their forwards round differently: PyTorch's fused
    attention keeps the probabilities in float32, the chain casts them to the input dtype).
    '''
    shapes = SHAPES['self']
    args, mask, masked = core_inputs(generator, shapes, 'causal-min', dtype)
    relevance = randn(generator, *output_shape(shapes)).to(dtype)
    fused_rule = (rules.CPAttentionRule if cp_lrp else rules.AttentionRule)(epsilon=1e-3, block_elements=30)
    output, fused = attribute(layers.AttentionCore(scale=0.5, scale_output=True, softmax_dtype=torch.float32),
                              fused_rule, args, relevance)
    expected_output, expected = unfolded_relevance(args, relevance, cp_lrp, 1e-3, torch.float32)
    assert_close(output, expected_output, rtol=1e-6 if dtype == torch.float32 else 2e-2)
    assert all(rel.dtype == dtype for rel in fused if rel is not None)
    assert_relevances(fused, expected, rtol=1e-5 if dtype == torch.float32 else 0.15)
    exact = ref_attention(*(arg.detach().double() for arg in args[:3]), mask.double(), masked, relevance.double(),
                          1e-3, 0.5, cp_lrp=cp_lrp)
    for rel, chain, ref in zip(fused, expected, exact):
        if ref is not None:
            error, chain_error = ((tensor.double() - ref).abs().max().item() for tensor in (rel, chain))
            assert error <= 2 * chain_error + 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize('block', [1, 2 ** 20], ids=['row', 'whole'])
def test_fully_masked_queries_get_what_the_separate_rules_give(generator, block):
    '''A query whose keys are all masked with finfo.min (left padding) has uniform probabilities, not zeros: the fused
    rule must not drop any key for it and gives it the separate rules' relevance (none into the scores).
    '''
    shapes = SHAPES['self']
    args, mask, _ = core_inputs(generator, shapes, 'causal-min')
    mask[0, :, :2, :] = torch.finfo(torch.float64).min
    relevance = randn(generator, *output_shape(shapes))
    _, fused = attribute(layers.AttentionCore(scale=0.5, scale_output=True), rules.AttentionRule(block_elements=block),
                         args, relevance)
    _, expected = unfolded_relevance(args, relevance)
    assert_relevances(fused, expected)
    # the padding queries get no relevance from the scores, their values keep their share
    assert (fused[0][0, :, :2] == 0).all() and fused[2][0].abs().sum() > 0
    # the same in float32 (whose mask minimum is only twice the unmasking threshold) with a mask that broadcasts over
    # the keys (one value per query)
    row_mask = torch.zeros(2, 1, 7, 1)
    row_mask[0, :, :2] = torch.finfo(torch.float32).min
    args = [arg.detach().float().requires_grad_() for arg in args[:3]] + [row_mask]
    _, fused = attribute(layers.AttentionCore(scale=0.5, scale_output=True), rules.AttentionRule(block_elements=block),
                         args, relevance.float())
    assert_relevances(fused, unfolded_relevance(args, relevance.float())[1], rtol=1e-5)
    assert (fused[0][0, :, :2] == 0).all()


@pytest.mark.parametrize('mask_kind', ['none', 'causal-min', 'per-head'])
@pytest.mark.parametrize('block', [1, 7, 2 ** 20], ids=['row', 'rows', 'whole'])
@pytest.mark.parametrize('cp_lrp', [False, True], ids=['attnlrp', 'cp_lrp'])
def test_grouped_query_attention_without_repeated_keys(generator, mask_kind, block, cp_lrp):
    '''Keys and values with 2 heads for 6 query heads give the output and relevance of the composed references on
    keys and values repeated per query head (summed over the copies, as the gradient of ``repeat_kv`` does), also with
    fully masked queries and per-head masks.
    '''
    args, mask, masked = core_inputs(generator, ((2, 6, 9, 4), (2, 2, 9, 4), (2, 2, 9, 3)), 'none')
    if mask_kind == 'causal-min':
        mask, masked = additive_mask('causal-min', (2, 6, 9, 4), (2, 2, 9, 4), torch.float64)
        mask, masked = mask.clone(), masked.clone()
        mask[0, :, :2], masked[0, :, :2] = torch.finfo(torch.float64).min, True
    elif mask_kind == 'per-head':
        masked = torch.rand(2, 6, 9, 9, generator=generator, dtype=torch.float64) < 0.3
        masked[..., 0] = False
        mask = torch.zeros(masked.shape, dtype=torch.float64).masked_fill(masked, torch.finfo(torch.float64).min)
    args = args + ([] if mask is None else [mask])
    relevance = randn(generator, 2, 6, 9, 3)
    rule = (rules.CPAttentionRule if cp_lrp else rules.AttentionRule)(epsilon=1e-3, block_elements=block)
    output, actual = attribute(layers.AttentionCore(scale=0.5, scale_output=True), rule, args, relevance)
    query, key, value = (arg.detach() for arg in args[:3])
    repeated = [tensor.repeat_interleave(3, dim=1) for tensor in (key, value)]
    expected_output = torch.softmax(0.5 * query @ repeated[0].mT + (0. if mask is None else mask), -1) @ repeated[1]
    assert_close(output, expected_output, rtol=1e-12)
    expected = ref_attention(query, *repeated, mask, masked, relevance, 1e-3, 0.5, cp_lrp=cp_lrp)
    expected = expected[:1] + tuple(None if rel is None else rel.unflatten(1, (2, 3)).sum(2) for rel in expected[1:])
    assert_relevances(actual, expected)


def test_error_query_heads_not_divisible_by_key_heads(generator):
    args, _, _ = core_inputs(generator, ((1, 6, 5, 4), (1, 4, 5, 4), (1, 4, 5, 4)), 'none')
    with pytest.raises(ValueError, match=r'query heads \(6\) divisible by the number of key/value heads \(4\)'):
        attribute(layers.AttentionCore(), rules.AttentionRule(), args, randn(generator, 1, 6, 5, 4))


def test_attention_rule_keeps_no_matrix_of_scores(generator):
    '''Only q, k, v, the mask and the output are kept for the backward pass: no ``T x T`` tensor besides the mask (the
    unfolded chain keeps two).
    '''
    tokens = 64
    args, mask, _ = core_inputs(generator, ((1, 2, tokens, 8),) * 3, 'causal-min')
    core = layers.AttentionCore(scale=0.3)
    handles = rules.AttentionRule().register(core)
    try:
        output = core(*args)
    finally:
        handles.remove()
    # the module's own graph is dropped; the rule's node holds what the backward pass reads
    assert type(output.grad_fn).__name__ == '_RelevanceFunctionBackward'
    saved = [tensor for tensor in output.grad_fn.saved_tensors if tensor is not None]
    assert len(saved) == 5
    square = [tensor for tensor in saved if tensor.shape[-2:] == (tokens, tokens)]
    assert len(square) == 1 and square[0] is mask


# ------------------------------------------------------------------------------------------------------ errors


def test_error_input_dependent_mask(generator):
    args, _, _ = core_inputs(generator, SHAPES['self'], 'causal-min')
    args[3] = args[3] + 0. * args[0].sum()
    with pytest.raises(ValueError, match='mask depends on the model input.*fused=False'):
        attribute(layers.AttentionCore(), rules.AttentionRule(), args, randn(generator, 2, 3, 7, 5))


@pytest.mark.parametrize('module, args, error, message', [
    (layers.AttentionCore(), 2, ValueError, r'expected \(q, k, v\) or \(q, k, v, mask\)'),
    (layers.MatMul(), 3, TypeError, 'needs a `scores'),
])
def test_error_wrong_module_or_arity(generator, module, args, error, message):
    tensors = [randn(generator, 2, 3, 4).requires_grad_() for _ in range(args)]
    with pytest.raises(error, match=message):
        attribute(module, rules.AttentionRule(), tensors, None)


@pytest.mark.parametrize('rule_type', [rules.AttentionRule, rules.CPAttentionRule])
def test_copy_keeps_epsilon_and_block_size(rule_type):
    copy = rule_type(epsilon=0.25, block_elements=123).copy()
    assert type(copy) is rule_type and copy.epsilon == 0.25 and copy.block_elements == 123
