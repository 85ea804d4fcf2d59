'''Latent features of real models: the most relevant neurons for a prediction, their reference samples (relevance
maximization over a corpus) and their conditional heatmaps.

* ``sentiment``: the shipped MiniLM sentiment classifier on Rotten Tomatoes snippets; the MLP neurons of the last
  block that carry a positive and a negative review, each with its reference snippets.
* ``vit``: the shipped Fashion-MNIST ViT; the MLP neurons and the heads of the last block that carry a shirt, a
  sneaker, a sandal and a bag (collars, soles, straps), with reference crops from the Fashion-MNIST test set.
* ``gemma``: Gemma-3-270M (a float32 copy at ``--gemma DIR``, see ASSETS.md) on a factual prompt; the MLP neurons
  that carry " Paris", with reference contexts from short factual prompts.

Collections are saved in the output folder and resumed when the script is run again.

Usage:
    python examples/latent_features.py -o latent-output                    # all three
    python examples/latent_features.py --part sentiment --corpus 600
'''
import argparse
import json
import time
from pathlib import Path

import torch

from zennit_attn.composites import AttnLRP, AttnLRPViT
from zennit_attn.reference import Heads, Neurons, collect_references
from zennit_attn.report import image_neurons_report, text_neurons_report


SENTIMENT_LAYER = 'encoder.encoder.layer.5.intermediate'
VIT_LAYER = 'encoder.layers.encoder_layer_3.mlp.1'
VIT_HEADS = 'encoder.layers.encoder_layer_3.self_attention.attention'
VIT_CLASSES = (6, 7, 5, 8)  # shirt (collar), sneaker (sole), sandal (straps), bag (handle)
GEMMA_PROMPT = 'The Eiffel Tower is located in the city of'
GEMMA_CORPUS = [
    'The Colosseum is located in the city of', 'The capital of France is', 'The Louvre museum is in',
    'The Statue of Liberty stands in', 'Big Ben is a clock tower in', 'The capital of Italy is',
    'The Brandenburg Gate is in the city of', 'The Sagrada Familia is a church in', 'The capital of Germany is',
    'The Acropolis overlooks the city of', 'Mount Fuji is the highest mountain in', 'The Kremlin is in',
    'The capital of Spain is', 'The Golden Gate Bridge is in', 'Notre-Dame cathedral is in the city of',
    'The Sydney Opera House is in', 'The capital of Japan is', 'The Taj Mahal is located in the city of',
    'The Parthenon is a temple in', 'Paris is the capital of', 'The Rhine flows through', 'Tokyo is the capital of',
    'The Tower of London is in', 'The Vatican is surrounded by the city of',
]


def pick_reviews(model, tokenizer, texts, count=1, max_words=14):
    '''The first short reviews predicted positive and negative with probability > 0.95.'''
    picked = {0: [], 1: []}
    for start in range(0, len(texts), 32):
        batch = [text for text in texts[start:start + 32] if len(text.split()) <= max_words]
        if not batch:
            continue
        encoded = tokenizer(batch, return_tensors='pt', padding=True)
        with torch.no_grad():
            probabilities = model(encoded['input_ids'], encoded['attention_mask']).softmax(-1)
        for text, row in zip(batch, probabilities):
            label = int(row.argmax())
            if row[label] > 0.95 and len(picked[label]) < count:
                picked[label].append(text)
        if all(len(value) == count for value in picked.values()):
            break
    return picked[1] + picked[0]


def sentiment(args, out):
    from zennit_attn.data import rotten_tomatoes_split
    from zennit_attn.models import SENTIMENT_CLASSES, load_minilm_sentiment, load_minilm_tokenizer
    model, tokenizer = load_minilm_sentiment(), load_minilm_tokenizer()
    _, (texts, _) = rotten_tomatoes_split()
    corpus, rest = texts[:args.corpus], texts[args.corpus:]
    reviews = pick_reviews(model, tokenizer, rest)
    summary = text_neurons_report(
        model, tokenizer, reviews, SENTIMENT_LAYER, corpus, out / 'sentiment', AttnLRP(), Neurons(),
        SENTIMENT_CLASSES, top=5, k=3, state_path=out / 'sentiment_references.pt',
        title='MiniLM sentiment: most relevant MLP neurons of the last block',
    )
    for entry in summary['texts']:
        print(f'\n{entry["prediction"]}: "{entry["text"]}"')
        for item in entry['units']:
            print(f'  neuron {item["unit"]:4d}  R = {item["relevance"]:+.4f}')
            for snippet in item['references']:
                print(f'      {snippet}')
    return summary


