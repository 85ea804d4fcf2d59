'''Reference samples (zennit_attn.reference): top-k tracking against a brute-force ranking, deterministic ties,
resumable collection, text snippets and image crops.'''
import math

import pytest
import torch
from torchvision.models import VisionTransformer
from zennit.attribution import Gradient

from zennit_attn.composites import AttnLRP
from zennit_attn.concepts import conditional_relevance
from zennit_attn.reference import (
    Heads, Neurons, TextInputs, canonical, collect_references, crop_box, merge_top_k,
)

from tiny_vit import randomize_head

pytestmark = pytest.mark.usefixtures('single_thread')

MLP = 'encoder.layers.encoder_layer_0.mlp.1'
SITE = 'encoder.layers.encoder_layer_1.self_attention.attention'


@pytest.fixture(scope='module')
def vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=12,
                              num_classes=3)
    return randomize_head(model).double().eval()


@pytest.fixture(scope='module')
def corpus():
    return torch.randn(7, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def brute_force(model, corpus, layer, reduce):
    '''Per sample (one at a time, no batching, no top-k): activation and relevance at ``layer`` for the prediction,
    reduced to ``(positions, units)`` by ``reduce``.'''
    rows = []
    for image in corpus:
        seen = {}

        def hook(module, args, output):
            seen['activation'] = output.detach()
            output.register_hook(lambda grad: seen.update(relevance=grad.detach()))
        module = dict(model.named_modules())[layer]
        with Gradient(model, AttnLRP()) as attributor:
            handle = module.register_forward_hook(hook)  # after the composite's hooks
            try:
                output = model(image[None])
                onehot = torch.nn.functional.one_hot(output.argmax(1), 3).double()
                attributor(image[None], lambda y: y * onehot)
            finally:
                handle.remove()
        rows.append(reduce(seen['activation'][0], seen['relevance'][0]))
    return rows


def ranking(scores, unit, k):
    '''The top-k (sample, position, value) of ``unit``, by value then sample index, from per-sample score tables.'''
    best = []
    for sample, table in enumerate(scores):
        column = table[:, unit].tolist()
        value = max(column)
        best.append((-value, sample, column.index(value)))
    return [(sample, position, -value) for value, sample, position in sorted(best)[:k]]


def test_top_k_matches_a_brute_force_ranking(vit, corpus):
    units = [0, 3, 7, 11]
    result = collect_references(vit, corpus, {MLP: units}, k=4, composite=AttnLRP(), batch_size=3, progress=False)
    tables = brute_force(vit, corpus, MLP, lambda act, rel: (act, rel))
    assert result.units[MLP] == units
    assert result.position_shapes[MLP] == [5]
    for mode, index in (('activation', 0), ('relevance', 1)):
        for unit in units:
            expected = ranking([table[index] for table in tables], unit, 4)
            got = result.references(MLP, unit, mode)
            assert [(ref.sample, ref.position) for ref in got] == [(sample, pos) for sample, pos, _ in expected]
            assert [ref.value for ref in got] == pytest.approx([value for _, _, value in expected], rel=1e-9)


def test_heads_at_the_attention_site_against_brute_force(vit, corpus):
    result = collect_references(vit, corpus, {SITE: Heads()}, k=3, composite=AttnLRP(), batch_size=4,
                                progress=False)
    calls = {}

    def context(act, rel):  # the site's output: (heads, tokens, head_dim)
        return act.norm(dim=-1).T, rel.sum(-1).T
    # brute force through the op site: record it per sample with the same watch mechanism
    from zennit_attn.latent import watch_outputs
    tables = []
    for image in corpus:
        def output(name, tensor):
            calls['activation'] = tensor.detach()
            tensor.register_hook(lambda grad: calls.update(relevance=grad.detach()))
        with watch_outputs(vit, [SITE], output), Gradient(vit, AttnLRP()) as attributor:
            onehot = torch.nn.functional.one_hot(vit(image[None]).argmax(1), 3).double()
            attributor(image[None], lambda y: y * onehot)
        tables.append(context(calls['activation'][0], calls['relevance'][0]))
    for mode, index in (('activation', 0), ('relevance', 1)):
        for head in range(2):
            expected = ranking([table[index] for table in tables], head, 3)
            assert [(ref.sample, ref.position) for ref in result.references(SITE, head, mode)] == [
                (sample, position) for sample, position, _ in expected]


def test_merge_breaks_ties_by_sample_index():
    generator = torch.Generator().manual_seed(0)
    state = (torch.full((2, 4), -math.inf, dtype=torch.float64), torch.full((2, 4), -1), torch.full((2, 4), -1))
    seen = [[], []]
    for start in range(0, 30, 6):
        values = torch.randint(0, 3, (2, 6), generator=generator).double()  # many ties
        samples = torch.arange(start, start + 6).expand(2, -1)
        state = merge_top_k(*state, values, samples, torch.zeros(2, 6, dtype=torch.long), 4)
        for unit in range(2):
            seen[unit] += [(-value, sample) for value, sample in zip(values[unit].tolist(), samples[unit].tolist())]
    for unit in range(2):
        expected = sorted(seen[unit])[:4]
        assert state[1][unit].tolist() == [sample for _, sample in expected]
        assert state[0][unit].tolist() == [-value for value, _ in expected]


def test_runs_are_deterministic_and_resume_equals_an_uninterrupted_run(vit, corpus, tmp_path):
    units = {MLP: None, SITE: Heads()}
    options = dict(k=3, composite=AttnLRP(), batch_size=2, progress=False)  # 4 batches, the last one short
    whole = collect_references(vit, corpus, units, state_path=tmp_path / 'whole.pt', **options)
    again = collect_references(vit, corpus, units, **options)
    path = tmp_path / 'parts.pt'
    first = collect_references(vit, corpus, units, state_path=path, save_every=1, max_batches=1, **options)
    assert first.batches == 1 and not first.complete
    resumed = collect_references(vit, corpus, units, state_path=path, resume=True, max_batches=1, **options)
    resumed = collect_references(vit, corpus, units, state_path=path, resume=True, **options)
    assert resumed.complete and resumed.batches == 4
    for other in (again, resumed):
        for layer in units:
            for mode in ('activation', 'relevance'):
                for mine, theirs in zip(whole.top[layer][mode], other.top[layer][mode]):
                    assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match='saved for another run'):
        collect_references(vit, corpus, units, state_path=path, resume=True, **dict(options, k=2))


