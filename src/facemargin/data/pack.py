"""``python -m facemargin.data.pack IMAGE_ROOT OUT_DIR ...``: the packer's command (:mod:`facemargin.data.tools.pack`)."""

import sys

from .tools.pack import main

if __name__ == "__main__":
    sys.exit(main())
