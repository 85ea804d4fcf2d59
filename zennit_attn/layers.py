'''Op modules: the carriers of the operations that a model's forward writes inline, and hookable modules for models
written by hand.

Zennit attaches rules to modules. The interception engine (:py:mod:`zennit_attn.engine`) describes every operation it
attributes by one of these modules (``a + b`` by :py:class:`Sum`, fused attention by :py:class:`AttentionCore`, ...), so
that a composite's layer map chooses the rule of an inline operation exactly as it does for a module. They can also be
used directly as modules; then one instance per call site (a module called twice in one forward keeps only the inputs
of its last call).

Every forward computes exactly the plain torch expression given in its docstring; :py:class:`AttentionCore` uses
PyTorch's fused attention where it can (equal up to rounding).
'''
import torch
import torch.nn.functional as F


def scaled_matmul(a, b, scale=1.0, scale_output=False):
    '''``scale * a @ b``, or ``(a @ b) * scale`` with ``scale_output`` (the two round differently); no multiplication
    for a scale of 1.
    '''
    if scale == 1.0:
        return a @ b
    if scale_output:
        return (a @ b) * scale
    return scale * a @ b


class MatMul(torch.nn.Module):
    '''Scaled matrix product ``scale * a @ b`` (or ``(a @ b) * scale`` with ``scale_output=True``).

    Parameters
    ----------
    scale: float, optional
        Constant factor, e.g. ``1 / sqrt(head_dim)`` for attention scores.
    scale_output: bool, optional
        If ``True``, compute ``(a @ b) * scale`` instead of ``(scale * a) @ b``, for code written in that order (the
        two differ in floating point rounding).
    '''
    def __init__(self, scale=1.0, scale_output=False):
        super().__init__()
        self.scale = float(scale)
        self.scale_output = scale_output

    def forward(self, a, b):
        '''Compute the scaled matrix product of ``a`` and ``b`` with :py:func:`torch.matmul` broadcasting.'''
        return scaled_matmul(a, b, self.scale, self.scale_output)

    def extra_repr(self):
        return f'scale={self.scale}, scale_output={self.scale_output}'


class Sum(torch.nn.Module):
    '''Element-wise sum ``a + b`` with broadcasting (residual connections, position embeddings, additive masks).'''
    def forward(self, a, b):
        '''Compute ``a + b``.'''
        return a + b


class Product(torch.nn.Module):
    '''Element-wise product ``a * b`` with broadcasting (gated MLPs).'''
    def forward(self, a, b):
        '''Compute ``a * b``.'''
        return a * b


class Softmax(torch.nn.Module):
    '''Softmax along ``dim``, ``torch.softmax(x, dim, dtype=dtype)``.

    Masked entries (``-inf`` or very negative values such as ``torch.finfo(dtype).min``) are handled by the softmax
    rule, which treats their input as 0.

    Parameters
    ----------
    dim: int, optional
        Dimension along which the softmax is computed.
    dtype: :py:obj:`torch.dtype`, optional
        Dtype in which the softmax is computed, as in :py:func:`torch.softmax`.
    '''
    def __init__(self, dim=-1, dtype=None):
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def forward(self, x):
        '''Compute the softmax of ``x``.'''
        return torch.softmax(x, self.dim, dtype=self.dtype)

    def extra_repr(self):
        return f'dim={self.dim}, dtype={self.dtype}'


class Scale(torch.nn.Module):
    '''Multiplication by a constant, ``x * factor`` (or ``x / factor`` with ``divide=True``).

    Parameters
    ----------
    factor: float
        The constant.
    divide: bool, optional
        Divide by ``factor`` instead of multiplying, for code written as a division (rounding differs).
    '''
    def __init__(self, factor, divide=False):
        super().__init__()
        self.factor = factor
        self.divide = divide

    def forward(self, x):
        '''Compute ``x * factor`` or ``x / factor``.'''
        if self.divide:
            return x / self.factor
        return x * self.factor

    def extra_repr(self):
        return f'factor={self.factor}, divide={self.divide}'


class Mean(torch.nn.Module):
    '''Mean over ``dim``, ``x.mean(dim, keepdim=keepdim)`` (mean pooling).

    Parameters
    ----------
    dim: int or tuple[int]
        Dimension(s) to average over.
    keepdim: bool, optional
        Whether to keep the reduced dimension(s).
    '''
    def __init__(self, dim, keepdim=False):
        super().__init__()
        self.dim = dim
        self.keepdim = keepdim

    def forward(self, x):
        '''Compute the mean of ``x`` over ``dim``.'''
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self):
        return f'dim={self.dim}, keepdim={self.keepdim}'


