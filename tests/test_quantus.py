'''zennit_attn.integrations.quantus: our methods as a Quantus explain_func, and one Quantus metric against ours.'''
import numpy as np
import pytest
import torch

from zennit_attn.evaluation import perturbation_curves
from zennit_attn.integrations.quantus import explain_func
from zennit_attn.methods import attribute

pytestmark = pytest.mark.usefixtures('single_thread')


def test_explain_func_returns_our_attribution_as_numpy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 4)).astype(np.float32)
    y = np.array([0, 2, 1])
    relevance = explain_func(model=model, inputs=x, targets=y, method='input_x_gradient')
    assert isinstance(relevance, np.ndarray) and relevance.dtype == np.float32 and relevance.shape == x.shape
    expected = attribute(model, torch.from_numpy(x), torch.from_numpy(y), 'input_x_gradient')
    np.testing.assert_allclose(relevance, expected.numpy(), rtol=1e-6)
    # input x gradient of a linear model: w_t * x, independently
    weight = model[1].weight.detach().numpy().reshape(3, 2, 4, 4)
    np.testing.assert_allclose(relevance, weight[y] * x, rtol=1e-5, atol=1e-7)
    summed = explain_func(model, x, y, method='input_x_gradient', channels='sum', device='cpu')
    np.testing.assert_allclose(summed, relevance.sum(1, keepdims=True), rtol=1e-6)
    with pytest.raises(TypeError, match='explains torch models'):
        explain_func(lambda inputs: inputs, x, y)
    with pytest.raises(ValueError, match="channels must be 'keep' or 'sum'"):
        explain_func(model, x, y, channels='mean')


def test_quantus_region_perturbation_equals_our_deletion_curve():
    '''quantus.RegionPerturbation (MoRF, baseline 0, logits) records f(x) − f(x with the k most relevant patches at 0):
    our patch-granularity deletion curve, curve[0] − curve[k], on the shipped Fashion-MNIST ViT with AttnLRP.'''
    # a plain import: Quantus is part of the test extra, a missing one must fail here rather than skip
    import quantus
    from zennit_attn.models import load_fashion_mnist_samples, load_fashion_mnist_vit
    model = load_fashion_mnist_vit()
    inputs, labels, _ = load_fashion_mnist_samples()
    inputs, labels = inputs[:3], labels[:3]
    metric = quantus.RegionPerturbation(
        patch_size=7, order='morf', regions_evaluation=16, perturb_baseline=0.0, normalise=False, abs=False,
        disable_warnings=True,
    )
    scores = np.array(metric(
        model=model, x_batch=inputs.numpy(), y_batch=labels.numpy(), explain_func=explain_func,
        explain_func_kwargs={'method': 'attnlrp_vit'}, softmax=False, channel_first=True,
    ))
    relevance = attribute(model, inputs, labels, 'attnlrp_vit')
    patch_sums = relevance.sum(1).reshape(3, 4, 7, 4, 7).sum((2, 4)).flatten(1)
    assert (patch_sums.sort(1).values.diff(1) > 1e-4).all()  # no ties: both rankings are the same
    curves, _ = perturbation_curves(model, inputs, labels, relevance, 'morf', steps=16, granularity='patch',
                                    patch_size=7, baseline_value=0.)
    ours = (curves[:, :1] - curves[:, 1:]).numpy()
    assert scores.shape == (3, 16)
    np.testing.assert_allclose(scores, ours, atol=1e-4 * np.abs(ours).max())
    assert np.abs(ours).max() > 1  # the curves are not flat: the comparison means something
