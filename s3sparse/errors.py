"""The exceptions of s3sparse.

Every error s3sparse raises about a bad argument is an :class:`S3Error`, so a
caller can catch them all at once, and also the built-in kind it would be
without s3sparse, so code that catches those keeps working:

* :class:`ArgumentError` (a :class:`ValueError`): a bad value — a count out of
  range, a Hessian that is not symmetric, an empty weight. Its subclasses
  :class:`SpecError`, :class:`ShapeMismatchError` and :class:`CouplingError`
  are about specifications, :class:`NonFiniteError` about a weight or inputs
  holding NaN or Inf.
* :class:`ArgumentTypeError` (a :class:`TypeError`): an argument of the wrong
  type or dtype — ``nnz=2.5``, an integer weight, a Hessian that is a list.
* :class:`ArgumentIndexError` (an :class:`IndexError`): an index outside a view.
* :class:`UnknownNameError` (a :class:`KeyError`): a name nobody registered.
* :class:`UsageError` (an :class:`ArgumentError`): a bad argument of the
  command line or the model pipeline (an unknown pattern name, a malformed
  option); its message is always one line, which the CLI prints as is.

Two errors are not about an argument. :class:`ExtensionBuildError` (an
:class:`ImportError`) is raised by ``import s3sparse`` when the compiled
extension was built against another torch than the one imported (or is
missing); its one-line message says how to rebuild. :class:`NumericalError` (a
:class:`FloatingPointError`) says a pruner could not finish on arguments it
accepted — a damped Hessian still not positive definite, non-finite results.
The weight is left unchanged; the model pipeline prunes such a layer by
magnitude instead (and reports it), while it stops on every other error.

Messages name the argument, what was expected, what was got, and what to do.
The checks themselves live in :mod:`s3sparse.checks`, shared by every entry
point, so an argument is accepted or refused alike everywhere.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "S3Error",
    "SparseKitError",
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentIndexError",
    "SpecError",
    "ShapeMismatchError",
    "CouplingError",
    "UnknownNameError",
    "UsageError",
    "NonFiniteError",
    "NumericalError",
    "ExtensionBuildError",
]


class S3Error(Exception):
    """Base class of every error raised by s3sparse."""


#: The reference implementation's name of the base class, for scripts written for it.
SparseKitError = S3Error


class ArgumentError(S3Error, ValueError):
    """An argument with a bad value (out of range, wrong shape, not symmetric, empty...)."""


class ArgumentTypeError(S3Error, TypeError):
    """An argument of the wrong type or dtype (a float count, an integer weight...)."""


class ArgumentIndexError(S3Error, IndexError):
    """An index argument outside the range it indexes."""


class SpecError(ArgumentError):
    """An invalid specification argument (a view, a block or scope shape, a count...)."""


def _format_shape(shape: Any) -> str:
    if hasattr(shape, "__len__") and not isinstance(shape, str):
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            return str(shape)
        return str(dims)
    return str(shape)


class ShapeMismatchError(ArgumentError):
    """A tensor argument does not have the shape it must have.

    Args:
        expected: the shape wanted (a tuple, or a description such as
            ``"(4, 8) or (2, 16)"``).
        got: the shape received.
        context: the argument's name (and optionally where), e.g. ``"values"``.
    """

    def __init__(self, expected: Any, got: Any, context: str = "") -> None:
        self.expected = expected
        self.got = got
        self.context = context
        message = f"expected shape {_format_shape(expected)}, got {_format_shape(got)}"
        super().__init__(f"`{context}`: {message}" if context else f"shape mismatch: {message}")


class CouplingError(ArgumentError):
    """Blocks or scopes that cannot be coupled (their grids disagree, or they repeat)."""


class UnknownNameError(S3Error, KeyError):
    """A name that a :class:`~s3sparse.builder.SparsityBuilder` does not know."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0]) if self.args else ""


class UsageError(ArgumentError):
    """A bad argument; the message is one line saying what was wrong and what would work.

    Raised by the pattern names of :mod:`s3sparse.patterns` and by the model
    pipeline (:mod:`s3sparse.llm`), whose CLI prints it on one line and exits
    with status 2.
    """

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))


class NonFiniteError(ArgumentError):
    """A tensor argument (a weight, calibration inputs) holds NaN or Inf.

    Attributes:
        name: how the message calls the tensor (e.g. ``"the weight behind `scope`"``).
        index: the first non-finite element's index, a tuple (row-major order).
        value: that element (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, message: str, name: str = "", index: tuple = (), value: float = float("nan")) -> None:
        super().__init__(message)
        self.name = name
        self.index = tuple(index)
        self.value = value

    def __reduce__(self):  # picklable (sent between ranks), with its attributes
        return (type(self), (self.args[0] if self.args else "", self.name, self.index, self.value))


class NumericalError(S3Error, FloatingPointError):
    """A pruner could not finish numerically on arguments it accepted.

    Raised when a damped Hessian stays not positive definite even with heavy
    damping, or when the pruned weights come out non-finite. Not a bad
    argument: the weight is left unchanged, and the model pipeline falls back
    to magnitude pruning for that layer (and reports it). Also a
    :class:`FloatingPointError`, what these failures raised before.
    """


class ExtensionBuildError(S3Error, ImportError):
    """The compiled extension ``s3sparse._C`` does not fit the imported torch, or is missing.

    Raised by ``import s3sparse``; the message is one line naming the torch the
    extension was built for, the torch imported, and the rebuild command
    (``pip install --no-build-isolation --force-reinstall .``).
    """
