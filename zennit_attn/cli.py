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


class CLIError(Exception):
    '''An error caused by the user's input, reported as one line.'''


# --------------------------------------------------------------------------------------------------- models
# image classifiers (the embedded default, torchvision, timm, Hugging Face, your own builder) live in tasks.py
from .tasks import ImageTask, default_image_task, image_task, torchvision_image_task  # noqa: E402,F401


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
    '''A registered composite name (whether it covers the model is checked on the model: ImageTask.require_coverage).'''
    import zennit.composites
    if name not in zennit.composites.COMPOSITES:
        raise CLIError(f'unknown composite {name!r}; choose one of {", ".join(COMPOSITE_NAMES)} (or another Zennit '
                       'composite that covers the model)')
    return name


def refuse_image_options(args):
    '''Image model options given with --text would be silently ignored: refuse them.'''
    given = [option for option, value in (('--weights', args.weights), ('--checkpoint', args.checkpoint),
                                          ('--model-args', args.model_args), ('--resize', args.resize)) if value]
    if given:
        raise CLIError(f'{", ".join(given)} apply to image models; a text model is a Hugging Face directory '
                       '(--model DIR)')


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
        options = task.method_options(method, inputs)  # e.g. the input bounds of epsilon_gamma_box
        results[method] = attribute(task.model, inputs, targets, method, **options).detach()
    return results


def enlarge(array, factor):
    '''Nearest-neighbour enlargement of an (H, W, 3) array, so tiny images stay legible as PNG files.'''
    return array.repeat(factor, 0).repeat(factor, 1) if factor > 1 else array


