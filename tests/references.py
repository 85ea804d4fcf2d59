'''Float64 reference twins of the rules, written straight from the formulas of ATTNLRP.md §2 (einsum and explicit
Jacobians, sharing no code with the rules), and the helpers the rule tests share.'''
import math

import torch


def sign(z):
    '''Sign of ``z`` with sign(0) = +1.'''
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def clip_stabilizer(z):
    '''Callable stabilizer: clip ``|z|`` from below at 0.1, keeping the sign (sign(0) = +1).'''
    return sign(z) * z.abs().clamp(min=0.1)


def stabilize(z, epsilon):
    '''Reference stabilizer: ``z + epsilon * sign(z)`` for a float, the callable itself otherwise.'''
    if callable(epsilon):
        return epsilon(z)
    return z + epsilon * sign(z)


EPSILONS = [1e-9, 1e-2, 0.5, clip_stabilizer]
EPSILON_IDS = ['1e-9', '1e-2', '0.5', 'clip']


def reduce_to(tensor, shape):
    '''Undo broadcasting: sum ``tensor`` over its extra leading dims and the dims in which ``shape`` has size 1.'''
    shape = tuple(shape)
    while tensor.ndim > len(shape):
        tensor = tensor.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and tensor.shape[dim] != 1:
            tensor = tensor.sum(dim, keepdim=True)
    assert tensor.shape == shape
    return tensor


def assert_close(actual, expected, rtol=1e-7):
    '''Assert ``actual`` equals ``expected`` (compared in float64) up to ``rtol`` times the largest ``|expected|``.'''
    assert actual is not None, 'expected a relevance, got None'
    assert actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp(min=1e-12)
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f'max error {error:.3e} > {rtol:.1e} * {scale:.3e}'


def attribute(module, rule, args, relevance):
    '''Run ``module(*args)`` with ``rule`` attached and return the output and the relevance of every argument (the
    gradient autograd returns for it; None for arguments that do not require a gradient or receive none).
    '''
    handles = rule.register(module)
    try:
        output = module(*args)
        wrt = [arg for arg in args if arg.requires_grad]
        grads = iter(torch.autograd.grad(output, wrt, grad_outputs=relevance, allow_unused=True))
    finally:
        handles.remove()
    return output, tuple(next(grads) if arg.requires_grad else None for arg in args)


def randn(generator, *shape, dtype=torch.float64):
    '''Standard normal tensor of ``shape`` (no gradient).'''
    return torch.randn(*shape, generator=generator, dtype=dtype)


def leaf(generator, *shape, dtype=torch.float64):
    '''Standard normal leaf tensor of ``shape`` which requires a gradient.'''
    return randn(generator, *shape, dtype=dtype).requires_grad_()


def ref_matmul(a, b, relevance, epsilon, scale=1., shares=(.5, .5)):
    '''Uniform-ε matmul: ``r = R / stab(c A B)``, ``R_A = s_A A ⊙ (c r Bᵀ)``, ``R_B = s_B B ⊙ (c Aᵀ r)``.'''
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a_full, b_full = a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:])
    output = scale * torch.einsum('...ij,...jk->...ik', a_full, b_full)
    ratio = relevance / stabilize(output, epsilon)
    rel_a = shares[0] * scale * torch.einsum('...ij,...ik,...jk->...ij', a_full, ratio, b_full)
    rel_b = shares[1] * scale * torch.einsum('...ij,...ik,...jk->...jk', a_full, ratio, b_full)
    return reduce_to(rel_a, a.shape), reduce_to(rel_b, b.shape)


def ref_product(a, b, relevance, shares=(.5, .5)):
    '''Uniform product rule: ``R_a = s_a R``, ``R_b = s_b R``, summed over broadcast dims.'''
    return reduce_to(shares[0] * relevance, a.shape), reduce_to(shares[1] * relevance, b.shape)


def ref_sum(a, b, relevance, epsilon):
    '''ε-sum rule: ``R_a = a ⊙ R / stab(a + b)``, ``R_b = b ⊙ R / stab(a + b)``, summed over broadcast dims.'''
    output = a + b
    ratio = relevance / stabilize(output, epsilon)
    return reduce_to(a.expand_as(output) * ratio, a.shape), reduce_to(b.expand_as(output) * ratio, b.shape)


