'''Type groups of modules, in the style of :py:mod:`zennit.types`.'''
import torch
from zennit.types import SubclassMeta, Linear, Convolution  # noqa: F401 (re-exported for layer maps)

from . import layers


class NameMatch(SubclassMeta):
    '''Meta class matching classes by name suffix as well, for model families whose classes cannot be imported
    without optional dependencies (e.g. ``LlamaRMSNorm`` from transformers).
    '''
    def __subclasscheck__(cls, sub):
        suffixes = cls.__dict__.get('__name_suffix__', ())
        excluded = cls.__dict__.get('__name_exclude__', ())
        name = sub.__name__
        if name.endswith(tuple(suffixes)) and not name.endswith(tuple(excluded)):
            return True
        return super().__subclasscheck__(sub)


class LinearLike(metaclass=NameMatch):
    '''Zennit's :py:class:`zennit.types.Linear` (dense layers and convolutions) plus Hugging Face's ``Conv1D`` (GPT-2's
    transposed-weight linear layer, matched by name so that transformers stays optional).
    '''
    __subclass__ = (Linear,)
    __name_suffix__ = ('Conv1D',)


class LayerNorm(metaclass=NameMatch):
    '''Layer normalisations ``gamma * (x - mean) / std + beta`` (LayerNormRule).'''
    __subclass__ = (torch.nn.LayerNorm,)
    __name_suffix__ = ('LayerNorm',)
    __name_exclude__ = ('RMSLayerNorm',)


class RMSNorm(metaclass=NameMatch):
    '''RMS normalisations ``w * x / rms(x)`` (RMSNormRule), including Hugging Face's ``*RMSNorm`` classes.'''
    __subclass__ = (torch.nn.RMSNorm,)
    __name_suffix__ = ('RMSNorm',)


class Activation(metaclass=NameMatch):
    '''Element-wise activations, which get the identity rule (AttnLRP Eq. 9), including Hugging Face's classes.'''
    __subclass__ = (
        torch.nn.ReLU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Softplus,
        torch.nn.ELU, torch.nn.LeakyReLU, torch.nn.Mish, torch.nn.Hardswish, torch.nn.Hardtanh,
    )
    # transformers.activations: GELUActivation, NewGELUActivation, QuickGELUActivation, GELUTanh, ...
    __name_suffix__ = ('Activation', 'GELUTanh')


class Softmax(metaclass=SubclassMeta):
    '''Softmax modules (SoftmaxRule).'''
    __subclass__ = (torch.nn.Softmax, layers.Softmax)


class Normalization(metaclass=NameMatch):
    '''Every module that looks like a normalisation; those without a rule are reported as unsupported.'''
    __subclass__ = (
        torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.modules.instancenorm._InstanceNorm,
        torch.nn.LocalResponseNorm, torch.nn.LayerNorm, torch.nn.RMSNorm,
    )
    __name_suffix__ = ('Norm', 'Norm1d', 'Norm2d', 'Norm3d', 'Normalization')


class Attention(metaclass=NameMatch):
    '''Every module that looks like attention; Linear layers inside it are attention projections (the γ presets keep ε
    on them).'''
    __subclass__ = (torch.nn.MultiheadAttention,)
    __name_suffix__ = ('Attention', 'SelfAttention', 'Attention2', 'SdpaAttention', 'FlashAttention2')
