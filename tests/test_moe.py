'''The mixture-of-experts rules, on one sparse block of Mixtral and Qwen3-MoE (transformers, per-expert loop, float64).

The block's relevance is compared with a hand-written oracle (ATTNLRP.md §3: modified gradient × input of a forward
written here, sharing no code with the library): router softmax, top-k selection, re-normalisation and the scatter-sum
keep their plain gradient, the products of two input-dependent factors (SiLU(gate) · up, expert output · routing
weight) pass half of the gradient to each factor (CP-LRP: the gate and the routing weight are constant), the SiLU's
derivative is SiLU(x)/x. The individual MoE rules are then checked at the operation sites (``record_relevance``)
against closed forms computed here: the routing weights get half of the relevance of their products (uniform rule),
and the router logits get the softmax rule (AttnLRP Prop. 3.1) of the softmax over the *selected* logits when the
top-k weights are re-normalised (which that softmax is).

Both models compute the router softmax in float32 by design (``router_logits.float()``, ``dtype=torch.float``), so
the relevance of the router branch carries float32 rounding (unit roundoff 6e-8): checks that involve it allow 1e-6
relative; those that do not (CP-LRP, where the routing weights are constant) hold to 1e-10.
'''
import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, UnsupportedModelError
from zennit_attn.engine import UnsupportedOperationError
from zennit_attn.latent import record_relevance

from restoration import assert_restored, relative_difference, snapshot

pytestmark = pytest.mark.usefixtures('single_thread')

transformers = pytest.importorskip('transformers')

HIDDEN, EXPERTS, TOP_K = 32, 4, 2

#: (config, model, options): Mixtral always re-normalises the top-k weights, Qwen3-MoE only with norm_topk_prob
VARIANTS = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(num_local_experts=EXPERTS, intermediate_size=20)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', dict(num_experts=EXPERTS, moe_intermediate_size=20)),
    'qwen3_moe_normalized': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', dict(
        num_experts=EXPERTS, moe_intermediate_size=20, norm_topk_prob=True)),
}
RENORMALIZED = {'mixtral': True, 'qwen3_moe': False, 'qwen3_moe_normalized': True}


def build_model(variant, **options):
    config_name, model_name, extra = VARIANTS[variant]
    config = getattr(transformers, config_name)(
        vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=64, use_cache=False, num_experts_per_tok=TOP_K,
        attn_implementation='sdpa', **{'experts_implementation': 'eager', **extra, **options},
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).double().eval()


def sparse_block(variant):
    '''The sparse block of a tiny model, with weights scaled up (the default initialisation, std 0.02, routes almost
    uniformly and gives outputs of 1e-3, where ε = 1e-12 would matter), its input (hidden states of unit scale) and the
    seed of the relevance at its output.'''
    block = build_model(variant).model.layers[0].mlp
    with torch.no_grad():
        for param in block.parameters():
            param.mul_(10.)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, HIDDEN, generator=generator, dtype=torch.float64)
    seed = torch.randn(2, 6, HIDDEN, generator=generator, dtype=torch.float64)
    return block, x, seed


def attribute(block, composite, x, seed, patterns=()):
    '''Relevance at the input for the output relevance ``block(x) * seed``, and the relevance at the op sites.'''
    with record_relevance(block, list(patterns)) as recorded:
        with Gradient(block, composite) as attributor:
            _, relevance = attributor(x, lambda output: output * seed)
    return relevance, dict(recorded)


def half(tensor):
    '''``tensor`` with half of its gradient (the uniform rule of a product of two input-dependent factors).'''
    return 0.5 * tensor + 0.5 * tensor.detach()


