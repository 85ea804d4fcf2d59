'''Our attribution methods as a Quantus ``explain_func`` (Quantus 0.6, ``pip install quantus==0.6.0``).

Quantus metrics call ``explain_func(model=model, inputs=x_batch, targets=y_batch, **explain_func_kwargs)`` with numpy
batches and expect a numpy attribution; :py:func:`explain_func` is such a function for every method of
:py:func:`zennit_attn.methods.attribute` (the composites ``attnlrp_vit``, ``attnlrp``, ... and the baselines)::

    import quantus
    from zennit_attn.integrations.quantus import explain_func

    metric = quantus.RegionPerturbation(patch_size=7, regions_evaluation=16, perturb_baseline=0.0, normalise=False)
    scores = metric(model=model, x_batch=x, y_batch=y, explain_func=explain_func,
                    explain_func_kwargs={'method': 'attnlrp_vit'}, softmax=False, channel_first=True)

Agreement with our metric: ``RegionPerturbation`` with ``order='morf'``, ``perturb_baseline=0.0`` and ``softmax=False``
records ``f(x) − f(x with the k most relevant p × p patches set to 0)`` for ``k = 1 ... regions_evaluation``; that is
``curve[0] − curve[k]`` of our deletion curve :py:func:`zennit_attn.evaluation.perturbation_curves` with
``order='morf'``, ``granularity='patch'``, ``patch_size=p``, ``steps`` = the number of patches and ``baseline_value=0``
(tests/test_quantus.py checks it on the shipped Fashion-MNIST ViT). Both rank patches by their summed relevance; ties
are broken differently (Quantus: numpy's argsort; ours: a seeded permutation), so compare on maps without ties.
Quantus imports every metric's dependencies at once (scipy, scikit-image, scikit-learn, pandas, opencv-python).
'''
import numpy as np
import torch

from ..methods import attribute


__all__ = ['explain_func']


def explain_func(model, inputs, targets, method='attnlrp_vit', device=None, channels='keep', **options):
    '''Attribute ``targets`` at ``inputs`` with one of our methods, Quantus style.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        The model (Quantus passes the torch module; a Quantus ``ModelInterface`` is unwrapped with ``get_model``).
    inputs: :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        ``(N, ...)`` inputs, channel first for images.
    targets: int, sequence, :py:obj:`numpy.ndarray` or :py:obj:`torch.Tensor`
        The explained class per sample.
    method: str or :py:obj:`zennit.core.Composite`
        A name of :py:func:`zennit_attn.methods.available_methods` or a composite instance.
    device: str or :py:obj:`torch.device`, optional
        Where to compute (Quantus passes its ``device``); default: the device of the model's parameters.
    channels: str
        ``'keep'``: the attribution has the shape of ``inputs``; ``'sum'``: images ``(N, C, H, W)`` give the channel
        sum ``(N, 1, H, W)`` (Quantus broadcasts it back where a metric needs the input shape).
    **options:
        Options of the method (e.g. ``n_iter`` of ``integrated_gradients``).

    Returns
    -------
    :py:obj:`numpy.ndarray`
        float32 attribution, detached, on the CPU.
    '''
    if channels not in ('keep', 'sum'):
        raise ValueError(f"channels must be 'keep' or 'sum', got {channels!r}")
    if not isinstance(model, torch.nn.Module) and callable(getattr(model, 'get_model', None)):
        model = model.get_model()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f'explain_func explains torch models (torch.nn.Module), got {type(model).__name__}')
    parameter = next(model.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else torch.device('cpu')
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    inputs = torch.as_tensor(np.asarray(inputs.detach().cpu() if torch.is_tensor(inputs) else inputs))
    inputs = inputs.to(device=device, dtype=dtype)
    targets = torch.as_tensor(np.asarray(targets.cpu() if torch.is_tensor(targets) else targets), dtype=torch.long)
    relevance = attribute(model, inputs, targets.reshape(-1) if targets.ndim else targets, method, **options)
    relevance = relevance.detach().to(torch.float32).cpu().numpy()
    if channels == 'sum' and relevance.ndim == 4:
        relevance = relevance.sum(1, keepdims=True)
    return relevance
