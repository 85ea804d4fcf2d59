'''Time and memory of AttnLRP attributions next to a plain gradient, IG and SmoothGrad (issue: speed).

Prints ratios to the plain gradient measured in the same process and writes them (with absolute numbers) as JSON.
Not a test: run ``python benchmarks/speed.py [--device cuda] [--threads 1] [--settings vit_b_16:1 llama:128]``.
'''
import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import zennit.composites
from torch.multiprocessing.reductions import StorageWeakRef
from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad

import zennit_attn  # noqa: F401 (registers the composites)


class SavedTensorBytes:
    '''The most memory autograd holds for the backward pass at any time while the context is active: the bytes of the
    distinct storages saved for backward and still alive (beyond the parameters), counted exactly and independent of
    the allocator and of other processes. Tensors saved by graphs that are dropped again (a hooked module's own forward
    graph) stop counting when they are freed.
    '''
    def __init__(self, model):
        # parameters exist with or without an attribution: only count what the attribution adds
        self.parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
        self.storages = {}
        self.total = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[(storage.data_ptr(), tensor.device)] = (StorageWeakRef(storage), storage.nbytes())
            self.total = max(self.total, sum(size for ref, size in self.storages.values() if not ref.expired()))
        # a detached alias: returning the tensor itself would make saved outputs reference their own graph (a cycle
        # that keeps everything alive)
        return tensor.detach()

    def __enter__(self):
        self.context = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.context.__enter__()
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        return False


def measure(run, model, device, repeats, warmup=1):
    '''Median wall time and process CPU time over ``repeats`` runs after ``warmup`` runs, and the bytes saved for the
    backward pass (on a GPU: the allocator's peak above the starting level).
    '''
    device = torch.device(device)
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        memory = torch.cuda.max_memory_allocated(device) - base
    else:
        with SavedTensorBytes(model) as saved:
            run()
        memory = saved.total
    return statistics.median(wall), statistics.median(cpu), memory


def _status_kib(key):
    '''A ``/proc/self/status`` entry in KiB (``VmRSS``: resident now, ``VmHWM``: resident peak).'''
    with open('/proc/self/status') as file:
        return int(re.search(rf'^{key}:\s+(\d+) kB', file.read(), re.MULTILINE).group(1))


def child_peak(setting, method, args):
    '''In this (child) process: the peak resident memory one attribution adds above what the model and the warmed-up
    process hold, from the kernel's high-water mark (Linux), and the wall and CPU seconds of that attribution. glibc is
    told to return large blocks to the system at once (``MALLOC_MMAP_THRESHOLD_``, set by the parent), so freed memory
    does not hide in the allocator.
    '''
    model, runs = setting_runs(setting, args, only=method)
    run = runs[method]
    for _ in range(args.warmup):
        run()
    gc.collect()
    # writing 5 to clear_refs resets the high-water mark to the current resident size
    with open('/proc/self/clear_refs', 'w') as file:
        file.write('5')
    base = _status_kib('VmRSS')
    start, start_cpu = time.perf_counter(), time.process_time()
    run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return f'{(_status_kib("VmHWM") - base) * 1024} {seconds} {cpu_seconds}'


def peak_in_child(setting, method, args):
    '''Run :py:func:`child_peak` in a fresh process (CPU only) and return its peak bytes, wall and CPU seconds, or
    None where unsupported.
    '''
    if args.device != 'cpu' or not os.path.exists('/proc/self/clear_refs'):
        return None
    command = [
        sys.executable, __file__, '--child-peak', setting, method, '--device', args.device,
        '--n-iter', str(args.n_iter), '--warmup', str(args.warmup), '--attention', *args.attention,
    ]
    if args.threads:
        command += ['--threads', str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    if args.child_only and not args.warmup:
        # the child's one run is also the timed one: with these settings every block allocation of the attention rule
        # would be a fresh mmap (page faults, zeroing) that the allocator otherwise reuses, which costs AttnLRP up to
        # 1.6x its time at 4k tokens. Without a warm-up no freed memory can hide in the allocator, so the high-water
        # mark is valid without them.
        env = dict(os.environ)
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    peak, seconds, cpu_seconds = result.stdout.strip().splitlines()[-1].split()
    return int(peak), float(seconds), float(cpu_seconds)


def attribution_runs(model, x, seed_fn, composites, n_iter, only=None, attention=('exact',)):
    '''One closure per method computing a full attribution of ``x`` (only ``only`` if given); each composite once per
    ``attention`` option (``'sdpa'``: the attention rule through PyTorch's fused attention backward, named
    ``<composite>+sdpa``).'''
    def attributor_run(attributor_type, composite_factory=None, **kwargs):
        def run():
            composite = None if composite_factory is None else composite_factory()
            with attributor_type(model, composite, **kwargs) as attributor:
                attributor(x, seed_fn)
        return run

    def factory(name, option):
        return lambda: zennit.composites.COMPOSITES[name](attention=option)

    methods = {'gradient': (Gradient, None, {})}
    methods.update({
        name if option == 'exact' else f'{name}+{option}': (Gradient, factory(name, option), {})
        for name in composites for option in attention
    })
    if n_iter:
        methods[f'integrated_gradients (n={n_iter})'] = (IntegratedGradients, None, {'n_iter': n_iter})
        methods[f'smoothgrad (n={n_iter})'] = (SmoothGrad, None, {'n_iter': n_iter})
    return {
        name: attributor_run(kind, composite, **kwargs)
        for name, (kind, composite, kwargs) in methods.items() if only is None or name == only
    }


class EmbeddingsToLogit(torch.nn.Module):
    '''Decoder wrapper: input embeddings -> logits of the last position (the attributed quantity).'''
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds):
        return self.model(inputs_embeds=inputs_embeds, use_cache=False).logits[:, -1]


