'''Docstrings in Zennit's style for numpydoc: parameter lines ``name: type`` become numpydoc's ``name : type``.

The package writes its numpydoc sections as Zennit does (``model: :py:obj:`torch.nn.Module```, no space before the
colon); numpydoc splits a parameter line on ``' : '`` only and would show the whole line as the name. This handler
runs on every docstring before numpydoc's (a lower priority runs first) and rewrites, inside the field sections only,
the lines at the section's indentation that are a name (or several, ``a, b``, with ``*``/``**``) followed by a colon.
'''
import re

#: numpydoc sections whose entries are ``name : type`` lines
FIELD_SECTIONS = {'Parameters', 'Other Parameters', 'Returns', 'Yields', 'Receives', 'Attributes', 'Raises', 'Warns'}
FIELD = re.compile(r'^(?P<name>\*{0,2}[A-Za-z_]\w*(?:\s*,\s*\*{0,2}[A-Za-z_]\w*)*)\s*:(?:\s+(?P<type>\S.*))?$')


def _indent(line):
    return len(line) - len(line.lstrip())


def numpydoc_fields(app, what, name, obj, options, lines):
    '''``autodoc-process-docstring`` handler: rewrite ``name: type`` field lines in place.'''
    section = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        underline = lines[index + 1].strip() if index + 1 < len(lines) else ''
        if underline and set(underline) == {'-'} and stripped:
            # a section header: the fields follow at the header's indentation
            section = (stripped, _indent(line)) if stripped in FIELD_SECTIONS else None
            continue
        if section is None or not stripped or set(stripped) == {'-'} or _indent(line) != section[1]:
            continue
        match = FIELD.match(stripped)
        if match and ' : ' not in stripped:
            field = match['name'] + (f' : {match["type"]}' if match['type'] else '')
            lines[index] = ' ' * section[1] + field


def setup(app):
    app.setup_extension('sphinx.ext.autodoc')
    app.connect('autodoc-process-docstring', numpydoc_fields, priority=100)
    return {'version': '1.0', 'parallel_read_safe': True, 'parallel_write_safe': True}
