'''Peak memory of an attribution vs the number of layers, with and without gradient checkpointing (issue: scale).

A LLaMA-style decoder (float32, CPU) with 8, 16 and 32 layers explains the last-position logit of a few hundred tokens
with the plain gradient and with AttnLRP, once as is and once with Hugging Face's activation checkpointing of every
decoder layer (non-reentrant; transformers checkpoints in training mode only, and the config has no dropout). Each
measurement runs in a fresh process (as in ``speed.py``): the peak resident memory one attribution adds above the
warmed-up process (kernel high-water mark), and the bytes autograd holds for the backward pass outside checkpointed
regions (``speed.SavedTensorBytes``). Prints ratios, writes ``benchmarks/results/memory.json`` and a plot
``benchmarks/results/memory.png``.

Not a test: run ``python benchmarks/memory.py [--layers 8 16 32] [--tokens 384] [--threads 1]``.
'''
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
import zennit.composites
from zennit.attribution import Gradient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import EmbeddingsToLogit, SavedTensorBytes, _status_kib  # noqa: E402

import zennit_attn  # noqa: E402,F401 (registers the composites)


METHODS = ('gradient', 'attnlrp')
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def build(layers, tokens, checkpointing):
    '''The decoder (wrapped: input embeddings -> last-position logits), its input and the seed of the target logit.'''
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, use_cache=False, attn_implementation='sdpa',
    )
    decoder = LlamaForCausalLM(config).eval()
    if checkpointing:
        decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False})
        decoder.train()
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = decoder.get_input_embeddings()(ids)
    onehot = torch.nn.functional.one_hot(torch.tensor([7]), config.vocab_size).float()
    return EmbeddingsToLogit(decoder), x, onehot


def runner(model, x, onehot, method):
    def run():
        composite = None if method == 'gradient' else zennit.composites.COMPOSITES[method]()
        with Gradient(model, composite) as attributor:
            return attributor(x, lambda y: y * onehot)[1]
    return run


def child(layers, tokens, checkpointing, method):
    '''In this (fresh) process: peak resident bytes, saved-for-backward bytes and CPU seconds of one attribution.'''
    model, x, onehot = build(layers, tokens, checkpointing)
    # warm up (lazy initialisations of torch, transformers and the allocator) on a few tokens
    runner(model, x[:, :16], onehot, method)()
    gc.collect()
    # writing 5 to clear_refs resets the high-water mark to the current resident size
    with open('/proc/self/clear_refs', 'w') as file:
        file.write('5')
    base = _status_kib('VmRSS')
    start = time.process_time()
    # the saved-tensor count keeps weak references only (a few KiB for a few thousand storages)
    with SavedTensorBytes(model) as saved:
        runner(model, x, onehot, method)()
    seconds = time.process_time() - start
    return {'peak_rss_bytes': (_status_kib('VmHWM') - base) * 1024, 'saved_bytes': saved.total, 'cpu_seconds': seconds}


