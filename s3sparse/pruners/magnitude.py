"""Magnitude pruning over any ScopeSpec or ScopeCoupling.

Keeps, in every scope, the ``nnz`` blocks of largest L2 norm ``‖w_b‖`` and zeroes
the rest, through the specification's own ``hard_threshold`` (so it works on
every pattern, coupling and parameter the specification can express). It reads
no Hessian.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch
from torch import Tensor

from ..scope import check_scope
from .method import MethodOptions, ProgressFn, PruningMethod

__all__ = ["Magnitude", "MagnitudeOptions", "prune_magnitude"]


@dataclasses.dataclass(frozen=True)
class MagnitudeOptions(MethodOptions):
    """Magnitude pruning has no options, and needs no Hessian."""

    needs_hessian: ClassVar[bool] = False


class Magnitude(PruningMethod):
    """Keep the ``nnz`` blocks of largest L2 norm per scope (``hessian`` is not read)."""

    Options = MagnitudeOptions

    @torch.no_grad()
    def prune(self, scope, hessian: Optional[Tensor], nnz: int, progress_fn: ProgressFn = None,
              process_group=None) -> None:
        self._refuse_process_group(process_group)
        check_scope(scope)
        scope.hard_threshold(nnz=scope._check_nnz(nnz))


def prune_magnitude(scope, nnz: int) -> None:
    """Keep the ``nnz`` blocks of largest L2 norm in every scope; zero the others (in place)."""
    Magnitude().prune(scope, None, nnz)
