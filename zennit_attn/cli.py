'''Command line interface: ``zennit-attn demo | explain | compare | evaluate``.

``explain --text TEXT --model DIR`` takes any local Hugging Face causal LM, seq2seq model or sequence classifier; the
kind comes from the config (``architectures``, ``is_encoder_decoder``, transformers' Auto* mappings). Language models
are explained token by token (:py:func:`zennit_attn.explain_generation`: ``--generate N`` tokens or a given
``--continuation``, ``--target logit|probability|log_probability``, ``--contrast TOKEN``), classifiers class by class
(:py:func:`zennit_attn.token_relevance`). A bare model without a task head, or a checkpoint lacking weights that
would be newly initialised (e.g. a classifier head), is refused: its explanation would be of random weights.
``compare --text`` puts AttnLRP, CP-LRP, input × gradient and integrated gradients side by side for a generation.

Bad input (a missing file, an unknown model or composite, an image of the wrong size, a class out of range) ends
with a one-line error and exit status 2, never a traceback; ``--debug`` shows the traceback.
'''
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from .composites import UnsupportedModelError
from .engine import UnsupportedOperationError


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
#: what ``--target`` explains for a language model (see :py:func:`zennit_attn.explain_generation`)
TEXT_TARGETS = ('logit', 'probability', 'log_probability')
DEFAULT_NEW_TOKENS = 10
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


class TextTask:
    '''A text model with its tokenizer: ``kind`` is ``'causal'`` (causal LM), ``'seq2seq'`` (encoder-decoder) or
    ``'classifier'`` (sequence classifier, with class names).'''
    def __init__(self, kind, model, tokenizer, classes=None, architecture='', name=''):
        self.kind, self.model, self.tokenizer, self.classes = kind, model, tokenizer, classes
        self.architecture, self.name = architecture, name

    @property
    def generates(self):
        return self.kind in ('causal', 'seq2seq')


#: what ``--model`` must be for ``--text``, in the error messages
TEXT_MODELS_HINT = (
    'pass a local Hugging Face causal LM (*ForCausalLM), seq2seq model (*ForConditionalGeneration, e.g. T5/BART) or '
    'fine-tuned sequence classifier (*ForSequenceClassification) directory'
)


def _class_names(mapping):
    '''The model class names of a transformers Auto* name mapping (values are a name or a tuple of names).'''
    names = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def text_model_kind(config, name):
    '''``(kind, architecture)`` of a Hugging Face config, from its ``architectures`` (the class the checkpoint was saved
    from) and ``is_encoder_decoder``, looked up in transformers' Auto* mappings; a CLIError for a bare model (no task
    head) or a head this command cannot explain.'''
    from transformers.models.auto import modeling_auto as auto
    architectures = list(getattr(config, 'architectures', None) or [])
    if not architectures:
        raise CLIError(f'{name}: the config names no architecture, so its task head is unknown; {TEXT_MODELS_HINT}')
    architecture = architectures[0]
    encoder_decoder = bool(getattr(config, 'is_encoder_decoder', False))
    if encoder_decoder and architecture in _class_names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return 'seq2seq', architecture
    if not encoder_decoder and architecture in _class_names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return 'causal', architecture
    if architecture in _class_names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        return 'classifier', architecture
    if architecture in _class_names(auto.MODEL_MAPPING_NAMES):
        raise CLIError(f'{name} holds a bare {architecture} without a task head (a classifier head would be randomly '
                       f'initialised); {TEXT_MODELS_HINT}')
    raise CLIError(f'{name} holds a {architecture}, which is not a causal LM, seq2seq model or sequence classifier; '
                   f'{TEXT_MODELS_HINT}')


