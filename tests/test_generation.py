'''explain_generation: every generated token attributed to every earlier token with one forward pass.'''
import pytest
import torch

import zennit_attn
from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.generation import GenerationAttribution, explain_generation

from conformance import bias_free, decoder, generator, t5

pytestmark = pytest.mark.usefixtures('single_thread')


def prompts(batch=2, length=5, padded=True):
    ids = torch.randint(2, 50, (batch, length), generator=generator(7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0
        ids[1, :2] = 0
    return ids, mask


@pytest.fixture(scope='module')
def llama():
    return decoder('llama')()


def test_each_row_equals_the_attribution_of_that_token_alone(llama):
    '''One forward over the whole sequence + one backward per token == a separate token_relevance call on every
    prefix (an independent path: its own forward on the shorter sequence).'''
    ids, mask = prompts(1, padded=False)
    result = explain_generation(llama, input_ids=ids[0], max_new_tokens=4, composite=AttnLRP(epsilon=1e-12))
    assert result.relevance.shape == (4, 9)
    for row in range(4):
        position = int(result.target_positions[row])
        alone = zennit_attn.token_relevance(llama, AttnLRP(epsilon=1e-12), result.source_ids[:position],
                                            target=int(result.target_ids[row]))
        assert torch.allclose(result.relevance[row, :position], alone.relevance[0], rtol=1e-9, atol=1e-14)
        # causal: nothing for the token itself and the tokens after it
        assert torch.all(result.relevance[row, position:] == 0)
        assert result.target_values[row] == pytest.approx(float(alone.logits[0, alone.target[0]]), rel=1e-12)


def test_generated_tokens_are_the_greedy_continuation(llama):
    ids, _ = prompts(1, padded=False)
    result = explain_generation(llama, input_ids=ids[0], max_new_tokens=3)
    with torch.no_grad():
        expected = llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 5:]
    assert result.target_ids.tolist() == expected.tolist()
    assert result.source_ids.tolist() == ids[0].tolist() + expected.tolist()


def test_rows_conserve_on_a_bias_free_model():
    model = bias_free(decoder('llama')())
    ids, mask = prompts()
    results = explain_generation(model, input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                 composite=CPLRP(epsilon=1e-12))
    for result in results:
        assert torch.allclose(result.relevance.sum(1), result.target_values, rtol=1e-8, atol=1e-12)


def test_left_padded_batch_equals_one_prompt_at_a_time(llama):
    ids, mask = prompts()
    batched = explain_generation(llama, input_ids=ids, attention_mask=mask, max_new_tokens=3,
                                 composite=AttnLRP(epsilon=1e-12))
    for index in range(2):
        real = mask[index].bool()
        single = explain_generation(llama, input_ids=ids[index, real], max_new_tokens=3,
                                    composite=AttnLRP(epsilon=1e-12))
        assert batched[index].source_ids.tolist() == single.source_ids.tolist()
        assert batched[index].prompt_length == int(real.sum())
        assert torch.allclose(batched[index].relevance, single.relevance, rtol=1e-7, atol=1e-12)


def test_contrast_is_the_difference_of_the_two_single_target_runs(llama):
    ids, _ = prompts(1, padded=False)
    composite = AttnLRP(epsilon=1e-12)

    def run(**kwargs):
        return explain_generation(llama, input_ids=ids[0], composite=composite, **kwargs)

    contrastive = run(continuation=[7], contrast=9)
    first, second = run(continuation=[7]), run(continuation=[9])
    assert torch.allclose(contrastive.relevance, first.relevance - second.relevance, rtol=1e-9, atol=1e-14)
    assert contrastive.target_values[0] == pytest.approx(float(first.target_values[0] - second.target_values[0]))
    # the summary names the difference, not a plain logit
    assert 'logit - logit[9]=' in str(contrastive) and 'logit - logit' not in str(first)
    # one contrast id per generated row
    longer = run(max_new_tokens=3, contrast=9)
    assert longer.contrast_ids.tolist() == [9] * len(longer.target_tokens)
    assert str(longer).count('logit - logit[9]=') == 3


def test_probability_target_scales_the_logit_relevance(llama):
    '''The probability is distributed like the logit: every rule is linear in the relevance it receives.'''
    ids, _ = prompts(1, padded=False)
    logit = explain_generation(llama, input_ids=ids[0], max_new_tokens=2, composite=AttnLRP(epsilon=1e-12))
    probability = explain_generation(llama, input_ids=ids[0], max_new_tokens=2, target='probability',
                                     composite=AttnLRP(epsilon=1e-12))
    ratio = (probability.target_values / logit.target_values)[:, None]
    assert torch.allclose(probability.relevance, logit.relevance * ratio, rtol=1e-9, atol=1e-15)
    assert torch.allclose(probability.target_values, probability.probabilities.double(), rtol=1e-6)
    # log-probability: the logit contrasted with the probability-weighted mean logit
    log_probability = explain_generation(llama, input_ids=ids[0], max_new_tokens=2, target='log_probability')
    assert torch.isfinite(log_probability.relevance).all()
    assert not torch.allclose(log_probability.relevance, logit.relevance)


def test_callable_target_gets_the_logits_and_tokens(llama):
    ids, _ = prompts(1, padded=False)
    seen = []

    def twice_the_logit(logits, tokens):
        seen.append(tuple(logits.shape))
        return 2 * logits * torch.nn.functional.one_hot(tokens, logits.shape[-1]).to(logits.dtype)

    doubled = explain_generation(llama, input_ids=ids[0], max_new_tokens=2, target=twice_the_logit,
                                 composite=AttnLRP(epsilon=1e-12))
    plain = explain_generation(llama, input_ids=ids[0], max_new_tokens=2, composite=AttnLRP(epsilon=1e-12))
    assert seen == [(1, 50)] * 2 and doubled.target == 'twice_the_logit'
    assert torch.allclose(doubled.relevance, 2 * plain.relevance, rtol=1e-12, atol=1e-15)


def test_encoder_decoder_rows_equal_token_relevance():
    model = t5()
    ids = torch.randint(2, 50, (6,), generator=generator(8))
    result = explain_generation(model, input_ids=ids, max_new_tokens=3, composite=AttnLRP(epsilon=1e-12))
    assert result.prompt_length == 6 and len(result.source_tokens) == 6 + 1 + len(result.target_tokens)
    for row in range(len(result.target_tokens)):
        position = int(result.target_positions[row])
        alone = zennit_attn.token_relevance(model, AttnLRP(epsilon=1e-12), ids,
                                            decoder_input_ids=result.source_ids[6:position],
                                            target=int(result.target_ids[row]))
        expected = torch.cat([alone.relevance[0], alone.decoder_relevance[0]])
        assert torch.allclose(result.relevance[row, :position], expected, rtol=1e-9, atol=1e-14)
        assert torch.all(result.relevance[row, position:] == 0)


def test_bad_requests_are_refused(llama):
    ids, mask = prompts()
    with pytest.raises(ValueError, match='the explained token itself'):
        explain_generation(llama, input_ids=ids[0], continuation=[7, 9], contrast=9)
    with pytest.raises(ValueError, match='pass a tokenizer'):
        explain_generation(llama, input_ids=ids[0], contrast=' Paris')
    with pytest.raises(ValueError, match='not a token id'):
        explain_generation(llama, input_ids=ids[0], contrast=50)
    with pytest.raises(ValueError, match='right-padded'):
        explain_generation(llama, input_ids=ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match='target must be one of'):
        explain_generation(llama, input_ids=ids[0], target='logits')
    with pytest.raises(ValueError, match='either prompt'):
        explain_generation(llama)


def test_non_finite_logits_name_the_first_bad_layer():
    model = decoder('llama')()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e308)
    ids, _ = prompts(1, padded=False)
    with pytest.raises(ValueError, match=r'not finite \(first non-finite hidden state: layer 1'):
        explain_generation(model, input_ids=ids[0], continuation=[3])


