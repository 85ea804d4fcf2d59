'''Conformance entries: mixture-of-experts language models (joined into ``conformance.ENTRIES``).

transformers 5.24 runs the experts with grouped matrix products by default (``experts_implementation='grouped_mm'``),
which refuse float64 and have no rule; the entries load the per-expert loop (``'eager'``: one ``F.linear`` per expert,
products with the routing weights, ``index_add_``), the only implementation the families accept. The MoE rules
themselves (router softmax, re-normalised top-k weights, routing products, scatter-sum) are checked against a
hand-written oracle of one sparse block in ``tests/test_moe.py``.
'''
import torch

from conformance import Entry, perturbed, wrap_decoder


#: 4 experts, top-2, 2 layers, hidden 32 (Qwen3-MoE: layer 0 dense, ``mlp_only_layers``; its default
#: ``norm_topk_prob=False`` keeps the top-k probabilities as they are, while Mixtral always re-normalises them)
MOE = {
    'mixtral': ('MixtralConfig', 'MixtralForCausalLM', dict(num_local_experts=4, intermediate_size=20)),
    'qwen3_moe': ('Qwen3MoeConfig', 'Qwen3MoeForCausalLM', dict(
        num_experts=4, moe_intermediate_size=20, intermediate_size=37, head_dim=8, mlp_only_layers=[0],
    )),
}


def moe(family):
    def build():
        import transformers
        config_name, model_name, extra = MOE[family]
        config = getattr(transformers, config_name)(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, use_cache=False, rms_norm_eps=1e-6, num_experts_per_tok=2,
            attn_implementation='sdpa', experts_implementation='eager', **extra,
        )
        torch.manual_seed(0)
        return perturbed(getattr(transformers, model_name)(config).double().eval())
    return build


ENTRIES = [
    Entry(family, moe(family), wrap_decoder, check='CP-LRP conservation (bias-free); MoE block oracle (test_moe.py)')
    for family in sorted(MOE)
]
