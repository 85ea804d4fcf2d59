'''Conformance entries: vision transformers beyond the plain ViT (joined into ``conformance.ENTRIES``).

Hugging Face DINOv2 (LayerScale; with registers), BEiT (relative position bias, LayerScale, mean pooling) and Swin
(window attention, shifted-window masks, patch merging, adaptive average pooling); timm ViT with an attention-pool head
(``global_pool='map'``), DINOv2 with registers, EVA-02 (RoPE, SwiGLU), SigLIP, BEiT and Swin (eager with an
``nn.Softmax`` module, and fused); torchvision's Swin (``shifted_window_attention``, a function with functional
linear layers, roll, pad and masks). Their independent check is exact conservation of CP-LRP on the bias-free model.

Scale matters for that check: the ε-rules absorb about ``ε * R / |z|`` at every pre-activation ``z``, so a model whose
logits or activations are tiny (timm's default head initialisation, LayerScale 1e-5, a class token that bias_free
zeroes) shows an ε-sized residual far above rounding. The builds below therefore draw the classifier from N(0, 1),
every LayerScale from N(1, 0.2²) and use Hugging Face's ``initializer_range=0.2``: the residual left is then at most
2e-9 of the logit at ε = 1e-12 (``tests/test_vision_families.py`` shows that it shrinks in proportion to ε).
'''
import torch
import torchvision

from conformance import Entry, Logits, generator, perturbed, wrap_image

#: Hugging Face vision configs: tiny, with weights large enough that ε stays negligible (see the module docstring)
HF_COMMON = dict(image_size=16, num_labels=5, initializer_range=0.2, attn_implementation='sdpa')
HF_VIT = dict(patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)


#: names of LayerScale parameters (timm ViT/EVA, timm BEiT, Hugging Face DINOv2, Hugging Face BEiT)
LAYER_SCALES = ('.gamma', 'gamma_1', 'gamma_2', 'lambda1', 'lambda_1', 'lambda_2')


def _randomize(model, names, seed=4, scale=1.0):
    '''Draw the parameters whose name contains one of ``names`` from N(0, scale²) (heads, register tokens), and every
    LayerScale from N(1, 0.2²): per-channel scales of order 1 (see the module docstring).'''
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in names):
                param.copy_(scale * torch.randn(param.shape, generator=generator(seed), dtype=param.dtype))
            elif any(key in name for key in LAYER_SCALES):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator(seed), dtype=param.dtype))
    return model


def hf_vision(config_name, model_name, randomize=('classifier',), **options):
    def build():
        import transformers
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(**{**HF_COMMON, **options})
        model = getattr(transformers, model_name)(config).double().eval()
        return perturbed(_randomize(model, randomize))
    return build


def wrap_hf_image(model):
    return Logits(model), torch.randn(2, 3, 16, 16, generator=generator(2), dtype=torch.float64), torch.tensor([1, 3])


TIMM_VIT = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)


def timm_vision(name, fused_attn=None, **options):
    '''A tiny timm model built by name (``pretrained=False``: no download), the architecture options of ``name`` with
    ``options`` overriding them, and its classifier drawn from N(0, 1).'''
    def build():
        import timm
        torch.manual_seed(0)
        defaults = {'img_size': 16} if 'depths' in options else TIMM_VIT
        model = timm.create_model(name, pretrained=False, num_classes=5, **{**defaults, **options})
        if fused_attn is not None:
            for child in model.modules():
                if hasattr(child, 'fused_attn'):
                    child.fused_attn = fused_attn
        head = next(key for key, param in model.named_parameters() if param is model.get_classifier().weight)
        return perturbed(_randomize(model.double().eval(), (head,)))
    return build


def torchvision_swin():
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2], num_classes=5,
    )
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator(3)))
    return perturbed(model.double().eval())


#: Swin options: an 8 x 8 patch grid, windows of 2 x 2, so that both stages shift their windows (Swin does not shift a
#: stage whose grid fits in one window)
SWIN = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=2)

ENTRIES = [
    Entry('hf_dinov2', hf_vision('Dinov2Config', 'Dinov2ForImageClassification', **HF_VIT), wrap_hf_image),
    # the register tokens are initialised to 0 (then they would absorb nothing): drawn at random, they absorb the
    # relevance of their value path, like the class token
    Entry('hf_dinov2_registers', hf_vision(
        'Dinov2WithRegistersConfig', 'Dinov2WithRegistersForImageClassification', num_register_tokens=2,
        randomize=('classifier', 'register_tokens'), **HF_VIT,
    ), wrap_hf_image, absorbing=('register_tokens',)),
    Entry('hf_beit', hf_vision(
        'BeitConfig', 'BeitForImageClassification', use_relative_position_bias=True, use_mean_pooling=True, **HF_VIT,
    ), wrap_hf_image),
    Entry('hf_swin', hf_vision(
        'SwinConfig', 'SwinForImageClassification', **{**SWIN, 'depths': [2, 2], 'num_heads': [2, 2]}), wrap_hf_image),
    Entry('timm_vit_attention_pool', timm_vision('vit_small_patch16_224', global_pool='map'), wrap_image),
    Entry('timm_dinov2_registers', timm_vision('vit_small_patch14_reg4_dinov2'), wrap_image),
    Entry('timm_eva02', timm_vision('eva02_tiny_patch14_224'), wrap_image),
    Entry('timm_siglip', timm_vision('vit_base_patch16_siglip_224'), wrap_image),
    Entry('timm_beit', timm_vision('beit_base_patch16_224'), wrap_image),
    # timm's Swin runs eager attention with an nn.Softmax module by default; fused, it passes relative position bias
    # and shift mask to scaled_dot_product_attention as one additive mask
    Entry('timm_swin', timm_vision('swin_tiny_patch4_window7_224', **SWIN), wrap_image),
    Entry('timm_swin_fused', timm_vision('swin_tiny_patch4_window7_224', fused_attn=True, **SWIN), wrap_image),
    Entry('torchvision_swin', torchvision_swin, wrap_image),
]
