"""Pruning methods by name: each name is a method class of :mod:`s3sparse.pruners`.

======================  =================================================  ===============================================
name                    class (options fixed by the name)                  options (defaults: the class's ``Options``)
======================  =================================================  ===============================================
``magnitude``           :class:`~s3sparse.pruners.Magnitude`               —
``obd``                 :class:`~s3sparse.pruners.OBD`                     —
``sparsegpt``           :class:`~s3sparse.pruners.SparseGPT`               ``blocksize`` (128), ``damp`` (0.01), ``refine``
                                                                           (0: off; N: sweeps of ``refine_mask``)
``obs-local``           :class:`~s3sparse.pruners.SharedOBS`,              ``damp`` (0.01), ``block_size`` (2048)
                        ``compensate='local'``
``obs-full``            the same, ``compensate='full'``                    ``damp``, ``block_size``
``obs-split``           the same, ``compensate='split'``                   ``damp``, ``block_size``, ``n_splits`` (4)
``obs-interleaved``     the same, ``compensate='interleaved'``             ``damp``, ``block_size``, ``n_splits`` (4)
``true-obs``            :class:`~s3sparse.pruners.TrueOBS`                 ``damp`` (1e-4), ``ng`` (64; 1 on row-coupled
                                                                           patterns), ``chunk_size`` (auto), ``order``
                                                                           (left_to_right), ``scoring`` (independent;
                                                                           joint, hybrid), ``hybrid_tau`` (4),
                                                                           ``c_dtype`` (float16), ``refine`` (0: off;
                                                                           N: sweeps of :func:`~s3sparse.pruners.refine_mask`)
======================  =================================================  ===============================================

An option not given takes the default of the class's options dataclass (the
values in parentheses are theirs), so ``s3sparse prune --method X``, a recipe
naming X, ``prune_model(..., method=X)`` and ``Class(**fixed).prune(scope, H, nnz)``
prune alike (``tests/test_method_defaults.py``). Option types and choices come
from the dataclass fields; their values are checked by the dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

import torch
from torch import Tensor

from ..errors import S3Error
from ..pruners import OBD, Magnitude, PruningMethod, SharedOBS, SparseGPT, TrueOBS
from ..pruners.obs_layer import MAX_SUBSETS
from .errors import UsageError

__all__ = ["MethodChoice", "parse_method", "METHOD_NAMES"]

ProgressFn = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class _Name:
    """What a method name stands for: a class, the options the name fixes, and the
    options of the class it does not take (they do nothing with the fixed ones)."""

    cls: Type[PruningMethod]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    hidden: Tuple[str, ...] = ()


_NAMES: Dict[str, _Name] = {
    "magnitude": _Name(Magnitude),
    "obd": _Name(OBD),
    "sparsegpt": _Name(SparseGPT),
    "obs-local": _Name(SharedOBS, {"compensate": "local"}, ("n_splits",)),
    "obs-full": _Name(SharedOBS, {"compensate": "full"}, ("n_splits",)),
    "obs-split": _Name(SharedOBS, {"compensate": "split"}),
    "obs-interleaved": _Name(SharedOBS, {"compensate": "interleaved"}),
    "true-obs": _Name(TrueOBS),
}
_ALIASES = {"true_obs": "true-obs", "trueobs": "true-obs", "obs": "obs-full", "mag": "magnitude"}
# torch dtypes by the names an option value may use.
_DTYPES = {
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

METHOD_NAMES = tuple(_NAMES)
"""The method names, in the order of the table above."""


@dataclass(frozen=True)
class _Option:
    """One option a name takes: its type (int, float, str or torch.dtype), whether None
    is a value of it, its default as plain data, and its choices (strings) if any."""

    kind: type
    optional: bool
    default: Any
    choices: Optional[Tuple[str, ...]]


def _plain(value: Any) -> Any:
    """An option value as plain data (JSON): a dtype by its name."""
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value


def _options_of(entry: _Name) -> Dict[str, _Option]:
    """The options ``entry`` takes, from its class's options dataclass."""
    hints = typing.get_type_hints(entry.cls.Options)
    out = {}
    for f in dataclasses.fields(entry.cls.Options):
        if f.name in entry.fixed or f.name in entry.hidden:
            continue
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, optional = args[0], True
        choices = f.metadata.get("choices")
        if kind is torch.dtype:
            choices = tuple(n for n, d in _DTYPES.items() if d in choices)
        out[f.name] = _Option(kind, optional, _plain(f.default), choices)
    return out


