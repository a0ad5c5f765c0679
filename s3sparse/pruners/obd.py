"""OBD (Optimal Brain Damage) pruning over any ScopeSpec or ScopeCoupling.

Keeps, in every scope, the ``nnz`` blocks of largest saliency ``Σ_b w² · H_cc``
over the block's elements (``c`` the element's input column: the second-order
loss of removing the block when the Hessian is taken as diagonal) and zeroes the
rest, through the specification's own ``hard_threshold`` (so it works on every
pattern, coupling and parameter the specification can express).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import torch
from torch import Tensor

from ..scope import check_scope
from ..errors import ArgumentError, ArgumentTypeError, UnknownNameError
from .hessian import check_hessian
from .method import MethodOptions, ProgressFn, PruningMethod

__all__ = ["OBD", "OBDOptions", "prune_obd"]

HessianArg = Union[Tensor, Mapping[object, Tensor]]


def _hessian_for(spec, hessian: HessianArg) -> Tensor:
    if isinstance(hessian, Tensor):
        return hessian
    if not isinstance(hessian, Mapping):
        raise ArgumentTypeError(
            f"`hessian` must be a (K, K) tensor or a mapping {{parameter: (K, K) tensor}}, got {type(hessian).__name__}; "
            "compute it with s3sparse.compute_hessian(X)"
        )
    param = spec.view.param
    for key in (spec, spec.view, param, getattr(spec, "name", None)):
        if key is None:
            continue
        try:
            if key in hessian:
                return hessian[key]
        except TypeError:  # unhashable key type for this mapping
            continue
    for key, value in hessian.items():
        if key is param or getattr(key, "param", None) is param:
            return value
    raise UnknownNameError(
        f"`hessian` has no entry for block {spec!r}; map each parameter (or its BlockSpec, View or name) to its (K, K) Hessian"
    )


@dataclasses.dataclass(frozen=True)
class OBDOptions(MethodOptions):
    """OBD has no options; it reads the diagonal of the Hessian."""


class OBD(PruningMethod):
    """Keep the ``nnz`` blocks of largest OBD saliency ``Σ w²·diag(H)`` per scope.

    ``hessian``: the (K, K) Hessian of the weight, or, for patterns over several
    parameters, a mapping from each parameter (or its BlockSpec / View / name) to
    its Hessian.
    """

    Options = OBDOptions

    @torch.no_grad()
    def prune(self, scope, hessian: HessianArg, nnz: int, progress_fn: ProgressFn = None,
              process_group=None) -> None:
        self._refuse_process_group(process_group)
        check_scope(scope)
        nnz = scope._check_nnz(nnz)
        values = {}
        for spec in scope.block_specs():
            param = spec.view.param
            if param.dim() != 2:
                raise ArgumentError(
                    f"OBD needs 2-D weights (out, in) behind `scope`; block {spec!r} is on a {param.dim()}-D parameter"
                )
            H = _hessian_for(spec, hessian)
            check_hessian(H, param.shape[1], like=param)
            diag = torch.diagonal(H).to(torch.float32).clamp(min=0)
            # Block norm of w·sqrt(h) is sqrt(Σ w² h): a monotone transform of the OBD saliency.
            values[spec] = param.detach().to(torch.float32) * diag.sqrt()
        scope.hard_threshold(nnz=nnz, values=values)


def prune_obd(scope, hessian: HessianArg, nnz: int) -> None:
    """Keep the ``nnz`` blocks of largest OBD saliency ``Σ w²·diag(H)`` per scope (in place).

    Args:
        scope: ScopeSpec or ScopeCoupling.
        hessian: the (K, K) Hessian of the weight, or, for patterns over several
            parameters, a mapping from each parameter (or its BlockSpec / View /
            name) to its Hessian.
        nnz: blocks kept per scope.
    """
    OBD().prune(scope, hessian, nnz)
