'''Groups of canonizers that together canonize one model family.'''
from zennit.canonizers import Canonizer


class CanonizerGroup(Canonizer):
    '''Apply several canonizers as one, for one model family (like :py:class:`zennit.canonizers.CompositeCanonizer`,
    but a failure midway restores what was already applied, and the family can be detected in a model).

    Parameters
    ----------
    canonizers: list[:py:obj:`zennit.canonizers.Canonizer`]
        The canonizers to apply, in order.
    '''
    #: module types whose presence in a model means this family applies (used by auto-detection)
    model_type = ()

    def __init__(self, canonizers):
        super().__init__()
        self.canonizers = canonizers

    @classmethod
    def detect(cls, root_module):
        '''Whether ``root_module`` contains a model of this family.'''
        return any(isinstance(module, cls.model_type) for module in root_module.modules())

    def check(self, root_module):
        '''Raise a clear error if the model is a variant of the family that is not supported.'''

    def apply(self, root_module):
        '''Apply all canonizers; on failure remove the instances already applied and re-raise.'''
        self.check(root_module)
        instances = []
        try:
            for canonizer in self.canonizers:
                instances += canonizer.apply(root_module)
        except BaseException:
            for instance in reversed(instances):
                instance.remove()
            raise
        return instances

    def register(self):
        '''Nothing to do: the applied instances are registered individually.'''

    def remove(self):
        '''Nothing to do: the applied instances are removed individually.'''

    def copy(self):
        return self.__class__(self.canonizers)
