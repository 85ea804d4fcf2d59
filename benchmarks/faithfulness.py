'''Perturbation-faithfulness benchmark (ATTNLRP.md §5): every attribution method on the real Fashion-MNIST ViT and the
MiniLM sentiment model, with γ tuned on a held-out split.

Not a test: run ``python benchmarks/faithfulness.py [--output DIR] [--quick]``.

Protocol
--------
* Images: ``--samples`` Fashion-MNIST *test* images (a fixed random permutation of the test set, seed ``--seed``),
  explained for the model's predicted class; pixels (and, separately, the 4x4 patches of the ViT) are set to 0 in
  normalized space (= the training-set mean intensity) in ``--steps`` steps, MoRF and LeRF; ABPC = ∫ (LeRF − MoRF).
* γ tuning: ``tune_gamma`` over conv γ × linear γ on ``--tune-samples`` *other* test images (the next ones in the same
  permutation, disjoint from the evaluation images), pixel granularity; the tuned ``attnlrp_vit`` is then evaluated
  on the evaluation images next to the paper's preset (conv γ 0.25, linear γ 0.05).
* Text (if ``zennit_attn.attribution.token_relevance`` and the MiniLM model are available): ``--text-samples``
  held-out Rotten Tomatoes sentences (the test split of ``rotten_tomatoes_split``, which the sentiment head never saw),
  explained for the predicted class; whole token embeddings are set to 0 (only real tokens are ranked).
  Composites via ``token_relevance`` (one sentence at a time, so the masked mean pooling of ``MiniLMSentiment`` is a
  plain mean over tokens, replaced by a hooked :py:class:`zennit_attn.layers.Mean`); gradient, input × gradient,
  integrated gradients (zero embedding baseline) and SmoothGrad at the input embeddings, reduced to one score per
  token by the signed sum over the hidden dimension. Attention rollouts are not run on text: the model pools by a mean
  over tokens (there is no class token whose attention row rollout reads).
* A random ranking is always reported.

Writes ``<output>/{image_pixel,image_patch,text_token}/faithfulness*.{json,csv,png}``, ``gamma_tuning.{json,csv}``
and ``summary.md``, and prints the Markdown tables.
'''
import argparse
import csv
import json
import os
import sys
import time
import traceback

import torch

import zennit_attn  # noqa: F401 (registers the composites)
from zennit_attn.evaluation import (
    evaluate, evaluate_tokens, paired_difference, plot_results, save_results, tune_gamma,
)
from zennit_attn.methods import attribute


IMAGE_METHODS = [
    'attnlrp_vit', 'cp_lrp_vit', 'attnlrp', 'cp_lrp', 'gradient', 'input_x_gradient', 'integrated_gradients',
    'smoothgrad', 'attention_rollout', 'grad_x_attn_rollout',
]
PAPER_PRESET = (0.25, 0.05)
CONV_GAMMAS = (0., 0.1, 0.25, 0.5, 1.)
LINEAR_GAMMAS = (0., 0.01, 0.05, 0.1, 0.25)
TEXT_COMPOSITES = ['attnlrp', 'cp_lrp']


def log(message):
    print(f'[{time.strftime("%H:%M:%S")}] {message}', flush=True)


# ----------------------------------------------------------------------------------------------------- images
def image_model(random_model=False):
    '''The trained Fashion-MNIST ViT, or (if ``random_model`` or the weights are missing) a random one.'''
    from zennit_attn.models import fashion_mnist_vit, load_fashion_mnist_vit
    if not random_model:
        try:
            return load_fashion_mnist_vit(), 'trained Fashion-MNIST ViT (zennit_attn.models.load_fashion_mnist_vit)'
        except (FileNotFoundError, ModuleNotFoundError, RuntimeError) as error:
            log(f'WARNING: trained Fashion-MNIST ViT not available ({error}); using a RANDOMLY INITIALISED ViT')
    torch.manual_seed(0)
    model = fashion_mnist_vit()
    with torch.no_grad():  # torchvision initialises the head to zero
        model.heads.head.weight.normal_(0, model.hidden_dim ** -0.5)
        model.heads.head.bias.normal_(0, 0.1)
    return model.eval(), 'RANDOMLY INITIALISED Fashion-MNIST ViT architecture (trained weights unavailable)'