_OPTIONS: Dict[str, Dict[str, _Option]] = {name: _options_of(entry) for name, entry in _NAMES.items()}


@dataclass(frozen=True)
class MethodChoice:
    """A pruning method picked by name, with its options filled in.

    ``options`` holds every option the name takes, as plain data (given, or the
    class's default); :attr:`method` is the pruner they make, and
    ``run(scope, nnz, H, progress_fn)`` prunes the weight behind ``scope`` with it,
    in place.
    """

    name: str
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> PruningMethod:
        """The method object: the name's class with the fixed and the given options."""
        entry = _NAMES[self.name]
        typed = {k: _DTYPES[v] if _OPTIONS[self.name][k].kind is torch.dtype else v for k, v in self.options.items()}
        return entry.cls(**entry.fixed, **typed)

    @property
    def uses_hessian(self) -> bool:
        """Whether the method reads the layer Hessian (all but ``magnitude``)."""
        return _NAMES[self.name].cls.Options.needs_hessian

    @property
    def enumerates_subsets(self) -> bool:
        """Whether the method scores every candidate subset of a scope (shared-C OBS, joint True OBS)."""
        return self.method.options.enumerates_subsets

    @property
    def shards_rows(self) -> bool:
        """Whether ``run`` can split the layer's rows over a process group (SparseGPT, True OBS)."""
        return _NAMES[self.name].cls.Options.shards_rows

    def run(self, scope, nnz: int, hessian: Optional[Tensor], progress_fn: ProgressFn = None, process_group=None) -> None:
        """Prune the weight behind ``scope`` to ``nnz`` blocks per scope, in place.

        ``process_group`` (methods with :attr:`shards_rows` only): split the rows
        over its ranks, every rank calling this with the same arguments and H; an
        error on one rank is raised on all of them.
        """
        if process_group is not None and not self.shards_rows:
            raise UsageError(f"method {self.name} does not split rows over ranks; run it with process_group=None")
        self.method.prune(scope, hessian, nnz, progress_fn, process_group)

    def check_subset_count(self, blocks_per_scope: int, nnz: int, where: str) -> None:
        """Refuse (UsageError) a pattern whose scopes have too many candidate subsets for this method."""
        if not self.enumerates_subsets:
            return
        count = math.comb(blocks_per_scope, max(0, blocks_per_scope - nnz))
        if count > MAX_SUBSETS:
            raise UsageError(
                f"{where}: method {self.name} scores all {count} subsets of a {blocks_per_scope}-block scope "
                f"(limit {MAX_SUBSETS}); use sparsegpt or true-obs with scoring=independent (or hybrid, which "
                "runs as independent there) for this pattern"
            )

    def __str__(self) -> str:
        return self.name


def _coerce(method: str, key: str, option: _Option, value: Any) -> Any:
    """``value`` (a string from the command line, or a number) as the option's type."""
    if value is None:
        return None if option.optional else option.default
    if option.kind in (str, torch.dtype):
        value = str(value)
        if option.choices and value not in option.choices:
            raise UsageError(f"method {method}: option {key}={value!r} is not one of {', '.join(option.choices)}")
        return value
    kind = option.kind
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value)
        else:
            number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"method {method}: option {key} must be {'an int' if kind is int else 'a number'}, got {value!r}")
    # Ints are counts >= 1, except those whose default 0 means "off" (refine).
    least = (0 if option.default == 0 else 1) if kind is int else 0
    if number < least:
        raise UsageError(f"method {method}: option {key} must be >= {least}, got {value!r}")
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
    if key not in _NAMES:
        raise UsageError(f"unknown method {name!r}; known methods: {', '.join(METHOD_NAMES)}")
    allowed = _OPTIONS[key]
    given = dict(options or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        takes = ", ".join(allowed) if allowed else "no options"
        raise UsageError(f"method {key} has no option {', '.join(unknown)}; it takes {takes}")
    filled = {k: _coerce(key, k, option, given[k]) if k in given else option.default for k, option in allowed.items()}
    choice = MethodChoice(key, filled)
    try:
        choice.method  # the options dataclass checks the values
    except S3Error as exc:
        raise UsageError(f"method {key}: {exc}") from None
    return choice
