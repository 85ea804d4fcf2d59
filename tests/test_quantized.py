'''Quantized linear layers (issue 15): bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` get the ε/γ rules on their
effective (dequantized) weights, and what no rule can read is refused at registration, naming the module; never the
raw integer codes (relevance off by ~1e5, as before) nor a silent plain gradient.

The reference of each check is the same model with ``nn.Linear`` layers holding the effective weights, read
independently of the rules: by probing the quantized layer's own forward with the identity matrix (``W^T = f(I) - b``).
'''
import copy

import pytest
import torch
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT, UnsupportedModelError
from zennit_attn.rules import IdentityRule

from conformance import bias_free, decoder, timm_vit, wrap_decoder, wrap_image
from restoration import relative_difference

bnb = pytest.importorskip('bitsandbytes')

pytestmark = pytest.mark.usefixtures('single_thread')


def attribute(wrapper, composite, x, target):
    with Gradient(wrapper, composite) as attributor:
        output, relevance = attributor(x, lambda y: y * torch.nn.functional.one_hot(target, y.shape[-1]).to(y.dtype))
    return output.detach(), relevance


def quantized(linear, kind):
    '''``linear`` (float32) as a bitsandbytes layer: ``'int8'`` (LLM.int8(), no outliers), ``'nf4'`` / ``'fp4'``, or
    ``'nf4/float32'`` (4-bit codes packed into float32 storage, as for FSDP).'''
    if kind == 'int8':
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        kind, _, storage = kind.partition('/')
        storage = getattr(torch, storage or 'uint8')
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type=kind, quant_storage=storage)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=kind,
                                         quant_storage=storage)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data.clone())
    # moving to the device quantizes the weight
    return layer.to('cpu')


def effective(layer):
    '''A float ``nn.Linear`` with the weight ``layer``'s own forward computes with: ``W^T = layer(I) - b`` (the rows of
    the identity quantize exactly in LLM.int8()'s activation quantization; an input that requires a gradient keeps
    bitsandbytes from repacking 4-bit weights for its CPU inference kernel).'''
    eye = torch.eye(layer.in_features, requires_grad=True)
    with torch.no_grad():
        transposed = layer(eye) - (0. if layer.bias is None else layer.bias)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(transposed.T)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def replace_linears(model, make, kinds=(torch.nn.Linear,)):
    '''Replace every module of ``model`` whose type is one of ``kinds`` (exactly) by ``make(module)``, in place.'''
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in kinds:
                setattr(module, name, make(child))
                replaced += 1
    assert replaced, 'nothing to replace'
    return model


