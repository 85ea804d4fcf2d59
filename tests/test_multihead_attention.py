'''torch.nn.MultiheadAttention through the engine: ``F.multi_head_attention_forward`` is decomposed into its functional
in-projection, the attention core and the functional out-projection. Every call signature computes what torch computes,
the relevance equals an independent modified-gradient oracle, self-attention (one packed projection) and distinct
query/key/value (three projections) give the same relevance, and models built from plain MultiheadAttention (a custom
ViT with inline residual sums, torch.nn.TransformerEncoderLayer) are attributed correctly.
'''
import pytest
import torch
import torch.nn.functional as F
import zennit.rules
from zennit.attribution import Gradient

from zennit_attn.check import check
from zennit_attn.composites import AttnLRP, CPLRP, UnsupportedModelError
from zennit_attn.engine import op_listeners

from helpers import recorded_sites
from oracle_vit import half_grad, identity_grad, layer_norm_detached
from restoration import assert_restored, relative_difference, snapshot

pytestmark = pytest.mark.usefixtures('single_thread')


class Attend(torch.nn.Module):
    '''Calls its MultiheadAttention with fixed keyword arguments; ``self_attention`` passes one tensor three times.'''
    def __init__(self, attention, self_attention=True, **kwargs):
        super().__init__()
        self.attention = attention
        self.self_attention = self_attention
        self.kwargs = kwargs

    def forward(self, x):
        query, key, value = (x, x, x) if self.self_attention else (x, x * 1., x * 1.)
        return self.attention(query, key, value, **self.kwargs)


class CrossAttend(torch.nn.Module):
    '''Attends from ``query`` to ``key`` (also the value).'''
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, query, key):
        return self.attention(query, key, key)


def make_attention(batch_first=True, kdim=None, dropout=0.):
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(
        8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dropout=dropout
    ).double().eval()


TOKENS, BATCH = 5, 3
CAUSAL = torch.ones(TOKENS, TOKENS, dtype=torch.bool).triu(1)
PADDING = torch.zeros(BATCH, TOKENS, dtype=torch.bool)
PADDING[-1, -2:] = True
# one mask per (batch, head): causal for head 0, anti-causal for head 1 (no row is fully masked)
PER_HEAD = torch.stack([CAUSAL, CAUSAL.t()]).repeat(BATCH, 1, 1)
CALLS = {
    'plain': dict(),
    'weights-averaged': dict(need_weights=True),
    'weights-per-head': dict(need_weights=True, average_attn_weights=False),
    'bool-mask': dict(attn_mask=CAUSAL, need_weights=False),
    'float-mask': dict(attn_mask=torch.zeros(TOKENS, TOKENS, dtype=torch.float64).masked_fill(CAUSAL, -1e9)),
    'float-mask-no-weights': dict(
        attn_mask=torch.zeros(TOKENS, TOKENS, dtype=torch.float64).masked_fill(CAUSAL, -1e9), need_weights=False,
    ),
    'per-head-mask': dict(attn_mask=PER_HEAD, need_weights=False),
    'padding': dict(key_padding_mask=PADDING, need_weights=False),
    'padding-with-weights': dict(key_padding_mask=PADDING, need_weights=True),
    'is-causal': dict(attn_mask=CAUSAL, is_causal=True, need_weights=False),
    'causal-and-padding': dict(attn_mask=CAUSAL, is_causal=True, key_padding_mask=PADDING, need_weights=False),
}


def additive_mask(call, batch, heads, dtype):
    '''The additive mask of a call, ``(batch or 1, heads or 1, T_q, T_k)``, boolean ``True`` = masked (-inf).'''
    mask = None
    for key in ('attn_mask', 'key_padding_mask'):
        value = call.get(key)
        if value is None:
            continue
        if key == 'key_padding_mask':
            value = value[:, None, None, :]
        elif value.dim() == 3:
            value = value.reshape(batch, heads, *value.shape[1:])
        if value.dtype == torch.bool:
            value = torch.zeros(value.shape, dtype=dtype).masked_fill(value, float('-inf'))
        mask = value if mask is None else mask + value
    return mask


