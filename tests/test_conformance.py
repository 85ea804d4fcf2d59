'''The conformance suite: every entry of tests/conformance.py gets the same tests (see its docstring).'''
import pytest
import torch
from zennit.attribution import Gradient

import zennit_attn
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT

from conformance import bias_free
from registry import ENTRIES
from restoration import assert_restored, relative_difference, snapshot

pytestmark = pytest.mark.usefixtures('single_thread')


pytest.importorskip('transformers')

ENTRY_IDS = [entry.name for entry in ENTRIES]
COMPOSITES = [AttnLRP, CPLRP, AttnLRPViT, CPLRPViT]


def attribute(wrapper, composite, x, target):
    '''Zennit's Gradient attributor seeded with ``logit * onehot(target)``.'''
    with Gradient(wrapper, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype))
    return output, relevance


@pytest.fixture(params=ENTRIES, ids=ENTRY_IDS)
def entry(request):
    return request.param


@pytest.mark.parametrize('composite_type', COMPOSITES)
def test_forward_unchanged_while_registered(entry, composite_type):
    model = entry.build()
    wrapper, x, _ = entry.wrap(model)
    with torch.no_grad():
        plain = wrapper(x)
    # some models take other kernels when gradients are needed (T5: 1e-15): compare like with like
    plain_grad = wrapper(x.detach().requires_grad_(True)).detach()
    with composite_type().context(wrapper):
        with torch.no_grad():
            no_grad = wrapper(x)
        registered = wrapper(x.detach().requires_grad_(True))
    # bit-identical where the engine runs the model's own ops (everything but nn.MultiheadAttention, whose fast path
    # torch skips under a function mode, and whose decomposition rounds differently)
    tolerance = 1e-6 if any(isinstance(module, torch.nn.MultiheadAttention) for module in model.modules()) else 0.
    assert relative_difference(no_grad, plain) <= tolerance
    assert relative_difference(registered.detach(), plain_grad) <= tolerance


def test_model_bit_identical_after_removal_and_after_an_exception(entry):
    model = entry.build()
    wrapper, x, target = entry.wrap(model)
    before = snapshot(wrapper)
    attribute(wrapper, AttnLRP(), x, target)
    assert_restored(wrapper, before)
    # an exception deep inside the forward, while registered
    leaves = [module for module in wrapper.modules() if next(module.parameters(recurse=False), None) is not None]
    deepest = leaves[-2]
    handle = deepest.register_forward_pre_hook(lambda module, args: 1 / 0)
    before = snapshot(wrapper)
    with pytest.raises(ZeroDivisionError):
        attribute(wrapper, CPLRP(), x, target)
    assert_restored(wrapper, before)
    handle.remove()
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRPViT])
def test_lint_clean(entry, composite_type):
    model = entry.build()
    wrapper, x, _ = entry.wrap(model)
    report = zennit_attn.check(wrapper, composite_type(), x)
    assert report.ok, str(report)
    assert report.rule_nodes > 10


ORACLES = [entry for entry in ENTRIES if entry.oracle is not None]


@pytest.mark.parametrize('oracle_entry', ORACLES, ids=[entry.name for entry in ORACLES])
@pytest.mark.parametrize('composite_type,cp_lrp', [(AttnLRP, False), (CPLRP, True)], ids=['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'unfolded'])
def test_independent_oracle(oracle_entry, composite_type, cp_lrp, fused):
    '''Relevance equals the hand-written modified gradient × input (ATTNLRP.md §3) to 1e-6 relative (float64), for the
    entries that have an oracle (the others are checked by exact conservation only).'''
    entry = oracle_entry
    model = entry.build()
    wrapper, x, target = entry.wrap(model)
    expected = entry.oracle(model, x, target, cp_lrp)
    _, relevance = attribute(wrapper, composite_type(epsilon=1e-12, fused_attention=fused), x, target)
    assert relative_difference(relevance, expected) < 1e-6


def test_cp_lrp_conserves_on_bias_free_model(entry):
    '''CP-LRP with every bias, additive embedding and class token zeroed: input relevance = logit (ATTNLRP.md §2).'''
    if not entry.conserves:
        pytest.skip(f'{entry.name}: its rules do not conserve')
    model = bias_free(entry.build(), entry.absorbing)
    wrapper, x, target = entry.wrap(model)
    # ε absorbs an absolute amount, ε × (sum of the stabilised relevance ratios): 1e-14 keeps it far below the
    # tolerance even for tiny logits (OPT's are 1e-3)
    output, relevance = attribute(wrapper, CPLRP(epsilon=1e-14), x, target)
    logits = output[torch.arange(len(target)), target]
    totals = relevance.flatten(1).sum(1)
    assert torch.allclose(totals, logits, rtol=1e-8, atol=1e-12), (totals, logits)


def test_fused_and_unfolded_attention_agree(entry):
    model = entry.build()
    wrapper, x, target = entry.wrap(model)
    results = [
        attribute(wrapper, AttnLRP(epsilon=1e-12, fused_attention=fused), x, target)[1] for fused in (True, False)
    ]
    assert relative_difference(results[0], results[1]) < 1e-7


#: name parts of the Linear layers that are attention projections (q/k/v/out), across the registered families
PROJECTION_NAMES = ('attn', 'attention', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'query', 'key', 'value', 'qkv')


def test_vision_preset_finds_the_roles(entry):
    '''``attnlrp_vit``: ε on every attention projection (q/k/v/out, found by name here, independently of the
    composite's type matching), γ=0.05 on every other Linear (MLP, head), γ=0.25 on convolutions (patch embedding).'''
    from zennit_attn.rules import Epsilon, Gamma
    model = entry.build()
    wrapper, _, _ = entry.wrap(model)
    composite = AttnLRPViT()
    linear_types = (torch.nn.Linear,) + ((__import__('transformers').pytorch_utils.Conv1D,))
    with composite.context(wrapper):
        for name, module in wrapper.named_modules():
            rule = composite.template(module, composite.roles.get(module))
            parts = name.lower().split('.')
            if isinstance(module, linear_types) and not name.endswith(('gate', 'router')):
                # an MLP inside an attention module (timm's attention-pool head) is an MLP
                if 'mlp' not in parts and any(key in part for part in parts for key in PROJECTION_NAMES):
                    assert type(rule) is Epsilon, (name, rule)
                else:
                    assert type(rule) is Gamma and rule.gamma == 0.05, (name, rule)
            elif isinstance(module, torch.nn.modules.conv._ConvNd):
                assert type(rule) is Gamma and rule.gamma == 0.25, (name, rule)