class AveragePool(torch.nn.Module):
    '''Average pooling ``function(x, *args, **kwargs)`` with one of ``F.avg_pool1d/2d/3d`` or
    ``F.adaptive_avg_pool1d/2d/3d`` and its arguments (kernel size, stride, padding, ... or output size): a linear map
    without bias, each output the mean of a window of the input (windows may overlap; padding adds zeros).

    Parameters
    ----------
    function: callable
        The pooling function.
    *args, **kwargs:
        Its arguments after the input.
    '''
    def __init__(self, function, *args, **kwargs):
        super().__init__()
        self.function, self.args, self.kwargs = function, args, kwargs

    def forward(self, x):
        '''Compute ``function(x, *args, **kwargs)``.'''
        return self.function(x, *self.args, **self.kwargs)

    def extra_repr(self):
        return f'function={getattr(self.function, "__name__", self.function)}, args={self.args}, kwargs={self.kwargs}'


class AttentionScores(MatMul):
    '''Attention scores ``scale * q @ k^T`` (a :py:class:`MatMul` that CP-LRP treats as constant).'''


class AttentionContext(MatMul):
    '''Attention output ``probabilities @ v`` (a :py:class:`MatMul`; CP-LRP passes all relevance to ``v``).'''


class AttentionSoftmax(Softmax):
    '''Softmax of the attention scores (CP-LRP treats it as constant).'''


class AttentionMask(Sum):
    '''Additive attention mask ``scores + mask`` (a :py:class:`Sum`; CP-LRP treats the scores as constant).'''


class AttentionCore(torch.nn.Module):
    '''The core of scaled dot-product attention in one module, ``softmax(scale * q @ k^T + mask) @ v``: the computation
    of the unfolded chain :py:class:`AttentionScores`, :py:class:`AttentionMask`, :py:class:`AttentionSoftmax`,
    :py:class:`AttentionContext`, with :py:func:`torch.nn.functional.scaled_dot_product_attention` where that is as
    precise (see :py:meth:`fusable`; equal up to rounding) and with the chain's own expressions otherwise.

    Grouped-query attention: ``k`` and ``v`` may have fewer heads (dimension -3) than ``q``, a divisor of them; query
    head ``h`` then attends with key/value head ``h // groups`` (as ``repeat_kv`` in transformers), without ``k`` and
    ``v`` being repeated in memory.

    One module lets one rule see the whole attention: it keeps ``q``, ``k``, ``v`` and the output and recomputes the
    scores and probabilities block by block in the backward pass (like fused attention kernels do for the gradient),
    instead of keeping two ``T x T`` matrices per layer. Called as ``(q, k, v)`` or ``(q, k, v, mask)``, with ``k`` not
    transposed (as :py:func:`torch.nn.functional.scaled_dot_product_attention`) and an additive ``mask`` broadcastable
    to the scores.

    Parameters
    ----------
    scale: float, optional
        Factor of the scores, e.g. ``1 / sqrt(head_dim)``.
    scale_output: bool, optional
        Compute the scores as ``(q @ k^T) * scale`` instead of ``(scale * q) @ k^T`` (see :py:class:`MatMul`).
    softmax_dtype: :py:obj:`torch.dtype`, optional
        Dtype in which the softmax is computed (as :py:class:`Softmax`); the probabilities are cast to the dtype of
        ``v`` before the product.
    '''
    def __init__(self, scale=1.0, scale_output=False, softmax_dtype=None):
        super().__init__()
        self.scale = float(scale)
        self.scale_output = scale_output
        self.softmax_dtype = softmax_dtype

    def scores(self, query, key, mask=None):
        '''The (masked) attention scores ``scale * q @ k^T + mask``.'''
        scores = scaled_matmul(query, key.transpose(-1, -2), self.scale, self.scale_output)
        return scores if mask is None else scores + mask

    def probabilities(self, query, key, mask=None, dtype=None):
        '''The attention probabilities ``softmax(scale * q @ k^T + mask)``, in ``dtype`` (default: that of ``q``).'''
        probabilities = torch.softmax(self.scores(query, key, mask), -1, dtype=self.softmax_dtype)
        return probabilities.to(query.dtype if dtype is None else dtype)

    def fusable(self, query, key, value, mask=None):
        '''Whether PyTorch's fused attention computes this call as precisely as the unfolded chain: one dtype for all
        inputs, and a softmax in that dtype or, for half precision, in float32 (fused kernels accumulate in float32).
        A float64 model whose softmax runs in float32 (as transformers' eager LLaMA code does) keeps the chain.
        '''
        dtypes = {query.dtype, key.dtype, value.dtype} | (set() if mask is None else {mask.dtype})
        half = query.dtype in (torch.float16, torch.bfloat16)
        return len(dtypes) == 1 and (
            self.softmax_dtype in (None, query.dtype) or half and self.softmax_dtype == torch.float32
        )

    def forward(self, query, key, value, mask=None):
        '''Compute ``softmax(scale * q @ k^T + mask) @ v``: with PyTorch's fused
        :py:func:`~torch.nn.functional.scaled_dot_product_attention` where :py:meth:`fusable` (equal to the unfolded
        chain up to rounding, and no ``T x T`` matrix in memory), else with the unfolded chain's expressions.
        '''
        groups = query_groups(query, key)
        if self.fusable(query, key, value, mask):
            if groups > 1:
                return F.scaled_dot_product_attention(
                    query, key, value, attn_mask=mask, scale=self.scale, enable_gqa=True
                )
            batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
            query, key, value = (tensor.expand(batch + tensor.shape[-2:]) for tensor in (query, key, value))
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=self.scale)
        key, value = repeat_heads(key, groups), repeat_heads(value, groups)
        return self.probabilities(query, key, mask, dtype=value.dtype) @ value

    def extra_repr(self):
        return f'scale={self.scale}, scale_output={self.scale_output}, softmax_dtype={self.softmax_dtype}'


