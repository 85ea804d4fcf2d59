'''Gradient (activation) checkpointing: a checkpointed region of the forward is recomputed in the backward pass, outside
the window in which the engine intercepts the forward. The relevance must equal that of the same model without
checkpointing (the engine re-enters its mode for the recomputation), and every run here proves that the recomputation
really happened (a module's forward runs twice).
'''
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from zennit.attribution import Gradient

from conformance import decoder, hf_vit, timm_vit, wrap_decoder, wrap_hf_vit, wrap_image
from restoration import assert_restored, snapshot
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP
from zennit_attn.engine import UnsupportedOperationError


COMPOSITES = {'attnlrp': AttnLRP, 'cp_lrp': CPLRP}


def seed(logits, target):
    return logits * torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits.dtype)


def attribute(wrapper, composite, x, target, backward=False, call=None):
    '''The relevance of ``x`` through zennit's Gradient attributor; with ``call`` (``x -> logits``, running the
    registered ``wrapper``) through ``torch.autograd.grad``, with ``backward=True`` through ``Tensor.backward``
    (reentrant checkpointing refuses ``torch.autograd.grad``).'''
    if not backward and call is None:
        with Gradient(wrapper, composite) as attributor:
            _, relevance = attributor(x, lambda logits: seed(logits, target))
        return relevance
    composite.register(wrapper)
    try:
        x = x.detach().requires_grad_()
        logits = (call or wrapper)(x)
        if not backward:
            (relevance,) = torch.autograd.grad(logits, x, seed(logits, target))
            return relevance
        logits.backward(seed(logits, target))
        return x.grad
    finally:
        composite.remove()


class Calls:
    '''Counts the forward calls of ``module`` (a recomputed region calls its modules a second time).'''
    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.count += 1


def assert_same(actual, expected, tolerance):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max() <= tolerance * expected.abs().max()


def hf_checkpointed(model, reentrant):
    '''Hugging Face checkpointing, which checkpoints only in training mode (dropout is 0 in these configs).'''
    if hasattr(model, 'activation_checkpointing_enable'):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': reentrant})
    else:  # transformers < 5.2x: the former name
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': reentrant})
    return model.train()


HF_MODELS = {
    'llama': (decoder('llama'), wrap_decoder, lambda model: model.model.layers[0].mlp),
    'vit': (hf_vit, wrap_hf_vit, lambda model: model.vit.layers[0].mlp),
}


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
@pytest.mark.parametrize('reentrant', [False, True], ids=['non_reentrant', 'reentrant'])
@pytest.mark.parametrize('family', sorted(HF_MODELS))
def test_hf_checkpointing(family, reentrant, composite):
    '''``activation_checkpointing_enable`` (formerly ``gradient_checkpointing_enable``): the same relevance in float64
    (to rounding: the recomputation repeats the same operations).'''
    build, wrap, probe = HF_MODELS[family]
    model = build()
    wrapper, x, target = wrap(model)
    expected = attribute(wrapper, COMPOSITES[composite](), x, target, backward=reentrant)
    hf_checkpointed(model, reentrant)
    calls = Calls(probe(model))
    before = snapshot(wrapper)
    actual = attribute(wrapper, COMPOSITES[composite](), x, target, backward=reentrant)
    assert calls.count == 2, 'the region was not recomputed: the test would not test checkpointing'
    assert_restored(wrapper, before)
    assert_same(actual, expected, 1e-12)


def test_hf_checkpointing_float32_vision_preset():
    '''float32 and the γ rules of the vision preset: the same relevance to 1e-6.'''
    model = hf_vit().float()
    wrapper, x, target = wrap_hf_vit(model)
    x = x.float()
    expected = attribute(wrapper, AttnLRPViT(), x, target)
    hf_checkpointed(model, reentrant=False)
    calls = Calls(model.vit.layers[1].attention)
    actual = attribute(wrapper, AttnLRPViT(), x, target)
    assert calls.count == 2
    assert_same(actual, expected, 1e-6)


class CheckpointedLayer(torch.nn.Module):
    '''Runs a decoder layer's ``forward`` inside ``checkpoint`` (as transformers does: the layer's own hooks stay
    outside the region, and its residual sums and other glue operations are inside).'''
    def __init__(self, layer, reentrant):
        super().__init__()
        self.layer, self.reentrant = layer, reentrant

    def forward(self, hidden_states, **kwargs):
        return checkpoint(functools.partial(self.layer.forward, **kwargs), hidden_states, use_reentrant=self.reentrant)


