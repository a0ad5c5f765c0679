"""Pruning methods by name, with their options.

An option left out is not passed: the pruner uses its own default (the value in
parentheses), so ``s3sparse prune --method X``, a recipe naming X and
``prune_model(..., method=X)`` all prune exactly as the library call does.

======================  ===========================================================  ==========================================
name                    call                                                         options (default)
======================  ===========================================================  ==========================================
``magnitude``           ``prune_magnitude(scope, nnz)``                              —
``obd``                 ``prune_obd(scope, H, nnz)``                                 —
``sparsegpt``           ``prune_sparsegpt(scope, H, nnz, blocksize, damp)``          ``blocksize`` (128), ``damp`` (0.01)
``obs-local``           ``StructuredOBS(scope, H, damp).prune(nnz, compensate=…)``   ``damp`` (0.01), ``block_size`` (2048)
``obs-full``            the same, ``compensate='full'``                              ``damp``, ``block_size``
``obs-split``           the same, ``compensate='split'``                             ``damp``, ``block_size``, ``n_splits`` (4)
``obs-interleaved``     the same, ``compensate='interleaved'``                       ``damp``, ``block_size``, ``n_splits`` (4)
``true-obs``            ``StructuredOBS(scope, H, damp).prune_true_obs(nnz, …)``     ``damp`` (1e-4), ``ng`` (64; 1 on
                                                                                     row-coupled patterns), ``chunk_size``
                                                                                     (auto), ``order`` (left_to_right),
                                                                                     ``scoring`` (independent), ``c_dtype``
                                                                                     (float16)
======================  ===========================================================  ==========================================

``n_splits`` (4) is the one option the library call does not default the same way
(``prune`` takes ``n_splits=1``, which makes ``split`` and ``interleaved`` equal to
``full``): the names ``obs-split`` and ``obs-interleaved`` mean four column chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import Tensor

from ..pruners import StructuredOBS, prune_magnitude, prune_obd, prune_sparsegpt
from ..pruners.sharding import AllRanks
from .errors import UsageError

__all__ = ["MethodChoice", "parse_method", "METHOD_NAMES"]

ProgressFn = Optional[Callable[[str], None]]

_C_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}

#: Options of every method: name -> {option: (type, default)}. A default of None is
#: not passed: the pruner's own default applies (see the table above).
_OPTIONS: Dict[str, Dict[str, tuple]] = {
    "magnitude": {},
    "obd": {},
    "sparsegpt": {"blocksize": (int, None), "damp": (float, None)},
    "obs-local": {"damp": (float, None), "block_size": (int, None)},
    "obs-full": {"damp": (float, None), "block_size": (int, None)},
    "obs-split": {"damp": (float, None), "block_size": (int, None), "n_splits": (int, 4)},
    "obs-interleaved": {"damp": (float, None), "block_size": (int, None), "n_splits": (int, 4)},
    "true-obs": {
        "damp": (float, None),
        "ng": (int, None),
        "chunk_size": (int, None),
        "order": (str, None),
        "scoring": (str, None),
        "c_dtype": (str, None),
    },
}
_CHOICES = {"order": ("left_to_right", "largest_first"), "scoring": ("independent", "joint"), "c_dtype": tuple(_C_DTYPES)}
_ALIASES = {"true_obs": "true-obs", "trueobs": "true-obs", "obs": "obs-full", "mag": "magnitude"}

METHOD_NAMES = tuple(_OPTIONS)
"""The method names, in the order of the table above."""


@dataclass(frozen=True)
class MethodChoice:
    """A pruning method picked by name, with its options filled in.

    ``run(scope, nnz, H, progress_fn)`` prunes the weight behind ``scope`` in place.
    """

    name: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def uses_hessian(self) -> bool:
        """Whether the method reads the layer Hessian (all but ``magnitude``)."""
        return self.name != "magnitude"

    @property
    def enumerates_subsets(self) -> bool:
        """Whether the method scores every candidate subset of a scope (shared-C OBS, joint True OBS)."""
        return self.name.startswith("obs-") or (self.name == "true-obs" and self.options["scoring"] == "joint")

    @property
    def shards_rows(self) -> bool:
        """Whether ``run`` can split the layer's rows over a process group (SparseGPT, True OBS)."""
        return self.name in ("sparsegpt", "true-obs")

    def run(self, scope, nnz: int, hessian: Optional[Tensor], progress_fn: ProgressFn = None, process_group=None) -> None:
        """Prune the weight behind ``scope`` to ``nnz`` blocks per scope, in place.

        ``process_group`` (methods with :attr:`shards_rows` only): split the rows
        over its ranks, every rank calling this with the same arguments and H; an
        error on one rank is raised on all of them.
        """
        if process_group is not None and not self.shards_rows:
            raise UsageError(f"method {self.name} does not split rows over ranks; run it with process_group=None")
        given = {k: v for k, v in self.options.items() if v is not None}
        if self.name == "magnitude":
            prune_magnitude(scope, nnz)
        elif self.name == "obd":
            prune_obd(scope, hessian, nnz)
        elif self.name == "sparsegpt":
            prune_sparsegpt(scope, hessian, nnz, progress_fn=progress_fn, process_group=process_group, **given)
        elif self.name.startswith("obs-"):
            damp = given.pop("damp", None)
            StructuredOBS(scope, hessian, damp=damp).prune(nnz, compensate=self.name[len("obs-"):], **given)
        elif self.name == "true-obs":
            damp = given.pop("damp", None)
            if "c_dtype" in given:
                given["c_dtype"] = _C_DTYPES[given["c_dtype"]]
            # Built on every rank before prune_true_obs's own sync point: a sync here too,
            # so a rank failing to build it cannot leave the others waiting.
            with AllRanks(process_group, "setting up True OBS"):
                pruner = StructuredOBS(scope, hessian, damp=damp)
            pruner.prune_true_obs(nnz, progress_fn=progress_fn, process_group=process_group, **given)
        else:  # pragma: no cover - parse_method only builds known names
            raise AssertionError(self.name)

    def check_subset_count(self, blocks_per_scope: int, nnz: int, where: str) -> None:
        """Refuse (UsageError) a pattern whose scopes have too many candidate subsets for this method."""
        if not self.enumerates_subsets:
            return
        from ..pruners import obs

        limit = int(getattr(obs, "MAX_SUBSETS", 20_000))
        count = math.comb(blocks_per_scope, max(0, blocks_per_scope - nnz))
        if count > limit:
            raise UsageError(
                f"{where}: method {self.name} scores all {count} subsets of a {blocks_per_scope}-block scope "
                f"(limit {limit}); use sparsegpt or true-obs with scoring=independent for this pattern"
            )

    def __str__(self) -> str:
        return self.name


