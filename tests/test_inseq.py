'''The Inseq integration: ``inseq.load_model(model, 'attnlrp' | 'cp_lrp')`` and Inseq's own attribution loop, step
functions and outputs, on a tiny random LLaMA / T5 with a word-level tokenizer built offline.

The references: :py:func:`zennit_attn.explain_generation` (its own single forward over the whole sequence and its own
seeding of the targets, versus Inseq's one forward per prefix and its step functions), and Inseq's step scores (its own
no-grad forward), which CP-LRP's relevance must sum to on a bias-free model.
'''
import subprocess
import sys
import warnings

import pytest
import torch

inseq = pytest.importorskip('inseq', reason='the Inseq integration needs inseq (make install puts it in the venv)')

import zennit_attn  # noqa: E402
from zennit_attn import CPLRP, AttnLRP, explain_generation  # noqa: E402

from conformance import bias_free, decoder, t5  # noqa: E402
from restoration import assert_restored, snapshot  # noqa: E402

pytestmark = pytest.mark.usefixtures('single_thread')

PROMPT = 'w1 w2 w3 w4'
#: the continuation explained (forced decoding) and a contrast token different from each of its tokens
CONTINUATION, CONTRAST = 'w19 w7 w30', 'w11'
COMPOSITES = {'attnlrp': AttnLRP, 'cp_lrp': CPLRP}


def word_tokenizer():
    '''A word-level fast tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, w0..w45 = 4..49 (no special tokens added).'''
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ['<pad>', '<bos>', '<eos>', '<unk>'] + [f'w{index}' for index in range(46)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<bos>', eos_token='<eos>', pad_token='<pad>',
                                   unk_token='<unk>')


def special_ids(model):
    # set before the snapshot: inseq.load_model writes config.pad_token_id itself when it is None
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 0, 1, 2
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


@pytest.fixture(scope='module')
def llama():
    return special_ids(decoder('llama')())


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)['input_ids']


def attribute(model, method, tokenizer, continuation=CONTINUATION, **kwargs):
    with warnings.catch_warnings():
        # Inseq warns that the contrast prefix differs from the explained one (its default: the explained prefix)
        warnings.filterwarnings('ignore', message='Contrastive inputs do not match')
        attribution_model = inseq.load_model(model, method, tokenizer=tokenizer, epsilon=1e-12)
        return attribution_model.attribute(PROMPT, f'{PROMPT} {continuation}', show_progress=False, **kwargs)


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


def test_methods_are_registered_when_inseq_is_imported_after_zennit_attn():
    '''The post-import hook: ``import zennit_attn`` does not import Inseq, the methods appear when Inseq is imported.
    (In this process Inseq was imported first: the other order.)'''
    assert {'attnlrp', 'cp_lrp'} <= set(inseq.list_feature_attribution_methods())
    code = (
        'import sys, zennit_attn\n'
        'assert "inseq" not in sys.modules, "import zennit_attn imported inseq"\n'
        'import inseq\n'
        'print(sorted(set(inseq.list_feature_attribution_methods()) & {"attnlrp", "cp_lrp"}))\n'
    )
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['attnlrp', 'cp_lrp']"
    assert 'could not be registered' not in result.stderr


@pytest.mark.parametrize('method', ['attnlrp', 'cp_lrp'])
@pytest.mark.parametrize('attributed_fn, options, target, contrast', [
    ('logit', {}, 'logit', False),
    ('probability', {}, 'probability', False),  # Inseq's default step function
    ('probability', {'logprob': True}, 'log_probability', False),
    ('contrast_prob_diff', {}, 'probability', True),
    ('contrast_logits_diff', {}, 'logit', True),
])
def test_inseq_attribution_equals_explain_generation(llama, method, attributed_fn, options, target, contrast):
    tokenizer = word_tokenizer()
    before = snapshot(llama)
    if contrast:
        # Inseq's contrast: a whole alternative sequence, aligned 1:1; its token at every step is the contrast token
        options = dict(options, contrast_targets=f'{PROMPT} {CONTRAST} {CONTRAST} {CONTRAST}')
    output = attribute(llama, method, tokenizer, attributed_fn=attributed_fn, **options)
    assert_restored(llama, before)

    (sequence,) = output.sequence_attributions
    assert isinstance(output, inseq.FeatureAttributionOutput)
    # with a contrast, Inseq labels the generated tokens 'contrast → token'
    assert [token.token.split(' → ')[-1] for token in sequence.target] == f'{PROMPT} {CONTINUATION}'.split()
    assert sequence.source_attributions is None  # decoder-only: everything is target prefix
    matrix = sequence.target_attributions.T.double()  # (generated, tokens)
    expected = explain_generation(
        llama, tokenizer, PROMPT, composite=COMPOSITES[method](epsilon=1e-12), target=target,
        continuation=ids(tokenizer, CONTINUATION), contrast=ids(tokenizer, CONTRAST)[0] if contrast else None,
    )
    assert matrix.shape == expected.relevance.shape == (3, 7)
    # a generated token sees the tokens before it only: Inseq marks the others NaN, explain_generation 0
    future = torch.arange(7)[None] >= expected.target_positions[:, None]
    assert torch.equal(matrix.isnan(), future)
    assert relative_error(matrix.nan_to_num(), expected.relevance) <= 1e-6  # Inseq stores float32