def add_figure_options(sub):
    '''Options of the image figures written by :py:func:`write_image_outputs` (``explain``, ``compare``, ``demo``).'''
    from .figures import DEFAULT_PERCENTILE, FORMATS, NORMALIZATIONS, SIGNS

    def percentile(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number in (0, 100], got {text!r}') from None
        if not 0. < value <= 100.:
            raise argparse.ArgumentTypeError(f'expected a number in (0, 100], got {value:g}')
        return value

    group = sub.add_argument_group('image figures')
    group.add_argument('--format', choices=FORMATS, default='png', help='format of the figures (default: png)')
    group.add_argument('--dpi', type=positive_int, default=150, help='resolution of the figures (default: 150)')
    group.add_argument('--normalize', choices=NORMALIZATIONS, default='panel',
                       help='what the colour bar\'s 1.0 is: each panel\'s max|R| (panel, default), one raw scale per '
                       'method over the images (column) or for the whole grid (shared), or each panel\'s '
                       '--percentile of |R| with larger values clipped (percentile)')
    group.add_argument('--percentile', type=percentile, default=DEFAULT_PERCENTILE,
                       help=f'percentile of |R| for --normalize percentile (default: {DEFAULT_PERCENTILE:g})')
    group.add_argument('--sign', choices=SIGNS, default='signed',
                       help='draw R (signed, default; diverging colours), max(R, 0) (positive) or |R| (absolute); '
                       'non-negative maps such as attention rollout get a sequential colour map')
    group.add_argument('--patches', action='store_true',
                       help='also draw patch-level maps of a ViT: the relevance summed over each patch (token)')


def write_image_outputs(out, task, images, targets, relevances, titles, prefix='', options=None, inputs=None):
    '''Write the figures and the raw relevance of an image explanation; returns the written paths.

    ``{prefix}comparison.FMT`` (rows: images, columns: input and methods, with colour bars), ``{prefix}overlays.FMT``
    (the maps over the images), with ``--patches`` ``{prefix}patches.FMT`` (relevance per ViT patch), and per image and
    method ``..._overlay.png`` (the overlay alone, enlarged) and ``..._relevance.npy`` with a ``.json`` saying what it
    is. ``options`` holds the figure options of :py:func:`add_figure_options` (None: their defaults); ``inputs``, the
    model inputs, give the logit of each explained class for titles and JSON.
    '''
    import zennit.composites
    from .attribution import logits_of
    from .figures import DEFAULT_PERCENTILE, model_patch_size, overlay_relevance, relevance_grid, save_relevance
    from .image import save_png
    fmt, dpi = getattr(options, 'format', 'png'), getattr(options, 'dpi', 150)
    style = dict(normalize=getattr(options, 'normalize', 'panel'), sign=getattr(options, 'sign', 'signed'),
                 percentile=getattr(options, 'percentile', DEFAULT_PERCENTILE), dpi=dpi,
                 panel_inches=1.1 if images[0].shape[0] <= 64 else 1.6)
    patch_size = None
    if getattr(options, 'patches', False):
        try:
            patch_size = model_patch_size(task.model)
        except ValueError as error:
            raise CLIError(str(error)) from None
    logits = None
    if inputs is not None:
        with torch.no_grad():
            logits = logits_of(task.model(inputs)).float()
    names = [class_name(task.classes, int(target)) for target in targets]
    values = [None if logits is None else float(logits[index, int(target)]) for index, target in enumerate(targets)]
    row_titles = [name if value is None else f'{name}\nlogit {value:.3g}' for name, value in zip(names, values)]
    rows = [[image] + [relevance[index] for relevance in relevances.values()] for index, image in enumerate(images)]
    columns = ['input'] + [titles.get(method, method) for method in relevances]
    title = f'{task.name} (rows: the explained class)'
    written = [out / f'{prefix}comparison.{fmt}', out / f'{prefix}overlays.{fmt}']
    _, info = relevance_grid(rows, columns, row_titles=row_titles, title=title, path=written[0], **style)
    relevance_grid(rows, columns, row_titles=row_titles, title=title, overlay=True, path=written[1], **style)
    if patch_size is not None:
        written.append(out / f'{prefix}patches.{fmt}')
        relevance_grid(rows, columns, row_titles=row_titles, patch_size=patch_size, path=written[-1],
                       title=f'{task.name}: relevance per {patch_size}×{patch_size} patch (token)', **style)
    factor = max(1, 224 // images[0].shape[0])
    for index, image in enumerate(images):
        for column, (method, relevance) in enumerate(relevances.items(), start=1):
            scale = info['scales'][index][column]
            path = out / f'{prefix}{index:02d}_{method}_overlay.png'
            save_png(enlarge(overlay_relevance(image, relevance[index], scale=scale, sign=style['sign'],
                                               cmap=info['cmaps'][column], sequential=info['sequential'][column]),
                             factor), path)
            written += [path] + [Path(saved) for saved in save_relevance(
                out / f'{prefix}{index:02d}_{method}_relevance', relevance[index].cpu(),
                method=method, method_title=titles.get(method, method),
                composite=method if method in zennit.composites.COMPOSITES else None,
                model=str(task.name), target_index=int(targets[index]), target_name=names[index],
                input_shape=list(relevance.shape[1:]), logit=values[index],
                display={'normalize': style['normalize'], 'sign': style['sign'], 'scale': scale,
                         'colour_map': info['cmaps'][column], 'colour_bar': info['label']},
            )]
    return written


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


@contextlib.contextmanager
def demo_part(report, name, outputs, debug=False):
    '''Run one part of the demo in its own guard: an exception ends only this part, is reported in one line and is
    recorded in ``report`` (``report['failed'][name]``: the error; ``report['skipped']``: the part's ``outputs``), so
    the other parts still run and write their files.'''
    try:
        yield
    except Exception as error:  # pylint: disable=broad-except
        message = ' '.join(f'{type(error).__name__}: {error}'.split())
        report['failed'][name] = message
        report['skipped'].extend(outputs)
        print(f'demo: {name} failed: {message} (skipped: {", ".join(outputs)})', file=sys.stderr)
        if debug:
            import traceback
            traceback.print_exc()


def demo_written_lines(out, written, report, seconds):
    '''The demo's closing lines: what was written where, and what was skipped.'''
    lines = [f'wrote {len(written) + 1} files to {out.resolve()} in {seconds} s:']
    notes = {'comparison': 'methods side by side', '.html': 'token heatmap, open in a browser',
             'faithfulness_abpc': 'faithfulness plot'}
    for path in written:
        note = notes.get(path.stem, notes.get(path.suffix))
        if note:
            lines.append(f'  {path}  ({note})')
    lines.append(f'  {out / "summary.json"}')
    if report['skipped']:
        failed = f' ({", ".join(report["failed"])} failed, see above)' if report['failed'] else ''
        lines.append(f'skipped: {", ".join(report["skipped"])}{failed}')
    return lines


def command_demo(args):
    '''Compare methods on the embedded Fashion-MNIST ViT, explain sentences with MiniLM, summarise faithfulness.

    Each part runs in its own guard (:py:func:`demo_part`): a failing part is reported in one line and the others still
    write their files; ``summary.json`` is always written (with ``failed`` and ``skipped``), and the exit status is 1
    only if a part failed.
    '''
    from .models import load_fashion_mnist_samples
    started = time.perf_counter()
    out = output_dir(args.output)
    debug = getattr(args, 'debug', False)
    report = {'failed': {}, 'skipped': []}
    written, summary, task = [], {}, None
    with demo_part(report, 'comparison grid', ('comparison grid', 'overlays'), debug):
        task = default_image_task()
        inputs, labels, raw = load_fashion_mnist_samples()
        # one sample per class, in class order, so the grid shows the ten categories
        picks = [int((labels == label).nonzero()[0]) for label in labels.unique()][:args.samples]
        inputs, labels, raw = inputs[picks], labels[picks], raw[picks]
        images = [raw_image.numpy()[..., None].repeat(3, -1) for raw_image in raw]
        with torch.no_grad():
            predictions = task.model(inputs).argmax(-1)
        summary.update(
            model=task.name, samples=len(picks), labels=labels.tolist(), predictions=predictions.tolist(),
        )
        relevances = image_heatmaps(task, inputs, predictions, list(DEMO_METHODS))
        written = write_image_outputs(out, task, images, predictions, relevances, DEMO_METHODS, options=args,
                                      inputs=inputs)
    if args.text:
        with demo_part(report, 'text heatmap', ('token heatmap',), debug):
            try:
                text = text_task(DEFAULT_MODEL)
            except CLIError as error:
                # the MiniLM package is optional: not installed is a skip, not a failure
                print(f'skipping the text demo: {error}')
                report['skipped'].append('token heatmap (MiniLM model not available)')
            else:
                written += explain_text(text.model, text.tokenizer, text.classes, DEMO_TEXTS, 'attnlrp', None, out)
    if args.faithfulness:
        with demo_part(report, 'faithfulness', ('faithfulness plot', 'summary table'), debug):
            from .evaluation import evaluate, plot_results, save_results
            # the model of the comparison grid, loaded again only if that part failed before loading it
            task = task or default_image_task()
            model_inputs, model_labels, _ = load_fashion_mnist_samples()
            results = evaluate(task.model, model_inputs, model_labels, list(DEMO_METHODS), steps=10, target='predicted')
            written += [Path(path) for path in save_results(results, out / 'faithfulness')]
            written += [Path(path) for path in plot_results(results, out / 'faithfulness')]
            summary['faithfulness'] = faithfulness_table(results)
            print(summary['faithfulness'])
    summary.update(report, seconds=round(time.perf_counter() - started, 1))
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str))
    print('\n'.join(demo_written_lines(out, written, report, summary['seconds'])))
    return 1 if report['failed'] else 0


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
        refuse_image_options(args)
        with quiet_transformers():
            written = explain_text_command(args, composite, out)
    else:
        if args.image is None:
            raise CLIError('pass an IMAGE file or --text TEXT')
        given = [option for option, value in (('--generate', args.generate), ('--continuation', args.continuation),
                                              ('--contrast', args.contrast)) if value is not None]
        if given:
            raise CLIError(f'{", ".join(given)} apply to --text only')
        task = image_task(args.model, args.weights, args.checkpoint, args.model_args)
        inputs, image = task.load_image(args.image, args.resize)
        # only a composite whose coverage check passes on this model (e.g. not Zennit's CNN composites on a ViT)
        task.require_coverage(composite, inputs)
        with torch.no_grad():
            logits = task.model(inputs)
        targets = resolve_target(task.classes, logits, class_index(args.target, task.classes))
        relevances = image_heatmaps(task, inputs, targets, [composite], progress=False)
        written = write_image_outputs(out, task, [image], targets, relevances, DEMO_METHODS, prefix='explain_',
                                      options=args, inputs=inputs)
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
        refuse_image_options(args)
        with quiet_transformers():
            written = compare_text(args, out)
        for path in written:
            print(path)
        return 0
    if args.generate is not None or args.continuation is not None or args.contrast is not None:
        raise CLIError('--generate, --continuation and --contrast apply to --text only')
    methods = check_methods(args.methods or list(DEMO_METHODS))
    task = image_task(args.model, args.weights, args.checkpoint, args.model_args)
    if args.image is None:
        from .models import load_fashion_mnist_samples
        if args.model not in (None, DEFAULT_MODEL):
            raise CLIError('pass an IMAGE file (the shipped samples only fit the embedded default model)')
        inputs, _, raw = load_fashion_mnist_samples()
        inputs, images = inputs[:1], [raw[0].numpy()[..., None].repeat(3, -1)]
    else:
        inputs, image = task.load_image(args.image, args.resize)
        images = [image]
    # composites whose coverage check fails and rollouts on other than torchvision ViTs: refused if asked for, else
    # dropped from the default set with a note
    methods = task.usable_methods(methods, inputs, explicit=args.methods is not None)
    with torch.no_grad():
        logits = task.model(inputs)
    targets = resolve_target(task.classes, logits, class_index(args.target, task.classes))
    relevances = image_heatmaps(task, inputs, targets, methods)
    for path in write_image_outputs(out, task, images, targets, relevances, DEMO_METHODS, prefix='compare_',
                                    options=args, inputs=inputs):
        print(path)
    return 0


