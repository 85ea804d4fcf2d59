'''``python -m zennit_attn``: the command line interface.'''
import sys

from .cli import main

sys.exit(main())