def image_data(samples, tune_samples, seed):
    '''Disjoint evaluation and tuning images from a fixed random permutation of the Fashion-MNIST test set.'''
    from zennit_attn.data import fashion_mnist_transform, load_fashion_mnist
    images, labels = load_fashion_mnist('test')
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    evaluation, tuning = order[:samples], order[samples:samples + tune_samples]
    assert not set(evaluation.tolist()) & set(tuning.tolist())
    return (
        (fashion_mnist_transform(images[evaluation]), labels[evaluation], evaluation),
        (fashion_mnist_transform(images[tuning]), labels[tuning], tuning),
    )


def predictions(model, inputs, batch_size=256):
    with torch.no_grad():
        return torch.cat([model(inputs[i:i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])


def write_tuning(tuning, directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'gamma_tuning.json'), 'w') as fd:
        json.dump({'best': tuning.best, 'best_score': tuning.best_score, 'table': tuning.table,
                   'paper_preset': PAPER_PRESET}, fd, indent=1)
    with open(os.path.join(directory, 'gamma_tuning.csv'), 'w', newline='') as fd:
        writer = csv.DictWriter(fd, fieldnames=list(tuning.table[0]))
        writer.writeheader()
        writer.writerows(tuning.table)


def run_images(args, out, report):
    model, description = image_model(args.random_model)
    report.append(f'## Images: {description}\n')
    (inputs, labels, indices), (tune_inputs, tune_labels, tune_indices) = image_data(
        args.samples, args.tune_samples, args.seed,
    )
    targets = predictions(model, inputs)
    accuracy = (targets == labels).double().mean().item()
    log(f'{description}: {len(inputs)} evaluation images (accuracy {accuracy:.3f}), {len(tune_inputs)} tuning images')
    report.append(
        f'{len(inputs)} Fashion-MNIST test images (permutation seed {args.seed}; model accuracy on them '
        f'{accuracy:.3f}), explained for the predicted class; {args.steps} perturbation steps, baseline 0 in '
        f'normalized space. γ tuned on {len(tune_inputs)} other test images (disjoint).\n'
    )
    common = dict(batch_size=args.batch_size, steps=args.steps, progress=not args.no_progress)
    methods = {name: name for name in IMAGE_METHODS}
    if args.quick:
        methods['integrated_gradients'] = ('integrated_gradients', {'n_iter': 4})
        methods['smoothgrad'] = ('smoothgrad', {'n_iter': 4})

    tuned = None
    if not args.skip_tuning:
        started = time.perf_counter()
        tuning = tune_gamma(
            model, tune_inputs, tune_labels, conv_gammas=args.conv_gammas, linear_gammas=args.linear_gammas,
            composite='attnlrp_vit', granularity='pixel', target='predicted', **common,
        )
        write_tuning(tuning, out)
        preset = next((row for row in tuning.table if (row['conv_gamma'], row['linear_gamma']) == PAPER_PRESET), None)
        preset_text = f"{preset['abpc_mean']:.3f} ± {preset['abpc_se']:.3f}" if preset else 'not in grid'
        log(f'γ tuning done in {time.perf_counter() - started:.0f} s: best {tuning.best} ({tuning.best_score:.3f})')
        report += [
            '### γ tuning (attnlrp_vit, ABPC on the held-out tuning images, pixel granularity)\n',
            tuning.markdown(), '',
            f'Tuned: conv γ = {tuning.best[0]:g}, linear γ = {tuning.best[1]:g} (held-out ABPC '
            f'{tuning.best_score:.3f}); paper preset (Table B.5): conv γ = {PAPER_PRESET[0]}, linear γ = '
            f'{PAPER_PRESET[1]} (held-out ABPC {preset_text}).\n',
        ]
        tuned = tuning.composite
        methods[f'attnlrp_vit (tuned γ {tuning.best[0]:g}/{tuning.best[1]:g})'] = tuned

    for granularity in args.granularities:
        started = time.perf_counter()
        patch_size = model.patch_size if granularity == 'patch' else None
        results = evaluate(
            model, inputs, labels, methods, granularity=granularity, patch_size=patch_size,
            description=f'images/{granularity}', random_seed=args.seed, target='predicted', **common,
        )
        results.metadata.update(model=description, test_indices=indices.tolist(), targets='predicted class')
        directory = os.path.join(out, f'image_{granularity}')
        save_results(results, directory)
        plot_results(results, directory, title=f'Fashion-MNIST ViT, {granularity} perturbation')
        size = f' ({patch_size}x{patch_size})' if patch_size else ''
        title = f'Fashion-MNIST ViT, {granularity} granularity{size}'
        table = results.markdown(title)
        report += [table, '', paired_lines(results), '']
        log(f'{granularity} granularity done in {time.perf_counter() - started:.0f} s\n{table}')


def paired_lines(results):
    '''Paired per-sample ABPC differences of the headline comparisons (same images, so a paired s.e.).'''
    tuned = next((name for name in results.methods if name.startswith('attnlrp_vit (tuned')), None)
    pairs = [(tuned, 'attnlrp_vit'), ('attnlrp_vit', 'attnlrp'), ('attnlrp_vit', 'cp_lrp_vit'),
             ('attnlrp_vit', 'integrated_gradients'), (tuned, 'integrated_gradients')]
    lines = ['Paired ABPC differences over the same samples (mean ± paired s.e., 95 % percentile bootstrap interval '
             'with 10000 resamples and seed 0, win rate):', '']
    for first, second in pairs:
        if first in results.methods and second in results.methods:
            paired = paired_difference(results, first, second)
            lines.append(f'- {first} − {second}: {paired.mean:+.3f} ± {paired.se:.3f} [{paired.low:+.3f}, '
                         f'{paired.high:+.3f}], wins {paired.win_rate:.0%}')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------- text
class MeanPooledSentiment(torch.nn.Module):
    '''``MiniLMSentiment`` for unpadded single sentences, with its pooling as a hooked
    :py:class:`zennit_attn.layers.Mean` (the masked mean equals the plain mean without padding), and
    ``get_input_embeddings`` for :py:func:`zennit_attn.attribution.token_relevance`.'''
    def __init__(self, model):
        super().__init__()
        from zennit_attn.layers import Mean
        self.model = model
        self.mean = Mean(dim=1)

    def get_input_embeddings(self):
        return self.model.encoder.get_input_embeddings()

    def forward(self, inputs_embeds=None, attention_mask=None, input_ids=None):
        if attention_mask is not None and not attention_mask.bool().all():
            raise ValueError('MeanPooledSentiment explains unpadded sentences only (one at a time)')
        hidden = self.model.encoder(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
        ).last_hidden_state
        return self.model.head(self.mean(hidden))


def text_methods(model, args):
    '''``{label: explain(embeds, mask, targets) -> (B, T)}`` for the text benchmark.'''
    from zennit_attn.attribution import token_relevance
    import zennit.composites
    unpadded = MeanPooledSentiment(model).eval()

    def embedding_method(name, **options):
        def explain(embeds, mask, targets):
            wrapper = EmbeddingsModel(model, mask)
            return attribute(wrapper, embeds, targets, name, **options).sum(-1)
        return explain

    def composite_method(name):
        def explain(embeds, mask, targets):
            scores = torch.zeros(mask.shape, dtype=torch.float64)
            embedding = unpadded.get_input_embeddings()
            for row in range(len(mask)):
                length = int(mask[row].sum())
                ids = explain.ids[row, :length][None]
                # token_relevance re-embeds the ids: check it sees the same embeddings as the perturbation
                assert torch.allclose(embedding(ids)[0], embeds[row, :length])
                result = token_relevance(
                    unpadded, zennit.composites.COMPOSITES[name](), ids, attention_mask=mask[row, :length][None],
                    target=targets[row:row + 1],
                )
                scores[row, :length] = result.relevance[0].double()
            return scores
        return explain

    n_iter = 4 if args.quick else 20
    methods = {name: composite_method(name) for name in TEXT_COMPOSITES}
    methods.update({
        'gradient': embedding_method('gradient'),
        'input_x_gradient': embedding_method('input_x_gradient'),
        'integrated_gradients': embedding_method('integrated_gradients', n_iter=n_iter),
        'smoothgrad': embedding_method('smoothgrad', n_iter=n_iter),
    })
    return methods


class EmbeddingsModel(torch.nn.Module):
    '''``inputs_embeds -> logits`` with a fixed attention mask (one input tensor, as Zennit's attributors need).'''
    def __init__(self, model, mask):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, inputs_embeds):
        return self.model(inputs_embeds=inputs_embeds, attention_mask=self.mask)