def command_evaluate(args):
    '''Faithfulness benchmark (deletion/MoRF, insertion, LeRF, ABPC with paired differences to a reference) on the
    embedded default model; with ``--sanity`` also the cascading model-randomisation sanity check.

    Under ``torchrun`` / ``accelerate launch`` the batches are shared between the processes
    (:py:func:`zennit_attn.evaluation.evaluate`); every process gets the full result, process 0 alone writes and prints
    (and runs the sanity check).
    '''
    from .evaluation import evaluate, plot_results, process_group, save_results
    methods = check_methods(args.methods or list(DEMO_METHODS))
    if args.model not in (None, DEFAULT_MODEL):
        raise CLIError('evaluate runs on the embedded default; use benchmarks/faithfulness.py for the full benchmark')
    if args.reference is not None and args.reference not in methods + ['random']:
        raise CLIError(f'--reference {args.reference}: not one of the evaluated methods ({", ".join(methods)}, random)')
    if args.interval == 't':
        try:
            import scipy.stats  # noqa: F401
        except ImportError:
            raise CLIError('--interval t needs scipy (pip install scipy); or use --interval bootstrap') from None
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
        results = evaluate(task.model, inputs, labels, methods, batch_size=args.batch_size, steps=args.steps,
                           target=args.target, insertion=args.insertion, reference=args.reference,
                           interval=args.interval)
    if rank != 0:
        return 0
    save_results(results, out)
    plot_results(results, out)
    print(faithfulness_table(results))
    if args.sanity:
        print(evaluate_sanity(task, inputs, labels, methods, args, out))
    print(f'results in {out.resolve()}')
    return 0


