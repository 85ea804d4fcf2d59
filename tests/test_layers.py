'''Tests that every layer of zennit_attn.layers computes exactly the plain torch expression it replaces.'''
import math

import pytest
import torch

from zennit_attn import layers


@pytest.fixture
def generator():
    '''Seeded random number generator.'''
    return torch.Generator().manual_seed(0xa77e)


def randn(generator, *shape, dtype=torch.float32):
    '''Standard normal tensor of ``shape``.'''
    return torch.randn(*shape, generator=generator, dtype=dtype)


def hf_rotate_half(x):
    '''Rotate half the hidden dims of the input, written as in Hugging Face transformers (Llama).'''
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary(x, cos, sin):
    '''Hugging Face style rotary embedding, with partial rotary (GPT-NeoX/Phi style) if ``cos`` is narrower.'''
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_embed = (x_rot * cos) + (hf_rotate_half(x_rot) * sin)
    return torch.cat((x_embed, x_pass), dim=-1)


def hf_cos_sin(position_ids, dim, base=10000.):
    '''Hugging Face style ``cos``/``sin`` of shape (batch, 1, seq, dim) for ``position_ids`` of shape (batch, seq).'''
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


SCALE = 1 / math.sqrt(7)


@pytest.mark.parametrize('shape_a, shape_b', [
    ((5, 7), (7, 4)),
    ((2, 3, 5, 7), (2, 3, 7, 4)),
    ((1, 1, 5, 7), (2, 3, 7, 4)),
    ((2, 3, 5, 7), (7, 4)),
    ((2, 1, 5, 7), (1, 3, 7, 4)),
])
def test_matmul_unscaled_equals_matmul(generator, shape_a, shape_b):
    '''MatMul without scale computes exactly ``a @ b``, batched and broadcast, in both scale orders.'''
    a, b = randn(generator, *shape_a), randn(generator, *shape_b)
    for scale_output in (False, True):
        assert torch.equal(layers.MatMul(scale_output=scale_output)(a, b), a @ b)


@pytest.mark.parametrize('shape_a, shape_b', [
    ((2, 3, 5, 7), (2, 3, 7, 4)),
    ((1, 1, 5, 7), (2, 3, 7, 4)),
    ((2, 3, 5, 7), (7, 4)),
])
def test_matmul_scale_input_equals_scaled_a_times_b(generator, shape_a, shape_b):
    '''MatMul with ``scale_output=False`` computes exactly ``(scale * a) @ b``.'''
    a, b = randn(generator, *shape_a), randn(generator, *shape_b)
    assert torch.equal(layers.MatMul(SCALE)(a, b), (SCALE * a) @ b)


@pytest.mark.parametrize('shape_a, shape_b', [
    ((2, 3, 5, 7), (2, 3, 7, 4)),
    ((1, 1, 5, 7), (2, 3, 7, 4)),
    ((2, 3, 5, 7), (7, 4)),
])
def test_matmul_scale_output_equals_product_times_scale(generator, shape_a, shape_b):
    '''MatMul with ``scale_output=True`` computes exactly ``(a @ b) * scale``.'''
    a, b = randn(generator, *shape_a), randn(generator, *shape_b)
    assert torch.equal(layers.MatMul(SCALE, scale_output=True)(a, b), (a @ b) * SCALE)


def test_matmul_scale_orders_are_distinguishable(generator):
    '''The data of the scale tests tells the two scale orders apart, so those tests can detect a swapped order.'''
    a, b = randn(generator, 2, 3, 5, 7), randn(generator, 2, 3, 7, 4)
    assert not torch.equal((SCALE * a) @ b, (a @ b) * SCALE)
    assert not torch.equal(layers.MatMul(SCALE)(a, b), layers.MatMul(SCALE, scale_output=True)(a, b))


def test_matmul_extra_repr_names_scale():
    '''MatMul's repr shows its scale and order.'''
    assert 'scale=0.5, scale_output=True' in repr(layers.MatMul(0.5, scale_output=True))


@pytest.mark.parametrize('shape_a, shape_b', [
    ((2, 3, 5, 7), (2, 3, 5, 7)),
    ((2, 3, 5, 7), (1, 1, 5, 7)),
    ((2, 3, 5, 7), (7,)),
    ((1, 5, 7), (2, 1, 1, 7)),
])
def test_sum_equals_plus(generator, shape_a, shape_b):
    '''Sum computes exactly ``a + b`` with broadcasting.'''
    a, b = randn(generator, *shape_a), randn(generator, *shape_b)
    output = layers.Sum()(a, b)
    assert output.shape == torch.broadcast_shapes(shape_a, shape_b)
    assert torch.equal(output, a + b)


@pytest.mark.parametrize('shape_a, shape_b', [
    ((2, 3, 5, 7), (2, 3, 5, 7)),
    ((2, 3, 5, 7), (1, 1, 5, 7)),
    ((2, 3, 5, 7), (7,)),
    ((1, 5, 7), (2, 1, 1, 7)),
])
def test_product_equals_times(generator, shape_a, shape_b):
    '''Product computes exactly ``a * b`` with broadcasting.'''
    a, b = randn(generator, *shape_a), randn(generator, *shape_b)
    output = layers.Product()(a, b)
    assert output.shape == torch.broadcast_shapes(shape_a, shape_b)
    assert torch.equal(output, a * b)