def measure(layers, tokens, checkpointing, method, threads):
    command = [sys.executable, __file__, '--child', str(layers), str(tokens), str(int(checkpointing)), method]
    if threads:
        command += ['--threads', str(threads)]
    # glibc returns large blocks to the system at once, so freed memory does not hide in the allocator
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(rows, tokens, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {('gradient', False): ('tab:blue', '-'), ('gradient', True): ('tab:blue', '--'),
              ('attnlrp', False): ('tab:red', '-'), ('attnlrp', True): ('tab:red', '--')}
    for (method, checkpointing), (color, line) in styles.items():
        selected = sorted((row['layers'], row) for row in rows
                          if row['method'] == method and row['checkpointing'] == checkpointing)
        label = f'{method}{" + checkpointing" if checkpointing else ""}'
        for axis, key in zip(axes, ('peak_rss_bytes', 'saved_bytes')):
            axis.plot([layers for layers, _ in selected], [row[key] / 2 ** 20 for _, row in selected], marker='o',
                      color=color, linestyle=line, label=label)
    for axis, title in zip(axes, ('peak resident memory added by one attribution',
                                  'kept for the backward pass (outside checkpointed layers)')):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel('decoder layers')
        axis.set_ylabel('MiB')
        axis.set_xticks(sorted({row['layers'] for row in rows}))
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize=9)
    figure.suptitle(f'LLaMA-style decoder, hidden 128, {tokens} tokens, float32, CPU', fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--layers', type=int, nargs='+', default=[8, 16, 32])
    parser.add_argument('--tokens', type=int, default=256)
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--output', default=os.path.join(RESULTS, 'memory.json'))
    parser.add_argument('--plot', default=os.path.join(RESULTS, 'memory.png'))
    parser.add_argument('--child', nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        layers, tokens, checkpointing, method = args.child
        print(json.dumps(child(int(layers), int(tokens), bool(int(checkpointing)), method)))
        return
    if not os.path.exists('/proc/self/clear_refs'):
        raise SystemExit('peak memory is read from /proc (Linux only)')

    rows = []
    for layers in args.layers:
        for method in METHODS:
            for checkpointing in (False, True):
                row = {'layers': layers, 'method': method, 'checkpointing': checkpointing,
                       **measure(layers, args.tokens, checkpointing, method, args.threads)}
                rows.append(row)
                print(f'  {layers:3d} layers  {method:<9} {"checkpointed" if checkpointing else "as is":<13}'
                      f'{row["peak_rss_bytes"] / 2 ** 20:8.1f} MiB peak  {row["saved_bytes"] / 2 ** 20:8.1f} MiB '
                      f'saved  {row["cpu_seconds"]:6.2f} s', flush=True)

    def row(layers, method, checkpointing):
        return next(item for item in rows if (item['layers'], item['method'], item['checkpointing']) == (
            layers, method, checkpointing))

    ratios = []
    print('\n| layers | AttnLRP / gradient | AttnLRP / gradient, checkpointed | checkpointed / as is: gradient | '
          'checkpointed / as is: AttnLRP |\n|---|---|---|---|---|')
    for layers in args.layers:
        peaks = {(method, checkpointing): row(layers, method, checkpointing)['peak_rss_bytes']
                 for method in METHODS for checkpointing in (False, True)}
        ratio = {
            'layers': layers,
            'attnlrp_over_gradient': peaks['attnlrp', False] / peaks['gradient', False],
            'attnlrp_over_gradient_checkpointed': peaks['attnlrp', True] / peaks['gradient', True],
            'checkpointed_over_plain_gradient': peaks['gradient', True] / peaks['gradient', False],
            'checkpointed_over_plain_attnlrp': peaks['attnlrp', True] / peaks['attnlrp', False],
        }
        ratios.append(ratio)
        print(f'| {layers} | ' + ' | '.join(f'{value:.2f}x' for key, value in ratio.items() if key != 'layers') + ' |')
    first, last = min(args.layers), max(args.layers)
    growth = {
        f'{method}{"_checkpointed" if checkpointing else ""}':
            row(last, method, checkpointing)['peak_rss_bytes'] / row(first, method, checkpointing)['peak_rss_bytes']
        for method in METHODS for checkpointing in (False, True)
    }
    print(f'\npeak growth from {first} to {last} layers ({last / first:.0f}x the layers): ' +
          ', '.join(f'{name} {value:.2f}x' for name, value in growth.items()))

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    results = {
        'model': 'LlamaForCausalLM, hidden 128, intermediate 344, 4 heads (2 kv), vocab 1000, float32, sdpa',
        'tokens': args.tokens, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
        'checkpointing': 'activation_checkpointing_enable(use_reentrant=False) of every decoder layer, train mode',
        'rows': rows, 'ratios': ratios, 'growth': {'from_layers': first, 'to_layers': last, **growth},
    }
    with open(args.output, 'w') as file:
        json.dump(results, file, indent=2)
    plot(rows, args.tokens, args.plot)
    print(f'wrote {args.output} and {args.plot}')


if __name__ == '__main__':
    main()
