"""Errors of the model pipeline.

:class:`UsageError` is a bad argument the user can fix (an unknown pattern or
method, a layer shape the pattern cannot divide, a missing calibration file, an
existing output directory...). It is an :class:`s3sparse.S3Error` (an
:class:`~s3sparse.errors.ArgumentError`, so also a ``ValueError``): one
``except s3sparse.S3Error`` catches the pipeline's argument errors and the
pruners' alike. The CLI prints its message on one line and exits with status 2.
It is defined in :mod:`s3sparse.errors` (the pattern names raise it too) and
re-exported here. :class:`DirectoryError`, a directory that cannot be used as
asked, is one.
"""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["UsageError", "DirectoryError"]


class DirectoryError(UsageError):
    """A directory argument that cannot be used as asked: an ``OUT_DIR`` that exists and that
    s3sparse did not write, a packed model directory given where a Hugging Face one is needed...

    A :class:`UsageError` (the CLI prints it on one line, exit status 2) and an
    :class:`s3sparse.S3Error`; the message names the argument and what to do.
    """
