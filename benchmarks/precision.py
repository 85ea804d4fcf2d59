'''Half-precision benchmark (issue 15): how far float16 / bfloat16 relevance is from float32 on the shipped real models
and on Gemma-3-270M.

Not a test: run ``python benchmarks/precision.py [--models vit minilm gemma] [--gemma DIR] [--output FILE]``.

For each model, composite and half type: the model cast to the half type explains the same inputs as the float32 model
(the shipped weights; the half model's are those rounded), for the same targets; reported per sample are the cosine
similarity of the relevance to float32's (minimum and median over the samples) and the largest relative L2 error, for
the pixels / input embeddings and, for text, per token. A forward that overflows (Gemma-3-270M in float16: its residual
stream passes 65504 in layer 7) is reported with the error the library gives.

* ``vit``: the Fashion-MNIST ViT, its 48 shipped test images, explained for their labels.
* ``minilm``: the MiniLM sentiment model (eager and sdpa attention), the first 32 Rotten Tomatoes snippets as one
  padded batch (47 % padding), explained for the positive class with :py:func:`zennit_attn.token_relevance`.
* ``gemma``: Gemma-3-270M (float32 Hugging Face folder, ``--gemma``; ``HF_HUB_OFFLINE=1``), three left-padded prompts,
  the float32 model's next token.
'''
import argparse
import copy
import json
import os
import time

import torch
from zennit.attribution import Gradient

import zennit_attn
from zennit_attn import models
from zennit_attn.composites import AttnLRP, AttnLRPViT, CPLRP, CPLRPViT

HALF = (torch.float16, torch.bfloat16)
PROMPTS = ['The Eiffel Tower is located in the city of', 'My favourite colour is', 'def fibonacci(n):\n    return']


def compare(actual, expected):
    '''Per-sample cosine similarity (min, median) and the largest relative L2 error, in float64.'''
    actual, expected = actual.double().flatten(1), expected.double().flatten(1)
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=1)
    error = (actual - expected).norm(dim=1) / expected.norm(dim=1)
    return {'cosine_min': cosine.min().item(), 'cosine_median': cosine.median().item(), 'relative_error_max':
            error.max().item(), 'finite': bool(torch.isfinite(actual).all())}


def vit_rows():
    model = models.load_fashion_mnist_vit()
    x, labels, _ = models.load_fashion_mnist_samples()

    def relevance(net, inputs, composite):
        with Gradient(net, composite) as attributor:
            _, result = attributor(inputs, lambda y: y * torch.nn.functional.one_hot(labels, 10).to(y.dtype))
        return result

    for composite_type in (AttnLRPViT, CPLRPViT, AttnLRP, CPLRP):
        expected = relevance(model, x, composite_type())
        for dtype in HALF:
            start = time.perf_counter()
            actual = relevance(copy.deepcopy(model).to(dtype), x.to(dtype), composite_type())
            yield dict(model='fashion_mnist_vit', composite=composite_type.__name__, dtype=str(dtype)[6:],
                       seconds=time.perf_counter() - start, pixels=compare(actual, expected))


def text_rows(name, model, batch, target=None):
    for composite_type in (AttnLRP, CPLRP):
        expected = zennit_attn.token_relevance(model, composite_type(), batch['input_ids'], batch['attention_mask'],
                                               target=target)
        for dtype in HALF:
            row = dict(model=name, composite=composite_type.__name__, dtype=str(dtype)[6:])
            half = copy.deepcopy(model).to(dtype)
            start = time.perf_counter()
            try:
                actual = zennit_attn.token_relevance(half, composite_type(), batch['input_ids'],
                                                     batch['attention_mask'], target=expected.target)
            except ValueError as error:
                row['error'] = str(error)
            else:
                row.update(seconds=time.perf_counter() - start, tokens=compare(actual.relevance, expected.relevance),
                           embeddings=compare(actual.embedding_relevance, expected.embedding_relevance))
            del half
            yield row


def minilm_rows():
    from zennit_attn.data import load_rotten_tomatoes
    texts, _ = load_rotten_tomatoes()
    batch = models.load_minilm_tokenizer()(texts[:32], padding=True, return_tensors='pt')
    for implementation in ('eager', 'sdpa'):
        yield from text_rows(f'minilm_sentiment_{implementation}', models.load_minilm_sentiment(implementation), batch,
                             target=1)


def gemma_rows(path):
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = 'left'
    batch = tokenizer(PROMPTS, padding=True, return_tensors='pt')
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation='sdpa').eval()
    yield from text_rows('gemma3_270m', model, batch)


def line(row):
    if 'error' in row:
        return f'| {row["model"]} | {row["composite"]} | {row["dtype"]} | error: {row["error"]} |'
    figures = row.get('tokens') or row['pixels']
    return (f'| {row["model"]} | {row["composite"]} | {row["dtype"]} | {figures["cosine_min"]:.4f} / '
            f'{figures["cosine_median"]:.4f} | {figures["relative_error_max"]:.3f} | {figures["finite"]} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['vit', 'minilm', 'gemma'], choices=['vit', 'minilm', 'gemma'])
    parser.add_argument('--gemma', default=os.path.expanduser('~/.cache/zennit-attn/gemma3-270m'),
                        help='float32 Hugging Face folder of Gemma-3-270M')
    parser.add_argument('--output', help='write the rows as JSON here')
    args = parser.parse_args()
    rows = []
    print('| model | composite | dtype | cosine to float32 (min / median) | max relative error | finite |')
    print('| --- | --- | --- | --- | --- | --- |')
    sources = {'vit': vit_rows, 'minilm': minilm_rows, 'gemma': lambda: gemma_rows(args.gemma)}
    for name in args.models:
        for row in sources[name]():
            rows.append(row)
            print(line(row), flush=True)
    if args.output:
        with open(args.output, 'w') as fd:
            json.dump(rows, fd, indent=1)


if __name__ == '__main__':
    main()