def _coerce(method: str, key: str, kind: type, value: Any) -> Any:
    if value is None:
        return None
    if kind is str:
        value = str(value)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise UsageError(f"method {method}: option {key}={value!r} is not one of {', '.join(_CHOICES[key])}")
        return value
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
        else:
            number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"method {method}: option {key} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    if number < 0 or (kind is int and number < 1):
        raise UsageError(f"method {method}: option {key} must be {'>= 1' if kind is int else '>= 0'}, got {value!r}")
    return number


def parse_method(name: str, options: Optional[Mapping[str, Any]] = None) -> MethodChoice:
    """The :class:`MethodChoice` called ``name`` with ``options`` over its defaults.

    Raises:
        UsageError: an unknown method, an option it does not take, or a bad value.
    """
    if isinstance(name, MethodChoice):
        if options:
            return parse_method(name.name, {**name.options, **dict(options)})
        return name
    if not isinstance(name, str):
        raise UsageError(f"a method must be a name such as 'sparsegpt', got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _OPTIONS:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    allowed = _OPTIONS[key]
    given = dict(options or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise UsageError(f"method {key} has no option {', '.join(unknown)}; it takes {takes}")
    filled = {k: _coerce(key, k, kind, given.get(k, default)) for k, (kind, default) in allowed.items()}
    return MethodChoice(key, filled)
