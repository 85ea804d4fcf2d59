'''Canonizers for :py:class:`torch.nn.MultiheadAttention` and torchvision's ``VisionTransformer``.'''
import math

import torch
from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

from .. import layers
from .attention import AttentionCanonizer, attend, attention_ops
from .base import ForwardCanonizer
from .group import CanonizerGroup


def _linear_view(weight, bias):
    '''A :py:class:`torch.nn.Linear` whose parameters share storage with ``weight`` and ``bias`` (slices of packed
    projections), so rules that read or temporarily swap ``weight``/``bias`` see the real values.
    '''
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=bias is not None, device='meta')
    linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


def _merge_masks(attn_mask, key_padding_mask, is_causal, batch, heads, target, source, dtype, device):
    '''Combine the masks of :py:meth:`torch.nn.MultiheadAttention.forward` into one additive float mask broadcastable
    to ``(batch, heads, target, source)``, or return None if there is no mask.
    '''
    masks = []
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(target, source, dtype=torch.bool, device=device).triu(1)
    for mask in (attn_mask, key_padding_mask):
        if mask is None:
            continue
        if mask is key_padding_mask:
            mask = mask.reshape(batch, 1, 1, source)
        elif mask.dim() == 3:
            mask = mask.reshape(batch, heads, target, source)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float('-inf'))
        masks.append(mask.to(dtype))
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] + masks[1]


class MultiheadAttentionCanonizer(AttentionCanonizer):
    '''Re-implement :py:class:`torch.nn.MultiheadAttention` with hookable modules.

    ``F.multi_head_attention_forward`` uses the projection weights directly (``out_proj`` is never called as a module)
    and may run a fused kernel, so no rule could see any of its operations. The canonical forward computes
    ``out_proj(softmax(scale * q @ k^T + mask) @ v)`` with q/k/v projections as :py:class:`torch.nn.Linear` views of the
    packed ``in_proj_weight`` (or the separate ``q/k/v_proj_weight``; self-attention with a packed weight runs one
    ``in_proj`` view over all three, which gives the same relevance in one matrix product), the attention core of
    :py:mod:`zennit_attn.canonizers.attention` (fused :py:class:`~zennit_attn.layers.AttentionCore`, or the unfolded
    chain when the weights are returned or dropout is active) and the module's own ``out_proj``. Masks are constants.

    Parameters
    ----------
    fused: bool, optional
        Run the attention core as one :py:class:`~zennit_attn.layers.AttentionCore` where possible.
    '''
    module_type = (torch.nn.MultiheadAttention,)

    def check(self, module):
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError(
                'MultiheadAttentionCanonizer: add_bias_kv / add_zero_attn are not supported; construct the '
                'nn.MultiheadAttention without them.'
            )

    def make_ops(self, module):
        embed_dim = module.embed_dim
        head_dim = module.head_dim
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.split(embed_dim)
        # self-attention runs one packed projection (one matrix product instead of three, as torch's own forward);
        # q/k/v views serve calls with distinct query, key and value
        packed = {'in_proj': _linear_view(module.in_proj_weight, module.in_proj_bias)} \
            if module._qkv_same_embed_dim else {}
        return {
            **packed,
            'q_proj': _linear_view(weights[0], biases[0]),
            'k_proj': _linear_view(weights[1], biases[1]),
            'v_proj': _linear_view(weights[2], biases[2]),
            **attention_ops(1 / math.sqrt(head_dim), scale_output=False, fused=self.fused),
        }

    def make_roles(self, module):
        roles = {self.ops[name]: 'attention_projection' for name in ('in_proj', 'q_proj', 'k_proj', 'v_proj')
                 if name in self.ops}
        roles[module.out_proj] = 'attention_projection'
        return roles

    def canonical_forward(
        self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
        is_causal=False,
    ):
        module, ops = self.module, self.ops
        packed = 'in_proj' in ops and query is key and key is value
        if not module.batch_first and query.dim() == 3:
            query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (tensor.unsqueeze(0) for tensor in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, target, _ = query.shape
        source = key.shape[1]
        heads, head_dim = module.num_heads, module.head_dim

        def split_heads(tensor, length):
            return tensor.reshape(batch, length, heads, head_dim).transpose(1, 2)

        if packed:
            q, k, v = (split_heads(tensor, target) for tensor in ops['in_proj'](query).chunk(3, dim=-1))
        else:
            q = split_heads(ops['q_proj'](query), target)
            k = split_heads(ops['k_proj'](key), source)
            v = split_heads(ops['v_proj'](value), source)
        mask = _merge_masks(attn_mask, key_padding_mask, is_causal, batch, heads, target, source, q.dtype, q.device)
        context, probabilities = attend(
            ops, q, k, v, mask, dropout=module.dropout, training=module.training, need_weights=need_weights
        )
        output = module.out_proj(context.transpose(1, 2).reshape(batch, target, heads * head_dim))
        if unbatched:
            output = output.squeeze(0)
        elif not module.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        weights = probabilities.mean(1) if average_attn_weights else probabilities
        return output, weights.squeeze(0) if unbatched else weights


class EncoderBlockCanonizer(ForwardCanonizer):
    '''Unfold the two residual sums of torchvision's ViT ``EncoderBlock`` into :py:class:`~zennit_attn.layers.Sum`.'''
    module_type = (EncoderBlock,)

    def make_ops(self, module):
        return {'residual_attention': layers.Sum(), 'residual_mlp': layers.Sum()}

    def canonical_forward(self, input):
        module, ops = self.module, self.ops
        torch._assert(input.dim() == 3, f'Expected (batch_size, seq_length, hidden_dim) got {input.shape}')
        x = module.ln_1(input)
        x, _ = module.self_attention(x, x, x, need_weights=False)
        x = module.dropout(x)
        x = ops['residual_attention'](x, input)
        y = module.ln_2(x)
        y = module.mlp(y)
        return ops['residual_mlp'](x, y)


class EncoderCanonizer(ForwardCanonizer):
    '''Unfold the position-embedding sum of torchvision's ViT ``Encoder`` into a :py:class:`~zennit_attn.layers.Sum`
    (the embedding is a parameter, so it absorbs its share of relevance).
    '''
    module_type = (Encoder,)

    def make_ops(self, module):
        return {'position_embedding': layers.Sum()}

    def canonical_forward(self, input):
        module, ops = self.module, self.ops
        torch._assert(input.dim() == 3, f'Expected (batch_size, seq_length, hidden_dim) got {input.shape}')
        input = ops['position_embedding'](input, module.pos_embedding)
        return module.ln(module.layers(module.dropout(input)))


class VisionTransformerCanonizer(CanonizerGroup):
    '''Canonizer for torchvision's :py:class:`~torchvision.models.VisionTransformer` (all ``vit_*`` variants):
    unfolds every ``nn.MultiheadAttention``, the residual sums of each ``EncoderBlock`` and the position-embedding sum.
    Models with a convolutional stem (``conv_stem_configs``, batch norms) are not supported.
    '''
    model_type = (VisionTransformer,)

    def __init__(self, fused=True):
        super().__init__([MultiheadAttentionCanonizer(fused), EncoderBlockCanonizer(), EncoderCanonizer()])
        self.fused = fused

    def copy(self):
        return self.__class__(fused=self.fused)

    def check(self, root_module):
        for module in root_module.modules():
            if isinstance(module, VisionTransformer) and not isinstance(module.conv_proj, torch.nn.Conv2d):
                raise NotImplementedError(
                    'VisionTransformerCanonizer: VisionTransformer with a convolutional stem (conv_stem_configs) is '
                    'not supported: its batch norms have no AttnLRP rule.'
                )
