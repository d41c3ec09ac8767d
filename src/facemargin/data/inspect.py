"""``python -m facemargin.data.inspect DIR [--decode N]``: the set checker's command (:mod:`facemargin.data.tools.inspect`)."""

import sys

from .tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
