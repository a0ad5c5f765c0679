"""Which dtype to compute in: the one home of s3sparse's dtype rules.

Ground level: imports nothing of s3sparse, so the specification, the pruners
and the pure-torch oracles (:mod:`s3sparse.reference`) all use the same rules.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["opmath_dtype", "get_dtype_epsilon"]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for values of ``dtype``: fp64 stays fp64, every other float fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def get_dtype_epsilon(dtype: torch.dtype, eps: Optional[float] = None) -> float:
    """``eps`` when given, else the machine epsilon of ``dtype``.

    Non-floating dtypes use the epsilon of the default float dtype.
    """
    if eps is not None:
        return float(eps)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return float(torch.finfo(dtype).eps)
