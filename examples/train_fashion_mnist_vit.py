'''Train the small torchvision ViT shipped with zennit_attn on Fashion-MNIST, reproducibly.

Needs the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``).

Writes, into zennit_attn/assets/:
    fashion_mnist_vit.pt            float32 state dict of ``zennit_attn.models.fashion_mnist_vit()``
    fashion_mnist_samples.npz       48 test images (uint8), their labels and their test-set indices
    fashion_mnist_vit.json          test accuracy, epochs, seed, training time, parameter count, settings

Usage:
    python examples/train_fashion_mnist_vit.py              # full run (8 epochs; 29 minutes on a busy 2-core machine)
    python examples/train_fashion_mnist_vit.py --time 50    # time 50 training steps and stop
'''
import argparse
import json
import math
import os
import pathlib
import platform
import random
import time

import numpy as np
import torch
from tqdm import tqdm

from zennit_attn.data import FASHION_MNIST_CLASSES, fashion_mnist_transform, load_fashion_mnist
from zennit_attn.models import fashion_mnist_vit

ASSETS = pathlib.Path(__file__).resolve().parents[1] / 'zennit_attn' / 'assets'
N_SAMPLES = 48
SAMPLES_PER_CLASS = 5


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception as error:  # pragma: no cover - depends on the torch build
        print(f'deterministic algorithms not available: {error}')


def augment(images, generator, pad=2):
    '''Random crop with zero padding and random horizontal flip, on a uint8 batch N x 28 x 28.'''
    n, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]
    cols = (dx[:, None] + torch.arange(width))[:, None, :]
    cropped = padded[torch.arange(n)[:, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None], cropped.flip(-1), cropped)


@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    model.eval()
    predictions = torch.cat([
        model(fashion_mnist_transform(images[start:start + batch_size])).argmax(1)
        for start in range(0, len(images), batch_size)
    ])
    return (predictions == labels).float().mean().item(), predictions


def select_samples(labels):
    '''Fixed selection: the first SAMPLES_PER_CLASS test images of each class, ordered rank-major (one image per
    class, then the next one per class, ...), cut to N_SAMPLES. So ``samples[:10]`` holds one image per class.'''
    first = [torch.nonzero(labels == cls).flatten()[:SAMPLES_PER_CLASS].tolist() for cls in range(10)]
    order = [first[cls][rank] for rank in range(SAMPLES_PER_CLASS) for cls in range(10)]
    return np.array(order[:N_SAMPLES], dtype=np.int64)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--warmup-epochs', type=float, default=1.0)
    parser.add_argument('--label-smoothing', type=float, default=0.1)
    parser.add_argument('--no-augment', action='store_true', help='train without random crop and flip')
    parser.add_argument('--seed', type=int, default=0)
    # One thread: the model is small, so a second thread gains little, and when the two cores are shared with
    # other work, two threads stall on each other (measured here: 10x slower per step). The shipped weights
    # were trained with one thread; CPU results can differ in the last bits with another thread count.
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--time', type=int, default=0, metavar='STEPS', help='time STEPS training steps, then stop')
    parser.add_argument('--output', type=pathlib.Path, default=ASSETS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels = load_fashion_mnist('train')
    test_images, test_labels = load_fashion_mnist('test')

    model = fashion_mnist_vit()
    n_params = sum(param.numel() for param in model.parameters())
    print(f'parameters: {n_params}')

    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or 'pos_embedding' in name or 'class_token' in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': args.weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
        lr=args.lr,
    )

    def lr_factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_time = time.perf_counter()
    step = 0
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{args.epochs}', leave=False)
        running_loss, running_correct, seen = 0.0, 0, 0
        for batch in progress:
            index = order[batch * args.batch_size:(batch + 1) * args.batch_size]
            images, labels = train_images[index], train_labels[index]
            if not args.no_augment:
                images = augment(images, generator)
            logits = model(fashion_mnist_transform(images))
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1

            running_loss += loss.item() * len(index)
            running_correct += (logits.argmax(1) == labels).sum().item()
            seen += len(index)
            progress.set_postfix(loss=f'{running_loss / seen:.3f}', acc=f'{running_correct / seen:.3f}')
            if args.time and step >= args.time:
                elapsed = time.perf_counter() - start_time
                print(f'{step} steps in {elapsed:.1f} s: {elapsed / step * 1000:.0f} ms/step, '
                      f'about {elapsed / step * steps_per_epoch:.0f} s/epoch')
                return
        accuracy, _ = evaluate(model, test_images, test_labels)
        elapsed = time.perf_counter() - start_time
        history.append({'epoch': epoch + 1, 'train_loss': round(running_loss / seen, 4),
                        'train_accuracy': round(running_correct / seen, 4), 'test_accuracy': round(accuracy, 4),
                        'elapsed_s': round(elapsed, 1)})
        print(f'epoch {epoch + 1}/{args.epochs}: train loss {running_loss / seen:.4f}, '
              f'train acc {running_correct / seen:.4f}, test acc {accuracy:.4f}, {elapsed:.0f} s')
    train_time = time.perf_counter() - start_time

    model.eval()
    accuracy, predictions = evaluate(model, test_images, test_labels)
    per_class = {FASHION_MNIST_CLASSES[cls]: round((predictions[test_labels == cls] == cls).float().mean().item(), 4)
                 for cls in range(10)}
    print(f'final test accuracy (10,000 images): {accuracy:.4f}; training time {train_time:.0f} s')

    args.output.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().float().contiguous().clone() for key, value in model.state_dict().items()}
    torch.save(state_dict, args.output / 'fashion_mnist_vit.pt')

    indices = select_samples(test_labels)
    np.savez_compressed(
        args.output / 'fashion_mnist_samples.npz',
        images=test_images[indices].numpy(),
        labels=test_labels[indices].numpy(),
        indices=indices,
    )
    sample_accuracy = (predictions[indices] == test_labels[indices]).float().mean().item()

    report = {
        'dataset': 'Fashion-MNIST (Debian package dataset-fashion-mnist)',
        'test_accuracy': round(accuracy, 4),
        'test_images': len(test_images),
        'per_class_test_accuracy': per_class,
        'samples': {'count': len(indices), 'correct': int(round(sample_accuracy * len(indices)))},
        'epochs': args.epochs,
        'seed': args.seed,
        'training_time_s': round(train_time, 1),
        'threads': args.threads,
        'parameters': n_params,
        'hyperparameters': {
            'batch_size': args.batch_size, 'optimizer': 'AdamW', 'lr': args.lr, 'schedule': 'linear warmup + cosine',
            'warmup_epochs': args.warmup_epochs, 'weight_decay': args.weight_decay,
            'label_smoothing': args.label_smoothing,
            'augmentation': None if args.no_augment else 'random crop (pad 2) + horizontal flip',
        },
        'history': history,
        'torch': torch.__version__,
        'python': platform.python_version(),
    }
    with open(args.output / 'fashion_mnist_vit.json', 'w') as fd:
        json.dump(report, fd, indent=2)
        fd.write('\n')
    for name in ('fashion_mnist_vit.pt', 'fashion_mnist_samples.npz', 'fashion_mnist_vit.json'):
        print(f'wrote {args.output / name} ({os.path.getsize(args.output / name)} bytes)')


if __name__ == '__main__':
    main()
