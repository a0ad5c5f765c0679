"""What every pruning method has: a frozen options dataclass and one ``prune`` call.

A method is a :class:`PruningMethod` subclass (magnitude, OBD, SparseGPT, shared-C
OBS, True OBS) whose ``Options`` dataclass is the one home of its defaults, checks
its values when built, and says what the method can do:

* ``needs_hessian``: whether ``prune`` reads the layer Hessian (all but magnitude);
* ``shards_rows``: whether ``prune`` can split the rows over a process group;
* ``enumerates_subsets``: whether it scores every candidate subset of a scope
  (its cost grows with C(blocks, pruned), bounded by ``MAX_SUBSETS``).

``Method(options)`` or ``Method(**fields)`` builds one; ``prune(scope, hessian, nnz,
progress_fn=None, process_group=None)`` prunes the weight behind ``scope`` in place.
The functions of the reference API (``prune_sparsegpt``, ``StructuredOBS(...).prune``
...) are thin calls of these classes, so a method gives the same result by name
(``s3sparse.llm``), by class and by function.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Optional, Type

from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["MethodOptions", "PruningMethod", "ProgressFn"]

ProgressFn = Optional[Callable[[str], None]]


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Options of a method without any; subclasses add fields (with their defaults)."""

    #: ``prune`` reads the layer Hessian.
    needs_hessian: ClassVar[bool] = True
    #: ``prune`` can split the layer's rows over a process group.
    shards_rows: ClassVar[bool] = False

    @property
    def enumerates_subsets(self) -> bool:
        """Whether the method scores every candidate subset of a scope with these options."""
        return False

    def _set(self, name: str, value: Any) -> None:
        """Store a checked (normalised) value on the frozen instance, from ``__post_init__``."""
        object.__setattr__(self, name, value)


class PruningMethod(abc.ABC):
    """One pruning method with its options (see the module docstring)."""

    #: The options dataclass of this method.
    Options: ClassVar[Type[MethodOptions]] = MethodOptions

    def __init__(self, options: Optional[MethodOptions] = None, **fields: Any):
        known = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            takes = ", ".join(known) or "no options"
            raise ArgumentError(f"{type(self).__name__} has no option {', '.join(unknown)}; it takes {takes}")
        if options is None:
            options = self.Options(**fields)
        elif not isinstance(options, self.Options):
            raise ArgumentTypeError(
                f"`options` of {type(self).__name__} must be a {self.Options.__name__}, got {type(options).__name__}"
            )
        elif fields:
            options = dataclasses.replace(options, **fields)
        self.options = options

    @abc.abstractmethod
    def prune(self, scope, hessian: Optional[Tensor], nnz: int, progress_fn: ProgressFn = None,
              process_group=None) -> None:
        """Prune the weight behind ``scope`` to ``nnz`` blocks per scope, in place."""

    def _refuse_process_group(self, process_group) -> None:
        if process_group is not None and not self.options.shards_rows:
            raise ArgumentError(
                f"{type(self).__name__} does not split rows over ranks; call it with process_group=None"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
