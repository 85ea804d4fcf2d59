'''Data-parallel evaluation (zennit_attn.evaluation.process_group): two CPU processes over gloo give the results of
one process, bit for bit, on the shipped Fashion-MNIST ViT; the CLI under torchrun writes the same files.

Bitwise, not merely close: each process computes whole batches of the single-process run (the same samples, the same
batch number, hence the same random-method and tie-breaking seeds) with the same kernels (one thread per process, as
in the reference), and ABPC is computed after the gather from the same concatenated curves.
'''
import contextlib
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from zennit_attn.evaluation import evaluate, evaluate_tokens, process_group
from zennit_attn.methods import attribute
from zennit_attn.models import load_fashion_mnist_samples, load_fashion_mnist_vit

pytestmark = pytest.mark.usefixtures('single_thread')

SAMPLES, BATCH, STEPS = 6, 2, 4  # three batches for two processes: process 0 gets batches 0 and 2, process 1 batch 1
LAUNCHER = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class Recording:
    '''The gradient, recording which samples it was asked to explain (to see the shards).'''
    def __init__(self):
        self.seen = []

    def __call__(self, model, inputs, target):
        self.seen.append(inputs.clone())
        return attribute(model, inputs, target, 'gradient')


def problem():
    inputs, labels, _ = load_fashion_mnist_samples()
    return load_fashion_mnist_vit(), inputs[:SAMPLES], labels[:SAMPLES]


def run(model, inputs, labels, recording, **options):
    return evaluate(
        model, inputs, labels, {'attnlrp_vit': 'attnlrp_vit', 'gradient': recording}, batch_size=BATCH, steps=STEPS,
        progress=False, **options,
    )


def as_plain(results):
    return {name: {'morf': r.morf, 'lerf': r.lerf, 'abpc': r.abpc} for name, r in results.methods.items()}, \
        results.to_dict()


def worker(rank, ports, directory):
    '''One of two processes: (1) the launcher's environment, group made and destroyed by evaluate; (2) a group the
    caller made: inputs differing between processes and an exception on one process raise on both.'''
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(ports[0]))
    model, inputs, labels = problem()
    recording = Recording()
    results = run(model, inputs, labels, recording)
    assert not dist.is_initialized(), 'the group evaluate created must be destroyed'
    mine = [slice(0, 2), slice(4, 6)] if rank == 0 else [slice(2, 4)]
    assert len(recording.seen) == len(mine) and all(
        torch.equal(seen, inputs[index]) for seen, index in zip(recording.seen, mine))
    # token evaluation shards the same way
    embeddings = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[0, 3:] = 0
    forward = lambda embeds, attention_mask: torch.stack([embeds.sum((1, 2)), -embeds.sum((1, 2))], 1)  # noqa: E731
    tokens = evaluate_tokens(None, embeddings, mask, 0, {'sum': lambda e, m, t: e.sum(-1)}, batch_size=2, steps=3,
                             progress=False, forward=forward)
    torch.save({'image': as_plain(results), 'tokens': as_plain(tokens)}, os.path.join(directory, f'rank{rank}.pt'))

    for name in LAUNCHER:
        os.environ.pop(name, None)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{ports[1]}', rank=rank, world_size=2)
    try:
        with pytest.raises(ValueError, match='process 1 differs from process 0 in samples'):
            run(model, inputs + rank, labels, Recording())
        with pytest.raises(ValueError, match='process 1 differs from process 0 in model weights'):
            run(load_fashion_mnist_vit().requires_grad_(False).apply(
                lambda m: m.weight.mul_(1 + rank) if isinstance(m, torch.nn.Linear) else None,
            ), inputs, labels, Recording())

        def failing(model, inputs, target):
            if rank == 1:
                raise ArithmeticError('only on process 1')
            return inputs

        # process 1 raises its own exception, process 0 a RuntimeError naming process 1: neither waits for the other
        expected = ArithmeticError if rank == 1 else RuntimeError
        with pytest.raises(expected, match='only on process 1'):
            evaluate(model, inputs, labels, {'failing': failing}, batch_size=BATCH, steps=STEPS, progress=False)
        assert dist.is_initialized(), 'a group the caller made stays open'
        # one batch for two processes: process 1 idles (process 0 warns) and still gets the whole result
        with (pytest.warns(UserWarning, match='1 batches for 2 processes') if rank == 0 else contextlib.nullcontext()):
            whole = evaluate(model, inputs, labels, ['gradient'], batch_size=SAMPLES, steps=STEPS, progress=False)
        shared = [None, None]
        dist.all_gather_object(shared, as_plain(whole)[1])
        assert shared[0] == shared[1] and len(shared[rank]['per_sample_abpc']['gradient']) == SAMPLES
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    torch.multiprocessing.spawn(worker, args=((free_port(), free_port()), str(tmp_path)), nprocs=2)
    model, inputs, labels = problem()
    recording = Recording()
    single = as_plain(run(model, inputs, labels, recording, distributed=False))
    assert len(recording.seen) == 3
    embeddings = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[0, 3:] = 0
    forward = lambda embeds, attention_mask: torch.stack([embeds.sum((1, 2)), -embeds.sum((1, 2))], 1)  # noqa: E731
    tokens = as_plain(evaluate_tokens(None, embeddings, mask, 0, {'sum': lambda e, m, t: e.sum(-1)}, batch_size=2,
                                      steps=3, progress=False, forward=forward, distributed=False))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f'rank{rank}.pt')
        for key, reference in (('image', single), ('tokens', tokens)):
            curves, summary = saved[key]
            assert list(curves) == list(reference[0])
            for name, values in reference[0].items():
                for field in ('morf', 'lerf', 'abpc'):
                    assert torch.equal(curves[name][field], values[field]), (rank, key, name, field)
            assert summary == reference[1]
    # the shipped ViT: AttnLRP beats the gradient on these samples, so the curves compared above are not degenerate
    assert single[0]['attnlrp_vit']['abpc'].mean() > single[0]['gradient']['abpc'].mean()


