'''``.. gallery:: DIRECTORY``: every PNG in ``DIRECTORY`` (relative to the page), as figures with captions.

The directive's content maps glob patterns to captions (``pattern: caption``, reStructuredText inline markup allowed),
the first matching pattern wins and the images are shown in the order of the patterns (then by name); images that
no pattern matches come last, with their file name as caption. New figures dropped into the directory appear without
editing the page, and the page is rebuilt when the directory changes.
'''
import fnmatch
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


class GalleryDirective(SphinxDirective):
    required_arguments = 1
    has_content = True
    option_spec = {'width': directives.unchanged, 'exclude': directives.unchanged}

    def captions(self):
        '''(pattern, caption) pairs of the directive's content.'''
        pairs = []
        for line in self.content:
            if line.strip():
                pattern, separator, caption = line.partition(':')
                if not separator:
                    raise self.error(f'gallery: expected "pattern: caption", got {line!r}')
                pairs.append((pattern.strip(), caption.strip()))
        return pairs

    def run(self):
        page_dir = Path(self.env.doc2path(self.env.docname)).parent
        folder = (page_dir / self.arguments[0]).resolve()
        if not folder.is_dir():
            raise self.error(f'gallery: no directory {folder}')
        # the page depends on the folder (a new image changes its mtime) and on every image in it
        self.env.note_dependency(str(folder))
        excluded = self.options.get('exclude', '').split()
        captions = self.captions()

        def matching(path):
            '''(index of the first pattern that matches, its caption); unmatched images last, without caption.'''
            return next(((index, text) for index, (pattern, text) in enumerate(captions)
                         if fnmatch.fnmatch(path.name, pattern)), (len(captions), ''))

        # in the order of the patterns, then by name
        images = sorted((path for path in folder.glob('*.png')
                         if not any(fnmatch.fnmatch(path.name, pattern) for pattern in excluded)),
                        key=lambda path: (matching(path)[0], path.name))
        lines = []
        for path in images:
            self.env.note_dependency(str(path))
            caption = matching(path)[1]
            lines += [
                f'.. figure:: {self.arguments[0]}/{path.name}',
                f'   :width: {self.options.get("width", "100%")}',
                f'   :alt: {path.stem}',
                '',
                f'   ``{path.name}``' + (f': {caption}' if caption else ''),
                '',
            ]
        if not images:
            lines = [f'(no figures in ``{self.arguments[0]}`` yet)', '']
        section = nodes.container(classes=['zennit-attn-gallery'])
        self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, section)
        return [section]


def setup(app):
    app.add_directive('gallery', GalleryDirective)
    return {'version': '1.0', 'parallel_read_safe': True, 'parallel_write_safe': True}
