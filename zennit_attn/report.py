'''Neuron reports: the most relevant units of a layer for a prediction, each with its reference samples and its
conditional heatmap, as HTML and a PNG summary (the ``zennit-attn neurons`` command).

:py:func:`text_neurons_report` explains texts of a text classifier (or the next token of a language model),
:py:func:`image_neurons_report` images of an image classifier; both collect the reference samples of the layer's units
on a corpus (:py:func:`zennit_attn.reference.collect_references`), rank the units by their relevance for each
explained input and draw the conditional heatmaps of the top units (:py:mod:`zennit_attn.concepts`).
'''
import html
import json
import re
from pathlib import Path

import torch

from .latent import record_relevance
from .reference import Neurons, TextInputs, ImageInputs, canonical, collect_references


__all__ = ['text_neurons_report', 'image_neurons_report', 'unit_relevance']

MARK = ('\x02', '\x03')  # markers of the context token in snippets, replaced by <mark> in HTML


def unit_relevance(relevance, spec):
    '''Relevance per unit and sample from the relevance at a layer's output: ``(batch, units)``.'''
    values, _ = canonical(relevance, spec)
    return values.double().sum((1, 3))


def _ranked(values, top):
    '''Indices of the ``top`` largest values (ties: smaller index first).'''
    order = sorted(range(len(values)), key=lambda index: (-values[index], index))
    return order[:top]


def _body(document):
    '''The ``<style>`` and the ``<body>`` content of a page made by :py:func:`zennit_attn.text.token_heatmap_html`.'''
    style = re.search(r'<style>(.*?)</style>', document, re.S).group(1)
    body = re.search(r'<body>(.*?)</body>', document, re.S).group(1)
    return style, body


def _snippet_html(snippet):
    escaped = html.escape(snippet)
    return escaped.replace(html.escape(MARK[0]), '<mark>').replace(html.escape(MARK[1]), '</mark>')


PAGE = '''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 70em; margin: 1em auto; }}
table {{ border-collapse: collapse; }} td, th {{ border-top: 1px solid #ccc; padding: .3em .6em; vertical-align: top; }}
mark {{ background: #ffd54f; font-weight: bold; }} .refs li {{ margin: .15em 0; }} .note {{ color: #555; }}
{style}
</style></head><body>
<h1>{title}</h1>
{body}
</body></html>
'''


def _text_units(model, composite, encoded, layer, spec):
    '''Logits and relevance per unit ``(batch, units)`` of the explained texts (target: the prediction).'''
    from .attribution import token_relevance
    with record_relevance(model, [layer]) as recorded:
        result = token_relevance(model, composite, encoded['input_ids'], encoded['attention_mask'])
    if layer not in recorded:
        raise ValueError(f'neurons: no relevance reached {layer!r}; choose a layer on the path to the output.')
    return result, unit_relevance(recorded[layer], spec)