def mha_oracle(mha, query, key, value, call, cp_lrp):
    '''Forward of ``mha(query, key, value, **call)`` with the oracle's modified gradients (oracle_vit.py: half the
    gradient into each operand of a product of two input-dependent tensors, CP-LRP detaches the probabilities), written
    with plain torch and the module's weights only. Inputs in the module's layout (batched or unbatched).'''
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = (tensor.unsqueeze(0) for tensor in (query, key, value))
    elif not mha.batch_first:
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    batch, target, width = query.shape
    heads = mha.num_heads
    head_dim = width // heads
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)

    def project(tensor, weight, bias):
        return F.linear(tensor, weight, bias).reshape(batch, -1, heads, head_dim).transpose(1, 2)

    q, k, v = (project(*args) for args in zip((query, key, value), weights, mha.in_proj_bias.chunk(3)))
    mask = additive_mask(call, batch, heads, query.dtype)
    if cp_lrp:
        scores = q @ k.transpose(-1, -2) / head_dim ** 0.5
        probabilities = torch.softmax(scores if mask is None else scores + mask, -1).detach()
        context = probabilities @ v
    else:
        scores = half_grad(q) @ half_grad(k).transpose(-1, -2) / head_dim ** 0.5
        probabilities = torch.softmax(scores if mask is None else scores + mask, -1)
        context = half_grad(probabilities) @ half_grad(v)
    output = F.linear(context.transpose(1, 2).reshape(batch, target, width), mha.out_proj.weight, mha.out_proj.bias)
    if unbatched:
        return output.squeeze(0)
    return output if mha.batch_first else output.transpose(0, 1)


def lrp(model, composite, inputs):
    '''Relevance at ``inputs`` of ``model(*inputs)[0]`` seeded with the output itself (R_out = out).'''
    inputs = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    with composite.context(model):
        output = model(*inputs)[0]
        relevances = torch.autograd.grad(output, inputs, output, allow_unused=True)
    return [torch.zeros_like(x) if r is None else r for x, r in zip(inputs, relevances)]


def oracle_relevance(forward, inputs):
    '''``x * g``, ``g`` the oracle's modified gradient with seed 1 (equals LRP seeded with the output).'''
    inputs = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    output = forward(*inputs)
    grads = torch.autograd.grad(output, inputs, torch.ones_like(output), allow_unused=True)
    return [tensor.detach() * (0. if grad is None else grad) for tensor, grad in zip(inputs, grads)]


