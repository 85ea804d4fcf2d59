'''Toy models with pluggable bodies, shared by the lint, conservation and latent tests.'''
import torch
import torch.nn.functional as F


def hook_count(model):
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
        for module in model.modules()
    )


class Residual(torch.nn.Module):
    '''Unhooked residual sum.'''
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(x)


class HalfScale(torch.nn.Module):
    '''Unhooked constant scale.'''
    def forward(self, x):
        return x * 0.5


class Standardize(torch.nn.Module):
    '''A LayerNorm that no type group matches (functional, class name without "Norm").'''
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class FunctionalGELU(torch.nn.Module):
    '''A functional GELU inside a module forward.'''
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return F.gelu(self.fc(x))


class TokenMixer(torch.nn.Module):
    '''Hand-written attention: ``softmax(q @ k^T * scale) @ v`` inline.'''
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.scale = dim ** -0.5

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return torch.softmax(scores, -1) @ self.v(x)


class Toy(torch.nn.Module):
    '''``head(body(embed(x))[:, 0])`` with a pluggable body.'''
    def __init__(self, body, dim=8, classes=3):
        super().__init__()
        self.embed = torch.nn.Linear(dim, dim)
        self.body = body
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.body(self.embed(x))[:, 0])


def toy_input(dim=8):
    return torch.randn(2, 4, dim, generator=torch.Generator().manual_seed(0))
