'''Wall time and peak memory of AttnLRP attributions next to a plain gradient, IG and SmoothGrad (issue: speed).

Prints ratios to the plain gradient measured in the same process and writes them (with absolute numbers) as JSON.
Not a test: run ``python benchmarks/speed.py [--device cuda] [--quick]``.
'''
import argparse
import gc
import json
import os
import statistics
import threading
import time

import torch
import zennit.composites
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad

import zennit_attn  # noqa: F401 (registers the composites)


class PeakMemory:
    '''Peak memory above the level at entry: CUDA's allocator statistics on a GPU, else the process RSS sampled
    every millisecond (CPU tensors are allocated outside Python's tracemalloc).
    '''
    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0

    @staticmethod
    def rss():
        with open('/proc/self/statm') as statm:
            return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.001)

    def __enter__(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.rss()
            self.done = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss() - self.base)
        return False


def measure(run, device, repeats):
    '''Median wall time over ``repeats`` runs (after one warm-up) and the peak memory of one run.'''
    run()
    times = []
    for _ in range(repeats):
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    with PeakMemory(device) as memory:
        run()
    return statistics.median(times), memory.peak


def attribution_runs(model, x, seed_fn, composites, n_iter):
    '''One closure per method computing a full attribution of ``x``.'''
    def attributor_run(attributor_type, composite_name=None, **kwargs):
        def run():
            composite = None if composite_name is None else zennit.composites.COMPOSITES[composite_name]()
            with attributor_type(model, composite, **kwargs) as attributor:
                attributor(x, seed_fn)
        return run

    runs = {'gradient': attributor_run(Gradient)}
    for name in composites:
        runs[name] = attributor_run(Gradient, name)
    if n_iter:
        runs[f'integrated_gradients (n={n_iter})'] = attributor_run(IntegratedGradients, n_iter=n_iter)
        runs[f'smoothgrad (n={n_iter})'] = attributor_run(SmoothGrad, n_iter=n_iter)
    return runs


def benchmark(title, runs, device, repeats):
    rows = []
    base_time = base_memory = None
    for name, run in runs.items():
        seconds, memory = measure(run, device, repeats)
        if name == 'gradient':
            base_time, base_memory = seconds, max(memory, 1)
        rows.append({
            'method': name, 'seconds': seconds, 'peak_bytes': memory,
            'time_ratio': seconds / base_time, 'memory_ratio': memory / base_memory,
        })
        print(f'  {title:<34} {name:<30} {seconds / base_time:6.2f}x time  {memory / base_memory:6.2f}x memory '
              f'({seconds * 1e3:8.1f} ms, {memory / 2 ** 20:8.1f} MiB)', flush=True)
    return {'setting': title, 'rows': rows}


def vit_benchmarks(args):
    from torchvision.models import vit_b_16
    torch.manual_seed(0)
    model = vit_b_16(weights=None).eval().to(args.device)
    torch.nn.init.normal_(model.heads.head.weight, std=0.01)
    results = []
    for batch in args.vit_batches:
        x = torch.randn(batch, 3, 224, 224, device=args.device)
        onehot = torch.nn.functional.one_hot(torch.arange(batch) % 1000, 1000).float().to(args.device)
        runs = attribution_runs(
            model, x, lambda y: y * onehot, ['attnlrp', 'cp_lrp', 'attnlrp_vit', 'cp_lrp_vit'],
            n_iter=args.n_iter if batch == args.vit_batches[0] else 0,
        )
        results.append(benchmark(f'vit_b_16 batch {batch}', runs, args.device, args.repeats))
    return results


class EmbeddingsToLogit(torch.nn.Module):
    '''Decoder wrapper: input embeddings -> logits of the last position (the attributed quantity).'''
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds):
        return self.model(inputs_embeds=inputs_embeds, use_cache=False).logits[:, -1]


def decoder_benchmarks(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=4096, use_cache=False,
    )
    model = LlamaForCausalLM(config).eval().to(args.device)
    print(f'  LLaMA-style decoder: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters', flush=True)
    wrapper = EmbeddingsToLogit(model)
    results = []
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length), device=args.device)
        embeds = model.get_input_embeddings()(ids).detach()
        onehot = torch.nn.functional.one_hot(torch.tensor([7]), config.vocab_size).float().to(args.device)
        runs = attribution_runs(wrapper, embeds, lambda y: y * onehot, ['attnlrp', 'cp_lrp'], n_iter=0)
        result = benchmark(f'llama-100M seq {length}', runs, args.device, args.repeats)
        for row in result['rows']:
            row['ms_per_token'] = row['seconds'] * 1e3 / length
        results.append(result)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--n-iter', type=int, default=20, help='iterations of IG and SmoothGrad (0 to skip)')
    parser.add_argument('--vit-batches', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--lengths', type=int, nargs='+', default=[128, 512, 1024])
    parser.add_argument('--skip-vit', action='store_true')
    parser.add_argument('--skip-decoder', action='store_true')
    parser.add_argument('--output', default='benchmarks/speed.json')
    args = parser.parse_args()

    results = {'device': args.device, 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'settings': []}
    if not args.skip_vit:
        results['settings'] += vit_benchmarks(args)
    if not args.skip_decoder:
        results['settings'] += decoder_benchmarks(args)
    with open(args.output, 'w') as file:
        json.dump(results, file, indent=2)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
