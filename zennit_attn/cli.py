'''Command line interface: ``zennit-attn demo | explain | compare | evaluate``.

Bad input (a missing file, an unknown model or composite, an image of the wrong size, a class out of range) ends
with a one-line error and exit status 2, never a traceback; ``--debug`` shows the traceback.
'''
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .composites import UnsupportedModelError


#: methods compared in the demo and by default in ``compare``, with their display names
DEMO_METHODS = {
    'attnlrp_vit': 'AttnLRP-ViT (γ)',
    'cp_lrp_vit': 'CP-LRP-ViT (γ)',
    'attnlrp': 'AttnLRP-ε',
    'integrated_gradients': 'Integrated Gradients',
    'smoothgrad': 'SmoothGrad',
    'attention_rollout': 'Attention rollout',
    'gradient': 'Gradient',
}
COMPOSITE_NAMES = ('attnlrp', 'attnlrp_vit', 'cp_lrp', 'cp_lrp_vit')
DEFAULT_MODEL = 'default'
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CLIError(Exception):
    '''An error caused by the user's input, reported as one line.'''


# --------------------------------------------------------------------------------------------------- models
class ImageTask:
    '''An image classifier with its preprocessing and class names.'''
    def __init__(self, model, image_size, mean, std, classes, gray=False, name=''):
        self.model, self.image_size, self.mean, self.std = model, image_size, mean, std
        self.classes, self.gray, self.name = classes, gray, name

    def load_image(self, path, resize):
        '''Read ``path`` and return (normalized input 1×3×H×W, uint8 RGB image H×W×3).'''
        from PIL import Image, UnidentifiedImageError
        import numpy as np
        path = Path(path)
        if not path.is_file():
            raise CLIError(f'image file not found: {path}')
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as error:
            raise CLIError(f'cannot read {path} as an image ({error})') from None
        image = image.convert('L' if self.gray else 'RGB')
        if image.size != (self.image_size, self.image_size):
            if not resize:
                raise CLIError(
                    f'{path} is {image.size[0]}×{image.size[1]} pixels, but {self.name} expects '
                    f'{self.image_size}×{self.image_size}; pass --resize to resize it'
                )
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        array = np.asarray(image)
        if self.gray:
            from .data import fashion_mnist_transform
            return fashion_mnist_transform(torch.from_numpy(array.copy())[None]), np.repeat(array[..., None], 3, -1)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return ((tensor - mean) / std)[None], array


def default_image_task():
    '''The embedded default: the shipped Fashion-MNIST ViT.'''
    from .data import FASHION_MNIST_CLASSES
    from .models import load_fashion_mnist_vit
    return ImageTask(
        load_fashion_mnist_vit(), 28, None, None, list(FASHION_MNIST_CLASSES), gray=True,
        name='the embedded Fashion-MNIST ViT',
    )


def torchvision_image_task(name, weights):
    '''A torchvision classifier by name, with ``weights`` from torchvision's weights API (or random weights).'''
    import torchvision.models
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise CLIError(
            f'unknown model {name!r}; for images use "default" or a torchvision model name (e.g. vit_b_16)'
        ) from None
    weight_enum = None
    if weights is not None:
        try:
            weight_enum = torchvision.models.get_weight(weights) if '.' in weights else (
                torchvision.models.get_model_weights(name)[weights]
            )
        except (KeyError, ValueError, AttributeError):
            raise CLIError(f'unknown weights {weights!r} for {name}') from None
    try:
        model = builder(weights=weight_enum).eval()
    except (OSError, RuntimeError) as error:
        raise CLIError(f'could not load the {weights} weights of {name} (offline?): {error}') from None
    if weight_enum is not None:
        classes = list(weight_enum.meta.get('categories', []))
        transforms = weight_enum.transforms()
        mean, std, size = transforms.mean, transforms.std, transforms.crop_size[0]
    else:
        print(f'note: {name} has random weights (pass --weights, e.g. IMAGENET1K_V1); torchvision initialises some '
              'classification heads to zero, which gives empty heatmaps', file=sys.stderr)
        classes = [str(index) for index in range(model.heads.head.out_features if hasattr(model, 'heads') else 1000)]
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, getattr(model, 'image_size', 224)
    return ImageTask(model, size, mean, std, classes, name=name)


def image_task(name, weights=None):
    if name in (None, DEFAULT_MODEL):
        if weights is not None:
            raise CLIError('--weights applies to torchvision models, not the embedded default')
        return default_image_task()
    return torchvision_image_task(name, weights)


