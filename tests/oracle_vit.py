'''Independent oracle for torchvision ViTs (ATTNLRP.md §3): a hand-written forward of the same model with modified
gradients, whose gradient × input equals the AttnLRP (or CP-LRP) relevance as ε -> 0.

It reads the model's weights but shares no code with zennit_attn's rules, layers or canonizers:
(i) element-wise nonlinearities pass the gradient scaled by f(x)/x; (ii) the gradient into each operand of a product of
two input-dependent tensors is halved (CP-LRP instead detaches the attention probabilities); (iii) the LayerNorm
standard deviation is detached; (iv) everything else is the plain gradient.
'''
import torch
import torch.nn.functional as F


def identity_grad(x, fn):
    '''Value ``fn(x)``, gradient ``fn(x) / x`` (the identity rule).'''
    return x * (fn(x) / x).detach()


def half_grad(x):
    '''Value ``x``, half its gradient (uniform rule for an operand of a bilinear product).'''
    return 0.5 * x + 0.5 * x.detach()


def layer_norm_detached(x, norm):
    '''LayerNorm with the standard deviation held constant.'''
    centered = x - x.mean(-1, keepdim=True)
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
    return centered / std * norm.weight + norm.bias


def attention(x, mha, cp_lrp):
    '''Self-attention of ``nn.MultiheadAttention`` (batch first, packed in-projection) with modified gradients.'''
    batch, length, width = x.shape
    heads = mha.num_heads
    head_dim = width // heads
    weight_q, weight_k, weight_v = mha.in_proj_weight.chunk(3)
    bias_q, bias_k, bias_v = mha.in_proj_bias.chunk(3)

    def project(weight, bias):
        return F.linear(x, weight, bias).reshape(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = project(weight_q, bias_q), project(weight_k, bias_k), project(weight_v, bias_v)
    if cp_lrp:
        probabilities = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, -1).detach()
        context = probabilities @ v
    else:
        scores = (half_grad(q) @ half_grad(k).transpose(-1, -2)) / head_dim ** 0.5
        probabilities = torch.softmax(scores, -1)
        context = half_grad(probabilities) @ half_grad(v)
    context = context.transpose(1, 2).reshape(batch, length, width)
    return F.linear(context, mha.out_proj.weight, mha.out_proj.bias)


def vit_logits(model, x, cp_lrp=False):
    '''Forward of a torchvision ``VisionTransformer`` with the modified gradients of the oracle.'''
    batch = x.shape[0]
    conv = model.conv_proj
    h = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride)
    h = h.reshape(batch, model.hidden_dim, -1).permute(0, 2, 1)
    h = torch.cat([model.class_token.expand(batch, -1, -1), h], dim=1)
    h = h + model.encoder.pos_embedding
    for block in model.encoder.layers:
        y = attention(layer_norm_detached(h, block.ln_1), block.self_attention, cp_lrp)
        h = h + y
        fc1, fc2 = block.mlp[0], block.mlp[3]
        z = F.linear(layer_norm_detached(h, block.ln_2), fc1.weight, fc1.bias)
        z = identity_grad(z, F.gelu)
        h = h + F.linear(z, fc2.weight, fc2.bias)
    h = layer_norm_detached(h, model.encoder.ln)[:, 0]
    if hasattr(model.heads, 'pre_logits'):
        h = identity_grad(model.heads.pre_logits(h), torch.tanh)
    return F.linear(h, model.heads.head.weight, model.heads.head.bias)


def vit_oracle(model, x, target, cp_lrp=False):
    '''Relevance ``x * g``, ``g`` the modified gradient of the target logit (equals LRP seeded with
    ``logit * onehot(target)``).'''
    x = x.detach().clone().requires_grad_(True)
    logits = vit_logits(model, x, cp_lrp=cp_lrp)
    seed = torch.zeros_like(logits)
    seed[torch.arange(len(target)), target] = 1.
    (grad,) = torch.autograd.grad(logits, x, grad_outputs=seed)
    return x.detach() * grad, logits.detach()