def setting_runs(setting, args, only=None):
    '''Build the model and input of ``setting`` (``vit_b_16:BATCH`` or ``llama:LENGTH``) and return its runs.'''
    kind, size = setting.split(':')
    size = int(size)
    torch.manual_seed(0)
    if kind == 'vit_b_16':
        from torchvision.models import vit_b_16
        model = vit_b_16(weights=None).eval().to(args.device)
        torch.nn.init.normal_(model.heads.head.weight, std=0.01)
        x = torch.randn(size, 3, 224, 224, device=args.device)
        onehot = torch.nn.functional.one_hot(torch.arange(size) % 1000, 1000).float().to(args.device)
        composites = ['attnlrp', 'cp_lrp', 'attnlrp_vit', 'cp_lrp_vit']
        n_iter = args.n_iter if size == 1 else 0
    elif kind == 'llama':
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=max(4096, size), use_cache=False,
        )
        decoder = LlamaForCausalLM(config).eval().to(args.device)
        model = EmbeddingsToLogit(decoder)
        ids = torch.randint(0, config.vocab_size, (1, size), device=args.device)
        x = decoder.get_input_embeddings()(ids).detach()
        onehot = torch.nn.functional.one_hot(torch.tensor([7]), config.vocab_size).float().to(args.device)
        composites, n_iter = ['attnlrp', 'cp_lrp'], 0
    else:
        raise ValueError(f'unknown setting {setting!r}')
    runs = attribution_runs(model, x, lambda y: y * onehot, composites, n_iter, only=only, attention=args.attention)
    if args.methods and only is None:
        unknown = set(args.methods) - set(runs)
        if unknown:
            raise ValueError(f'unknown methods {sorted(unknown)} for {setting}; known: {sorted(runs)}')
        # the gradient stays first: every ratio is to it
        runs = {name: run for name, run in runs.items() if name == 'gradient' or name in args.methods}
    return model, runs


def benchmark(setting, args):
    '''Time every method of ``setting`` in this process and its peak memory in a child process, as ratios. With
    ``--child-only`` (long inputs), each method runs once, in its own process, which gives both time and peak.
    '''
    rows = []
    model, runs = setting_runs(setting, args)
    for name, run in runs.items():
        if args.child_only:
            peak, seconds, cpu_seconds = peak_in_child(setting, name, args)
            row = {'method': name, 'seconds': seconds, 'cpu_seconds': cpu_seconds, 'peak_bytes': None}
        else:
            seconds, cpu_seconds, memory = measure(run, model, args.device, args.repeats, args.warmup)
            child = peak_in_child(setting, name, args)
            peak = None if child is None else child[0]
            row = {'method': name, 'seconds': seconds, 'cpu_seconds': cpu_seconds, 'peak_bytes': memory}
        rows.append(dict(row, peak_rss_bytes=peak))
    base = rows[0]
    length = int(setting.split(':')[1])
    # on a CPU shared with other processes, process CPU time is the steadier measure of work
    key = 'seconds' if args.device != 'cpu' or args.wall_time else 'cpu_seconds'
    for row in rows:
        row['time_ratio'] = row[key] / base[key]
        if row['peak_bytes'] is not None:
            row['memory_ratio'] = row['peak_bytes'] / max(base['peak_bytes'], 1)
        if row['peak_rss_bytes'] is not None:
            row['peak_rss_ratio'] = row['peak_rss_bytes'] / max(base['peak_rss_bytes'], 1)
        if setting.startswith('llama'):
            row['ms_per_token'] = row['seconds'] * 1e3 / length
            row['cpu_ms_per_token'] = row['cpu_seconds'] * 1e3 / length
        peak = f'{row["peak_rss_ratio"]:6.2f}x peak' if 'peak_rss_ratio' in row else ''
        saved = f'{row["memory_ratio"]:6.2f}x saved ' if 'memory_ratio' in row else ''
        size = row['peak_bytes'] if row['peak_bytes'] is not None else row['peak_rss_bytes']
        print(f'  {setting:<14} {row["method"]:<30} {row["time_ratio"]:6.2f}x time  {saved}{peak}  '
              f'({row["seconds"] * 1e3:9.1f} ms, {size / 2 ** 20:8.1f} MiB)', flush=True)
    return {'setting': setting, 'rows': rows}