def text_neurons_report(model, tokenizer, texts, layer, corpus, out, composite=None, spec=None, classes=None, top=5,
                        k=3, batch_size=16, max_length=48, state_path=None, progress=True, title=None,
                        references=None):
    '''Write ``neurons.html`` and ``neurons.png`` (and ``neurons.json``) to ``out`` for ``texts``.

    Parameters
    ----------
    model, tokenizer:
        A text classifier (logits ``(batch, classes)``) or language model accepting ``inputs_embeds``, and its
        tokenizer.
    texts: list[str]
        The explained texts (their predicted class, or next token).
    layer: str
        The layer whose units are ranked (e.g. ``'encoder.encoder.layer.5.intermediate'``).
    corpus: sequence of str
        The texts the reference samples come from.
    out: path
        Output folder (created).
    composite: :py:obj:`zennit.core.Composite`, optional
        Default :py:class:`~zennit_attn.AttnLRP`.
    spec: :py:class:`~zennit_attn.reference.Neurons` or :py:class:`~zennit_attn.reference.Heads`, optional
        The units of the layer (default: every neuron of the last dimension).
    classes: list[str], optional
        Class names.
    top, k: int
        Units per text; reference snippets per unit.
    references: :py:class:`~zennit_attn.reference.ReferenceSamples`, optional
        Reference samples of ``layer`` collected before on ``corpus`` (e.g. for several layers in one pass); by default
        they are collected here.

    Returns
    -------
    dict
        The summary that is also written as ``neurons.json``.
    '''
    from .composites import AttnLRP
    from .concepts import conditional_token_relevance
    from .text import token_heatmap_html, token_heatmap_png
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the caller's composite itself (its settings), registered once per attribution
    composite = composite if composite is not None else AttnLRP()
    spec = spec or Neurons()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if references is None:
        references = collect_references(
            model, corpus, {layer: spec}, k=k, composite=composite, inputs=TextInputs(tokenizer, max_length),
            batch_size=batch_size, state_path=state_path, resume=state_path is not None, progress=progress,
        )
    spec = references.specs[layer]
    encoded = tokenizer(list(texts), return_tensors='pt', padding=True, truncation=True, max_length=max_length)
    result, units = _text_units(model, composite, encoded, layer, spec)
    style, sections, summary = '', [], {'layer': layer, 'corpus': len(corpus), 'texts': []}
    png_tokens, png_values, png_labels = [], [], []
    for index, text in enumerate(texts):
        keep = encoded['attention_mask'][index].bool()
        ids = encoded['input_ids'][index][keep]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        predicted = int(result.target[index])
        name = classes[predicted] if classes and predicted < len(classes) else tokenizer.decode([predicted]) \
            if result.position is not None else str(predicted)
        values = units[index].tolist()
        chosen = _ranked(values, top)
        conditional = conditional_token_relevance(
            model, composite, ids[None], layer, [[unit] for unit in chosen], dim=spec.dim,
            num_heads=spec.num_heads, target=predicted, bypass='ignore',
        )
        rows_tokens, rows_values = [tokens], [result.relevance[index][keep].tolist()]
        rows_labels = [f'{name}: full map (sum of relevance {sum(rows_values[0]):+.3f})']
        entry = {'text': text, 'prediction': name, 'units': []}
        items = []
        for rank, unit in enumerate(chosen):
            snippets = references.text_snippets(corpus, tokenizer, layer, unit, 'relevance', mark=MARK,
                                                max_length=max_length)
            plain = [snippet.replace(MARK[0], '[').replace(MARK[1], ']') for snippet, _ in snippets]
            rows_tokens.append(tokens)
            rows_values.append(conditional.relevance[rank, 0].tolist())
            rows_labels.append(f'unit {unit}: R = {values[unit]:+.3f}')
            entry['units'].append({'unit': unit, 'relevance': values[unit], 'references': plain})
            refs = ''.join(f'<li>{_snippet_html(snippet)} <span class="note">(R = {reference.value:+.3f}, '
                           f'sample {reference.sample})</span></li>' for snippet, reference in snippets)
            items.append(f'<tr><td>{rank + 1}</td><td>unit {unit}</td><td>{values[unit]:+.4f}</td>'
                         f'<td><ul class="refs">{refs}</ul></td></tr>')
        document = token_heatmap_html(rows_tokens, rows_values, labels=rows_labels)
        style, heatmaps = _body(document)
        sections.append(
            f'<h2>{html.escape(text)}</h2><p>prediction: <b>{html.escape(name)}</b>; the {len(chosen)} most '
            f'relevant units of <code>{html.escape(layer)}</code> (relevance for the prediction; reference snippets: '
            f'relevance maximization over {len(corpus)} corpus texts, the context token marked).</p>'
            '<table><tr><th>#</th><th>unit</th><th>relevance</th><th>reference samples</th></tr>'
            + ''.join(items) + '</table><h3>Conditional heatmaps: the token relevance through each unit</h3>'
            + heatmaps
        )
        summary['texts'].append(entry)
        png_tokens += rows_tokens[:1] + rows_tokens[1:]
        png_values += rows_values
        first = [f'{item["unit"]}: ' + ', '.join(_context_words(item['references'])) for item in entry['units']]
        png_labels += [rows_labels[0]] + [f'{label} · refs: {words.split(": ", 1)[1]}'
                                          for label, words in zip(rows_labels[1:], first)]
    title = title or f'Most relevant units of {layer}'
    page = PAGE.format(title=html.escape(title), style=style, body='\n'.join(sections))
    (out / 'neurons.html').write_text(page, encoding='utf-8')
    token_heatmap_png(png_tokens, png_values, out / 'neurons.png', title=title, labels=png_labels)
    (out / 'neurons.json').write_text(json.dumps(summary, indent=2))
    return summary


def _context_words(snippets):
    '''The marked context tokens of reference snippets, e.g. ``['good', 'story']``.'''
    words = []
    for snippet in snippets:
        match = re.search(r'\[([^\[\]]*)\]', snippet)
        words.append(match.group(1) if match else '?')
    return words


def _outlined(image, box, color=(255, 200, 0)):
    '''An (H, W, 3) uint8 image with the outline of ``box = (top, left, height, width)``.'''
    image = image.copy()
    top, left, height, width = box
    bottom, right = top + height - 1, left + width - 1
    image[top, left:right + 1] = color
    image[bottom, left:right + 1] = color
    image[top:bottom + 1, left] = color
    image[top:bottom + 1, right] = color
    return image


