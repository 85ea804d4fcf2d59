'''Base class of the canonizers that unfold a module's forward into hookable operations.'''
from zennit.canonizers import Canonizer


class ForwardCanonizer(Canonizer):
    '''Temporarily replace the forward of every matching module by a canonical forward built from hookable op modules.

    While registered, the op modules are children of the canonized module (named ``attnlrp_<name>``), so composites
    find and hook them, and the canonical forward is an instance attribute that shadows the class's ``forward``.
    Removal deletes both; parameters, buffers and the ``state_dict`` are never touched, so the model is bit-identical
    afterwards. One canonizer instance handles one module, as Zennit's canonizers do.

    Subclasses set ``module_type``, implement :py:meth:`make_ops` and :py:meth:`canonical_forward`, and may mark
    modules with a role (e.g. ``'attention_projection'``) in :py:meth:`make_roles`, which composites use to pick rules.
    '''
    module_type = ()
    prefix = 'attnlrp_'

    def __init__(self):
        super().__init__()
        self.module = None
        self.ops = {}
        self.roles = {}

    def matches(self, module):
        '''Whether this canonizer handles ``module``.'''
        return isinstance(module, self.module_type)

    def apply(self, root_module):
        '''Register a copy of this canonizer on every matching module below (and including) ``root_module``.

        If registration fails midway, the already canonized modules are restored before the error propagates.

        Returns
        -------
        list[:py:obj:`ForwardCanonizer`]
            The registered instances, to be removed with ``remove()``.
        '''
        instances = []
        try:
            for module in list(root_module.modules()):
                if self.matches(module):
                    instance = self.copy()
                    instance.register(module)
                    instances.append(instance)
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
        return instances

    def register(self, module):
        '''Insert the op modules into ``module`` and shadow its forward with :py:meth:`canonical_forward`.'''
        name = type(module).__name__
        if 'forward' in vars(module):
            raise RuntimeError(
                f'{type(self).__name__}: {name} already has an instance-level forward (is it canonized twice, or '
                'wrapped by another tool?); remove the other canonizer first.'
            )
        self.check(module)
        ops = self.make_ops(module)
        clashes = [self.prefix + key for key in ops if self.prefix + key in module._modules]
        if clashes:
            raise RuntimeError(f'{type(self).__name__}: {name} already has children named {clashes}.')
        self.module = module
        self.ops = ops
        try:
            for key, op in ops.items():
                module.add_module(self.prefix + key, op)
            self.roles = self.make_roles(module)
            module.forward = self.canonical_forward
        except BaseException:
            # this instance is not yet in the caller's list, so undo its partial changes here
            self.remove()
            raise

    def remove(self):
        '''Restore the module: delete the instance forward and the inserted op modules.'''
        if self.module is None:
            return
        vars(self.module).pop('forward', None)
        for key in self.ops:
            self.module._modules.pop(self.prefix + key, None)
        self.module = None
        self.ops = {}
        self.roles = {}

    def copy(self):
        '''Return a fresh, unregistered canonizer of the same class and parameters.'''
        return self.__class__()

    def check(self, module):
        '''Raise a clear error if ``module`` is configured in a way this canonizer does not support.'''

    def make_ops(self, module):
        '''Return a dict of op modules (one instance per call site) for ``module``.'''
        raise NotImplementedError

    def make_roles(self, module):
        '''Return a dict ``{module: role}`` for modules whose rule depends on their role.'''
        return {}

    def canonical_forward(self, *args, **kwargs):
        '''The forward of ``self.module`` written with the op modules in ``self.ops``.'''
        raise NotImplementedError

    @property
    def handled(self):
        '''Modules whose computation this instance unfolded (for the unsupported-module check of composites).'''
        return () if self.module is None else (self.module,)
