'''Cost of explaining a generation: explain_generation (one forward, one modified backward per generated token)
next to N plain gradients (one forward + backward per generated token, each on its own prefix) — issue 14.

Prints the time per generated token of both and their ratio; writes JSON. Not a test:
``python benchmarks/generation.py [--model gemma|llama] [--tokens 10] [--threads 1]``. ``gemma`` needs the cached
float32 Gemma-3-270M (``examples/explain_generation.py --cache DIR`` makes it); ``llama`` is a random LLaMA-style
~110M model (12 layers, 768 wide).
'''
import argparse
import json
import os
import pathlib
import sys
import time

import torch

import zennit_attn
from zennit_attn.composites import AttnLRP, CPLRP


PROMPT = 'The Eiffel Tower is located in the city of'


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, attn_implementation='sdpa')
    return LlamaForCausalLM(config).eval(), None


def gemma(cache):
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'examples'))
    from explain_generation import load_gemma
    return load_gemma(cache)


def plain_gradients(model, ids, prompt_length):
    '''One plain gradient × input per generated token, each with its own forward on its prefix (only the last
    position's logits), as a hand loop would compute them.'''
    embedding = model.get_input_embeddings()
    for end in range(prompt_length, ids.shape[1]):
        x = embedding(ids[:, :end]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]
        (grad,) = torch.autograd.grad(logits[0, ids[0, end]], x)
        (grad * x).sum(-1)


def clock(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', choices=('gemma', 'llama'), default='gemma')
    parser.add_argument('--cache', default=os.path.expanduser('~/.cache/zennit-attn/gemma3-270m'))
    parser.add_argument('--tokens', type=int, default=10)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--threads', type=int)
    parser.add_argument('--output', default='benchmarks/results/generation.json')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = gemma(args.cache) if args.model == 'gemma' else llama()
    if tokenizer is not None:
        ids = tokenizer(PROMPT, return_tensors='pt')['input_ids']
    else:
        ids = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sequence = model.generate(input_ids=ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                  do_sample=False, pad_token_id=0)
    continuation = sequence[0, ids.shape[1]:]
    tokens = len(continuation)
    results = {'model': args.model, 'prompt_tokens': ids.shape[1], 'generated_tokens': tokens,
               'threads': torch.get_num_threads()}
    gradient = clock(lambda: plain_gradients(model, sequence, ids.shape[1]), args.repeats)
    results['gradient_s_per_token'] = gradient / tokens
    for name, composite in (('attnlrp', AttnLRP), ('cp_lrp', CPLRP)):
        seconds = clock(lambda: zennit_attn.explain_generation(
            model, tokenizer, input_ids=ids[0], composite=composite(), continuation=continuation), args.repeats)
        results[f'{name}_s_per_token'] = seconds / tokens
        results[f'{name}_ratio'] = seconds / gradient
        print(f'{name}: {seconds / tokens * 1e3:.0f} ms/token, {seconds / gradient:.2f}x {tokens} plain gradients '
              f'({gradient / tokens * 1e3:.0f} ms/token)')
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))


if __name__ == '__main__':
    main()