def run_text(args, out, report):
    try:
        from zennit_attn.attribution import token_relevance  # noqa: F401
        from zennit_attn.data import rotten_tomatoes_split
        from zennit_attn.models import load_minilm_sentiment, load_minilm_tokenizer
        model, tokenizer = load_minilm_sentiment(), load_minilm_tokenizer()
        _, (texts, labels) = rotten_tomatoes_split()
    except Exception as error:  # noqa: BLE001 (report and skip: the text part is optional)
        log(f'skipping the text benchmark: {type(error).__name__}: {error}')
        report.append(f'## Text: skipped ({type(error).__name__}: {str(error).splitlines()[0]})\n')
        return
    texts, labels = texts[:args.text_samples], torch.tensor(labels[:args.text_samples])
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=args.max_tokens, return_tensors='pt')
    ids, mask = encoded['input_ids'], encoded['attention_mask']
    with torch.no_grad():
        embeds = model.encoder.get_input_embeddings()(ids)
        logits = torch.cat([
            model(inputs_embeds=embeds[i:i + 64], attention_mask=mask[i:i + 64]) for i in range(0, len(ids), 64)
        ])
    targets = logits.argmax(1)
    accuracy = (targets == labels).double().mean().item()
    log(f'text: {len(texts)} held-out sentences, accuracy {accuracy:.3f}, up to {ids.shape[1]} tokens')
    methods = text_methods(model, args)
    # the composite methods need the ids of the current batch: evaluate_tokens passes embeddings only
    batch_size = args.batch_size
    for explain in methods.values():
        explain.ids = None
    # batches of similar length, each trimmed to its longest sentence: far less padding to run through the encoder
    order = torch.argsort(mask.sum(1), stable=True)
    collected = []
    started = time.perf_counter()
    for start in range(0, len(ids), batch_size):
        index = order[start:start + batch_size]
        length = int(mask[index].sum(1).max())
        for explain in methods.values():
            explain.ids = ids[index, :length]
        collected.append(evaluate_tokens(
            model, embeds[index, :length], mask[index, :length], targets[index], methods, batch_size=batch_size,
            steps=args.text_steps, random_seed=args.seed + start, progress=not args.no_progress,
            description=f'text {start}',
        ))
        log(f'text: {start + len(index)}/{len(ids)} sentences ({time.perf_counter() - started:.0f} s)')
    results = merge(collected)
    results.metadata.update(sample_order=order.tolist())
    results.metadata.update(
        model='MiniLM sentiment (zennit_attn.models.load_minilm_sentiment)', targets='predicted class',
        accuracy=accuracy, texts='rotten_tomatoes_split() test split, first N',
    )
    directory = os.path.join(out, 'text_token')
    save_results(results, directory)
    plot_results(results, directory, title='MiniLM sentiment, token perturbation')
    table = results.markdown('MiniLM sentiment (Rotten Tomatoes, held-out), token granularity')
    report += [
        f'## Text: MiniLM sentiment, {len(texts)} held-out Rotten Tomatoes sentences (accuracy {accuracy:.3f}), '
        f'explained for the predicted class; whole token embeddings set to 0 in {args.text_steps} steps (only real '
        'tokens, [CLS]/[SEP] included, are ranked). Token scores of the gradient methods: '
        'signed sum over the hidden dimension. Rollouts not run on text (mean-pooled model, no class token).\n',
        table, '',
    ]
    log(table)


