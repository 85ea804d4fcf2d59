'''Conservation report: where along the backward pass relevance is absorbed.

LRP rules are not all conservative by design (ATTNLRP.md §1-2): biases, constant operands of sums (position
embeddings, masks), the LayerNorm bias and the softmax (Prop. 3.1) absorb relevance, and the ε-stabilizers absorb a
little. :py:func:`conservation_report` runs one attribution and records, for every module with an AttnLRP rule and every
operation the engine attributes (named by its site, ``'<module>.<op>'``), how much relevance arrives at its output and
how much it passes to its inputs. Because every unhooked operation between rules
only re-arranges relevance (see :py:mod:`zennit_attn.check`), the books balance::

    seed = sum(absorbed by rules) + relevance at the input + relevance at parameters (via unhooked ops)

The remainder (``unaccounted``) is 0 up to rounding; a non-zero remainder means an unhooked operation that creates or
destroys relevance (run :py:func:`zennit_attn.check.check`) or a non-AttnLRP Zennit rule that absorbs relevance (only
rules derived from :py:class:`zennit_attn.rules.AttnHook` are itemised).
'''
from dataclasses import dataclass, field

import torch

from .check import _table, hooked_modules
from .engine import op_listeners
from .rules import AttnHook, Gamma


__all__ = ['conservation_report', 'ConservationReport', 'ModuleRelevance']


def _total(tensor):
    '''Sum of ``tensor`` in float64 as a Python float (0 for None).'''
    return 0. if tensor is None else tensor.sum(dtype=torch.float64).item()


def _rule_name(hook):
    '''Short description of a rule, e.g. ``'Epsilon'`` or ``'Gamma(0.05)'``.'''
    if isinstance(hook, Gamma):
        return f'Gamma({hook.gamma:g})'
    return type(hook).__name__


@dataclass
class ModuleRelevance:
    '''Relevance balance of one hooked module, summed over its calls and the batch.

    Attributes
    ----------
    name: str
        Qualified module name.
    rule: str
        The rule.
    calls: int
        Number of backward calls of the rule.
    relevance_in: float
        Relevance arriving at the module's output (what the rule receives).
    relevance_out: float
        Relevance the rule passes to the module's inputs (constants and parameters receive none).
    '''
    name: str
    rule: str
    calls: int = 0
    relevance_in: float = 0.
    relevance_out: float = 0.

    @property
    def absorbed(self):
        '''Relevance absorbed by the module: ``relevance_in - relevance_out``.'''
        return self.relevance_in - self.relevance_out


@dataclass
class ConservationReport:
    '''Result of :py:func:`conservation_report` (all sums over the batch, in float64).

    Attributes
    ----------
    seed: float
        Sum of the initial relevance ``target_fn(output)`` (the target logit for ``y * onehot``).
    modules: list[:py:class:`ModuleRelevance`]
        One row per hooked module that received a backward call, in backward order (from the output to the input).
    input_relevance: float
        Sum of the relevance at the input.
    parameter_relevance: float
        Relevance that reached parameters through unhooked operations (e.g. torchvision's class token through
        ``cat``); it leaves the input path like an absorbed share.
    relevance: :py:obj:`torch.Tensor`
        The input relevance (the attribution).
    output: :py:obj:`torch.Tensor`
        The model output.
    '''
    seed: float
    modules: list = field(default_factory=list)
    input_relevance: float = 0.
    parameter_relevance: float = 0.
    relevance: torch.Tensor = None
    output: torch.Tensor = None

    @property
    def absorbed(self):
        '''Total relevance absorbed by the rules.'''
        return sum(row.absorbed for row in self.modules)

    @property
    def unaccounted(self):
        '''``seed - absorbed - input_relevance - parameter_relevance``: 0 up to rounding if every unhooked op only
        re-arranges relevance.
        '''
        return self.seed - self.absorbed - self.input_relevance - self.parameter_relevance

    def format(self, sort='order', limit=None, scale=None):
        '''Format the report as a text table.

        Parameters
        ----------
        sort: str, optional
            ``'order'`` (backward order, from the logit to the input) or ``'absorbed'`` (largest absolute absorption
            first).
        limit: int, optional
            Show only the first ``limit`` module rows.
        scale: float, optional
            Reference for the percentage column; defaults to the seed.

        Returns
        -------
        str
            The table.
        '''
        if sort not in ('order', 'absorbed'):
            raise ValueError(f"sort must be 'order' or 'absorbed', got {sort!r}")
        scale = self.seed if scale is None else scale
        rows = list(self.modules)
        if sort == 'absorbed':
            rows.sort(key=lambda row: -abs(row.absorbed))

        def percent(value):
            return f'{100 * value / scale:+.2f}%' if scale else ''

        def number(value):
            return f'{value:+.6e}'

        lines = [['seed (target_fn(output).sum())', '', '', number(self.seed), '', '', percent(self.seed)]]
        for row in rows[:limit]:
            lines.append([
                row.name or '<model>', row.rule, str(row.calls), number(row.relevance_in), number(row.relevance_out),
                number(row.absorbed), percent(row.absorbed),
            ])
        if limit is not None and len(rows) > limit:
            rest = sum(row.absorbed for row in rows[limit:])
            lines.append([f'... {len(rows) - limit} more modules', '', '', '', '', number(rest), percent(rest)])
        totals = [
            ('total absorbed by rules', self.absorbed), ('relevance at the input', self.input_relevance),
            ('relevance at parameters (unhooked ops)', self.parameter_relevance), ('unaccounted', self.unaccounted),
        ]
        lines += [[label, '', '', '', '', number(value), percent(value)] for label, value in totals]
        return _table(lines, ['module', 'rule', 'calls', 'R in', 'R out', 'absorbed', 'of seed'])

    def __str__(self):
        return self.format()