def evaluate_sanity(task, inputs, labels, methods, args, out):
    '''``evaluate --sanity``: cascading randomisation (:py:mod:`zennit_attn.sanity`) on the first
    ``--sanity-samples`` samples; writes sanity.json, sanity.csv and sanity.png and returns the table.'''
    from .sanity import cascading_randomization, plot_sanity, save_sanity
    count = min(args.sanity_samples, len(inputs))
    methods = [name for name in methods if name != 'random']  # seeded noise ignores the model by construction
    results = cascading_randomization(task.model, inputs[:count], labels[:count], methods, target=args.target,
                                      batch_size=args.batch_size)
    save_sanity(results, out)
    plot_sanity(results, out)
    return results.markdown('spearman', title='Sanity check: cascading model randomisation')


#: the layers ``neurons`` ranks on the embedded defaults: the MLP neurons of the last block
NEURONS_TEXT_LAYER = 'encoder.encoder.layer.5.intermediate'
NEURONS_IMAGE_LAYER = 'encoder.layers.encoder_layer_3.mlp.1'
NEURONS_IMAGE_CLASSES = (6, 9)  # shirt (collars) and ankle boot (soles)


def neurons_text_corpus(args):
    '''The reference corpus of ``neurons --text``: a file with one text per line, else Rotten Tomatoes snippets.'''
    if args.corpus:
        path = Path(args.corpus)
        if not path.is_file():
            raise CLIError(f'--corpus {path}: no such file (give a text file with one snippet per line)')
        corpus = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
        if not corpus:
            raise CLIError(f'--corpus {path} holds no text')
        return corpus[:args.corpus_size or len(corpus)]
    from .data import rotten_tomatoes_split
    try:
        _, (texts, _) = rotten_tomatoes_split()
    except FileNotFoundError as error:
        raise CLIError(f'{error} Or pass --corpus FILE (one text per line).') from None
    return texts[:args.corpus_size or 300]