class Block(torch.nn.Module):
    '''A self-attention block whose attention core alone is checkpointed (``reentrant`` None: not checkpointed): a
    region without any module call; ``calls`` counts the runs of the attention core.'''
    def __init__(self, reentrant=None, width=8, heads=2):
        super().__init__()
        self.reentrant, self.heads, self.calls = reentrant, heads, 0
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 3)

    def attention(self, q, k, v):
        self.calls += 1
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.reentrant is None:
            context = self.attention(q, k, v)
        else:
            context = checkpoint(self.attention, q, k, v, use_reentrant=self.reentrant)
        x = x + self.out(context.transpose(1, 2).reshape(batch, length, width))
        return self.head(x).sum(1)


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
@pytest.mark.parametrize('reentrant', [False, True], ids=['non_reentrant', 'reentrant'])
@pytest.mark.parametrize('region', ['model', 'layer_forward'])
def test_torch_checkpoint_in_user_code(region, reentrant, composite):
    '''``torch.utils.checkpoint.checkpoint`` in eval mode, around the whole registered model (the region starts before
    the engine's window) or around each decoder layer's ``forward`` (inside the window, without the layer's hooks).
    '''
    model = decoder('llama')()
    wrapper, x, target = wrap_decoder(model)
    expected = attribute(wrapper, COMPOSITES[composite](), x, target, backward=reentrant)
    if region == 'model':
        calls = Calls(model.model.layers[-1].mlp)
        actual = attribute(wrapper, COMPOSITES[composite](), x, target, backward=reentrant,
                           call=lambda x: checkpoint(wrapper, x, use_reentrant=reentrant))
    else:
        model.model.layers = torch.nn.ModuleList(CheckpointedLayer(layer, reentrant) for layer in model.model.layers)
        calls = Calls(model.model.layers[-1].layer.mlp)
        actual = attribute(wrapper, COMPOSITES[composite](), x, target, backward=reentrant)
    assert calls.count == 2
    assert_same(actual, expected, 1e-12)


@pytest.mark.parametrize('composite', sorted(COMPOSITES))
@pytest.mark.parametrize('reentrant', [False, True], ids=['non_reentrant', 'reentrant'])
def test_checkpointed_function_without_modules(reentrant, composite):
    '''A region that calls no module (the attention core only): the engine finds it at its first operation.'''
    torch.manual_seed(0)
    model = Block().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2])
    expected = attribute(model, COMPOSITES[composite](), x, target, backward=reentrant)
    model.reentrant, model.calls = reentrant, 0
    actual = attribute(model, COMPOSITES[composite](), x, target, backward=reentrant)
    assert model.calls == 2, 'the attention core was not recomputed'
    assert_same(actual, expected, 1e-12)


def test_timm_checkpoint_seq():
    '''timm's ``set_grad_checkpointing`` (``checkpoint_seq`` over the blocks, also in eval mode), vision preset.'''
    model = timm_vit()()
    wrapper, x, target = wrap_image(model)
    expected = attribute(wrapper, AttnLRPViT(), x, target)
    model.set_grad_checkpointing(True)
    calls = Calls(model.blocks[0].mlp)
    actual = attribute(wrapper, AttnLRPViT(), x, target)
    assert calls.count == 2
    assert_same(actual, expected, 1e-12)


def test_reentrant_with_autograd_grad_is_refused():
    '''Reentrant checkpointing cannot serve ``torch.autograd.grad`` (zennit's attributors): torch says so.'''
    model = hf_checkpointed(decoder('llama')(), reentrant=True)
    wrapper, x, target = wrap_decoder(model)
    with pytest.raises(RuntimeError, match='use_reentrant=False'):
        attribute(wrapper, AttnLRP(), x, target)


def test_recomputation_after_removal_is_refused():
    '''A backward pass after the composite was removed would recompute the region without rules.'''
    model = hf_checkpointed(decoder('llama')(), reentrant=False)
    wrapper, x, target = wrap_decoder(model)
    composite = AttnLRP()
    composite.register(wrapper)
    x = x.detach().requires_grad_()
    try:
        logits = wrapper(x)
    finally:
        composite.remove()
    with pytest.raises(UnsupportedOperationError, match='removed after the forward'):
        logits.backward(seed(logits, target))


def test_training_dropout_is_still_refused():
    '''Training mode with checkpointing is fine with dropout 0 (above); with dropout > 0 it is refused as before.'''
    model = decoder('llama')()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    hf_checkpointed(model, reentrant=False)
    wrapper, x, target = wrap_decoder(model)
    with pytest.raises(Exception, match='dropout'):
        attribute(wrapper, AttnLRP(), x, target)