def test_canonical_layouts_of_heads_agree():
    merged = torch.randn(2, 5, 3 * 4)  # (batch, tokens, heads * head_dim)
    split = merged.unflatten(-1, (3, 4)).transpose(1, 2)  # (batch, heads, tokens, head_dim)
    first, shape_first = canonical(merged, Heads(3))
    second, shape_second = canonical(split, Heads())
    assert shape_first == shape_second == [5]
    assert torch.equal(first, second)
    neurons, shape = canonical(torch.randn(2, 4, 6, 7), Neurons(dim=1))  # channels of a feature map
    assert neurons.shape == (2, 42, 4, 1) and shape == [6, 7]


def test_crop_box_matches_an_exhaustive_search():
    relevance = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    heat = relevance.sum(0)
    best = max(((heat[top:top + 4, left:left + 4].sum().item(), -top, -left) for top in range(6) for left in range(8)))
    assert crop_box(relevance, 4) == (-best[1], -best[2], 4, 4)


def test_image_crops_point_where_the_conditional_relevance_is(vit, corpus):
    result = collect_references(vit, corpus, {MLP: [2]}, k=2, composite=AttnLRP(), batch_size=7, progress=False)
    crops = result.image_crops(vit, corpus, MLP, 2, AttnLRP(), size=6)
    assert [reference.sample for _, _, reference in crops] == [ref.sample for ref in result.references(MLP, 2)]
    samples = [reference.sample for reference in result.references(MLP, 2)]
    # the conditional maps of the reference samples, computed here directly (predicted class, unit 2 only)
    expected = conditional_relevance(vit, corpus[samples], None, AttnLRP(), MLP, [2], bypass='ignore').relevance[0]
    for (box, relevance, _), reference_map in zip(crops, expected):
        assert relevance.shape == (3, 16, 16)
        assert torch.allclose(relevance, reference_map, rtol=1e-10, atol=1e-12)
        assert box == crop_box(relevance, 6)


def test_text_snippets_mark_the_context_token():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ['[PAD]', '[UNK]'] + 'a good film bad movie plot thin the is and not very'.split()
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token='[UNK]'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='[PAD]', unk_token='[UNK]')
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).double().eval()
    corpus = ['a good film', 'the plot is thin', 'not a very good movie and the plot is bad', 'bad']
    layer = 'bert.encoder.layer.0.intermediate'
    result = collect_references(model, corpus, {layer: [0, 5]}, k=3, composite=AttnLRP(),
                                inputs=TextInputs(tokenizer), batch_size=3, progress=False)
    # brute force: the activation of each word, one text at a time
    best = []
    for sample, text in enumerate(corpus):
        captured = {}
        handle = dict(model.named_modules())[layer].register_forward_hook(
            lambda module, args, output: captured.update(value=output.detach()))
        with torch.no_grad():
            model(**tokenizer([text], return_tensors='pt'))
        handle.remove()
        column = captured['value'][0, :, 5].tolist()
        best.append((-max(column), sample, column.index(max(column))))
    expected = sorted(best)[:3]
    snippets = result.text_snippets(corpus, tokenizer, layer, 5, 'activation', window=2)
    assert [(reference.sample, reference.position) for _, reference in snippets] == [
        (sample, position) for _, sample, position in expected]
    for (snippet, reference) in snippets:
        word = corpus[reference.sample].split()[reference.position]
        assert f'[[{word}]]' in snippet