class IndexAdd(torch.nn.Module):
    '''Scatter-sum ``target.index_add(dim, index, source, alpha=alpha)``: rows of ``source`` added into ``target`` at
    ``index`` (several rows may go to one place; mixture-of-experts layers combine expert outputs this way).

    Parameters
    ----------
    dim: int
        The dimension along which ``index`` selects.
    index: :py:obj:`torch.Tensor`
        The destination of each row of ``source``.
    alpha: float, optional
        Factor of ``source``.
    '''
    def __init__(self, dim, index, alpha=1):
        super().__init__()
        self.dim = dim
        self.index = index
        self.alpha = alpha

    def forward(self, target, source):
        '''Compute ``target.index_add(dim, index, source, alpha=alpha)``.'''
        return target.index_add(self.dim, self.index, source, alpha=self.alpha)

    def extra_repr(self):
        return f'dim={self.dim}, alpha={self.alpha}'


class Renormalize(torch.nn.Module):
    '''Re-normalisation ``x / x.sum(dim, keepdim=True)`` (the top-k routing weights of a mixture-of-experts router,
    re-normalised to sum to 1).

    Parameters
    ----------
    dim: int or tuple[int]
        Dimension(s) of the sum.
    '''
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        '''Compute ``x / x.sum(dim, keepdim=True)``.'''
        return x / x.sum(self.dim, keepdim=True)

    def extra_repr(self):
        return f'dim={self.dim}'


class GatedProduct(Product):
    '''Product ``gate * up`` of a gated MLP; the gate is the first argument (CP-LRP treats it as constant).'''


class MaskedMean(torch.nn.Module):
    '''Mean over ``dim`` of the entries selected by ``mask``, ``(x * mask).sum(dim) / mask.sum(dim)`` (masked mean
    pooling over tokens; ``mask`` broadcastable to ``x``, e.g. ``attention_mask[..., None]``).

    Parameters
    ----------
    dim: int
        Dimension to average over.
    '''
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x, mask):
        '''Compute the masked mean of ``x`` over ``dim``.'''
        return (x * mask).sum(self.dim) / mask.sum(self.dim)

    def extra_repr(self):
        return f'dim={self.dim}'


def query_groups(query, key):
    '''The number of query heads per key/value head (dimension -3) of grouped-query attention, 1 otherwise (also when
    ``key`` has a single head, which broadcasts).
    '''
    if query.ndim < 3 or key.ndim < 3 or key.shape[-3] in (1, query.shape[-3]):
        return 1
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads % kv_heads:
        raise ValueError(
            f'grouped-query attention needs a number of query heads ({heads}) divisible by the number of key/value '
            f'heads ({kv_heads}).'
        )
    return heads // kv_heads


def repeat_heads(tensor, repeats):
    '''Repeat every head (dimension -3) ``repeats`` times in place order, as transformers' ``repeat_kv`` (an expand,
    whose gradient sums the copies, so relevance needs no rule).
    '''
    if repeats == 1:
        return tensor
    shape = tensor.shape
    expanded = tensor.unsqueeze(-3).expand(*shape[:-2], repeats, *shape[-2:])
    return expanded.reshape(*shape[:-3], shape[-3] * repeats, *shape[-2:])


def rotate_half(x):
    '''Rotate the two halves of the last dimension: ``(x1, x2) -> (-x2, x1)`` (Hugging Face convention).'''
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(torch.nn.Module):
    '''Apply rotary position embeddings, ``x * cos + rotate_half(x) * sin`` (Hugging Face ``rotate_half`` convention).

    If ``cos`` covers fewer channels than ``x`` (partial rotary embeddings), only the leading ``cos.shape[-1]``
    channels are rotated and the rest passes unchanged.
    '''
    def forward(self, x, cos, sin):
        '''Rotate ``x`` by the angles encoded in ``cos`` and ``sin`` (broadcastable to ``x[..., :cos.shape[-1]]``).'''
        rotary_dim = cos.shape[-1]
        if rotary_dim == x.shape[-1]:
            return (x * cos) + (rotate_half(x) * sin)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat(((x_rot * cos) + (rotate_half(x_rot) * sin), x_pass), dim=-1)