def text_task(name):
    '''(model, tokenizer, class names) of a text classifier: the MiniLM sentiment default or a Hugging Face path.'''
    if name in (None, DEFAULT_MODEL):
        from .models import SENTIMENT_CLASSES, load_minilm_sentiment, load_minilm_tokenizer
        try:
            return load_minilm_sentiment(), load_minilm_tokenizer(), list(SENTIMENT_CLASSES)
        except ModuleNotFoundError as error:
            raise CLIError(str(error)) from None
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError:
        raise CLIError('text models need transformers: pip install "zennit-attn[transformers]"') from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).eval()
    except (OSError, ValueError) as error:
        raise CLIError(f'could not load the Hugging Face model {name!r}: {str(error).splitlines()[0]}') from None
    labels = model.config.id2label
    return model, tokenizer, [labels[index] for index in range(len(labels))]


# ------------------------------------------------------------------------------------------------ helpers
def check_composite(name):
    import zennit.composites
    if name not in zennit.composites.COMPOSITES:
        raise CLIError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITE_NAMES)}')
    return name


def check_methods(names):
    from .methods import METHODS
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise CLIError(f'unknown method(s) {", ".join(unknown)}; choose from {", ".join(sorted(METHODS))}')
    return names


def resolve_target(task_classes, logits, target):
    '''The class to explain: ``target`` (checked against the number of classes) or the prediction.'''
    classes = logits.shape[-1]
    if target is None:
        return logits.argmax(-1)
    if not 0 <= target < classes:
        raise CLIError(f'class index {target} is out of range: the model has {classes} classes (0..{classes - 1})')
    return torch.full((logits.shape[0],), target, dtype=torch.long)