def pair(build, kind):
    '''(quantized model, the same model with float nn.Linear layers holding the effective weights), float32.'''
    model = build().float()
    # eval mode: in training mode Linear8bitLt computes with the dequantized weight on CPU, without LLM.int8()
    quantized_model = replace_linears(model, lambda linear: quantized(linear, kind)).eval()
    reference = replace_linears(
        copy.deepcopy(quantized_model), effective, kinds=(bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    assert not any(isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for module in reference.modules())
    return quantized_model, reference.eval()


def test_probe_finds_the_dequantized_weight():
    '''The reference's weights are the dequantized ones: int8 codes × row absmax / 127 (LLM.int8()), written out.'''
    torch.manual_seed(0)
    layer = quantized(torch.nn.Linear(24, 8), 'int8').eval()
    codes, scales = layer.weight.data.clone(), layer.weight.SCB.clone()
    assert codes.dtype == torch.int8
    assert torch.allclose(effective(layer).weight, codes.float() * scales[:, None] / 127, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('family,kind', [
    ('llama', 'nf4'), ('llama', 'fp4'), ('qwen3', 'nf4'), ('qwen3', 'nf4/float32'),
])
def test_4bit_equals_the_dequantized_model(family, kind):
    '''Linear4bit computes ``x W_deq^T + b`` (float32 compute dtype): relevance equals the float model's to 1e-5.'''
    model, reference = pair(decoder(family), kind)
    wrapper, x, target = wrap_decoder(model)
    reference_wrapper, _, _ = wrap_decoder(reference)
    x = x.float()
    for composite_type in (AttnLRP, CPLRP):
        output, relevance = attribute(wrapper, composite_type(), x, target)
        expected_output, expected = attribute(reference_wrapper, composite_type(), x, target)
        assert relative_difference(output, expected_output) < 1e-5
        assert relative_difference(relevance, expected) < 1e-5, composite_type.__name__


@pytest.mark.parametrize('composite_type', [AttnLRPViT, CPLRPViT])
def test_4bit_vision_preset_uses_gamma_on_the_dequantized_weights(composite_type):
    '''The γ rule (MLP and head Linear layers of the vision preset) reads the effective weights too.'''
    model, reference = pair(timm_vit(), 'nf4')
    _, x, target = wrap_image(model)
    x = x.float()
    output, relevance = attribute(model, composite_type(), x, target)
    expected_output, expected = attribute(reference, composite_type(), x, target)
    assert relative_difference(output, expected_output) < 1e-5
    assert relative_difference(relevance, expected) < 1e-5


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_int8_model_is_close_to_the_dequantized_model(composite_type):
    '''A whole LLaMA in LLM.int8() (eval mode: activations quantized too, logits 5e-3 off the float model's): relevance
    within 1e-3 of the float model with the dequantized weights (measured 5e-5 / 1e-4). Reading the int8 codes without
    their scales gave relevance ~1e5 times the logit.'''
    model, reference = pair(decoder('llama'), 'int8')
    wrapper, x, target = wrap_decoder(model)
    reference_wrapper, _, _ = wrap_decoder(reference)
    x = x.float()
    _, relevance = attribute(wrapper, composite_type(), x, target)
    _, expected = attribute(reference_wrapper, composite_type(), x, target)
    assert torch.isfinite(relevance).all()
    assert relative_difference(relevance, expected) < 1e-3


@pytest.mark.parametrize('kind,rtol', [('nf4', 1e-5), ('int8', 0.1)])
def test_bias_free_quantized_model_conserves(kind, rtol):
    '''CP-LRP on the bias-free model conserves the logit: exactly for 4-bit layers; for LLM.int8() up to the
    activation quantization, which the rule's denominators see but the dequantized weights do not (measured 5% of
    these small logits, 1e-2).'''
    model, _ = pair(lambda: bias_free(decoder('llama')()), kind)
    wrapper, x, target = wrap_decoder(model)
    output, relevance = attribute(wrapper, CPLRP(epsilon=1e-12), x.float(), target)
    logits = output[torch.arange(len(target)), target]
    totals = relevance.flatten(1).sum(1)
    assert torch.allclose(totals, logits, rtol=rtol, atol=1e-7), (totals, logits)


# ------------------------------------------------------------------------------------------------------- refusals
def test_torch_dynamic_quantization_is_refused_at_registration():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
    with pytest.warns(Warning):
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError, match=r"module '0' .*torch\.ao quantized module"):
        AttnLRP().register(model)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


def test_quantized_weight_with_another_rule_is_refused():
    '''Only the closed-form ε/γ rules dequantize: a user layer map giving a quantized layer another rule is refused.'''
    model = torch.nn.Sequential(quantized(torch.nn.Linear(8, 4), 'int8'))
    composite = AttnLRP(layer_map=[(torch.nn.Linear, IdentityRule())])
    with pytest.raises(UnsupportedModelError, match=r"module '0' \(Linear8bitLt\).*torch.int8 weight is quantized"):
        composite.register(model)


def test_repacked_4bit_weight_is_refused():
    '''bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel after a forward without gradients; that layout
    is not dequantized, so it is refused (simulated here: this machine has no such CPU).'''
    model = torch.nn.Sequential(quantized(torch.nn.Linear(64, 4), 'nf4'))
    model[0].weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(UnsupportedModelError, match=r"module '0' \(Linear4bit\).*repacked"):
        AttnLRP().register(model)


def test_unknown_integer_weight_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    model[0].weight = torch.nn.Parameter(torch.ones(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match=r"module '0' \(Linear\).*quantized format"):
        AttnLRP().register(model)