class _Recorder:
    '''Temporarily wraps ``backward_relevance`` of every AttnLRP rule of a model (as an instance attribute) to record
    the relevance sums of each call.
    '''
    def __init__(self, model):
        self.rows = {}
        self.hooks = []
        self.names = {}
        for name, module, hook in hooked_modules(model):
            self.names[id(module)] = (name, _rule_name(hook))
            if isinstance(hook, AttnHook) and 'backward_relevance' not in vars(hook):
                hook.backward_relevance = self._wrap(hook.backward_relevance)
                self.hooks.append(hook)

    def _wrap(self, original):
        def backward_relevance(module, inputs, output, relevance_out, variable):
            relevances = original(module, inputs, output, relevance_out, variable)
            name, rule = self.names.get(id(module), (type(module).__name__, '?'))
            row = self.rows.setdefault(id(module), ModuleRelevance(name, rule))
            row.calls += 1
            row.relevance_in += _total(relevance_out)
            row.relevance_out += sum(_total(relevance) for relevance in relevances)
            return relevances
        return backward_relevance

    def operation(self, site, output):
        '''Record the balance of an operation attributed by the engine (an ``op_listeners`` callback).'''
        node = output.grad_fn
        if node is None:
            return
        rule = _rule_name(getattr(node, 'hook', None))

        def hook(relevances, relevance_out):
            row = self.rows.setdefault(site, ModuleRelevance(site, rule))
            row.calls += 1
            row.relevance_in += sum(_total(relevance) for relevance in relevance_out)
            row.relevance_out += sum(_total(relevance) for relevance in relevances)
        node.register_hook(hook)

    def remove(self):
        '''Restore the rules' own ``backward_relevance``.'''
        for hook in self.hooks:
            vars(hook).pop('backward_relevance', None)
        self.hooks = []


def conservation_report(model, composite, input, target_fn):
    '''Run one attribution and report, per hooked module, how much relevance arrives at its output, how much it passes
    on and how much it absorbs.

    Parameters
    ----------
    model: :py:obj:`torch.nn.Module`
        A model with a single tensor input and a tensor output (wrap Hugging Face models, e.g. taking
        ``inputs_embeds``). Use float64 for exact books.
    composite: :py:obj:`zennit.core.Composite`
        The composite (its AttnLRP rules are itemised).
    input: :py:obj:`torch.Tensor`
        The input; a leaf copy that requires a gradient is attributed.
    target_fn: callable
        ``output -> initial relevance`` as Zennit's ``attr_output``, e.g. ``lambda y: y * onehot``.

    Returns
    -------
    :py:class:`ConservationReport`
        The balance; ``print(report)`` shows the table.
    '''
    input = input.detach().requires_grad_(True)
    with composite.context(model) as modified:
        recorder = _Recorder(modified)
        token = op_listeners.set(op_listeners.get() + (recorder.operation,))
        try:
            with torch.enable_grad():
                output = modified(input)
                if not isinstance(output, torch.Tensor):
                    raise TypeError(
                        f'conservation_report: the model returned {type(output).__name__}; wrap it so that it returns '
                        'the logits tensor.'
                    )
                seed = target_fn(output)
                parameters = [param for param in modified.parameters() if param.requires_grad]
                grads = torch.autograd.grad(output, [input] + parameters, seed, allow_unused=True)
        finally:
            op_listeners.reset(token)
            recorder.remove()
    relevance = grads[0] if grads[0] is not None else torch.zeros_like(input)
    return ConservationReport(
        seed=_total(seed),
        modules=list(recorder.rows.values()),
        input_relevance=_total(relevance),
        parameter_relevance=sum(_total(grad) for grad in grads[1:]),
        relevance=relevance.detach(),
        output=output.detach(),
    )