def neurons_images(args):
    '''(explained inputs, their uint8 images, corpus inputs, corpus uint8 images) of ``neurons --images``.'''
    from .models import load_fashion_mnist_samples
    task = default_image_task()
    inputs, labels, raw = load_fashion_mnist_samples()
    if args.images:
        loaded = [task.load_image(path, args.resize) for path in args.images]
        explained, shown = torch.cat([item[0] for item in loaded]), [item[1] for item in loaded]
    else:
        picks = [int((labels == label).nonzero()[0]) for label in NEURONS_IMAGE_CLASSES]
        explained, shown = inputs[picks], [raw[index].numpy()[..., None].repeat(3, -1) for index in picks]
    if args.corpus:
        raise CLIError('--corpus applies to --text; the image corpus is Fashion-MNIST (--corpus-size N)')
    size = args.corpus_size or len(inputs)
    if size > len(inputs):
        from .data import fashion_mnist_transform, load_fashion_mnist
        try:
            raw, _ = load_fashion_mnist('test')
        except FileNotFoundError as error:
            raise CLIError(str(error)) from None
        raw = raw[:size]
        inputs = fashion_mnist_transform(raw)
    corpus_images = raw[:size].numpy()[..., None].repeat(3, -1)
    return task, explained, shown, inputs[:size], corpus_images


