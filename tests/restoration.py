'''Shared test helpers: what removing a canonizer / composite must restore, and the relative error of a result.'''
import torch


def relative_difference(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def snapshot(model):
    '''Everything removal must restore: modules, forwards, parameter objects (duplicates included, so tied weights stay
    tied), state_dict values, hooks, and for every module with a ``config`` its attention implementation and vars.
    '''
    return {
        'modules': [(name, module) for name, module in model.named_modules()],
        'forwards': [(name, 'forward' in vars(module)) for name, module in model.named_modules()],
        'parameters': [(name, param) for name, param in model.named_parameters(remove_duplicate=False)],
        'state': {key: value.clone() for key, value in model.state_dict().items()},
        'hooks': sum(
            len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)
            for module in model.modules()
        ),
        'configs': [
            (module.config._attn_implementation, dict(vars(module.config)))
            for module in model.modules() if hasattr(module, 'config')
        ],
    }


def assert_restored(model, before):
    after = snapshot(model)
    assert [name for name, _ in after['modules']] == [name for name, _ in before['modules']]
    assert all(a is b for (_, a), (_, b) in zip(after['modules'], before['modules']))
    assert after['forwards'] == before['forwards']
    assert [name for name, _ in after['parameters']] == [name for name, _ in before['parameters']]
    assert all(a is b for (_, a), (_, b) in zip(after['parameters'], before['parameters']))
    assert after['state'].keys() == before['state'].keys()
    assert all(torch.equal(after['state'][key], before['state'][key]) for key in before['state'])
    assert after['hooks'] == before['hooks']
    assert after['configs'] == before['configs']
