'''Big-model placement with accelerate: offloading hooks put a module's parameters in place right before its forward
and replace them by meta tensors right after it, so a rule that read ``module.weight`` in the backward pass would read
a placeholder (once: relevance summing to 1e25 for a logit of -0.16, without an error). The rules keep the tensors the
forward computed with, so relevance equals that of the undispatched model, and accelerate's module hooks (an
instance-level ``forward``) and ours coexist.
'''
import pytest
import torch
import zennit.rules
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite

from conformance import Logits, decoder, hf_vit, wrap_decoder, wrap_hf_vit
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, UnsupportedModelError
from zennit_attn.rules import Epsilon

# accelerate is in the test extras and in constraints.txt, so CI runs these tests
accelerate = pytest.importorskip('accelerate')


def llama():
    return decoder('llama')().float()


def vit():
    return hf_vit().float()


def offload(model, tmp_path):
    '''accelerate's ``cpu_offload``: every module's parameters live in a CPU state dict and are meta in between.'''
    return accelerate.cpu_offload(model, execution_device=torch.device('cpu'))


def dispatch_llama(model, tmp_path):
    '''``dispatch_model`` with a CPU + disk split (the disk part is offloaded to ``tmp_path``).'''
    device_map = {
        'model.embed_tokens': 'cpu', 'model.rotary_emb': 'cpu', 'model.layers.0': 'cpu', 'model.layers.1': 'disk',
        'model.norm': 'disk', 'lm_head': 'cpu',
    }
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / 'offload'))


def dispatch_vit(model, tmp_path):
    device_map = {
        'vit.embeddings': 'disk', 'vit.layers.0': 'cpu', 'vit.layers.1': 'disk', 'vit.layernorm': 'disk',
        'classifier': 'cpu',
    }
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / 'offload'))


def from_pretrained(model, tmp_path):
    '''``from_pretrained(device_map='auto', max_memory=...)`` of a ``save_pretrained`` copy: the decoder layers do not
    fit the CPU budget and go to disk.'''
    model.save_pretrained(tmp_path / 'model')
    loaded = type(model).from_pretrained(
        tmp_path / 'model', device_map='auto', max_memory={'cpu': '60KB'}, offload_folder=str(tmp_path / 'offload'),
        dtype=torch.float32,
    )
    assert {'cpu', 'disk'} <= set(loaded.hf_device_map.values()), loaded.hf_device_map
    return loaded.eval()


PLACEMENTS = {'cpu_offload': offload, 'dispatch_cpu_disk': dispatch_llama, 'from_pretrained_auto': from_pretrained}


def attribute(wrapper, composite, x, target):
    onehot = torch.nn.functional.one_hot(target, 5 if x.ndim == 4 else 50).to(x.dtype)
    with Gradient(wrapper, composite) as attributor:
        output, relevance = attributor(x, lambda logits: logits * onehot)
    return output, relevance


def state(model):
    '''What removing a composite must leave as it was on an offloaded model: modules, instance-level forwards
    (accelerate's), hooks, the non-offloaded parameters (objects and values) and the offloaded weights (the values in
    accelerate's weights maps); the meta placeholders are replaced by accelerate itself on every forward.'''
    offloaded = {}
    for name, module in model.named_modules():
        hook = getattr(module, '_hf_hook', None)
        hooks = getattr(hook, 'hooks', (hook,))
        for part in hooks:
            weights = getattr(part, 'weights_map', None)
            if weights is not None and getattr(part, 'offload', False):
                for key, _ in module.named_parameters(recurse=getattr(part, 'place_submodules', False)):
                    offloaded[f'{name}.{key}'] = weights[key].clone()
    return {
        'modules': [(name, module, vars(module).get('forward'), getattr(module, '_hf_hook', None))
                    for name, module in model.named_modules()],
        'hooks': sum(len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
                     for module in model.modules()),
        'parameters': {name: (param, param.clone()) for name, param in model.named_parameters() if not param.is_meta},
        'placeholders': {name: (param.shape, param.dtype) for name, param in model.named_parameters() if param.is_meta},
        'offloaded': offloaded,
    }


