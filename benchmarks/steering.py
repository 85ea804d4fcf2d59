'''Steering by relevance (issue 17, item 3): for a target, amplifying the top-k units by AttnLRP relevance must raise
its probability clearly more than amplifying k random units of the same layer.

For every (model, layer, input, target, scale) it prints p(target) before steering, after multiplying the top-k units
by relevance by ``scale``, and after multiplying k random units of the same layer by ``scale`` (mean ± std over
``--trials`` random draws), and writes ``benchmarks/results/steering.json``. Not a test:
``python benchmarks/steering.py [--models minilm gemma] [--k 20] [--scales 2 4 8] [--trials 10] [--threads 2]``.

* ``minilm``: the shipped MiniLM sentiment classifier on Rotten Tomatoes test reviews that it classifies correctly; the
  target is the *other* class (so it is not already likely), units ranked by the contrastive relevance (target logit
  minus the predicted logit). Layers: the GELU neurons of layer 3 (``intermediate``, 1536) and the 12 heads of layer 3
  (merged context, the first output of ``attention.self``; k = 2).
* ``gemma``: Gemma-3-270M (float32 cache at ``--gemma``, see ASSETS / docs/steering.md) on short prompts; the target
  is the second most likely next token (plus " Rome" for the Eiffel Tower), units ranked by the relevance of its logit.
  Layers: the MLP output of layer 9 of 18 (640 features) and the MLP neurons of layer 9 (the input of ``down_proj``,
  2048). ``gemma-contrast``: the same, units ranked by the relevance of ``logit[target] - logit[top-1 token]``.
'''
import argparse
import json
import pathlib
import time

import torch

from zennit_attn.steering import relevant_units, steering_effect


RESULTS = pathlib.Path(__file__).parent / 'results' / 'steering.json'
GEMMA = '/work/cache/gemma3-270m'
PROMPTS = [
    ('The Eiffel Tower is located in the city of', ' Rome'),
    ('The Eiffel Tower is located in the city of', None),
    ('The opposite of hot is', None),
    ('She poured herself a cup of', None),
    ('My favourite fruit is the', None),
]