@contextlib.contextmanager
def quiet_transformers():
    '''Silence transformers' progress bars, load reports and kernel notes (this command reports missing weights
    itself, and errors must stay one line); restores the previous state.'''
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_text_model(name, dtype='float32'):
    '''A :py:class:`TextTask` for a Hugging Face model directory (or hub name): the class of its ``architectures``,
    refused if any of its weights would be newly initialised.'''
    try:
        import transformers
    except ImportError:
        raise CLIError('text models need transformers: pip install "zennit-attn[transformers]"') from None
    with quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise CLIError(f'could not load the Hugging Face model {name!r}: {str(error).splitlines()[0]}') from None
        kind, architecture = text_model_kind(config, name)
        model_class = getattr(transformers, architecture, None) or {
            'causal': transformers.AutoModelForCausalLM, 'seq2seq': transformers.AutoModelForSeq2SeqLM,
            'classifier': transformers.AutoModelForSequenceClassification,
        }[kind]
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError) as error:
            raise CLIError(f'could not load the tokenizer of {name!r}: {str(error).splitlines()[0]}') from None
        options = {} if dtype == 'auto' else {'dtype': getattr(torch, dtype)}
        try:
            model, info = model_class.from_pretrained(name, output_loading_info=True, **options)
        except (OSError, ValueError, RuntimeError) as error:
            raise CLIError(f'could not load the Hugging Face model {name!r}: {str(error).splitlines()[0]}') from None
    fresh = sorted(set(info.get('missing_keys') or ()) | {str(key) for key in info.get('mismatched_keys') or ()})
    if fresh:
        shown = ', '.join(fresh[:3]) + (f' and {len(fresh) - 3} more' if len(fresh) > 3 else '')
        raise CLIError(f'{name}: the checkpoint has no weights for {shown} of {architecture}; they would be randomly '
                       f'initialised and the explanation meaningless; {TEXT_MODELS_HINT} whose weights are complete')
    classes = None
    if kind == 'classifier':
        labels = model.config.id2label
        classes = [labels[index] for index in range(len(labels))]
    return TextTask(kind, model.eval(), tokenizer, classes, architecture, name)


def text_task(name, dtype='float32'):
    '''The :py:class:`TextTask` of ``--model``: the MiniLM sentiment classifier by default, else a Hugging Face
    model (:py:func:`load_text_model`).'''
    if name in (None, DEFAULT_MODEL):
        from .models import SENTIMENT_CLASSES, load_minilm_sentiment, load_minilm_tokenizer
        try:
            return TextTask('classifier', load_minilm_sentiment(), load_minilm_tokenizer(), list(SENTIMENT_CLASSES),
                            'MiniLM sentiment classifier', DEFAULT_MODEL)
        except ModuleNotFoundError as error:
            raise CLIError(str(error)) from None
    return load_text_model(name, dtype)


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


def class_index(value, classes, option='--target'):
    '''A class given on the command line as an index or a class name (``None`` stays ``None``).'''
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        pass
    if classes and value in classes:
        return list(classes).index(value)
    if value in TEXT_TARGETS:
        raise CLIError(f'{option} {value} applies to language models (--text with a causal LM or seq2seq --model); '
                       'for a classifier pass a class index or name')
    shown = f'; classes: {", ".join(classes[:12])}{" ..." if len(classes) > 12 else ""}' if classes else ''
    raise CLIError(f'{option} {value!r} is neither a class index nor a class name{shown}')


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