def assert_state(model, before):
    after = state(model)
    assert len(after['modules']) == len(before['modules'])
    assert all(a[0] == b[0] and all(x is y for x, y in zip(a[1:], b[1:]))
               for a, b in zip(after['modules'], before['modules']))
    assert after['hooks'] == before['hooks']
    assert after['parameters'].keys() == before['parameters'].keys()
    assert all(after['parameters'][key][0] is param and torch.equal(param, value)
               for key, (param, value) in before['parameters'].items())
    assert after['placeholders'] == before['placeholders']
    assert after['offloaded'].keys() == before['offloaded'].keys()
    assert all(torch.equal(after['offloaded'][key], value) for key, value in before['offloaded'].items())


def check_placement(build, place, wrap, composites, tmp_path):
    model = build()
    wrapper, x, target = wrap(model)
    x = x.float()
    expected = {name: attribute(wrapper, composite(), x, target) for name, composite in composites.items()}
    placed = place(build(), tmp_path)
    placed_wrapper = Logits(placed, getattr(wrapper, 'key', None), position=getattr(wrapper, 'position', None),
                            **getattr(wrapper, 'kwargs', {}))
    hooked = [name for name, module in placed.named_modules() if 'forward' in vars(module)]
    meta = [name for name, param in placed.named_parameters() if param.is_meta]
    # the situation of the issue: accelerate's instance-level forwards and offloaded (meta) parameters
    assert hooked and meta
    with torch.no_grad():
        plain = placed_wrapper(x)
    before = state(placed)
    for name, composite in composites.items():
        output, relevance = attribute(placed_wrapper, composite(), x, target)
        assert torch.equal(output, expected[name][0])
        reference = expected[name][1]
        assert torch.isfinite(relevance).all()
        assert (relevance - reference).abs().max() <= 1e-6 * reference.abs().max(), name
        assert_state(placed, before)
    with torch.no_grad():
        assert torch.equal(placed_wrapper(x), plain)


@pytest.mark.parametrize('placement', sorted(PLACEMENTS))
def test_llama(placement, tmp_path):
    '''A tiny LLaMA (float32, tied embeddings) under each placement: AttnLRP and CP-LRP equal the undispatched model's.
    '''
    check_placement(llama, PLACEMENTS[placement], wrap_decoder, {'attnlrp': AttnLRP, 'cp_lrp': CPLRP}, tmp_path)


@pytest.mark.parametrize('placement', ['cpu_offload', 'dispatch_cpu_disk'])
def test_vit_vision_preset(placement, tmp_path):
    '''A tiny ViT with the vision preset (γ rules on the patch convolution and the MLP, LayerNorm rules): the rules that
    read weights in the backward pass are all there.'''
    place = offload if placement == 'cpu_offload' else dispatch_vit
    check_placement(vit, place, wrap_hf_vit, {'attnlrp_vit': AttnLRPViT, 'cp_lrp': CPLRP}, tmp_path)


def test_zennit_rule_on_offloaded_module_is_refused(tmp_path):
    '''Zennit's own rules re-run the module with its parameters in the backward pass: refused at registration, naming
    the module.'''
    placed = offload(llama(), tmp_path)
    wrapper, x, target = wrap_decoder(placed)
    composite = AttnLRP(layer_map=[(torch.nn.Linear, zennit.rules.Epsilon())])
    with pytest.raises(UnsupportedModelError, match=r"'model\.model\.layers\.0\.self_attn\.q_proj'.*offloaded"):
        attribute(wrapper, composite, x.float(), target)


def test_rule_without_engine_on_offloaded_module_is_refused(tmp_path):
    '''A zennit_attn rule in a plain zennit composite (no engine records the forward's weights): a clear error, not
    garbage relevance.'''
    placed = offload(llama(), tmp_path)
    wrapper, x, target = wrap_decoder(placed)
    with pytest.raises(RuntimeError, match='placeholder on the meta device'):
        attribute(wrapper, LayerMapComposite([(torch.nn.Linear, Epsilon())]), x.float(), target)
