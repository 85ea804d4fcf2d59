'''The documentation stays true: every public module is in the API reference, every ``zennit_attn.*`` name the README
and the docs mention exists, and the how-tos' ``python`` code blocks run as written (blocks marked ``py`` need weights
that are not shipped and are not run). ``make docs`` builds the site itself (warnings are errors).
'''
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import zennit_attn.integrations


pytestmark = pytest.mark.usefixtures('single_thread')

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
#: modules that are not part of the API: the command line and its helpers, the data loaders of the examples
INTERNAL = {'zennit_attn.cli', 'zennit_attn.__main__', 'zennit_attn.tasks', 'zennit_attn.data'}


def public_modules():
    '''Every module of the package and of its integrations (the rules subpackage as one module: its ``__init__``
    re-exports the rules of its submodules).'''
    return {f'zennit_attn.{info.name}' for info in pkgutil.iter_modules(zennit_attn.__path__)} | {
        f'zennit_attn.integrations.{info.name}' for info in pkgutil.iter_modules(zennit_attn.integrations.__path__)}


def documented_modules():
    '''Modules named in the API reference: autosummary entries of api.rst and automodule directives of any page.'''
    names = set()
    for page in DOCS.glob('*.rst'):
        text = page.read_text()
        names |= set(re.findall(r'^\s+(zennit_attn(?:\.\w+)+)\s*$', text, re.MULTILINE))
        names |= set(re.findall(r'^\.\. automodule:: (\S+)', text, re.MULTILINE))
    return names


def test_every_public_module_is_in_the_api_reference():
    missing = public_modules() - INTERNAL - documented_modules()
    assert not missing, f'add to docs/api.rst (or to INTERNAL here, if not part of the API): {sorted(missing)}'
    # and nothing documented that does not exist (a renamed module)
    assert documented_modules() <= public_modules()


def resolve(dotted):
    '''The object a dotted name ``zennit_attn.a.b`` names: the longest importable module prefix, then attributes.'''
    parts = dotted.split('.')
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


PAGES = [ROOT / 'README.md', *sorted(DOCS.glob('*.md')), *sorted((DOCS / 'howto').glob('*.md')),
         *sorted(DOCS.glob('*.rst'))]


@pytest.mark.parametrize('page', PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_mentioned_names_exist(page):
    '''Every ``zennit_attn.x.y`` in a page exists (file paths such as ``zennit_attn/families.py`` are not names).'''
    names = set(re.findall(r'(?<![\w/])zennit_attn(?:\.\w+)+', page.read_text()))
    assert names, 'no name found: the pattern is broken'
    missing = []
    for name in sorted(names):
        if name.endswith('.py'):
            continue
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert not missing, f'{page.name} mentions names that do not exist: {missing}'


def code_blocks(page):
    return re.findall(r'^```python\n(.*?)^```', page.read_text(), re.MULTILINE | re.DOTALL)


RUNNABLE = ['explain-vit.md', 'evaluate-faithfulness.md', 'conservation-report.md', 'explain-llm.md']


@pytest.mark.parametrize('name', RUNNABLE)
def test_howto_code_runs(name, tmp_path, monkeypatch):
    '''The ``python`` blocks of a how-to, in order, in one namespace (files go to a temporary directory).'''
    if name == 'explain-llm.md':
        pytest.importorskip('transformers')
    blocks = code_blocks(DOCS / 'howto' / name)
    assert blocks, f'{name} has no python blocks'
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f'{name}, python block {number + 1}', 'exec'), namespace)  # noqa: S102 (our own docs)


def test_every_page_is_in_the_site():
    '''Every page (how-tos, the Markdown guides in docs/, the gallery, the API) is in the index's tables of contents.'''
    index = (DOCS / 'index.rst').read_text()
    pages = [f'howto/{page.stem}' for page in (DOCS / 'howto').glob('*.md')]
    pages += [page.stem for page in DOCS.glob('*.md')] + ['gallery', 'api']
    for page in pages:
        assert re.search(rf'^\s+{page}\s*$', index, re.MULTILINE), f'{page} is not in a toctree of docs/index.rst'