def command_neurons(args):
    '''The most relevant units of a layer for a prediction, with reference samples and conditional heatmaps.'''
    from .reference import Heads, Neurons
    from .report import image_neurons_report, text_neurons_report
    started = time.perf_counter()
    out = output_dir(args.output)
    spec = Heads(args.heads) if args.heads else Neurons()
    composite = None
    if args.composite:
        import zennit.composites
        composite = zennit.composites.COMPOSITES[check_composite(args.composite)]()
    state = None if args.state is None else Path(args.state)
    if args.images is not None:
        if args.text:
            raise CLIError('give --text or --images, not both')
        if args.model not in (None, DEFAULT_MODEL):
            raise CLIError('neurons --images runs on the embedded Fashion-MNIST ViT (--model default)')
        task, inputs, shown, corpus, corpus_images = neurons_images(args)
        layer = args.layer or NEURONS_IMAGE_LAYER
        summary = image_neurons_report(task.model, inputs, shown, layer, corpus, corpus_images, out, composite,
                                       spec, task.classes, top=args.top, k=args.k, state_path=state)
    else:
        task = text_task(args.model)
        if task.kind == 'seq2seq':
            raise CLIError('neurons --text explains classifiers and causal language models, not seq2seq models')
        if args.layer is None and args.model not in (None, DEFAULT_MODEL):
            names = [name for name, _ in task.model.named_modules() if name.count('.') in (3, 4)][:6]
            raise CLIError(f'--layer is required for --model {args.model} (a module name, e.g. {", ".join(names)})')
        layer = args.layer or NEURONS_TEXT_LAYER
        if layer not in dict(task.model.named_modules()):
            raise CLIError(f'--layer {layer!r} is no module of the model; give a qualified module name')
        texts = args.text or list(DEMO_TEXTS[:2])
        summary = text_neurons_report(task.model, task.tokenizer, texts, layer, neurons_text_corpus(args), out,
                                      composite, spec, task.classes, top=args.top, k=args.k, state_path=state)
    summary['seconds'] = round(time.perf_counter() - started, 1)
    (out / 'neurons.json').write_text(json.dumps(summary, indent=2))
    print(f'wrote {out / "neurons.html"} (open in a browser), {out / "neurons.png"} and {out / "neurons.json"} in '
          f'{summary["seconds"]} s')
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
    add_figure_options(demo)
    demo.set_defaults(run=command_demo)

    def add_model_options(sub):
        sub.add_argument('image', nargs='?', help='image file (PNG/JPEG)')
        sub.add_argument('--model', default=DEFAULT_MODEL,
                         help='"default" (shipped Fashion-MNIST ViT / MiniLM sentiment classifier); for images a '
                         'torchvision model name (vit_b_16) or class (VisionTransformer), a timm model name '
                         '(vit_tiny_patch16_224; timm:NAME if torchvision has the name too), a local Hugging Face '
                         'image classifier directory, or package.module:callable; for --text a Hugging Face causal '
                         'LM, seq2seq model or sequence classifier (directory or name)')
        sub.add_argument('--weights', help='torchvision\'s pretrained weights, e.g. IMAGENET1K_V1 (for your own file: '
                         '--checkpoint)')
        sub.add_argument('--checkpoint', metavar='FILE',
                         help='weights of a torchvision, timm or package.module:callable model: a state dict (or a '
                         'dict with it under "state_dict" or "model"; "module." prefixes are stripped), .pt/.pth or '
                         '.safetensors; num_classes is taken from its classification head')
        sub.add_argument('--model-args', nargs='+', metavar='KEY=VALUE',
                         help='arguments of the model builder, Python literals, e.g. image_size=32 num_classes=5 '
                         '(timm: img_size=32)')
        sub.add_argument('--target', help='classifiers: the class to explain, an index or a name (default: the '
                         f'prediction); language models: one of {", ".join(TEXT_TARGETS)} (default: logit)')
        sub.add_argument('--resize', action='store_true',
                         help='bring an image of another size to the model\'s input as the model\'s own '
                         'preprocessing does: torchvision weights\' transforms and timm\'s data config resize the '
                         'shorter side and centre-crop (the aspect ratio is kept), a Hugging Face image processor '
                         'resizes as configured (ViT\'s squashes to a square); the embedded default squashes to 28×28. '
                         'An image of the input size is only normalised')
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
    add_figure_options(explain)
    explain.add_argument('--composite', help=f'one of {", ".join(COMPOSITE_NAMES)} (default: attnlrp_vit for '
                         'images, attnlrp for text)')
    explain.set_defaults(run=command_explain)

    compare = commands.add_parser('compare', help='explain one image, or a language model\'s generation (--text), '
                                  'with several methods side by side')
    add_model_options(compare)
    add_figure_options(compare)
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
    evaluate.add_argument('--target', choices=('predicted', 'label'), default='predicted',
                          help='explain the class the model predicts (default) or the true label')
    evaluate.add_argument('--reference', metavar='METHOD',
                          help='compare every method with this one: paired ABPC difference, confidence interval and '
                          'win rate (default: the method with the best mean ABPC)')
    evaluate.add_argument('--interval', choices=('bootstrap', 't'), default='bootstrap',
                          help='confidence interval of the paired differences: 95%% percentile bootstrap (10000 '
                          'resamples, seed 0; default) or Student t (needs scipy)')
    evaluate.add_argument('--no-insertion', dest='insertion', action='store_false',
                          help='skip the insertion curves (fewer forward passes only where the relevance has ties)')
    evaluate.add_argument('--sanity', action='store_true',
                          help='also run the cascading model-randomisation sanity check (Adebayo et al. 2018): '
                          'similarity of each explanation to the original while the blocks are re-initialised from '
                          'the head down; writes sanity.png/.json/.csv')
    evaluate.add_argument('--sanity-samples', type=positive_int, default=8,
                          help='samples of the sanity check (default: 8; about a minute with the default methods)')
    evaluate.add_argument('-o', '--output', default='zennit-attn-evaluation')
    evaluate.set_defaults(run=command_evaluate)

    neurons = commands.add_parser('neurons', help='the most relevant neurons/heads of a layer for a prediction, with '
                                  'reference samples and conditional heatmaps (HTML and PNG)')
    neurons.add_argument('--model', default=DEFAULT_MODEL, help='"default" (MiniLM sentiment / Fashion-MNIST ViT) or '
                         'a Hugging Face sequence classifier or causal LM directory (with --text)')
    neurons.add_argument('--layer', help=f'qualified module name (default: {NEURONS_TEXT_LAYER} for text, '
                         f'{NEURONS_IMAGE_LAYER} for images)')
    neurons.add_argument('--text', action='append', help='a text to explain (repeat for several; default: two '
                         'reviews)')
    neurons.add_argument('--images', nargs='*', help='image files to explain with the Fashion-MNIST ViT (none: two '
                         'shipped samples)')
    neurons.add_argument('--resize', action='store_true', help='resize images to the model\'s input size')
    neurons.add_argument('--corpus', help='text file, one reference text per line (default: Rotten Tomatoes)')
    neurons.add_argument('--corpus-size', type=positive_int, help='reference corpus size (default: 300 texts, 48 '
                         'images)')
    neurons.add_argument('--heads', type=positive_int, metavar='N', help='units are N attention heads of the layer '
                         '(merged heads * head_dim output) instead of neurons')
    neurons.add_argument('--top', type=positive_int, default=5, help='units per input (default: 5)')
    neurons.add_argument('-k', type=positive_int, default=3, help='reference samples per unit (default: 3)')
    neurons.add_argument('--composite', help=f'one of {", ".join(COMPOSITE_NAMES)} (default: attnlrp for text, '
                         'attnlrp_vit for images)')
    neurons.add_argument('--state', help='file that keeps the reference collection (resumed if it exists)')
    neurons.add_argument('-o', '--output', default='zennit-attn-neurons')
    neurons.set_defaults(run=command_neurons)
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