def test_cp_lrp_relevance_sums_to_inseqs_own_step_scores():
    '''Bias-free model, CP-LRP: every step's relevance sums to the explained value, which Inseq computes itself as a
    step score (its own forward, no relevance involved).'''
    model = special_ids(bias_free(decoder('llama')()))
    tokenizer = word_tokenizer()
    for attributed_fn in ['logit', 'probability', 'contrast_prob_diff']:
        options = {}
        if 'contrast' in attributed_fn:
            # one step: as a step score, Inseq computes the contrast on the contrast prefix, which differs from the
            # explained one after the first step (as an attribution target, the explained prefix is used)
            options = dict(continuation=CONTINUATION.split()[0], contrast_targets=f'{PROMPT} {CONTRAST}')
        output = attribute(model, 'cp_lrp', tokenizer, attributed_fn=attributed_fn, step_scores=[attributed_fn],
                           **options)
        (sequence,) = output.sequence_attributions
        sums = sequence.target_attributions.nan_to_num().double().sum(0)
        values = sequence.step_scores[attributed_fn].double()
        assert values.abs().min() > 1e-4
        assert torch.allclose(sums, values, rtol=1e-5, atol=0), attributed_fn


def test_generation_batch_and_show(llama):
    '''Inseq generates the continuations itself (two prompts in one batch); each row equals explain_generation of that
    prompt, and Inseq's rendering works on the result.'''
    tokenizer = word_tokenizer()
    prompts = ['w1 w2 w3 w4', 'w9 w8 w7 w6']
    model = inseq.load_model(llama, 'attnlrp', tokenizer=tokenizer, epsilon=1e-12)
    output = model.attribute(prompts, generation_args=dict(max_new_tokens=2, do_sample=False), show_progress=False)
    assert output.info['attributed_fn'] == 'probability_fn'
    for prompt, sequence in zip(prompts, output.sequence_attributions):
        expected = explain_generation(llama, tokenizer, prompt, composite=AttnLRP(epsilon=1e-12), max_new_tokens=2,
                                      target='probability')
        assert [token.token for token in sequence.target] == expected.source_tokens
        matrix = sequence.target_attributions.T.double()
        assert relative_error(matrix.nan_to_num(), expected.relevance) <= 1e-6
    page = output.show(display=False, return_html=True)
    assert all(token in page for token in expected.target_tokens)


def test_encoder_decoder_source_and_target_prefix():
    '''T5: with attribute_target=True, Inseq's source (encoder) and target prefix (decoder) relevance are the two halves
    of explain_generation's row.'''
    model = special_ids(t5())
    tokenizer = word_tokenizer()
    before = snapshot(model)
    output = inseq.load_model(model, 'attnlrp', tokenizer=tokenizer, epsilon=1e-12).attribute(
        PROMPT, CONTINUATION, attributed_fn='logit', attribute_target=True, show_progress=False,
    )
    assert_restored(model, before)
    (sequence,) = output.sequence_attributions
    expected = explain_generation(model, tokenizer, PROMPT, composite=AttnLRP(epsilon=1e-12), target='logit',
                                  continuation=ids(tokenizer, CONTINUATION))
    matrix = torch.cat([sequence.source_attributions.T, sequence.target_attributions.T], 1).double()
    assert matrix.shape == expected.relevance.shape == (3, 4 + 4)
    assert relative_error(matrix.nan_to_num(), expected.relevance) <= 1e-6


@pytest.mark.filterwarnings('ignore:Forcing contrastive inputs')
def test_a_step_function_that_runs_the_model_again_is_refused(llama):
    '''contrast_force_inputs=True explains the contrast with a second forward on other inputs, whose relevance the
    attributed forward cannot carry: a clear error, and the model is restored.'''
    before = snapshot(llama)
    with pytest.raises(ValueError, match='ran the model 1 more time'):
        attribute(llama, 'attnlrp', word_tokenizer(), attributed_fn='contrast_prob_diff', contrast_force_inputs=True,
                  contrast_targets=f'{PROMPT} {CONTRAST} {CONTRAST} {CONTRAST}')
    assert_restored(llama, before)


def test_a_custom_composite_is_used(llama):
    '''``inseq.load_model(model, 'attnlrp', composite=...)`` uses that composite (here CP-LRP under the AttnLRP
    name): the result is CP-LRP's.'''
    tokenizer = word_tokenizer()
    with_composite = inseq.load_model(llama, 'attnlrp', tokenizer=tokenizer, composite=CPLRP(epsilon=1e-12))
    output = with_composite.attribute(PROMPT, f'{PROMPT} {CONTINUATION}', attributed_fn='logit', show_progress=False)
    reference = attribute(llama, 'cp_lrp', tokenizer, attributed_fn='logit')
    other = attribute(llama, 'attnlrp', tokenizer, attributed_fn='logit')
    matrix, same, different = (out.sequence_attributions[0].target_attributions.nan_to_num()
                               for out in (output, reference, other))
    assert torch.equal(matrix, same)
    assert relative_error(matrix, different) > 1e-3
    assert zennit_attn.integrations.inseq.AttnLRPAttribution.method_name == 'attnlrp'