def merge(parts):
    '''Concatenate the per-sample curves of several :py:class:`FaithfulnessResults` with the same methods.'''
    from zennit_attn.evaluation import FaithfulnessResults, MethodResult
    methods = {}
    for label in parts[0].methods:
        morf = torch.cat([part.methods[label].morf for part in parts])
        lerf = torch.cat([part.methods[label].lerf for part in parts])
        abpc = torch.cat([part.methods[label].abpc for part in parts])
        methods[label] = MethodResult(morf=morf, lerf=lerf, abpc=abpc)
    metadata = dict(parts[0].metadata, samples=sum(part.methods[label].abpc.numel() for part in parts))
    return FaithfulnessResults(fractions=parts[0].fractions, methods=methods, metadata=metadata)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--output', default='faithfulness-results', help='output directory')
    parser.add_argument('--samples', type=int, default=200, help='evaluation images')
    parser.add_argument('--tune-samples', type=int, default=100, help='held-out images for γ tuning')
    parser.add_argument('--text-samples', type=int, default=200, help='held-out sentences')
    parser.add_argument('--max-tokens', type=int, default=64, help='truncate sentences to this many tokens')
    parser.add_argument('--steps', type=int, default=20, help='perturbation steps (curves have steps + 1 points)')
    parser.add_argument('--text-steps', type=int, default=10,
                        help='perturbation steps for text (sentences have ~10-40 tokens)')
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1, help='torch threads (small models run best on 1)')
    parser.add_argument('--granularities', nargs='+', default=['pixel', 'patch'], choices=['pixel', 'patch'])
    parser.add_argument('--conv-gammas', type=float, nargs='+', default=list(CONV_GAMMAS))
    parser.add_argument('--linear-gammas', type=float, nargs='+', default=list(LINEAR_GAMMAS))
    parser.add_argument('--skip-tuning', action='store_true')
    parser.add_argument('--skip-images', action='store_true')
    parser.add_argument('--skip-text', action='store_true')
    parser.add_argument('--random-model', action='store_true', help='use a randomly initialised ViT (smoke tests)')
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument('--quick', action='store_true',
                        help='tiny smoke run: 8 images, 4 tuning images, 2x2 γ grid, 5 steps, 4 sentences')
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.tune_samples, args.text_samples, args.steps, args.text_steps = 8, 4, 4, 5, 5
        args.conv_gammas, args.linear_gammas, args.batch_size = [0., 0.25], [0., 0.05], 4
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    started = time.perf_counter()
    report = ['# Faithfulness benchmark (ABPC = ∫ LeRF − MoRF, logit units; higher is better)\n',
              f'Command: `{" ".join(sys.argv)}`\n']
    failed = False
    for part, skip in ((run_images, args.skip_images), (run_text, args.skip_text)):
        if skip:
            continue
        try:
            part(args, args.output, report)
        except Exception:  # noqa: BLE001 (keep the other part's results)
            failed = True
            log(f'{part.__name__} failed:\n{traceback.format_exc()}')
            report.append(f'## {part.__name__} FAILED\n\n```\n{traceback.format_exc()}```\n')
    report.append(f'Total time: {time.perf_counter() - started:.0f} s.')
    text = '\n'.join(report)
    with open(os.path.join(args.output, 'summary.md'), 'w') as fd:
        fd.write(text + '\n')
    print('\n' + text)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
