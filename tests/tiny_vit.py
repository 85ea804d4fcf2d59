'''Tiny torchvision ViTs and the attribution call shared by the vision test modules.'''
import torch
from torchvision.models import VisionTransformer
from zennit.attribution import Gradient


SMALL_CONFIGS = {
    'tiny': dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7),
    'uneven': dict(image_size=30, patch_size=6, num_layers=3, num_heads=3, hidden_dim=24, mlp_dim=40, num_classes=5),
    'representation': dict(
        image_size=24, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4,
        representation_size=12,
    ),
}


def randomize_head(model, seed=0):
    '''torchvision initialises the head to zeros; give it random weights so relevance is not trivially zero.'''
    generator = torch.Generator().manual_seed(seed)
    for module in model.heads.modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / module.in_features ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def make_vit(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return randomize_head(VisionTransformer(**SMALL_CONFIGS[config]), seed).to(dtype).eval()


def image(model, batch=2, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, model.image_size, model.image_size, generator=generator).to(dtype)


def attribute(model, composite, x, target):
    '''Zennit's Gradient attributor seeded with ``logit * onehot(target)``.'''
    with Gradient(model, composite) as attributor:
        onehot = torch.nn.functional.one_hot(target, model.heads.head.out_features).to(x.dtype)
        output, relevance = attributor(x, lambda y: y * onehot)
    return output, relevance