def vit(args, out):
    from zennit_attn.cli import default_image_task
    from zennit_attn.data import FASHION_MNIST_CLASSES, fashion_mnist_transform, load_fashion_mnist
    task = default_image_task()
    raw, labels = load_fashion_mnist('test')
    corpus_raw = raw[:args.images]
    explained = [int((labels[args.images:] == label).nonzero()[0]) + args.images for label in VIT_CLASSES]
    inputs = fashion_mnist_transform(raw[explained])
    shown = [raw[index].numpy()[..., None].repeat(3, -1) for index in explained]
    corpus_images = corpus_raw.numpy()[..., None].repeat(3, -1)
    corpus = fashion_mnist_transform(corpus_raw)
    # one pass over the corpus for both layers
    references = collect_references(task.model, corpus, {VIT_LAYER: Neurons(), VIT_HEADS: Heads()}, k=4,
                                    composite=AttnLRPViT(), batch_size=64, state_path=out / 'vit_references.pt',
                                    resume=True)
    results = {}
    for name, layer, top in (('vit_mlp', VIT_LAYER, 3), ('vit_heads', VIT_HEADS, 2)):
        results[name] = image_neurons_report(
            task.model, inputs, shown, layer, corpus, corpus_images, out / name, AttnLRPViT(), None,
            list(FASHION_MNIST_CLASSES), top=top, k=4, crop=10, references=references,
            title=f'Fashion-MNIST ViT: most relevant {"heads" if name == "vit_heads" else "MLP neurons"} of '
                  'the last block',
        )
        for entry in results[name]['images']:
            units = ', '.join(f'{item["unit"]} ({item["relevance"]:+.2f}; refs '
                              + ' '.join(FASHION_MNIST_CLASSES[int(labels[ref["sample"]])].split()[0].lower()
                                         for ref in item['references']) + ')'
                              for item in entry['units'])
            print(f'{name} {entry["prediction"]}: {units}')
    return results


def gemma(args, out):
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.gemma)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.gemma, dtype=torch.float32).eval()
    summary = text_neurons_report(
        model, tokenizer, [GEMMA_PROMPT], args.gemma_layer, GEMMA_CORPUS, out / 'gemma', AttnLRP(), Neurons(),
        None, top=5, k=3, batch_size=8, max_length=16, state_path=out / 'gemma_references.pt',
        title='Gemma-3-270M: most relevant MLP neurons for the next token',
    )
    for entry in summary['texts']:
        print(f'\n"{entry["text"]}" -> {entry["prediction"]!r}')
        for item in entry['units']:
            print(f'  neuron {item["unit"]:4d}  R = {item["relevance"]:+.4f}  refs: ' + ' | '.join(item['references']))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--part', choices=('all', 'sentiment', 'vit', 'gemma'), default='all')
    parser.add_argument('-o', '--output', default='latent-output')
    parser.add_argument('--corpus', type=int, default=600, help='Rotten Tomatoes reference snippets')
    parser.add_argument('--images', type=int, default=1000, help='Fashion-MNIST reference images')
    parser.add_argument('--gemma', default='/work/cache/gemma3-270m', help='float32 Gemma-3-270M directory')
    parser.add_argument('--gemma-layer', default='model.layers.9.mlp.up_proj',
                        help='Gemma module whose output units are ranked')
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    parts = ('sentiment', 'vit', 'gemma') if args.part == 'all' else (args.part,)
    results = {}
    for part in parts:
        started = time.perf_counter()
        results[part] = globals()[part](args, out)
        print(f'[{part}: {time.perf_counter() - started:.0f} s]')
    (out / f'latent_features_{args.part}.json').write_text(json.dumps(results, indent=2, default=str))


if __name__ == '__main__':
    main()
