'''The command line on your own models: a torchvision model with a checkpoint, a timm model, a Hugging Face image
classifier directory and your own builder, each explained end to end with random weights saved to a temporary
directory; preprocessing against torchvision's, timm's and Hugging Face's own transforms; composites that do not
cover the model refused with the coverage lint's reason.'''
import numpy as np
import pytest
import torch
from PIL import Image

import zennit_attn.cli as cli
from zennit_attn.cli import main
from zennit_attn.methods import attribute
from zennit_attn.tasks import ImageTask


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: a torchvision VisionTransformer small enough for a test
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
#: overrides making timm's vit_tiny_patch16_224 tiny
TINY_TIMM = dict(img_size=32, patch_size=8, depth=1, num_heads=2, embed_dim=16)
#: your own builder, imported by the CLI as my_models:tiny_cnn
MY_MODELS = '''
import torch


def tiny_cnn(num_classes=3):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes),
    )
    model.image_size = 32
    return model


class UnitFeatures(torch.nn.Module):
    # patch features L2-normalised inline: the division has no rule under any composite
    image_size = 32

    def __init__(self):
        super().__init__()
        self.patches, self.head = torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.Linear(64, 3)

    def forward(self, x):
        features = self.patches(x).flatten(1)
        return self.head(features / features.norm(dim=-1, keepdim=True))
'''


def model_args(options):
    return ['--model-args', *[f'{key}={value}' for key, value in options.items()]]


def error_lines(captured):
    '''The lines of stderr that are not notes.'''
    return [line for line in captured.err.strip().splitlines() if not line.startswith('note:')]


