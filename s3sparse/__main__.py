"""``python -m s3sparse prune|eval ...``: the s3sparse command line (see :mod:`s3sparse.llm.cli`)."""

from __future__ import annotations

import sys

from .llm.cli import main

if __name__ == "__main__":
    sys.exit(main())