def markdown(results):
    '''The results as a Markdown table of ratios to the plain gradient.'''
    lines = [
        '| setting | method | time / gradient | saved for backward / gradient | peak memory / gradient |',
        '|---|---|---|---|---|',
    ]
    for result in results['settings']:
        for row in result['rows']:
            peak = f'{row["peak_rss_ratio"]:.2f}x' if 'peak_rss_ratio' in row else 'n/a'
            saved = f'{row["memory_ratio"]:.2f}x' if 'memory_ratio' in row else 'n/a'
            lines.append(f'| {result["setting"]} | {row["method"]} | {row["time_ratio"]:.2f}x | {saved} | {peak} |')
    return '\n'.join(lines)


def long_context(results):
    '''The llama settings by length: CPU ms per token of each method and AttnLRP's ratios to the gradient, or None.

    The gradient's time per token grows with the length through attention's quadratic part; AttnLRP adds nothing
    quadratic of its own if its ratio to the gradient stays flat.
    '''
    settings = [result for result in results['settings'] if result['setting'].startswith('llama')]
    if not settings:
        return None
    methods = [row['method'] for row in settings[0]['rows']]
    lines = [
        '| tokens | ' + ' | '.join(f'{method} CPU ms/token' for method in methods)
        + ' | ' + ' | '.join(f'{method} time / gradient | {method} peak / gradient' for method in methods[1:]) + ' |',
        '|---' * (1 + len(methods) + 2 * (len(methods) - 1)) + '|',
    ]
    for result in settings:
        rows = {row['method']: row for row in result['rows']}
        cells = [result['setting'].split(':')[1]]
        cells += [f'{rows[method]["cpu_ms_per_token"]:.1f}' for method in methods]
        for method in methods[1:]:
            peak = rows[method].get('peak_rss_ratio')
            cells += [f'{rows[method]["time_ratio"]:.2f}x', 'n/a' if peak is None else f'{peak:.2f}x']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--attention', nargs='+', choices=['exact', 'sdpa'], default=['exact'],
                        help='attention rules of the composites: exact, and/or sdpa (fused attention backward)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs before the timed ones (0 for long runs)')
    parser.add_argument('--methods', nargs='+', help='only these methods (besides the gradient, the reference)')
    parser.add_argument('--n-iter', type=int, default=20, help='iterations of IG and SmoothGrad (0 to skip)')
    parser.add_argument('--settings', nargs='+', default=[
        'vit_b_16:1', 'vit_b_16:8', 'llama:128', 'llama:512', 'llama:1024',
    ], help='vit_b_16:BATCH and llama:LENGTH settings')
    parser.add_argument('--output', default='benchmarks/speed.json')
    parser.add_argument('--wall-time', action='store_true', help='ratios of wall time instead of CPU time on CPU')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--child-only', action='store_true',
                        help='run each method once in its own process, for time and peak memory (long inputs)')
    parser.add_argument('--child-peak', nargs=2, metavar=('SETTING', 'METHOD'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_only and torch.device(args.device).type != 'cpu':
        parser.error('--child-only measures the peak resident memory of CPU processes; on a GPU run without it (the '
                     'allocator\'s peak is measured in the process)')
    if args.child_only and not os.path.exists('/proc/self/clear_refs'):
        parser.error('--child-only reads the kernel\'s memory high-water mark (/proc/self/clear_refs, Linux), which '
                     'this system does not have')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_peak:
        print(child_peak(*args.child_peak, args))
        return

    results = {'device': args.device, 'torch': torch.__version__, 'threads': torch.get_num_threads(), 'settings': []}
    for setting in args.settings:
        results['settings'].append(benchmark(setting, args))
    with open(args.output, 'w') as file:
        json.dump(results, file, indent=2)
    print(markdown(results))
    table = long_context(results)
    if table:
        print(table)
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