def router(block, hidden, renormalize):
    '''Logits (float64), top-k weights (float64, computed in float32 as by the models) and the chosen experts.'''
    logits = hidden @ block.gate.weight.T
    weights, chosen = torch.softmax(logits.float(), -1).topk(TOP_K, -1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, weights.to(hidden.dtype), chosen


def oracle(block, x, seed, renormalize, cp_lrp):
    '''Modified gradient × input of ``sum(seed * block(x))`` (see the module docstring), from the block's weights.'''
    x = x.detach().requires_grad_(True)
    hidden = x.reshape(-1, HIDDEN)
    _, weights, chosen = router(block, hidden, renormalize)
    experts = block.experts
    # (tokens, k, features): the chosen experts' weights, applied to each token
    gate, up = (experts.gate_up_proj[chosen] @ hidden[:, None, :, None]).squeeze(-1).chunk(2, -1)
    activation = gate * (torch.nn.functional.silu(gate) / gate).detach()
    inner = activation.detach() * up if cp_lrp else half(activation) * half(up)
    expert_out = (experts.down_proj[chosen] @ inner[..., None]).squeeze(-1)
    weights = weights[..., None]
    routed = expert_out * weights.detach() if cp_lrp else half(expert_out) * half(weights)
    output = routed.sum(1).reshape(x.shape)
    (output * seed).sum().backward()
    return x.detach() * x.grad, output.detach()


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('composite_type,cp_lrp,tolerance', [(AttnLRP, False, 1e-6), (CPLRP, True, 1e-10)],
                         ids=['attnlrp', 'cp_lrp'])
def test_sparse_block_equals_the_modified_gradient_oracle(variant, composite_type, cp_lrp, tolerance):
    block, x, seed = sparse_block(variant)
    expected, output = oracle(block, x, seed, RENORMALIZED[variant], cp_lrp)
    with torch.no_grad():
        # the oracle computes what the block computes (up to the order of the sums)
        assert relative_difference(output, block(x)) < 1e-12
    # ε small enough not to show at 1e-10 (the ε-rules equal gradient × input as ε -> 0; some pre-activations of the
    # random experts are 1e-4 small)
    relevance, _ = attribute(block, composite_type(epsilon=1e-15), x, seed)
    assert relative_difference(relevance, expected) < tolerance
    if cp_lrp:
        # bias-free block, constant routing weights: exactly conservative
        assert torch.allclose(relevance.sum(), (output * seed).sum(), rtol=1e-10)


def in_loop_order(recorded, op):
    '''The recorded relevance at the sites ``experts.<op>``, ``experts.<op>_1``, ... that are ``hidden`` features wide,
    in the order of the experts' loop: for ``'mul'`` the products ``expert output * routing weight`` (the
    ``SiLU(gate) * up`` products are narrower), for ``'linear'`` the expert outputs (the down projections).'''
    def number(site):
        suffix = site[len(f'experts.{op}'):]
        return int(suffix[1:]) if suffix else 0
    sites = [site for site, value in recorded.items()
             if site.startswith(f'experts.{op}') and value.shape[-1] == HIDDEN]
    return [recorded[site] for site in sorted(sites, key=number)]


def per_choice(block, hidden, products):
    '''``(tokens, k)``: the relevance of each routing product summed over features, placed as the transformers loop
    visits them (experts in ascending order; per expert, by top-k position, then token).'''
    _, _, chosen = router(block, hidden, False)
    total = torch.zeros(chosen.shape, dtype=torch.float64)
    visited = [expert for expert in range(EXPERTS) if (chosen == expert).any()]
    assert len(products) == len(visited)
    for expert, relevance in zip(visited, products):
        position, token = torch.where((chosen == expert).T)
        total[token, position] += relevance.sum(-1)
    return total


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_routing_products_split_their_relevance(variant, composite_type):
    '''AttnLRP: uniform rule on ``expert output * routing weight`` (half each); CP-LRP: the routing weights are
    constant, so the expert output gets all of it and the router nothing.'''
    block, x, seed = sparse_block(variant)
    hidden = x.reshape(-1, HIDDEN)
    patterns = ['experts.mul*', 'experts.linear*', 'gate.div', 'gate.softmax']
    _, recorded = attribute(block, composite_type(epsilon=1e-12), x, seed, patterns)
    products, expert_outputs = in_loop_order(recorded, 'mul'), in_loop_order(recorded, 'linear')
    assert len(products) == len(expert_outputs) > 1
    share = 1. if composite_type is CPLRP else 0.5
    for product, expert_output in zip(products, expert_outputs):
        assert relative_difference(expert_output, share * product) < 1e-12
    if composite_type is CPLRP:
        assert 'gate.div' not in recorded and 'gate.softmax' not in recorded
        return
    # the routing weights: the re-normalised top-k weights (gate.div), else the top-k probabilities (gate.softmax)
    _, _, chosen = router(block, hidden, False)
    weights = recorded['gate.div'] if RENORMALIZED[variant] else recorded['gate.softmax'].gather(-1, chosen)
    halves = per_choice(block, hidden, products) / 2
    assert halves.abs().min() > 0
    assert relative_difference(weights, halves) < 1e-6


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_router_logits_get_the_softmax_rule(variant):
    '''Re-normalised top-k weights: the softmax rule of the softmax over the selected logits, ``x_S (R - y sum R)``,
    and nothing for the unselected logits. Without re-normalisation: the softmax rule of the router softmax, which
    the unselected logits reach through its denominator.'''
    block, x, seed = sparse_block(variant)
    hidden = x.reshape(-1, HIDDEN)
    _, recorded = attribute(block, AttnLRP(epsilon=1e-12), x, seed, ['gate.linear', 'experts.mul*'])
    logits, weights, chosen = router(block, hidden, RENORMALIZED[variant])
    # the relevance of the routing weights: half of that of their products (checked above)
    routed = per_choice(block, hidden, in_loop_order(recorded, 'mul')) / 2
    relevance = recorded['gate.linear']
    selected = torch.zeros(logits.shape, dtype=torch.bool).scatter(-1, chosen, True)
    if RENORMALIZED[variant]:
        expected = torch.zeros_like(logits).scatter(
            -1, chosen, logits.gather(-1, chosen) * (routed - weights * routed.sum(-1, keepdim=True)))
        # zero up to the float32 rounding of the router branch (the relevance of the selected weights sums to 0)
        assert relevance[~selected].abs().max() < 1e-6 * relevance.abs().max()
    else:
        probabilities = torch.softmax(logits.float(), -1).double()
        spread = torch.zeros_like(logits).scatter(-1, chosen, routed)
        expected = logits * (spread - probabilities * spread.sum(-1, keepdim=True))
        assert (relevance[~selected].abs() > 1e-5 * relevance.abs().max()).all()
    assert relative_difference(relevance, expected) < 1e-6


@pytest.mark.parametrize('implementation', ['grouped_mm', 'batched_mm'])
def test_other_experts_implementations_are_refused(implementation):
    model = build_model('mixtral', experts_implementation=implementation)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"experts.*experts_implementation='" + implementation):
        AttnLRPViT().context(model).__enter__()
    assert_restored(model, before)