@pytest.mark.parametrize('dim', [0, 1, 2, -1])
@pytest.mark.parametrize('dtype', [None, torch.float32, torch.float64])
def test_softmax_equals_torch_softmax(generator, dim, dtype):
    '''Softmax computes exactly ``torch.softmax(x, dim, dtype=dtype)``, including the output dtype.'''
    x = randn(generator, 2, 3, 5, 7) * 4
    output = layers.Softmax(dim=dim, dtype=dtype)(x)
    expected = torch.softmax(x, dim, dtype=dtype)
    assert output.dtype == expected.dtype
    assert torch.equal(output, expected)
    assert torch.allclose(output.sum(dim).double(), torch.ones((), dtype=torch.float64), atol=1e-6)


def test_softmax_default_dim_is_last(generator):
    '''Softmax defaults to the last dimension.'''
    x = randn(generator, 2, 3, 5, 7)
    assert torch.equal(layers.Softmax()(x), torch.softmax(x, -1))


def test_softmax_bfloat16_with_dtype_float32(generator):
    '''Softmax with ``dtype=float32`` on bfloat16 input upcasts exactly as torch does.'''
    x = randn(generator, 2, 3, 5, 7).to(torch.bfloat16)
    output = layers.Softmax(dim=-1, dtype=torch.float32)(x)
    assert output.dtype == torch.float32
    assert torch.equal(output, torch.softmax(x, -1, dtype=torch.float32))


@pytest.mark.parametrize('factor', [3., SCALE, 0.125, 7])
def test_scale_multiply_equals_times_factor(generator, factor):
    '''Scale computes exactly ``x * factor``.'''
    x = randn(generator, 2, 3, 5, 7)
    assert torch.equal(layers.Scale(factor)(x), x * factor)


@pytest.mark.parametrize('factor', [3., math.sqrt(7), 0.125, 7])
def test_scale_divide_equals_divided_by_factor(generator, factor):
    '''Scale with ``divide=True`` computes exactly ``x / factor``.'''
    x = randn(generator, 2, 3, 5, 7)
    assert torch.equal(layers.Scale(factor, divide=True)(x), x / factor)


def test_scale_divide_differs_from_multiply_by_inverse(generator):
    '''The data of the divide test tells ``x / c`` and ``x * (1 / c)`` apart, so a mixed-up branch would be caught.'''
    x = randn(generator, 2, 3, 5, 7)
    factor = 3.
    assert not torch.equal(x / factor, x * (1 / factor))
    assert not torch.equal(layers.Scale(factor, divide=True)(x), layers.Scale(1 / factor)(x))


@pytest.mark.parametrize('dim', [0, 1, -1, (1, 2), (-2, -1)])
@pytest.mark.parametrize('keepdim', [False, True])
def test_mean_equals_torch_mean(generator, dim, keepdim):
    '''Mean computes exactly ``x.mean(dim, keepdim=keepdim)``.'''
    x = randn(generator, 2, 3, 5, 7)
    output = layers.Mean(dim, keepdim=keepdim)(x)
    expected = x.mean(dim, keepdim=keepdim)
    assert output.shape == expected.shape
    assert torch.equal(output, expected)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('cos_batch', [1, 2])
def test_rotary_embedding_full_equals_hf_formula(generator, dtype, cos_batch):
    '''RotaryEmbedding with full rotary equals the Hugging Face ``q * cos + rotate_half(q) * sin`` exactly.'''
    head_dim = 8
    x = randn(generator, 2, 3, 5, head_dim).to(dtype)
    position_ids = torch.arange(5)[None].repeat(cos_batch, 1) + torch.arange(cos_batch)[:, None] * 3
    cos, sin = (tensor.to(dtype) for tensor in hf_cos_sin(position_ids, head_dim))
    expected = (x * cos) + (hf_rotate_half(x) * sin)
    output = layers.RotaryEmbedding()(x, cos, sin)
    assert output.dtype == dtype
    assert torch.equal(output, expected)


@pytest.mark.parametrize('head_dim, rotary_dim', [(10, 4), (8, 4), (6, 2)])
def test_rotary_embedding_partial_equals_hf_formula(generator, head_dim, rotary_dim):
    '''RotaryEmbedding with partial rotary rotates the leading channels and passes the rest, exactly as HF does.'''
    x = randn(generator, 2, 3, 5, head_dim)
    cos, sin = hf_cos_sin(torch.arange(5)[None] + 2, rotary_dim)
    output = layers.RotaryEmbedding()(x, cos, sin)
    assert torch.equal(output, hf_apply_rotary(x, cos, sin))
    assert torch.equal(output[..., rotary_dim:], x[..., rotary_dim:])
    assert not torch.equal(output[..., :rotary_dim], x[..., :rotary_dim])


def test_rotary_embedding_uses_half_split_not_interleaved(generator):
    '''RotaryEmbedding pairs channel ``i`` with ``i + d/2`` (rotate_half), not with ``i + 1`` (interleaved).'''
    x = randn(generator, 1, 1, 3, 4)
    angle = torch.tensor([0.3, 0.7])
    cos = torch.cat((angle, angle)).cos().expand(1, 1, 3, 4)
    sin = torch.cat((angle, angle)).sin().expand(1, 1, 3, 4)
    output = layers.RotaryEmbedding()(x, cos, sin)
    x0, x1, x2, x3 = x.unbind(-1)
    expected = torch.stack((
        x0 * cos[..., 0] - x2 * sin[..., 0],
        x1 * cos[..., 1] - x3 * sin[..., 1],
        x2 * cos[..., 2] + x0 * sin[..., 2],
        x3 * cos[..., 3] + x1 * sin[..., 3],
    ), dim=-1)
    assert torch.allclose(output, expected, atol=1e-6)