@pytest.fixture
def spy(monkeypatch):
    '''Records the task, the model input, the image shown and the relevance of the CLI's run.'''
    record = {}
    load_image, heatmaps = ImageTask.load_image, cli.image_heatmaps

    def spy_load_image(self, path, resize):
        record['task'] = self
        record['inputs'], record['image'] = result = load_image(self, path, resize)
        return result

    def spy_heatmaps(task, inputs, targets, methods, progress=True):
        record['targets'], record['relevances'] = targets, heatmaps(task, inputs, targets, methods, progress)
        return record['relevances']
    monkeypatch.setattr(ImageTask, 'load_image', spy_load_image)
    monkeypatch.setattr(cli, 'image_heatmaps', spy_heatmaps)
    return record


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
    '''A non-square (50×30) colour photo of noise: any crop or squash is visible in every pixel.'''
    path = tmp_path_factory.mktemp('photo') / 'photo.png'
    Image.fromarray((np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope='module')
def tiny_vit(tmp_path_factory):
    '''A tiny torchvision ViT and its checkpoint as a training script with DistributedDataParallel saves it.'''
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(**TINY_VIT, num_classes=5).eval()
    # torchvision initialises the head to zero, which would give zero logits and empty heatmaps
    torch.nn.init.normal_(model.heads.head.weight)
    path = tmp_path_factory.mktemp('vit') / 'vit.pt'
    torch.save({'state_dict': {f'module.{key}': value for key, value in model.state_dict().items()}, 'epoch': 3}, path)
    return model, path


def assert_explained(record, model, expected_inputs, method):
    '''The CLI explained the model's prediction at ``expected_inputs`` as ``method`` does when called directly.'''
    torch.testing.assert_close(record['inputs'][0], expected_inputs, atol=1e-5, rtol=0)
    with torch.no_grad():
        prediction = model(expected_inputs[None]).argmax(-1)
    assert record['targets'].tolist() == prediction.tolist()
    relevance = record['relevances'][method]
    direct = attribute(model, expected_inputs[None], prediction, method)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert abs(relevance.sum().item() - direct.sum().item()) <= 1e-4 * direct.abs().sum().item()
    torch.testing.assert_close(relevance, direct, atol=1e-5 * direct.abs().max().item(), rtol=1e-4)


def test_torchvision_checkpoint_explained_end_to_end(tmp_path, photo, tiny_vit, spy, capsys):
    '''A torchvision model class with --model-args and a DDP checkpoint ('state_dict', 'module.' prefixes, num_classes
    from the head): a non-square photo is resized and centre-cropped as torchvision's transforms do, not squashed.'''
    import torchvision
    import torchvision.transforms as T
    model, checkpoint = tiny_vit
    out = tmp_path / 'out'
    assert main(['explain', str(photo), '--model', 'VisionTransformer', *model_args(TINY_VIT), '--checkpoint',
                 str(checkpoint), '--resize', '-o', str(out)]) == 0
    captured = capsys.readouterr()
    assert (out / 'explain_comparison.png').is_file()
    assert 'num_classes=5 from heads.head.weight' in captured.err
    # torchvision's own ImageNet evaluation pipeline at 32 pixels: shorter side to 32 · 256/224 ≈ 37, centre crop
    image = Image.open(photo).convert('RGB')
    resized = T.Compose([T.Resize(37), T.CenterCrop(32), T.PILToTensor()])(image)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(resized.float() / 255.)
    reference = torchvision.models.VisionTransformer(**TINY_VIT, num_classes=5).eval()
    reference.load_state_dict(model.state_dict())
    assert_explained(spy, reference, expected, 'attnlrp_vit')
    # the image shown is what the model sees: the centre crop, not the photo squashed to 32×32
    assert np.array_equal(spy['image'], resized.permute(1, 2, 0).numpy())
    squashed = np.asarray(image.resize((32, 32), Image.BILINEAR)).astype(float)
    assert np.abs(spy['image'] - squashed).mean() > 20


def test_timm_model_explained_end_to_end(tmp_path, photo, spy, capsys):
    '''A timm model name with --model-args and a checkpoint: preprocessing by timm's data config (resize to
    floor(32 / crop_pct 0.9) = 35, bicubic, centre crop, mean = std = 0.5).'''
    timm = pytest.importorskip('timm')
    import torchvision.transforms as T
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=4, **TINY_TIMM).eval()
    checkpoint = tmp_path / 'timm.pth'
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / 'out'
    assert main(['explain', str(photo), '--model', 'vit_tiny_patch16_224', *model_args(TINY_TIMM), '--checkpoint',
                 str(checkpoint), '--resize', '-o', str(out)]) == 0
    assert 'num_classes=4 from head.weight' in capsys.readouterr().err
    assert (out / 'explain_comparison.png').is_file()
    reference = T.Compose([T.Resize(35, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert_explained(spy, model, reference(Image.open(photo).convert('RGB')), 'attnlrp_vit')


@pytest.fixture(scope='module')
def hf_directory(tmp_path_factory):
    '''A tiny ViTForImageClassification with named classes and its ViTImageProcessor, saved to a directory.'''
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    labels = {0: 'cat', 1: 'dog', 2: 'owl'}
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        num_labels=3, id2label=labels, label2id={name: index for index, name in labels.items()},
    )
    model = transformers.ViTForImageClassification(config).eval()
    directory = tmp_path_factory.mktemp('hf') / 'tiny-vit'
    model.save_pretrained(directory)
    transformers.ViTImageProcessor(size={'height': 32, 'width': 32}).save_pretrained(directory)
    return model, directory


def test_hugging_face_directory_explained_end_to_end(tmp_path, photo, hf_directory, spy, capsys):
    '''A Hugging Face image classifier directory: its image processor, class names from id2label; a grey image on
    the RGB model is converted with a note.'''
    import transformers
    model, directory = hf_directory
    grey = tmp_path / 'grey.png'
    Image.open(photo).convert('L').save(grey)
    out = tmp_path / 'out'
    assert main(['explain', str(grey), '--model', str(directory), '--resize', '-o', str(out)]) == 0
    captured = capsys.readouterr()
    assert 'is a grey image, but tiny-vit takes RGB images: repeating the grey channel' in captured.err
    assert (out / 'explain_comparison.png').is_file()
    processor = transformers.ViTImageProcessor(size={'height': 32, 'width': 32})
    expected = processor(images=Image.open(grey).convert('RGB'), return_tensors='pt')['pixel_values'][0]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits
    assert_explained(spy, Logits(), expected, 'attnlrp_vit')
    name = model.config.id2label[int(spy['targets'][0])]
    assert f'({name}), logit' in captured.out


def test_own_builder_runs_epsilon_gamma_box_where_it_is_valid(tmp_path, photo, spy, monkeypatch):
    '''package.module:callable with a checkpoint; on a plain CNN Zennit's epsilon_gamma_box passes the coverage check
    and runs with the input bounds of the preprocessing (black and white), as when called directly.'''
    (tmp_path / 'my_models.py').write_text(MY_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_models
    torch.manual_seed(0)
    model = my_models.tiny_cnn(3).eval()
    torch.save(model.state_dict(), tmp_path / 'cnn.pt')
    assert main(['explain', str(photo), '--model', 'my_models:tiny_cnn', '--checkpoint', str(tmp_path / 'cnn.pt'),
                 '--composite', 'epsilon_gamma_box', '--resize', '-o', str(tmp_path / 'out')]) == 0
    inputs = spy['inputs']
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    low, high = ((torch.full_like(inputs, value) - mean) / std for value in (0., 1.))
    direct = attribute(model, inputs, spy['targets'], 'epsilon_gamma_box', low=low, high=high)
    relevance = spy['relevances']['epsilon_gamma_box']
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    torch.testing.assert_close(relevance, direct, atol=1e-5 * direct.abs().max().item(), rtol=1e-4)


def test_attnlrp_on_an_uncovered_model_is_refused_with_the_lint_reason(tmp_path, photo, monkeypatch, capsys):
    '''Our own composites are refused the same way on a model with an operation they do not cover.'''
    (tmp_path / 'my_models.py').write_text(MY_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(['explain', str(photo), '--model', 'my_models:UnitFeatures', '--resize', '-o', str(tmp_path / 'out')])
    lines = error_lines(capsys.readouterr())
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith('zennit-attn: error: composite attnlrp_vit does not cover UnitFeatures: 2 operation(s)')
    assert 'div in <model> (UnitFeatures)' in lines[0] and 'norm in <model> (UnitFeatures)' in lines[0]


@pytest.mark.parametrize('composite', ['epsilon_plus', 'epsilon_gamma_box'])
def test_cnn_composite_on_a_vit_is_refused_with_the_lint_reason(tmp_path, photo, tiny_vit, composite, capsys):
    '''Zennit's CNN composites leave the ViT's LayerNorms and residual sums with their plain gradient (the relevance
    sum was up to 3817× the logit): refused with exit status 2 and the lint's reason, no TypeError.'''
    _, checkpoint = tiny_vit
    code = main(['explain', str(photo), '--model', 'VisionTransformer', *model_args(TINY_VIT), '--checkpoint',
                 str(checkpoint), '--resize', '--composite', composite, '-o', str(tmp_path / 'out')])
    lines = error_lines(capsys.readouterr())
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f'zennit-attn: error: composite {composite} does not cover VisionTransformer: ')
    assert 'layer_norm in encoder.ln (LayerNorm)' in lines[0] and 'plain gradient' in lines[0]
    assert not (tmp_path / 'out' / 'explain_comparison.png').exists()


def test_colour_photo_on_the_grey_default_says_it_converts(tmp_path, photo, spy, capsys):
    '''The embedded model takes 28×28 grey images: a colour photo is converted to grey with a note, and --resize
    squashes it to 28×28 as before (documented).'''
    from zennit_attn.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    assert main(['explain', str(photo), '--resize', '-o', str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert 'is a colour image, but the embedded Fashion-MNIST ViT takes grey images: converting it to grey' in err
    assert 'squash it to 28×28' in err
    grey = np.asarray(Image.open(photo).convert('L').resize((28, 28), Image.BILINEAR)).astype(np.float32) / 255.
    expected = (torch.from_numpy(grey) - float(FASHION_MNIST_MEAN)) / float(FASHION_MNIST_STD)
    torch.testing.assert_close(spy['inputs'][0], expected.expand(3, -1, -1), atol=1e-5, rtol=0)


def test_methods_that_do_not_apply(tmp_path, photo, hf_directory, capsys):
    '''compare: attention rollout (torchvision ViTs only) is refused when asked for, dropped from the defaults.'''
    _, directory = hf_directory
    code = main(['compare', str(photo), '--model', str(directory), '--resize', '--methods', 'attnlrp_vit',
                 'attention_rollout', '-o', str(tmp_path)])
    lines = error_lines(capsys.readouterr())
    assert code == 2 and len(lines) == 1 and 'method attention_rollout does not apply to tiny-vit' in lines[0]
    task = cli.image_task(str(directory))
    inputs, _ = task.load_image(photo, resize=True)
    assert task.usable_methods(['attnlrp_vit', 'attention_rollout', 'gradient'], inputs, explicit=False) == [
        'attnlrp_vit', 'gradient']
    assert 'skipping attention_rollout' in capsys.readouterr().err


@pytest.mark.parametrize('args,message', [
    (['--model', 'vit_b_16', '--weights', 'my_vit.pth'], 'for the file my_vit.pth pass --checkpoint my_vit.pth'),
    (['--model', '{checkpoint}'], 'is a file; pass the architecture as --model'),
    (['--checkpoint', '{checkpoint}'], '--checkpoint apply to --model NAME'),
    (['--model', 'VisionTransformer', '--checkpoint', '{checkpoint}', '--model-args', 'image_size'],
     '--model-args expects KEY=VALUE'),
    (['--model', 'VisionTransformer', '--checkpoint', '{listing}', *model_args(TINY_VIT)],
     'holds list, not a state dict'),
    (['--model', 'VisionTransformer', '--checkpoint', '{checkpoint}', *model_args(dict(TINY_VIT, num_layers=2))],
     'does not fit VisionTransformer (missing keys: encoder.layers.encoder_layer_1.'),
    (['--model', 'VisionTransformer', '--checkpoint', '{checkpoint}', *model_args(dict(TINY_VIT, hidden_dim=8))],
     'shape mismatches: class_token (1, 1, 16) (model: (1, 1, 8))'),
    (['--model', 'not_a_model'], "unknown model 'not_a_model'"),
    (['--text', 'a fine film', '--checkpoint', '{checkpoint}'], '--checkpoint apply to image models'),
])
def test_bad_model_options_give_one_line_errors(tmp_path, photo, tiny_vit, args, message, capsys):
    '''Bad --model/--weights/--checkpoint/--model-args: exit status 2, one line naming what to do.'''
    listing = tmp_path / 'listing.pt'
    torch.save([1, 2], listing)
    args = [arg.format(checkpoint=tiny_vit[1], listing=listing) for arg in args]
    image = [] if '--text' in args else [str(photo), '--resize']
    code = main(['explain', *image, *args, '-o', str(tmp_path / 'out')])
    lines = error_lines(capsys.readouterr())
    assert code == 2 and len(lines) == 1 and lines[0].startswith('zennit-attn: error:')
    assert message in lines[0]