def softmax_ref(x, dim, mask=None):
    '''Softmax from its definition, with masked entries set to probability 0.'''
    if mask is None:
        mask = torch.zeros_like(x, dtype=torch.bool)
    shifted = torch.where(mask, torch.zeros_like(x), x - torch.where(mask, -math.inf, x).amax(dim, keepdim=True))
    exp = torch.where(mask, torch.zeros_like(x), shifted.exp())
    return exp / exp.sum(dim, keepdim=True)


def ref_softmax(x, relevance, dim, mask=None):
    '''Bias-absorbing softmax rule: ``R_x = x ⊙ (R − s ⊙ ΣR)``; masked positions get 0.'''
    if mask is None:
        mask = torch.zeros_like(x, dtype=torch.bool)
    prob = softmax_ref(x, dim, mask)
    total = relevance.sum(dim, keepdim=True)
    return torch.where(mask, torch.zeros_like(x), torch.where(mask, 0., x) * (relevance - prob * total))


def ref_mean(x, relevance, dim, keepdim, epsilon):
    '''ε mean rule: ``R_i = x_i R / stab(Σ_k x_k)``.'''
    dims = sorted(d % x.ndim for d in ((dim,) if isinstance(dim, int) else dim))
    total = x.sum(dims, keepdim=True)
    if not keepdim:
        for d in dims:
            relevance = relevance.unsqueeze(d)
    return x * relevance / stabilize(total, epsilon)


def ref_layernorm(x, relevance, weight, bias, normalized_ndim, eps, epsilon):
    '''LayerNorm rule: σ constant, ε-rule on the linear map ``W_ji = γ_j (δ_ji − 1/n) / σ``; returns ``(R_x, y)``.'''
    shape = x.shape
    size = math.prod(shape[len(shape) - normalized_ndim:])
    x_flat = x.reshape(*shape[:len(shape) - normalized_ndim], size)
    rel_flat = relevance.reshape(x_flat.shape)
    gamma = torch.ones(size, dtype=x.dtype) if weight is None else weight.detach().reshape(size).to(x.dtype)
    beta = torch.zeros(size, dtype=x.dtype) if bias is None else bias.detach().reshape(size).to(x.dtype)
    mean = x_flat.sum(-1, keepdim=True) / size
    sigma = (((x_flat - mean) ** 2).sum(-1, keepdim=True) / size + eps).sqrt()
    linear = gamma[:, None] * (torch.eye(size, dtype=x.dtype) - 1 / size) / sigma[..., None]
    output = torch.einsum('...ji,...i->...j', linear, x_flat) + beta
    ratio = rel_flat / stabilize(output, epsilon)
    rel = x_flat * torch.einsum('...ji,...j->...i', linear, ratio)
    return rel.reshape(shape), output.reshape(shape)


def rope_jacobian(cos, sin):
    '''Jacobian ``J[..., e, d] = ∂y_e / ∂x_d`` of ``y = x ⊙ cos + rotate_half(x) ⊙ sin``.'''
    size = cos.shape[-1]
    half = size // 2
    jacobian = torch.zeros(*cos.shape, size, dtype=cos.dtype)
    for e in range(size):
        jacobian[..., e, e] = cos[..., e]
        if e < half:
            jacobian[..., e, e + half] = -sin[..., e]
        else:
            jacobian[..., e, e - half] = sin[..., e]
    return jacobian


def ref_rope(x, cos, sin, relevance, epsilon):
    '''RoPE ε-rule ``R_x = x ⊙ Jᵀ (R / stab(J x))`` on the rotary channels, identity on the passed channels.'''
    rotary_dim = cos.shape[-1]
    jacobian = rope_jacobian(cos, sin)
    x_rot = x[..., :rotary_dim]
    output = torch.einsum('...ed,...d->...e', jacobian, x_rot)
    ratio = relevance[..., :rotary_dim] / stabilize(output, epsilon)
    rel = x_rot * torch.einsum('...ed,...e->...d', jacobian, ratio)
    return torch.cat((rel, relevance[..., rotary_dim:]), dim=-1)


def random_cos_sin(generator, *shape, dtype=torch.float64):
    '''Cosine and sine of random angles (Hugging Face layout: both halves share the angles).'''
    angles = 3 * randn(generator, *shape[:-1], shape[-1] // 2, dtype=dtype)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------------------------------- identity
