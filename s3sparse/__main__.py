"""``python -m s3sparse prune|eval|pack ...``: the s3sparse command line (see :mod:`s3sparse.llm.cli`)."""

from __future__ import annotations

from .llm.cli import console_main

if __name__ == "__main__":
    console_main()
