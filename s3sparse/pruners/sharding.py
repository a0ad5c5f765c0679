"""Splitting one layer's rows over the ranks of a torch.distributed process group.

True OBS and SparseGPT treat the rows of a weight independently given the
Hessian H (the layer loss is a sum over rows), except that a scope spanning
several rows couples them: its rows compete for one budget. The rows therefore
split into *row groups* — the connected sets of rows that share a scope (one
row each for N:M; rows p and p+8 of every 16-row block for the row-coupled
16-column pattern) — and a group is never split: :class:`RowShard` hands each
rank a contiguous run of whole groups, as even as the group count allows. Every
rank holds the full H (all-reduced by the caller), prunes its own groups, and
:meth:`RowShard.gather` puts every rank's rows back into one full weight on
every rank (``all_gather`` of padded row slices, so uneven splits work).

Errors: a rank that raises must not leave the others waiting in a collective.
:class:`AllRanks` is a sync point — a ``with`` block whose end is one
``all_gather_object`` of every rank's outcome; if any rank raised inside it,
*every* rank raises the lowest failing rank's exception (the same type
everywhere, so callers that catch it, e.g. to fall back to another method, stay
in step). The rule that keeps this safe: no collective runs inside the block,
and sync points are never nested.

Nothing here talks to the network itself: everything is torch.distributed
(NCCL on GPUs, gloo on the CPU).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError

__all__ = ["AllRanks", "RankFailedError", "RowShard", "check_process_group", "split_evenly"]


class RankFailedError(RuntimeError):
    """Another rank raised an exception that could not be rebuilt on this rank (its type and text are in the message)."""


def _dist():
    import torch.distributed as dist

    return dist


def check_process_group(process_group: Any, name: str = "process_group"):
    """``process_group`` checked: ``None`` (no sharding) or a ProcessGroup of an initialised torch.distributed.

    Raises:
        ArgumentError: torch.distributed is not available or not initialised.
        ArgumentTypeError: ``process_group`` is not a ProcessGroup.
    """
    if process_group is None:
        return None
    try:
        dist = _dist()
    except ImportError:  # pragma: no cover - every torch build we support has it
        dist = None
    if dist is None or not dist.is_available():
        raise ArgumentError(f"`{name}` was given but this torch build has no torch.distributed; pass {name}=None")
    if not dist.is_initialized():
        raise ArgumentError(
            f"`{name}` was given but torch.distributed is not initialised; call "
            f"torch.distributed.init_process_group(...) on every rank first (torchrun sets up the environment), "
            f"or pass {name}=None"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ArgumentTypeError(
            f"`{name}` must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD) or None, "
            f"got {type(process_group).__name__}"
        )
    return process_group


def split_evenly(num_items: int, parts: int) -> List[int]:
    """Bounds ``b`` (``parts + 1`` of them) splitting ``num_items`` into ``parts`` contiguous runs
    ``[b[r], b[r+1])`` whose sizes differ by at most one (earlier runs are the smaller)."""
    return [(r * int(num_items)) // int(parts) for r in range(int(parts) + 1)]


def _note(exc: BaseException, text: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python >= 3.11
    if add_note is not None:
        add_note(text)


def _pickled(obj: Any) -> Optional[bytes]:
    try:
        return pickle.dumps(obj)
    except Exception:  # anything unpicklable: the caller sends a description instead
        return None


class AllRanks:
    """A sync point: ``with AllRanks(group, "what it covers") as sync: ...``.

    At the end of the block every rank sends its outcome to every other (one
    ``all_gather_object``). ``sync.payload``, set inside the block, is sent
    along; afterwards ``sync.results`` holds every rank's payload, in rank
    order. If any rank raised an ``Exception`` inside the block, every rank
    raises the lowest failing rank's exception — its own object there, a copy
    (same type, same message, a note saying which rank raised it) elsewhere, or
    :class:`RankFailedError` when the exception cannot be pickled. Interrupts
    (``KeyboardInterrupt``, ``SystemExit``) are not exchanged: they end that
    rank at once, and the launcher (torchrun) stops the others.

    With ``group=None`` it does nothing: ``results`` is ``[payload]``.
    The block must run no collective itself, and sync points must not nest.
    """

    def __init__(self, group, what: str):
        self.group = group
        self.what = what
        self.payload: Any = None
        self.results: List[Any] = []

    def __enter__(self) -> "AllRanks":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.group is None:
            self.results = [self.payload]
            return False
        if exc is not None and not isinstance(exc, Exception):
            return False
        dist = _dist()
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if exc is None:
            mine = _pickled(("ok", self.payload))
            if mine is None:
                exc = RankFailedError(f"rank {rank}: the result of {self.what} cannot be pickled ({type(self.payload).__name__})")
        if exc is not None:
            mine = _pickled(("failed", _pickled(exc), type(exc).__name__, str(exc)))
        outcomes: List[Optional[bytes]] = [None] * world
        dist.all_gather_object(outcomes, mine, group=self.group)
        decoded = [pickle.loads(o) for o in outcomes]
        failed = [r for r, o in enumerate(decoded) if o[0] == "failed"]
        if not failed:
            self.results = [o[1] for o in decoded]
            return False
        first = failed[0]
        where = f"raised on rank {first} of {world} while {self.what}"
        if first == rank:
            _note(exc, f"{where}; every rank stops with it")
            if exc_type is None:  # the payload could not be pickled: nothing is in flight on this rank
                raise exc
            return False
        _, blob, type_name, text = decoded[first]
        remote: Optional[BaseException] = None
        if blob is not None:
            try:
                remote = pickle.loads(blob)
            except Exception:  # e.g. an exception class whose constructor takes other arguments
                remote = None
        if not isinstance(remote, Exception):
            remote = RankFailedError(f"rank {first} of {world} failed while {self.what}: {type_name}: {text}")
        _note(remote, f"{where}; rank {rank} stops with it")
        raise remote


@dataclass(frozen=True)
class RowShard:
    """Which weight rows each rank of a process group prunes: contiguous runs of whole row groups.

    ``rows_by_rank[r]`` (long tensors, on the weight's device) are the rows rank
    ``r`` prunes, group by group: the groups ``group_bounds[r]`` to
    ``group_bounds[r + 1] - 1``; ``rank`` is this process's rank in ``group``.
    Rows in no group (rows no scope touches) are pruned by nobody and stay as they are.
    """

    group: Any
    rank: int
    world_size: int
    rows_by_rank: tuple
    group_bounds: tuple

    @property
    def rows(self) -> Tensor:
        """The rows this rank prunes."""
        return self.rows_by_rank[self.rank]

    @staticmethod
    def of_groups(group_rows: Sequence[Tensor], process_group) -> "RowShard":
        """Split row groups (a sequence of 1-D row-index tensors, or an (R, rows per group) tensor)
        over the ranks of ``process_group``, balancing the number of rows."""
        dist = _dist()
        rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
        groups = list(group_rows)
        sizes = torch.tensor([int(g.numel()) for g in groups], dtype=torch.long)
        starts = torch.cumsum(sizes, 0) - sizes
        total = int(sizes.sum())
        # Rank r takes the groups that start in its share [r·total/W, (r+1)·total/W) of the rows.
        targets = torch.tensor(split_evenly(total, world), dtype=torch.long)
        bounds = torch.searchsorted(starts, targets, right=False).tolist()
        bounds[-1] = len(groups)
        device = groups[0].device if groups else torch.device("cpu")
        empty = torch.zeros(0, dtype=torch.long, device=device)
        rows = tuple(
            torch.cat([g.reshape(-1) for g in groups[bounds[r] : bounds[r + 1]]]) if bounds[r + 1] > bounds[r] else empty
            for r in range(world)
        )
        return RowShard(group=process_group, rank=rank, world_size=world, rows_by_rank=rows, group_bounds=tuple(bounds))

    @torch.no_grad()
    def gather(self, weight: Tensor, local_rows: Tensor) -> None:
        """Write every rank's pruned rows into ``weight`` (M, K), in place, on every rank.

        ``local_rows`` (len(self.rows), K) are this rank's rows, in the order of
        ``self.rows``. Every rank of the group must call this (it is a collective).
        """
        dist = _dist()
        counts = [int(r.numel()) for r in self.rows_by_rank]
        width = weight.shape[1]
        if local_rows.shape != (counts[self.rank], width):
            raise ArgumentError(
                f"`local_rows` must be ({counts[self.rank]}, {width}), this rank's rows of the weight; "
                f"got {tuple(local_rows.shape)}"
            )
        most = max(counts)
        if most == 0:
            return
        # all_gather needs one shape on every rank: pad the slices to the largest.
        padded = torch.zeros(most, width, dtype=local_rows.dtype, device=local_rows.device)
        padded[: counts[self.rank]] = local_rows
        slices = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(slices, padded, group=self.group)
        for r, (rows, part) in enumerate(zip(self.rows_by_rank, slices)):
            if counts[r]:
                weight[rows.to(weight.device)] = part[: counts[r]].to(device=weight.device, dtype=weight.dtype)
