'''token_relevance on encoder-decoder models (T5, BART): one attribution of a decoder logit reaches the encoder tokens
and the previous decoder tokens.'''
import pytest
import torch

import zennit_attn
from zennit_attn.composites import AttnLRP, CPLRP

from conformance import bias_free, generator, t5
from conformance_decoders import POSITIONS, bart

pytestmark = pytest.mark.usefixtures('single_thread')

BUILDERS = {'t5': (t5, ()), 'bart': (bart, POSITIONS)}
ENCODER, DECODER = 6, 4


def inputs(pad_id):
    '''Encoder ids with right padding in the second sample, decoder ids starting with the start token 0.'''
    ids = torch.randint(4, 50, (2, ENCODER), generator=generator(5))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    decoder_ids = torch.randint(4, 50, (2, DECODER), generator=generator(6))
    decoder_ids[:, 0] = 0
    return ids, mask, decoder_ids


@pytest.fixture(params=sorted(BUILDERS))
def family(request):
    return request.param


def test_relevance_of_encoder_and_decoder_tokens_conserves_the_logit(family):
    build, absorbing = BUILDERS[family]
    model = bias_free(build(), absorbing)
    ids, mask, decoder_ids = inputs(model.config.pad_token_id)
    result = zennit_attn.token_relevance(
        model, CPLRP(epsilon=1e-12), ids, mask, target=[3, 7], decoder_input_ids=decoder_ids,
    )
    assert result.relevance.shape == (2, ENCODER) and result.decoder_relevance.shape == (2, DECODER)
    assert result.position.tolist() == [DECODER - 1] * 2
    logits = result.logits[torch.arange(2), result.target]
    totals = result.relevance.sum(1) + result.decoder_relevance.sum(1)
    assert torch.allclose(totals, logits, rtol=1e-8, atol=1e-12), (totals, logits)
    # both sides carry relevance, and the encoder's padding none
    assert (result.relevance[:, :ENCODER - 2].abs().sum(1) > 1e-3 * logits.abs()).all()
    assert (result.decoder_relevance.abs().sum(1) > 1e-3 * logits.abs()).all()
    assert torch.all(result.relevance[1, -2:] == 0)


@pytest.mark.parametrize('position', [1, 2])
def test_later_decoder_tokens_get_no_relevance_and_change_nothing(family, position):
    '''The decoder is causal: explaining position p with more decoder tokens equals explaining it with the first p+1
    tokens only, and the tokens after p get exactly zero relevance.'''
    build, _ = BUILDERS[family]
    model = build()
    ids, mask, decoder_ids = inputs(model.config.pad_token_id)
    full = zennit_attn.token_relevance(
        model, AttnLRP(epsilon=1e-12), ids, mask, target=5, position=position, decoder_input_ids=decoder_ids,
    )
    short = zennit_attn.token_relevance(
        model, AttnLRP(epsilon=1e-12), ids, mask, target=5, decoder_input_ids=decoder_ids[:, :position + 1],
    )
    assert torch.all(full.decoder_relevance[:, position + 1:] == 0)
    assert torch.allclose(full.decoder_relevance[:, :position + 1], short.decoder_relevance, rtol=1e-9, atol=1e-14)
    assert torch.allclose(full.relevance, short.relevance, rtol=1e-9, atol=1e-14)


def test_batched_equals_one_sample_at_a_time(family):
    build, _ = BUILDERS[family]
    model = build()
    ids, mask, decoder_ids = inputs(model.config.pad_token_id)
    batched = zennit_attn.token_relevance(model, AttnLRP(epsilon=1e-12), ids, mask, target=[3, 7],
                                          decoder_input_ids=decoder_ids)
    for index, target in enumerate([3, 7]):
        real = mask[index].bool()
        single = zennit_attn.token_relevance(model, AttnLRP(epsilon=1e-12), ids[index, real], target=target,
                                             decoder_input_ids=decoder_ids[index])
        assert torch.allclose(batched.relevance[index, real], single.relevance[0], rtol=1e-8, atol=1e-13)
        assert torch.allclose(batched.decoder_relevance[index], single.decoder_relevance[0], rtol=1e-8, atol=1e-13)


def test_encoder_decoder_inputs_are_checked():
    model = t5()
    ids, mask, decoder_ids = inputs(0)
    with pytest.raises(ValueError, match='encoder-decoder model; pass decoder_input_ids'):
        zennit_attn.token_relevance(model, AttnLRP(), ids, mask)
    with pytest.raises(ValueError, match='batch size 1'):
        zennit_attn.token_relevance(model, AttnLRP(), ids, mask, decoder_input_ids=decoder_ids[:1])
    from conformance import bert
    with pytest.raises(ValueError, match='not an encoder-decoder model'):
        zennit_attn.token_relevance(bert('bert')(), AttnLRP(), ids % 40, mask, decoder_input_ids=decoder_ids)
