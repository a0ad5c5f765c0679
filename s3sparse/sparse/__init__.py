"""Packed execution of pruned weights.

* :class:`PackedWeight` — a 2-D weight pruned to any S3 pattern with a fixed
  ``nnz`` per scope, stored as the kept blocks of every scope plus their
  in-scope indices (bit-packed), restored exactly by ``to_dense()``, saved and
  loaded (safetensors) without the spec objects.
* :class:`PackedLinear` — an ``nn.Module`` computing ``F.linear(x, W, b)`` from a
  PackedWeight through the custom op ``s3sparse::packed_linear``
  (``torch.compile``-able).

The format is documented in ``docs/packed.md``, ``csrc/ops.cpp`` and
:mod:`s3sparse.reference`.
"""

from __future__ import annotations

from . import format
from .linear import PackedLinear
from .packed import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, PackedWeight

__all__ = ["PackedWeight", "PackedLinear", "format", "FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY"]