def test_process_group_without_a_launcher(monkeypatch):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    with process_group() as group:
        assert group == (0, 1)
    with process_group(False) as group:
        assert group == (0, 1)
    with pytest.raises(RuntimeError, match='distributed=True, but torch.distributed is not initialised'):
        with process_group(True):
            pass
    monkeypatch.setenv('WORLD_SIZE', '1')
    with process_group() as group:
        assert group == (0, 1) and not dist.is_initialized()
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(RuntimeError, match='WORLD_SIZE=2 is set but MASTER_ADDR, MASTER_PORT are not'):
        with process_group():
            pass
    with process_group(False) as group:  # a process evaluating on its own ignores the launcher
        assert group == (0, 1)


def test_cli_under_torchrun_writes_what_one_process_writes(tmp_path, capsys):
    from zennit_attn.cli import main
    options = ['evaluate', '--samples', str(SAMPLES), '--steps', str(STEPS), '--batch-size', str(BATCH),
               '--methods', 'attnlrp_vit', 'gradient']
    assert main(options + ['-o', str(tmp_path / 'one')]) == 0
    single = capsys.readouterr().out
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER}
    environment['OMP_NUM_THREADS'] = '1'
    completed = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'zennit_attn']
        + options + ['-o', str(tmp_path / 'two')],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # one progress bar, of process 0's 2 batches x 3 methods (process 1 has 1 batch: 3 steps)
    assert '| 0/6 [' in completed.stderr and '/3 [' not in completed.stderr
    # one table, printed by process 0 only, equal to the single process's
    assert completed.stdout.count('| method |') == 1
    table = lambda text: [line for line in text.splitlines() if line.startswith('|')]  # noqa: E731
    assert table(completed.stdout) == table(single) and len(table(single)) == 5
    for name in ('faithfulness.json', 'faithfulness_summary.csv', 'faithfulness_curves.csv'):
        assert (tmp_path / 'two' / name).read_bytes() == (tmp_path / 'one' / name).read_bytes(), name
    saved = json.loads((tmp_path / 'two' / 'faithfulness.json').read_text())
    assert len(saved['per_sample_abpc']['attnlrp_vit']) == SAMPLES


def test_cli_batch_size_must_be_positive(capsys):
    from zennit_attn.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(['evaluate', '--batch-size', '0'])
    assert exit_info.value.code == 2 and 'expected a positive integer, got 0' in capsys.readouterr().err