def image_neurons_report(model, inputs, images, layer, corpus, corpus_images, out, composite=None, spec=None,
                         classes=None, top=5, k=4, crop=10, batch_size=32, state_path=None, progress=True,
                         title=None, references=None):
    '''Write ``neurons.html`` and ``neurons.png`` (and ``neurons.json``) to ``out`` for image inputs.

    Parameters
    ----------
    model:
        An image classifier.
    inputs: :py:obj:`torch.Tensor`
        The explained model inputs ``(batch, channels, H, W)``; ``images`` their displayable uint8 ``(batch, H, W,
        3)`` versions.
    layer: str
        The layer whose units are ranked (e.g. ``'encoder.layers.encoder_layer_3.mlp.1'``).
    corpus: :py:obj:`torch.Tensor`
        Reference images (model inputs) and ``corpus_images`` their uint8 ``(n, H, W, 3)`` versions.
    crop: int
        Size of the reference crop, boxed in the reference image where the unit's conditional relevance is largest.
    references: :py:class:`~zennit_attn.reference.ReferenceSamples`, optional
        Reference samples of ``layer`` collected before on ``corpus``; by default they are collected here.

    Returns
    -------
    dict
        The summary that is also written as ``neurons.json``.
    '''
    from zennit.attribution import Gradient
    from .composites import AttnLRPViT
    from .concepts import conditional_relevance
    from .image import heatmap_grid, overlay, relevance_to_heatmap
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    composite = composite if composite is not None else AttnLRPViT()
    spec = spec or Neurons()
    if references is None:
        references = collect_references(model, corpus, {layer: spec}, k=k, composite=composite,
                                        inputs=ImageInputs(), batch_size=batch_size, state_path=state_path,
                                        resume=state_path is not None, progress=progress)
    spec = references.specs[layer]
    with torch.no_grad():
        logits = model(inputs)
    predicted = logits.argmax(-1)
    onehot = torch.nn.functional.one_hot(predicted, logits.shape[-1]).to(logits.dtype)
    with record_relevance(model, [layer]) as recorded:
        with Gradient(model, composite) as attributor:
            _, full = attributor(inputs, lambda output: output * onehot)
    units = unit_relevance(recorded[layer], spec)
    rows, row_titles, summary, sections = [], [], {'layer': layer, 'corpus': len(corpus), 'images': []}, []
    # a unit's reference crops depend on the unit only; units shared by several images are computed once
    crops_of = {}
    for index in range(len(inputs)):
        name = classes[int(predicted[index])] if classes else str(int(predicted[index]))
        values = units[index].tolist()
        chosen = _ranked(values, top)
        conditional = conditional_relevance(model, inputs[index:index + 1], int(predicted[index]), composite,
                                            layer, [[unit] for unit in chosen], dim=spec.dim,
                                            num_heads=spec.num_heads, bypass='ignore')
        entry = {'prediction': name, 'units': []}
        rows.append([images[index], relevance_to_heatmap(full[index])] + [None] * k)
        row_titles.append(f'#{index} {name}: full map')
        for rank, unit in enumerate(chosen):
            heatmap = relevance_to_heatmap(conditional.relevance[rank, 0])
            row = [overlay(images[index], heatmap), heatmap]
            if unit not in crops_of:
                crops_of[unit] = references.image_crops(model, corpus, layer, unit, composite, size=crop)
            crops = crops_of[unit]
            for box, relevance, reference in crops:
                row.append(_outlined(overlay(corpus_images[reference.sample], relevance_to_heatmap(relevance)), box))
            row += [None] * (k + 2 - len(row))
            rows.append(row)
            row_titles.append(f'unit {unit} (R={values[unit]:+.2f}): through it')
            entry['units'].append({'unit': unit, 'relevance': values[unit],
                                   'references': [{'sample': reference.sample, 'box': list(box),
                                                   'value': reference.value} for box, _, reference in crops]})
        summary['images'].append(entry)
    columns = ['input', 'relevance'] + [f'reference {number + 1}' for number in range(k)]
    title = title or f'Most relevant units of {layer}'
    heatmap_grid(rows, columns, row_titles=row_titles, path=out / 'neurons.png', scale=4)
    sections.append(f'<p>For each image: the full heatmap, then the {top} most relevant units of '
                    f'<code>{html.escape(layer)}</code> for the prediction, each with its conditional heatmap and its '
                    f'{k} reference samples (relevance maximization over {len(corpus)} corpus images; the box is the '
                    f'{crop}×{crop} crop where the unit\'s conditional relevance is largest).</p>'
                    '<img src="neurons.png" alt="neurons">')
    for index, entry in enumerate(summary['images']):
        cells = ''.join(
            f'<tr><td>unit {item["unit"]}</td><td>{item["relevance"]:+.4f}</td><td>'
            + ', '.join(f'sample {ref["sample"]} (R = {ref["value"]:+.3f}, crop at row {ref["box"][0]}, column '
                        f'{ref["box"][1]})' for ref in item['references']) + '</td></tr>'
            for item in entry['units'])
        sections.append(f'<h2>#{index}: {html.escape(entry["prediction"])}</h2><table><tr><th>unit</th>'
                        f'<th>relevance</th><th>reference samples</th></tr>{cells}</table>')
    (out / 'neurons.html').write_text(PAGE.format(title=html.escape(title), style='', body='\n'.join(sections)),
                                      encoding='utf-8')
    (out / 'neurons.json').write_text(json.dumps(summary, indent=2))
    return summary