def make_input(batch_first, seed=1):
    x = torch.randn(BATCH, TOKENS, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize('call', CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize('batch_first', [True, False], ids=['batch-first', 'sequence-first'])
@pytest.mark.parametrize('self_attention', [True, False], ids=['self', 'distinct'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_forward_unchanged_while_registered_and_restored_after(call, batch_first, self_attention, fused):
    '''The engine's decomposition computes torch's output and attention weights: bit-identical where it runs torch's
    own sequence (fused core, or need_weights, where torch unfolds too), ≤1e-10 relative otherwise.'''
    model = Attend(make_attention(batch_first), self_attention, **call)
    x = make_input(batch_first)
    before = snapshot(model)
    expected, expected_weights = model(x.clone().requires_grad_(True))
    with recorded_sites() as sites, AttnLRP(fused_attention=fused).context(model):
        actual, weights = model(x.clone().requires_grad_(True))
    assert 'attention.linear' in sites  # the engine did decompose the call
    assert (weights is None) == (expected_weights is None)
    if fused or call.get('need_weights', True):
        assert torch.equal(actual, expected)
        if weights is not None:
            assert torch.equal(weights, expected_weights)
    else:
        assert torch.allclose(actual, expected, rtol=1e-10, atol=1e-14)
    assert_restored(model, before)


@pytest.mark.parametrize('call', CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize('batch_first', [True, False], ids=['batch-first', 'sequence-first'])
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_relevance_matches_the_oracle(call, batch_first, composite_type, cp_lrp, fused):
    '''Every call signature (weights, masks, padding, is_causal, layouts): the relevance equals the hand-written
    modified gradient × input (float64, ε tiny), fused and unfolded.'''
    model = Attend(make_attention(batch_first), **call)
    x = make_input(batch_first)
    (relevance,) = lrp(model, composite_type(epsilon=1e-12, fused_attention=fused), [x])
    (expected,) = oracle_relevance(lambda x: mha_oracle(model.attention, x, x, x, call, cp_lrp), [x])
    assert relative_difference(relevance, expected) < 1e-6
    assert expected.abs().sum() > 0


def test_oracle_detects_a_wrong_rule():
    '''Sanity check of the oracle comparison: AttnLRP's relevance is not CP-LRP's oracle, nor gradient × input.'''
    model = Attend(make_attention(), attn_mask=CAUSAL, need_weights=False)
    x = make_input(True)
    (relevance,) = lrp(model, AttnLRP(epsilon=1e-12), [x])
    (cp_lrp,) = oracle_relevance(lambda x: mha_oracle(model.attention, x, x, x, {'attn_mask': CAUSAL}, True), [x])
    assert relative_difference(relevance, cp_lrp) > 1e-2
    leaf = x.clone().requires_grad_(True)
    output = model(leaf)[0]
    (grad,) = torch.autograd.grad(output, leaf, torch.ones_like(output))
    assert relative_difference(relevance, leaf.detach() * grad) > 1e-2


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_unbatched_and_separate_key_value_dimensions(composite_type, cp_lrp, fused):
    '''Unbatched inputs and kdim/vdim != embed_dim (separate projection weights): torch's output, and the oracle's
    relevance for the query and the key/value input.'''
    attention = make_attention(kdim=6)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(TOKENS, 8, dtype=torch.float64, generator=generator)
    key = torch.randn(TOKENS + 2, 6, dtype=torch.float64, generator=generator)
    model = CrossAttend(attention)
    expected, _ = attention(query.clone().requires_grad_(True), key, key)
    with composite_type().context(attention):
        actual, _ = attention(query.clone().requires_grad_(True), key, key)
    assert torch.equal(actual, expected) if fused else torch.allclose(actual, expected, rtol=1e-10, atol=1e-14)
    relevances = lrp(model, composite_type(epsilon=1e-12, fused_attention=fused), [query, key])
    expected = oracle_relevance(lambda query, key: mha_oracle(attention, query, key, key, {}, cp_lrp), [query, key])
    for relevance, reference in zip(relevances, expected):
        assert relevance.shape == reference.shape
        if cp_lrp and reference is expected[0]:
            # CP-LRP: the query only enters the (constant) probabilities
            assert not relevance.any() and not reference.any()
        else:
            assert relative_difference(relevance, reference) < 1e-6


def record_sites(run):
    '''``[(site, shape)]`` of every operation the engine attributes while ``run()`` runs.'''
    sites = []
    token = op_listeners.set(op_listeners.get() + (lambda site, tensor: sites.append((site, tuple(tensor.shape))),))
    try:
        run()
    finally:
        op_listeners.reset(token)
    return sites


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_packed_self_attention_gives_the_relevance_of_three_projections(composite_type, fused):
    '''The packed q/k/v projection of self-attention (one ε-rule over all outputs) distributes exactly what three
    separate ε-rules do: the ε-rule is a sum over output neurons.
    '''
    x = make_input(True, seed=3)
    relevances = []
    for self_attention in (True, False):
        model = Attend(make_attention(), self_attention, attn_mask=CAUSAL, need_weights=False)
        composite = composite_type(epsilon=1e-9, fused_attention=fused)
        with composite.context(model):
            inputs = x.clone().requires_grad_()
            sites = record_sites(lambda: model(inputs))
            output, _ = model(inputs)
            (relevance,) = torch.autograd.grad(output, inputs, output)
        relevances.append(relevance)
        projections = [(site, shape) for site, shape in sites if site.startswith('attention.linear')]
        core = [site for site, _ in sites if site.startswith('attention.') and not site.startswith('attention.linear')]
        if self_attention:
            # one packed in-projection (3 * embed outputs), then the out-projection
            assert projections == [
                ('attention.linear', (TOKENS, BATCH, 24)), ('attention.linear_1', (TOKENS * BATCH, 8)),
            ]
        else:
            assert projections == [
                ('attention.linear', (TOKENS, BATCH, 8)), ('attention.linear_1', (TOKENS, BATCH, 8)),
                ('attention.linear_2', (TOKENS, BATCH, 8)), ('attention.linear_3', (TOKENS * BATCH, 8)),
            ]
        assert core == (['attention.attention'] if fused else [
            'attention.matmul', 'attention.add', 'attention.softmax', 'attention.matmul_1'
        ])
    assert torch.allclose(relevances[0], relevances[1], rtol=1e-10, atol=1e-12)
    assert relevances[0].abs().sum() > 0


def test_a_plain_zennit_rule_cannot_attribute_the_functional_projections():
    '''A Zennit rule from the layer map applies to Linear modules, but nn.MultiheadAttention's projections are
    functional calls: a clear error during the forward, and the model is restored.'''
    model = Attend(make_attention())
    before = snapshot(model)
    composite = AttnLRP(layer_map=[(torch.nn.Linear, zennit.rules.Epsilon())])
    with pytest.raises(UnsupportedModelError, match=r'Epsilon \(from the layer map\) cannot attribute an intercepted '
                                                    r'LinearCall call .*MultiheadAttention'):
        lrp(model, composite, [make_input(True)])
    assert_restored(model, before)
    # without gradients nothing is attributed: the forward runs
    with composite.context(model), torch.no_grad():
        model(make_input(True))


# --- models built from plain nn.MultiheadAttention ----------------------------------------------------------------

class Block(torch.nn.Module):
    '''A pre-norm ViT block from plain modules: MultiheadAttention, residual ``+`` inline, GELU called as a
    function.'''
    def __init__(self, width, heads):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CustomViT(torch.nn.Module):
    '''Linear patch embedding, an inline learned position embedding, two blocks, mean pooling, a head.'''
    def __init__(self, patches=6, patch_dim=5, width=8, heads=2, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(patch_dim, width)
        self.position = torch.nn.Parameter(torch.randn(1, patches, width) * 0.1)
        self.blocks = torch.nn.ModuleList([Block(width, heads), Block(width, heads)])
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)
        with torch.no_grad():  # non-trivial norm parameters
            for module in self.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(std=0.1)

    def forward(self, x):
        x = self.embed(x) + self.position
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def custom_vit_oracle(model, x, cp_lrp):
    '''The oracle's modified-gradient forward of :py:class:`CustomViT` (weights read from the model).'''
    h = F.linear(x, model.embed.weight, model.embed.bias) + model.position
    for block in model.blocks:
        y = layer_norm_detached(h, block.norm1)
        h = h + mha_oracle(block.attention, y, y, y, {}, cp_lrp)
        z = identity_grad(F.linear(layer_norm_detached(h, block.norm2), block.fc1.weight, block.fc1.bias), F.gelu)
        h = h + F.linear(z, block.fc2.weight, block.fc2.bias)
    return F.linear(layer_norm_detached(h, model.norm).mean(1), model.head.weight, model.head.bias)


def logit_relevance(model, composite, x, target):
    onehot = F.one_hot(target, model(x).shape[-1]).to(x.dtype)
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * onehot)
    return output[torch.arange(len(target)), target], relevance


def zero_constants(model):
    '''Zero every bias (Linear, LayerNorm β, MultiheadAttention in/out projections) and position embedding.'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(('bias', 'position')):
                param.zero_()
    return model


TARGET = torch.tensor([1, 3])


def patches(seed=1):
    return torch.randn(2, 6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_custom_vit_from_multihead_attention_matches_the_oracle(composite_type, cp_lrp, fused):
    '''A custom ViT from plain nn.MultiheadAttention with inline residual and position sums (which the old canonizers
    left to their plain gradient) gets the oracle's relevance; its forward is unchanged.'''
    model = CustomViT().double().eval()
    x = patches()
    expected_logits = model(x.clone().requires_grad_(True))
    names = [name for name, _ in model.named_modules()]
    logits, relevance = logit_relevance(model, composite_type(epsilon=1e-12, fused_attention=fused), x, TARGET)
    assert [name for name, _ in model.named_modules()] == names
    if fused:
        assert torch.equal(logits, expected_logits[torch.arange(2), TARGET])
    else:
        assert torch.allclose(logits, expected_logits[torch.arange(2), TARGET], rtol=1e-10, atol=1e-14)
    leaf = x.clone().requires_grad_(True)
    oracle_logits = custom_vit_oracle(model, leaf, cp_lrp)
    assert torch.allclose(oracle_logits, expected_logits, rtol=1e-10, atol=1e-14)
    (grad,) = torch.autograd.grad(oracle_logits, leaf, F.one_hot(TARGET, 4).double())
    assert relative_difference(relevance, x * grad) < 1e-6


def test_custom_vit_is_conservative_under_cp_lrp_without_biases():
    '''CP-LRP on the bias-free custom ViT conserves the logit exactly; AttnLRP's softmax absorbs relevance.'''
    model = zero_constants(CustomViT().double().eval())
    x = patches()
    logits, relevance = logit_relevance(model, CPLRP(epsilon=1e-12), x, TARGET)
    assert torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-8)
    logits, relevance = logit_relevance(model, AttnLRP(epsilon=1e-12), x, TARGET)
    assert not torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-5)


class EncoderClassifier(torch.nn.Module):
    '''Linear embedding, one torch.nn.TransformerEncoderLayer (eval, batch_first), a head on the first token.'''
    def __init__(self, norm_first, activation='relu', width=8, heads=2, classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(5, width)
        self.layer = torch.nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=16, batch_first=True, norm_first=norm_first, activation=activation,
        )
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.layer(self.embed(x))[:, 0])


@pytest.mark.parametrize('activation', ['relu', 'gelu'])
@pytest.mark.parametrize('norm_first', [False, True], ids=['post-norm', 'pre-norm'])
def test_transformer_encoder_layer(norm_first, activation):
    '''torch.nn.TransformerEncoderLayer runs through the engine: forward unchanged (its fused fast path is off when
    gradients are needed, and the engine reproduces the slow path bit for bit), nothing is left uncovered, and CP-LRP
    conserves the logit without biases.'''
    model = EncoderClassifier(norm_first, activation).double().eval()
    x = patches()
    before = snapshot(model)
    expected = model(x.clone().requires_grad_(True))
    with AttnLRP().context(model):
        actual = model(x.clone().requires_grad_(True))
    assert torch.equal(actual, expected)
    assert_restored(model, before)
    for composite in (AttnLRP(), CPLRP()):
        report = check(model, composite, x)
        assert report.ok, str(report)
        assert report.rule_nodes > 0
    assert_restored(model, before)
    model = zero_constants(model)
    logits, relevance = logit_relevance(model, CPLRP(epsilon=1e-12), x, TARGET)
    assert torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-8)
    logits, relevance = logit_relevance(model, AttnLRP(epsilon=1e-12), x, TARGET)
    assert not torch.allclose(relevance.sum((1, 2)), logits, rtol=1e-5)
