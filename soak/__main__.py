"""``python -m soak``: see :mod:`soak.runner`."""

from __future__ import annotations

import sys

from soak.runner import main

if __name__ == "__main__":
    sys.exit(main())