def test_router_jitter_in_training_mode_is_refused():
    model = build_model('mixtral', router_jitter_noise=0.1).train()
    with pytest.raises(UnsupportedModelError, match='jitter'):
        CPLRP().context(model).__enter__()


class Renormalized(torch.nn.Module):
    '''``w / w.sum(-1, keepdim=True)`` with ``w = x * flip(x)`` (in place like Mixtral's router, or not), or divisions
    that are no re-normalisation: by the sum of another tensor, by a sum without ``keepdim``, by a sum changed in
    place.'''
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        weights = x * x.flip(-1)
        if self.mode == 'in_place':
            weights /= weights.sum(-1, keepdim=True)
            return weights
        if self.mode == 'other':
            return weights / x.sum(-1, keepdim=True)
        if self.mode == 'squeezed':
            return weights / weights.sum(-1).unsqueeze(-1)
        if self.mode == 'shifted':
            total = weights.sum(-1, keepdim=True)
            total += 0.1
            return weights / total
        return weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize('mode', ['in_place', 'out_of_place'])
def test_renormalization_rule(mode):
    '''``R_w = R - y * sum(R)`` (the gradient × input of ``w / sum(w)``), then the uniform rule of ``x * flip(x)``.'''
    x = torch.rand(3, 4, dtype=torch.float64) + 0.5
    seed = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = Renormalized(mode)
    with Gradient(model, AttnLRP(epsilon=1e-12)) as attributor:
        output, relevance = attributor(x, lambda y: y * seed)
    relevance_out = output * seed
    relevance_weights = relevance_out - output * relevance_out.sum(-1, keepdim=True)
    expected = relevance_weights / 2 + (relevance_weights / 2).flip(-1)
    assert relative_difference(relevance, expected) < 1e-12
    assert relevance.sum(-1).abs().max() < 1e-12


@pytest.mark.parametrize('mode', ['other', 'squeezed', 'shifted'])
def test_other_divisions_by_input_dependent_tensors_raise(mode):
    x = torch.rand(3, 4, dtype=torch.float64) + 0.5
    with pytest.raises(UnsupportedOperationError, match="'div'"):
        with Gradient(Renormalized(mode), AttnLRP()) as attributor:
            attributor(x, torch.ones_like(x))