def minilm_cases(reviews):
    '''(name, model, tokenizer, [(label, inputs, target, contrast)], sites).'''
    from zennit_attn.cli import text_task
    from zennit_attn.data import rotten_tomatoes_split
    task = text_task('default')
    model, tokenizer = task.model, task.tokenizer
    _, (texts, labels) = rotten_tomatoes_split()
    cases, wanted = [], {0: reviews // 2, 1: reviews - reviews // 2}
    for text, label in zip(texts, labels):
        if len(text) > 160 or not wanted[label]:  # short reviews keep the run quick
            continue
        inputs = tokenizer([text], return_tensors='pt')
        inputs.pop('token_type_ids', None)
        with torch.no_grad():
            predicted = int(model(**inputs).argmax(-1))
        if predicted != label:
            continue
        wanted[label] -= 1
        target = 1 - label
        cases.append((f'{text[:60]}... -> {task.classes[target]}', inputs, target, label))
        if not any(wanted.values()):
            break
    sites = [
        dict(module='encoder.encoder.layer.3.intermediate', on='output', num_heads=None, k=None,
             label='layer 3 GELU neurons (1536)'),
        dict(module='encoder.encoder.layer.3.attention.self', on='output', num_heads=12, k=2,
             label='layer 3 heads (12)'),
    ]
    return 'MiniLM sentiment', model, cases, sites


def gemma_cases(path, contrastive=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cases = []
    for prompt, word in PROMPTS:
        inputs = tokenizer(prompt, return_tensors='pt')
        with torch.no_grad():
            probabilities = model(**inputs, logits_to_keep=1).logits[0, -1].softmax(-1)
        ranking = probabilities.argsort(descending=True)
        target = tokenizer.encode(word, add_special_tokens=False)[0] if word else int(ranking[1])
        rank = int((ranking == target).nonzero()) + 1
        top = tokenizer.decode(int(ranking[0]))
        contrast = int(ranking[0]) if contrastive and rank > 1 else None
        cases.append((f'{prompt} -> {tokenizer.decode(target)!r} (rank {rank}; top-1 {top!r})', inputs, target,
                      contrast))
    sites = [
        dict(module='model.layers.9.mlp', on='output', num_heads=None, k=None, label='layer 9 MLP output (640)'),
        dict(module='model.layers.9.mlp.down_proj', on='input', num_heads=None, k=None,
             label='layer 9 MLP neurons (2048)'),
    ]
    return 'Gemma-3-270M' + (' (contrast: top-1)' if contrastive else ''), model, cases, sites


def run(name, model, cases, sites, k, scales, trials):
    rows = []
    for site in sites:
        site_k = site['k'] or k
        for label, inputs, target, contrast in cases:
            start = time.perf_counter()
            units = relevant_units(model, inputs, target, site['module'], site_k, contrast=contrast,
                                   num_heads=site['num_heads'], on=site['on']).indices
            for scale in scales:
                effect = steering_effect(model, inputs, target, site['module'], units, scale, trials=trials, seed=0,
                                         num_heads=site['num_heads'], on=site['on'])
                row = dict(model=name, site=site['label'], case=label, **effect.as_dict())
                rows.append(row)
                print(f'| {name} | {site["label"]} | {label} | {scale:g} | {effect.before:.4f} | {effect.after:.4f} '
                      f'| {effect.random_mean:.4f} ± {effect.random_std:.4f} | {effect.k} |', flush=True)
            print(f'<!-- {time.perf_counter() - start:.1f} s -->', flush=True)
    return rows


def summary(rows):
    '''Per model, site and scale: mean gains, and how often top-k beats every random draw and the random mean + 2
    std.'''
    groups = {}
    for row in rows:
        groups.setdefault((row['model'], row['site'], row['scale']), []).append(row)
    table = []
    for (model, site, scale), items in groups.items():
        table.append(dict(
            model=model, site=site, scale=scale, cases=len(items),
            mean_gain_top=sum(item['gain'] for item in items) / len(items),
            mean_gain_random=sum(item['random_gain'] for item in items) / len(items),
            top_beats_all_random=sum(item['after'] > max(item['random']) for item in items),
            top_beats_random_2std=sum(item['after'] > item['random_mean'] + 2 * item['random_std'] for item in items),
        ))
    return table


SUMMARY_HEAD = ('\n| model | layer | scale | cases | mean gain top-k | mean gain random-k | top-k > every random draw '
                '| top-k > random mean + 2 std |\n|---|---|---|---|---|---|---|---|')


def summary_row(item):
    return (f'| {item["model"]} | {item["site"]} | {item["scale"]:g} | {item["cases"]} | {item["mean_gain_top"]:+.4f} '
            f'| {item["mean_gain_random"]:+.4f} | {item["top_beats_all_random"]}/{item["cases"]} '
            f'| {item["top_beats_random_2std"]}/{item["cases"]} |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['minilm', 'gemma', 'gemma-contrast'],
                        choices=['minilm', 'gemma', 'gemma-contrast'])
    parser.add_argument('--k', type=int, default=20)
    parser.add_argument('--scales', type=float, nargs='+', default=[2., 4., 8.])
    parser.add_argument('--trials', type=int, default=10)
    parser.add_argument('--reviews', type=int, default=6)
    parser.add_argument('--gemma', default=GEMMA, help='float32 Gemma-3-270M directory')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--output', default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print('| model | layer | input -> target | scale | p before | p top-k | p random-k (mean ± std) | k |')
    print('|---|---|---|---|---|---|---|---|')
    rows = []
    for name in args.models:
        setup = minilm_cases(args.reviews) if name == 'minilm' else gemma_cases(args.gemma, name == 'gemma-contrast')
        rows += run(*setup, args.k, args.scales, args.trials)
    table = summary(rows)
    print(SUMMARY_HEAD)
    for item in table:
        print(summary_row(item))
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(
        k=args.k, scales=args.scales, trials=args.trials, torch=torch.__version__, rows=rows, summary=table,
    ), indent=1))
    print(f'\nwrote {output}')


if __name__ == '__main__':
    main()