def output_dir(path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def class_name(classes, index):
    return classes[index] if index < len(classes) else str(index)


def image_heatmaps(task, inputs, targets, methods, progress=True):
    '''Relevance of every method for ``inputs``: dict method -> tensor (B, 3, H, W).'''
    from tqdm.auto import tqdm
    from .methods import attribute
    results = {}
    for method in tqdm(methods, desc='attributing', disable=not progress, leave=False):
        results[method] = attribute(task.model, inputs, targets, method).detach()
    return results


def enlarge(array, factor):
    '''Nearest-neighbour enlargement of an (H, W, 3) array, so tiny images stay legible as PNG files.'''
    return array.repeat(factor, 0).repeat(factor, 1) if factor > 1 else array


def write_image_outputs(out, task, images, targets, relevances, titles, prefix=''):
    '''A comparison grid (rows: images, columns: input and methods) and one overlay per image and method.'''
    from .image import heatmap_grid, overlay, relevance_to_heatmap, save_png
    factor = max(1, 224 // images[0].shape[0])
    written = []
    rows = []
    for index, image in enumerate(images):
        row = [image]
        for method, relevance in relevances.items():
            heatmap = relevance_to_heatmap(relevance[index])
            row.append(heatmap)
            path = out / f'{prefix}{index:02d}_{method}_overlay.png'
            save_png(enlarge(overlay(image, heatmap), factor), path)
            written.append(path)
        rows.append(row)
    grid_path = out / f'{prefix}comparison.png'
    row_titles = [class_name(task.classes, int(target)) for target in targets]
    heatmap_grid(
        rows, ['input'] + [titles.get(method, method) for method in relevances], row_titles=row_titles,
        path=grid_path, scale=4 if images[0].shape[0] <= 64 else 1,
    )
    return [grid_path] + written


def explain_text(model, tokenizer, classes, texts, composite, target, out, prefix='text'):
    '''Token relevance of ``texts`` with ``composite``: writes an HTML and a PNG token heatmap.'''
    import zennit.composites
    from .attribution import token_relevance
    from .text import token_heatmap_html, token_heatmap_png
    encoded = tokenizer(list(texts), return_tensors='pt', padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        logits = model(input_ids=encoded['input_ids'], attention_mask=encoded['attention_mask'])
        logits = getattr(logits, 'logits', logits)
    targets = resolve_target(classes, logits, target)
    result = token_relevance(
        model, zennit.composites.COMPOSITES[composite](), encoded['input_ids'], encoded['attention_mask'],
        target=targets,
    )
    tokens, values, labels = [], [], []
    for index in range(len(texts)):
        keep = encoded['attention_mask'][index].bool()
        tokens.append(tokenizer.convert_ids_to_tokens(encoded['input_ids'][index][keep]))
        values.append(result.relevance[index][keep].tolist())
        probability = logits[index].softmax(-1)[targets[index]].item()
        labels.append(f'{class_name(classes, int(targets[index]))} ({probability:.0%})')
    html_path, png_path = out / f'{prefix}_heatmap.html', out / f'{prefix}_heatmap.png'
    title = f'{composite}: token relevance (red: for the class, blue: against)'
    token_heatmap_html(tokens, values, title=title, path=html_path, labels=labels)
    token_heatmap_png(tokens, values, png_path, title=title, labels=labels)
    return [html_path, png_path]


# ----------------------------------------------------------------------------------------------- commands
DEMO_TEXTS = (
    'a gorgeous, witty and deeply moving film .',
    'the plot is thin and the jokes fall flat .',
    'not as bad as i feared , but far from good .',
)


def command_demo(args):
    '''Compare methods on the embedded Fashion-MNIST ViT, explain sentences with MiniLM, summarise faithfulness.'''
    from .models import load_fashion_mnist_samples
    started = time.perf_counter()
    out = output_dir(args.output)
    task = default_image_task()
    inputs, labels, raw = load_fashion_mnist_samples()
    # one sample per class, in class order, so the grid shows the ten categories
    picks = [int((labels == label).nonzero()[0]) for label in labels.unique()][:args.samples]
    inputs, labels, raw = inputs[picks], labels[picks], raw[picks]
    images = [raw_image.numpy()[..., None].repeat(3, -1) for raw_image in raw]
    with torch.no_grad():
        predictions = task.model(inputs).argmax(-1)
    relevances = image_heatmaps(task, inputs, predictions, list(DEMO_METHODS))
    written = write_image_outputs(out, task, images, predictions, relevances, DEMO_METHODS)
    summary = {
        'model': task.name, 'samples': len(picks), 'labels': labels.tolist(), 'predictions': predictions.tolist(),
    }
    if args.text:
        try:
            model, tokenizer, classes = text_task(DEFAULT_MODEL)
        except CLIError as error:
            print(f'skipping the text demo: {error}')
        else:
            written += explain_text(model, tokenizer, classes, DEMO_TEXTS, 'attnlrp', None, out)
    if args.faithfulness:
        from .evaluation import evaluate, plot_results, save_results
        model_inputs, model_labels, _ = load_fashion_mnist_samples()
        results = evaluate(task.model, model_inputs, model_labels, list(DEMO_METHODS), steps=10)
        save_results(results, out / 'faithfulness')
        plot_results(results, out / 'faithfulness')
        summary['faithfulness'] = faithfulness_table(results)
        print(summary['faithfulness'])
    summary['seconds'] = round(time.perf_counter() - started, 1)
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    print(f'wrote {len(written) + 1} files to {out.resolve()} in {summary["seconds"]} s:')
    print(f'  {written[0]}  (methods side by side)')
    for path in written:
        if path.suffix == '.html':
            print(f'  {path}  (token heatmap, open in a browser)')
    print(f'  {out / "summary.json"}')
    return 0


def faithfulness_table(results):
    '''A Markdown table of ABPC per method from an evaluation result.'''
    from .evaluation import results_table
    return results_table(results)


def command_explain(args):
    '''Explain one image or text with one composite.'''
    out = output_dir(args.output)
    # the vision preset is the default for images, plain AttnLRP for text
    composite = check_composite(args.composite or ('attnlrp' if args.text is not None else 'attnlrp_vit'))
    if args.text is not None:
        model, tokenizer, classes = text_task(args.model)
        written = explain_text(model, tokenizer, classes, [args.text], composite, args.target, out, prefix='explain')
    else:
        if args.image is None:
            raise CLIError('pass an IMAGE file or --text TEXT')
        task = image_task(args.model, args.weights)
        inputs, image = task.load_image(args.image, args.resize)
        with torch.no_grad():
            logits = task.model(inputs)
        targets = resolve_target(task.classes, logits, args.target)
        relevances = image_heatmaps(task, inputs, targets, [composite], progress=False)
        written = write_image_outputs(out, task, [image], targets, relevances, DEMO_METHODS, prefix='explain_')
        print(f'class {int(targets[0])} ({class_name(task.classes, int(targets[0]))}), '
              f'logit {logits[0, targets[0]].item():.3f}')
    for path in written:
        print(path)
    return 0


def command_compare(args):
    '''Explain one image with several methods side by side.'''
    out = output_dir(args.output)
    methods = check_methods(args.methods or list(DEMO_METHODS))
    task = image_task(args.model, args.weights)
    if args.image is None:
        from .models import load_fashion_mnist_samples
        if args.model not in (None, DEFAULT_MODEL):
            raise CLIError('pass an IMAGE file (the shipped samples only fit the embedded default model)')
        inputs, _, raw = load_fashion_mnist_samples()
        inputs, images = inputs[:1], [raw[0].numpy()[..., None].repeat(3, -1)]
    else:
        inputs, image = task.load_image(args.image, args.resize)
        images = [image]
    with torch.no_grad():
        logits = task.model(inputs)
    targets = resolve_target(task.classes, logits, args.target)
    relevances = image_heatmaps(task, inputs, targets, methods)
    for path in write_image_outputs(out, task, images, targets, relevances, DEMO_METHODS, prefix='compare_'):
        print(path)
    return 0


def command_evaluate(args):
    '''Faithfulness benchmark (MoRF/LeRF, ABPC) on the embedded default model.'''
    from .evaluation import evaluate, plot_results, save_results
    out = output_dir(args.output)
    methods = check_methods(args.methods or list(DEMO_METHODS))
    if args.model not in (None, DEFAULT_MODEL):
        raise CLIError('evaluate runs on the embedded default; use benchmarks/faithfulness.py for the full benchmark')
    task = default_image_task()
    if args.samples <= 48:
        from .models import load_fashion_mnist_samples
        inputs, labels, _ = load_fashion_mnist_samples()
    else:
        from .data import fashion_mnist_transform, load_fashion_mnist
        try:
            images, labels = load_fashion_mnist('test')
        except FileNotFoundError as error:
            raise CLIError(str(error)) from None
        inputs = fashion_mnist_transform(images)
    inputs, labels = inputs[:args.samples], labels[:args.samples]
    results = evaluate(task.model, inputs, labels, methods, steps=args.steps)
    save_results(results, out)
    plot_results(results, out)
    print(faithfulness_table(results))
    print(f'results in {out.resolve()}')
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog='zennit-attn', description='AttnLRP explanations for transformers (a Zennit plugin).',
    )
    parser.add_argument('--debug', action='store_true', help='show tracebacks')
    commands = parser.add_subparsers(dest='command', required=True)

    demo = commands.add_parser('demo', help='compare methods on the embedded default model and write images')
    demo.add_argument('-o', '--output', default='demo-output')
    demo.add_argument('--samples', type=int, default=6, help='images in the comparison grid (max 10)')
    demo.add_argument('--no-text', dest='text', action='store_false', help='skip the MiniLM token heatmap')
    demo.add_argument('--no-faithfulness', dest='faithfulness', action='store_false')
    demo.set_defaults(run=command_demo)

    def add_model_options(sub):
        sub.add_argument('image', nargs='?', help='image file (PNG/JPEG)')
        sub.add_argument('--model', default=DEFAULT_MODEL,
                         help='"default" (shipped Fashion-MNIST ViT / MiniLM), a torchvision model name for images, '
                         'or a Hugging Face sequence classifier (name or path) for --text')
        sub.add_argument('--weights', help='torchvision weights, e.g. IMAGENET1K_V1')
        sub.add_argument('--target', type=int, help='class index to explain (default: the prediction)')
        sub.add_argument('--resize', action='store_true', help='resize the image to the model\'s input size')
        sub.add_argument('-o', '--output', default='zennit-attn-output')

    explain = commands.add_parser('explain', help='explain one image or text')
    add_model_options(explain)
    explain.add_argument('--text', help='explain this text instead of an image')
    explain.add_argument('--composite', help=f'one of {", ".join(COMPOSITE_NAMES)} (default: attnlrp_vit for '
                         'images, attnlrp for text)')
    explain.set_defaults(run=command_explain)

    compare = commands.add_parser('compare', help='explain one image with several methods side by side')
    add_model_options(compare)
    compare.add_argument('--methods', nargs='+', help='methods to compare (default: the demo set)')
    compare.set_defaults(run=command_compare)

    evaluate = commands.add_parser('evaluate', help='perturbation faithfulness (MoRF/LeRF, ABPC)')
    evaluate.add_argument('--model', default=DEFAULT_MODEL)
    evaluate.add_argument('--methods', nargs='+')
    evaluate.add_argument('--samples', type=int, default=48)
    evaluate.add_argument('--steps', type=int, default=20)
    evaluate.add_argument('-o', '--output', default='zennit-attn-evaluation')
    evaluate.set_defaults(run=command_evaluate)
    return parser


def main(argv=None):
    '''Entry point of the ``zennit-attn`` console script.'''
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CLIError as error:
        print(f'zennit-attn: error: {error}', file=sys.stderr)
        return 2
    except UnsupportedModelError as error:
        print(f'zennit-attn: error: unsupported model: {error}', file=sys.stderr)
        return 2
    except Exception as error:  # pylint: disable=broad-except
        if args.debug:
            raise
        print(f'zennit-attn: error: {type(error).__name__}: {error} (run with --debug for the traceback)',
              file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
