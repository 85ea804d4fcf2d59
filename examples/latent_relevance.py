'''Latent relevance on a small random torchvision ViT: which MLP neurons and which attention heads carry the relevance
of the predicted class.

Also runs the two trust checks first: the coverage lint (no operation runs with its plain gradient) and the
conservation report (where relevance is absorbed).

Usage:
    python examples/latent_relevance.py                 # AttnLRP, MLP neurons of layer 1
    python examples/latent_relevance.py --cp-lrp --layer 0 --conservation
'''
import argparse

import torch
from torchvision.models import VisionTransformer
from zennit.attribution import Gradient

from zennit_attn.check import check
from zennit_attn.composites import AttnLRP, CPLRP
from zennit_attn.conservation import conservation_report
from zennit_attn.latent import per_head, per_neuron, record_relevance, top_k


def small_vit(seed=0):
    '''A random ViT (3 layers, 4 heads, width 32) in float64; the head is randomised (torchvision zeroes it).'''
    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10,
    )
    with torch.no_grad():
        model.heads.head.weight.normal_(0, model.hidden_dim ** -0.5)
    return model.double().eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--layer', type=int, default=1, help='encoder layer whose MLP neurons are ranked')
    parser.add_argument('--cp-lrp', action='store_true', help='CP-LRP inside attention instead of AttnLRP')
    parser.add_argument('--conservation', action='store_true', help='also print the conservation table')
    args = parser.parse_args()

    model = small_vit()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    composite_type = CPLRP if args.cp_lrp else AttnLRP

    output = model(image)
    target = output.argmax(1)
    onehot = torch.nn.functional.one_hot(target, 10).double()

    print(check(model, composite_type(), image))
    if args.conservation:
        print(conservation_report(model, composite_type(epsilon=1e-12), image, lambda y: y * onehot).format(
            sort='absorbed', limit=10
        ))

    layer = f'encoder.layers.encoder_layer_{args.layer}'
    with record_relevance(model, [f'{layer}.mlp.1', '*.self_attention.attention']) as recorded:
        with Gradient(model, composite_type(epsilon=1e-12)) as attributor:
            _, relevance = attributor(image, lambda y: y * onehot)

    logit = output[0, target].item()
    print(f'\nclass {target.item()}, logit {logit:+.4f}, input relevance {relevance.sum().item():+.4f}')
    neurons = per_neuron(recorded[f'{layer}.mlp.1'])
    print(f'\ntop-5 MLP neurons of {layer} (relevance at the GELU output, total {neurons.sum().item():+.4f}):')
    for index, value in zip(*top_k(neurons, 5, absolute=True)):
        print(f'  neuron {index.item():3d}  {value.item():+.4f}')

    print('\nrelevance per attention head (output of the attention context):')
    for index in range(len(model.encoder.layers)):
        name = f'encoder.layers.encoder_layer_{index}.self_attention.attention'
        heads = per_head(recorded[name])
        print(f'  layer {index}: ' + '  '.join(f'h{head} {value:+.4f}' for head, value in enumerate(heads.tolist())))


if __name__ == '__main__':
    main()
