'''Integrations with other attribution libraries.

:py:mod:`zennit_attn.integrations.inseq` registers the AttnLRP and CP-LRP composites as Inseq attribution methods
(``inseq.load_model(model, 'attnlrp')``). Importing Inseq costs seconds (it imports transformers' model code, Captum
and treescope), so ``import zennit_attn`` does not import it: the methods are registered the moment Inseq is imported
(at once if it already is), by a finder on :py:data:`sys.meta_path` that runs the registration after Inseq's own
``__init__`` (the usual post-import hook; it is removed after the registration).
'''
import importlib.abc
import importlib.util
import sys
import warnings


__all__ = ['register_inseq']


def register_inseq():
    '''Register the methods ``'attnlrp'`` and ``'cp_lrp'`` in Inseq (imports Inseq; normally automatic, see the
    module docstring). Returns the module :py:mod:`zennit_attn.integrations.inseq`.'''
    from . import inseq
    return inseq


def _register_or_warn():
    try:
        register_inseq()
    except Exception as error:  # Inseq itself must stay importable whatever goes wrong here
        warnings.warn(
            f'zennit_attn: the AttnLRP methods could not be registered in Inseq ({type(error).__name__}: {error}); '
            'inseq.load_model(model, "attnlrp") will not find them. zennit_attn supports inseq 0.7.',
            RuntimeWarning, stacklevel=2,
        )


class _Loader(importlib.abc.Loader):
    '''Inseq's own loader, registering the methods after its ``exec_module``.'''
    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _register_or_warn()

    def __getattr__(self, name):
        # get_code, get_source, is_package, get_resource_reader, ...: the original loader's
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    '''Finds nothing itself: wraps the loader of the spec that the other finders return for ``inseq``.'''
    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'inseq' or self._searching:
            return None
        self._searching = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, self)
        return spec


def _install():
    if sys.modules.get('inseq') is not None:
        _register_or_warn()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


_install()