def explain_text(model, tokenizer, classes, texts, composite, target, out, prefix='text', contrast=None, record=None):
    '''Token relevance of ``texts`` with ``composite``: writes an HTML and a PNG token heatmap (and fills ``record``, a
    dict, with what was explained).'''
    import zennit.composites
    from .attribution import token_relevance
    from .text import token_heatmap_html, token_heatmap_png
    if tokenizer.pad_token is None:
        # decoder classifiers (e.g. *ForSequenceClassification of a Llama) often ship without a padding token
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(list(texts), return_tensors='pt', padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        logits = model(input_ids=encoded['input_ids'], attention_mask=encoded['attention_mask'])
        logits = getattr(logits, 'logits', logits)
    targets = resolve_target(classes, logits, target)
    against = None
    if contrast is not None:
        against = resolve_target(classes, logits, contrast)
        if bool((against == targets).any()):
            raise CLIError(f'--contrast {class_name(classes, contrast)} is the explained class itself; the explained '
                           'difference would be zero: choose another class')
    result = token_relevance(
        model, zennit.composites.COMPOSITES[composite](), encoded['input_ids'], encoded['attention_mask'],
        target=targets, contrast=against,
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
    if record is not None:
        record.update(
            kind='classifier', texts=list(texts), composite=composite, classes=list(classes),
            target=[class_name(classes, int(index)) for index in targets], labels=labels,
            contrast=None if against is None else [class_name(classes, int(index)) for index in against],
            logits=logits.tolist(), tokens=tokens, relevance=values,
        )
    return [html_path, png_path]


def explain_language_model(task, text, composite, args, out, prefix='explain'):
    '''Explain what ``task.model`` (a causal LM or seq2seq model) generates after ``text``: writes the relevance matrix
    as HTML and PNG, the result (``.pt``) and ``explain.json``; returns (written paths, result).'''
    from .generation import explain_generation
    contrast = args.contrast
    if contrast is not None:
        contrast = check_contrast_token(task.tokenizer, contrast)
    if args.continuation is not None and not text[-1:].isspace():
        note_leading_space(task.tokenizer, args.continuation, '--continuation')
    with generation_request_errors():
        result = explain_generation(
            task.model, task.tokenizer, text, composite=composite, max_new_tokens=args.generate or DEFAULT_NEW_TOKENS,
            target=args.target or 'logit', contrast=contrast, continuation=args.continuation,
        )
    generated = task.tokenizer.decode(result.target_ids.tolist())
    what = f'{args.target or "logit"}' + ('' if contrast is None else f' minus that of {contrast!r}')
    title = f'{composite}: relevance of each source token for the {what} of each generated token'
    paths = [out / f'{prefix}_generation.html', out / f'{prefix}_generation.png', out / f'{prefix}_generation.pt']
    result.to_html(paths[0], title=title)
    result.to_png(paths[1], title=f'{composite}: {text!r} → {generated!r}')
    result.save(paths[2])
    record = dict(
        kind=task.kind, model=str(task.name), architecture=task.architecture, prompt=text, composite=composite,
        target=args.target or 'logit', contrast=contrast,
        contrast_id=None if result.contrast_ids is None else int(result.contrast_ids[0]),
        continuation_given=args.continuation is not None, generated=generated,
        source_tokens=result.source_tokens, generated_tokens=result.target_tokens,
        target_values=result.target_values.tolist(), probabilities=result.probabilities.tolist(),
        relevance_sums=result.relevance.sum(1).tolist(),
        top=[[dict(token=token, relevance=value) for _, token, value in result.top(row, 3)]
             for row in range(len(result.target_tokens))],
    )
    paths.append(out / 'explain.json')
    paths[-1].write_text(json.dumps(record, indent=2, ensure_ascii=False))
    return paths, result


@contextlib.contextmanager
def generation_request_errors():
    '''explain_generation's own checks (contrast, continuation, non-finite logits) are about the request: one line.'''
    prefix = 'explain_generation: '
    try:
        yield
    except ValueError as error:
        if not str(error).startswith(prefix):
            raise
        raise CLIError(str(error)[len(prefix):]) from None


def check_text_options(task, args):
    '''Refuse options that do not apply to the kind of ``task`` (a :py:class:`TextTask`).'''
    if not task.generates:
        given = [option for option, value in (('--generate', args.generate), ('--continuation', args.continuation))
                 if value is not None]
        if given:
            raise CLIError(f'{" and ".join(given)} apply to language models; {task.name} is a sequence classifier '
                           f'({task.architecture}); {TEXT_MODELS_HINT}')
        return
    if args.target is not None and args.target not in TEXT_TARGETS:
        raise CLIError(f'--target for a language model is one of {", ".join(TEXT_TARGETS)}, got {args.target!r}; to '
                       'explain a token of your choice pass it as --continuation TEXT')
    if args.generate is not None and args.continuation is not None:
        raise CLIError('pass --generate N (explain N generated tokens) or --continuation TEXT (explain that text), '
                       'not both')
    if args.continuation is not None and not args.continuation:
        raise CLIError('--continuation is empty')


def check_contrast_token(tokenizer, contrast):
    '''``--contrast`` for a language model: one token; a note when the word after a space is meant.'''
    ids = tokenizer(contrast, add_special_tokens=False)['input_ids']
    if len(ids) != 1:
        raise CLIError(f'--contrast {contrast!r} is {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)}, not one; '
                       'pass a single token (mind the leading space, e.g. " London")')
    note_leading_space(tokenizer, contrast, '--contrast')
    return contrast


def note_leading_space(tokenizer, text, option):
    '''Tell the user when ``text`` (no leading space) tokenizes differently from the word after a space, which is what
    usually follows a prompt (" Paris", not "Paris").'''
    if text[:1].isspace():
        return
    plain = tokenizer(text, add_special_tokens=False)['input_ids']
    if tokenizer(' ' + text, add_special_tokens=False)['input_ids'] != plain:
        print(f'note: {option} {text!r} is taken without a leading space; for the word after a space pass '
              f'{" " + text!r}', file=sys.stderr)


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
            text = text_task(DEFAULT_MODEL)
        except CLIError as error:
            print(f'skipping the text demo: {error}')
        else:
            written += explain_text(text.model, text.tokenizer, text.classes, DEMO_TEXTS, 'attnlrp', None, out)
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


def explain_text_command(args, composite, out):
    '''``explain --text``: a language model's generation or a classifier's prediction; returns the written paths.'''
    task = text_task(args.model, args.dtype)
    check_text_options(task, args)
    if task.generates:
        written, result = explain_language_model(task, args.text, composite, args, out)
        print(result)
        return written
    record = {}
    target, contrast = class_index(args.target, task.classes), class_index(args.contrast, task.classes, '--contrast')
    written = explain_text(task.model, task.tokenizer, task.classes, [args.text], composite, target, out,
                           prefix='explain', contrast=contrast, record=record)
    record.update(model=str(task.name), architecture=task.architecture)
    written.append(out / 'explain.json')
    written[-1].write_text(json.dumps(record, indent=2, ensure_ascii=False))
    print(f'{task.architecture}: {record["labels"][0]}')
    return written


def command_explain(args):
    '''Explain one image or text with one composite.'''
    out = output_dir(args.output)
    # the vision preset is the default for images, plain AttnLRP for text
    composite = check_composite(args.composite or ('attnlrp' if args.text is not None else 'attnlrp_vit'))
    if args.text is not None:
        if args.image is not None:
            raise CLIError('pass an IMAGE file or --text TEXT, not both')
        with quiet_transformers():
            written = explain_text_command(args, composite, out)
    else:
        if args.image is None:
            raise CLIError('pass an IMAGE file or --text TEXT')
        given = [option for option, value in (('--generate', args.generate), ('--continuation', args.continuation),
                                              ('--contrast', args.contrast)) if value is not None]
        if given:
            raise CLIError(f'{", ".join(given)} apply to --text only')
        task = image_task(args.model, args.weights)
        inputs, image = task.load_image(args.image, args.resize)
        with torch.no_grad():
            logits = task.model(inputs)
        targets = resolve_target(task.classes, logits, class_index(args.target, task.classes))
        relevances = image_heatmaps(task, inputs, targets, [composite], progress=False)
        written = write_image_outputs(out, task, [image], targets, relevances, DEMO_METHODS, prefix='explain_')
        print(f'class {int(targets[0])} ({class_name(task.classes, int(targets[0]))}), '
              f'logit {logits[0, targets[0]].item():.3f}')
    for path in written:
        print(path)
    return 0


def compare_text(args, out):
    '''Explain what a language model generates with several methods (composites and gradient baselines).'''
    from .methods import GENERATION_COMPARISON, GENERATION_METHODS, compare_generation, plot_generation_comparison
    import zennit.composites
    methods = args.methods or list(GENERATION_COMPARISON)
    unknown = [name for name in methods if name not in GENERATION_METHODS and name not in zennit.composites.COMPOSITES]
    if unknown:
        raise CLIError(f'unknown method(s) {", ".join(unknown)} for text; choose from '
                       f'{", ".join(list(GENERATION_METHODS) + list(COMPOSITE_NAMES))}')
    task = text_task(args.model, args.dtype)
    if not task.generates:
        raise CLIError(f'compare --text compares methods on what a language model generates; {task.name} is a sequence '
                       f'classifier ({task.architecture}): use explain --text')
    check_text_options(task, args)
    contrast = None if args.contrast is None else check_contrast_token(task.tokenizer, args.contrast)
    if args.continuation is not None and not args.text[-1:].isspace():
        note_leading_space(task.tokenizer, args.continuation, '--continuation')
    with generation_request_errors():
        results = compare_generation(
            task.model, task.tokenizer, args.text, methods=methods, target=args.target or 'logit', contrast=contrast,
            max_new_tokens=args.generate or DEFAULT_NEW_TOKENS, continuation=args.continuation,
        )
    written = [out / 'compare_generation.png', out / 'compare_generation_top.png']
    plot_generation_comparison(results, written[0], title=f'{args.text!r}: {args.target or "logit"} per method')
    plot_generation_comparison(results, written[1], row=0)
    for name, result in results.items():
        written.append(out / f'compare_{name}.html')
        result.to_html(written[-1], title=f'{name}: {result.composite}')
        print(f'{name}: {result}')
    return written


def command_compare(args):
    '''Explain one image with several methods side by side (or, with --text, a language model's generation).'''
    out = output_dir(args.output)
    if args.text is not None:
        if args.image is not None:
            raise CLIError('pass an IMAGE file or --text TEXT, not both')
        with quiet_transformers():
            written = compare_text(args, out)
        for path in written:
            print(path)
        return 0
    if args.generate is not None or args.continuation is not None or args.contrast is not None:
        raise CLIError('--generate, --continuation and --contrast apply to --text only')
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
    targets = resolve_target(task.classes, logits, class_index(args.target, task.classes))
    relevances = image_heatmaps(task, inputs, targets, methods)
    for path in write_image_outputs(out, task, images, targets, relevances, DEMO_METHODS, prefix='compare_'):
        print(path)
    return 0


def command_evaluate(args):
    '''Faithfulness benchmark (MoRF/LeRF, ABPC) on the embedded default model.

    Under ``torchrun`` / ``accelerate launch`` the batches are shared between the processes
    (:py:func:`zennit_attn.evaluation.evaluate`); every process gets the full result, process 0 alone writes and prints.
    '''
    from .evaluation import evaluate, plot_results, process_group, save_results
    methods = check_methods(args.methods or list(DEMO_METHODS))
    if args.model not in (None, DEFAULT_MODEL):
        raise CLIError('evaluate runs on the embedded default; use benchmarks/faithfulness.py for the full benchmark')
    with process_group() as (rank, _):
        # created before the evaluation, so that a bad path fails at once, not after it
        out = output_dir(args.output) if rank == 0 else None
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
        results = evaluate(task.model, inputs, labels, methods, batch_size=args.batch_size, steps=args.steps)
    if rank != 0:
        return 0
    save_results(results, out)
    plot_results(results, out)
    print(faithfulness_table(results))
    print(f'results in {out.resolve()}')
    return 0


EVALUATE_EPILOG = '''\
several processes, on one machine or several, share the batches and give the same result as one process:
  torchrun --nproc_per_node 4 -m zennit_attn evaluate --samples 48 --batch-size 4 -o eval
  torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m zennit_attn evaluate ...
  accelerate launch --multi_gpu --num_processes 4 -m zennit_attn evaluate ...   (also on CPUs: it runs torchrun)
process 0 writes the files and prints the table.
'''


def positive_int(text):
    '''argparse type: an int ≥ 1.'''
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


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
                         help='"default" (shipped Fashion-MNIST ViT / MiniLM sentiment classifier), a torchvision '
                         'model name for images, or for --text a Hugging Face causal LM, seq2seq model or sequence '
                         'classifier (directory or name)')
        sub.add_argument('--weights', help='torchvision weights, e.g. IMAGENET1K_V1')
        sub.add_argument('--target', help='classifiers: the class to explain, an index or a name (default: the '
                         f'prediction); language models: one of {", ".join(TEXT_TARGETS)} (default: logit)')
        sub.add_argument('--resize', action='store_true', help='resize the image to the model\'s input size')
        sub.add_argument('-o', '--output', default='zennit-attn-output')
        sub.add_argument('--text', help='explain this text (the prompt of a language model) instead of an image')
        sub.add_argument('--generate', type=positive_int, metavar='N',
                         help=f'language models: explain N generated tokens (default: {DEFAULT_NEW_TOKENS})')
        sub.add_argument('--continuation', metavar='TEXT',
                         help='language models: explain this continuation of the text instead of generating one')
        sub.add_argument('--contrast', metavar='TOKEN',
                         help='language models: explain the target minus that of this token (e.g. " London"); '
                         'classifiers: minus that of this class')
        sub.add_argument('--dtype', default='float32', choices=('float32', 'float64', 'bfloat16', 'float16', 'auto'),
                         help='dtype of Hugging Face text models (default: float32; auto: the checkpoint\'s)')

    explain = commands.add_parser('explain', help='explain one image or text')
    add_model_options(explain)
    explain.add_argument('--composite', help=f'one of {", ".join(COMPOSITE_NAMES)} (default: attnlrp_vit for '
                         'images, attnlrp for text)')
    explain.set_defaults(run=command_explain)

    compare = commands.add_parser('compare', help='explain one image, or a language model\'s generation (--text), '
                                  'with several methods side by side')
    add_model_options(compare)
    compare.add_argument('--methods', nargs='+', help='methods to compare (default: the demo set; for --text: '
                         'attnlrp, cp_lrp, input_x_gradient, integrated_gradients)')
    compare.set_defaults(run=command_compare)

    evaluate = commands.add_parser(
        'evaluate', help='perturbation faithfulness (MoRF/LeRF, ABPC)', epilog=EVALUATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument('--model', default=DEFAULT_MODEL)
    evaluate.add_argument('--methods', nargs='+')
    evaluate.add_argument('--samples', type=int, default=48)
    evaluate.add_argument('--steps', type=int, default=20)
    evaluate.add_argument('--batch-size', type=positive_int, default=16,
                          help='samples per batch (default: 16); several processes share the batches, so use at '
                          'least as many batches as processes')
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
    except (UnsupportedModelError, UnsupportedOperationError) as error:
        # refused by the composite (a module) or by the engine (an operation without a rule): the model is unsupported
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