def words_result():
    tokens = ['<bos>', '▁The', '▁Eif', 'fel', '▁Tower', '▁Par', 'is']
    relevance = torch.tensor([[1., 2., 3., 4., 5., 0., 0.], [1., 1., 1., 1., 1., 1., 0.]])
    return GenerationAttribution(
        relevance=relevance, source_tokens=tokens, target_tokens=tokens[5:], source_ids=torch.arange(7),
        target_ids=torch.tensor([5, 6]), target_positions=torch.tensor([5, 6]), target_values=torch.tensor([9., 8.]),
        probabilities=torch.tensor([.5, .9]), prompt_length=5,
    )


def test_sub_words_aggregate_to_words():
    words = words_result().aggregate_words()
    assert words.source_tokens == ['<bos>', '▁The', '▁Eiffel', '▁Tower', '▁Par', 'is']  # generated: not merged
    assert words.relevance.tolist() == [[1., 2., 7., 5., 0., 0.], [1., 1., 2., 1., 1., 0.]]
    assert words.target_positions.tolist() == [4, 5] and words.prompt_length == 4


def test_special_tokens_are_excluded_from_the_ranking_and_the_colour_scale():
    result = words_result()
    result.relevance[:, 0] = 100.
    assert [token for _, token, _ in result.top(0, k=2)] == ['▁Tower', 'fel']
    assert result.top(0, k=1, exclude_special=False)[0][1] == '<bos>'
    assert result._scale(exclude_special=True) == 5. and result._scale(exclude_special=False) == 100.


def test_save_load_html_png(tmp_path, llama):
    ids, _ = prompts(1, padded=False)
    result = explain_generation(llama, input_ids=ids[0], max_new_tokens=2)
    loaded = GenerationAttribution.load(result.save(tmp_path / 'r.pt'))
    assert torch.equal(loaded.relevance, result.relevance) and loaded.source_tokens == result.source_tokens
    page = result.to_html(tmp_path / 'r.html', title='t')
    assert page.count('<tr>') == 3 and 'units of the explained logit' in page and (tmp_path / 'r.html').exists()
    from PIL import Image
    with Image.open(result.to_png(tmp_path / 'r.png')) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert 'generated tokens explained with AttnLRP' in str(result)
