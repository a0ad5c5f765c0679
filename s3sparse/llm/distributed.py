"""Pruning one model on several processes (GPUs, hosts) through torch.distributed.

Every rank holds the whole model and runs :func:`~s3sparse.llm.prune_model`
with the same arguments. Per block:

1. the calibration windows are split into contiguous shares, one per rank
   (:meth:`Ranks.share`); each rank runs its share through the block, feeding
   its layers' Hessian accumulators;
2. the accumulators are summed over the ranks (``all_reduce`` of ``Σ xᵀx`` and
   the sample counts, :meth:`Ranks.sum_hessians`), so every rank has every
   layer's full H;
3. every Linear's rows are split over the ranks in whole row groups and each
   rank prunes its slice (SparseGPT and True OBS take a ``process_group``);
   the rows are gathered, so every rank has the whole pruned layer. Methods
   that do not split rows (magnitude, OBD, shared-C OBS: cheap next to
   these) run on every rank and rank 0's result is broadcast;
4. each rank re-runs its share through the pruned block (the next block's
   inputs) and the block's output-error sums are added over the ranks.

Errors: every stretch of local work ends in a sync point
(:class:`~s3sparse.pruners.sharding.AllRanks`), so an exception on one rank is
raised on every rank instead of leaving them waiting in a collective.

The command line runs under ``torchrun``: :func:`launch` reads the environment
torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…),
initialises the default process group (NCCL for CUDA, gloo for the CPU), pins
each rank to ``cuda:LOCAL_RANK``, and destroys the group at the end.
"""

from __future__ import annotations

import datetime
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..pruners import HessianAccumulator
from ..pruners.sharding import AllRanks, check_process_group
from .errors import UsageError

__all__ = ["Ranks", "TorchrunEnv", "torchrun_env", "launch", "rank_prefix", "sum_over_ranks", "DEFAULT_TIMEOUT_MINUTES"]

#: How long a rank waits in one collective before torch.distributed gives up. Long:
#: a rank waits there while the slowest rank prunes its share of a large layer, and
#: while rank 0 writes OUT_DIR; a rank that dies is caught by torchrun, not by this.
DEFAULT_TIMEOUT_MINUTES = 60.0


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Ranks:
    """The processes pruning one model together: ``group`` (None: this process alone), its ``rank`` and ``world_size``."""

    group: Any = None
    rank: int = 0
    world_size: int = 1

    @staticmethod
    def resolve(process_group: Any = "auto") -> "Ranks":
        """``'auto'``: the default group when torch.distributed is initialised with more than one rank,
        else this process alone; ``None``: alone; a ProcessGroup: that group."""
        if isinstance(process_group, str):
            if process_group != "auto":
                raise UsageError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, got {process_group!r}")
            dist = _dist()
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return Ranks()
            process_group = dist.group.WORLD
        try:
            group = check_process_group(process_group)
        except (TypeError, ValueError) as exc:
            raise UsageError(str(exc).replace("`process_group`", "process_group"))
        if group is None:
            return Ranks()
        dist = _dist()
        return Ranks(group, dist.get_rank(group), dist.get_world_size(group))

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that prints and writes)."""
        return self.rank == 0

    def share(self, n_items: int) -> slice:
        """This rank's contiguous share of ``n_items`` calibration windows (shares differ by at most one)."""
        return slice(self.rank * n_items // self.world_size, (self.rank + 1) * n_items // self.world_size)

    def sync(self, what: str) -> AllRanks:
        """A sync point covering local work (see :class:`~s3sparse.pruners.sharding.AllRanks`); a no-op alone."""
        return AllRanks(self.group, what)

    @torch.no_grad()
    def broadcast_(self, tensor: Tensor) -> None:
        """Overwrite ``tensor`` with rank 0's, in place, on every rank (a collective; a no-op alone)."""
        if not self.distributed:
            return
        dist = _dist()
        buffer = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.broadcast(buffer, group=self.group, group_src=0)
        if buffer is not tensor:
            tensor.copy_(buffer)

    def sum_hessians(
        self, accumulators: Dict[str, HessianAccumulator], leaders: Sequence[Dict[str, str]],
        in_features: Dict[str, int], device: torch.device, dtype: torch.dtype = torch.float32,
    ) -> None:
        """Sum the layers' Hessian accumulators over the ranks, in place (a collective).

        ``leaders[r]`` is rank r's map of each layer it saw called to the layer
        whose accumulator it shares (q/k/v share one); a rank that saw a layer
        never called (no windows, or data-dependent routing) gets a zero
        accumulator for it first, so every rank sums the same accumulators in the
        same order. ``in_features`` gives K for every layer to prune; ``dtype``
        is the accumulators' (fp32 or fp64).
        """
        if not self.distributed:
            return
        merged: Dict[str, str] = {}
        for rank_map in leaders:
            for name, leader in rank_map.items():
                if merged.setdefault(name, leader) != leader:
                    raise RuntimeError(
                        f"{name}: its input was shared with {merged[name]} on one rank and with {leader} on another"
                    )
        for name in in_features:  # the layers' order: the same on every rank
            leader = merged.get(name)
            if leader is None or leader != name:
                continue
            if name not in accumulators:
                accumulators[name] = HessianAccumulator(in_features[name], device=device, dtype=dtype)
            accumulators[name].all_reduce(self.group)
        for name, leader in merged.items():
            if leader != name:
                accumulators[name] = accumulators[leader]


def sum_over_ranks(values: Sequence[Sequence[float]]) -> Tuple[float, ...]:
    """Element-wise sums of every rank's numbers (the ``results`` of a sync point), in rank order."""
    return tuple(math.fsum(column) for column in zip(*values))


# ------------------------------------------------------------------ torchrun
@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun (or any launcher of torch.distributed's ``env://`` kind) says about this process."""

    rank: int
    world_size: int
    local_rank: int


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer (set by torchrun; launch with torchrun)")


def torchrun_env() -> Optional[TorchrunEnv]:
    """The torchrun environment of this process, or None when it was not launched that way (``WORLD_SIZE`` unset)."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK") if "RANK" in os.environ else 0
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not fit together")
    return TorchrunEnv(rank, world, local)


def rank_prefix() -> str:
    """``' (rank R of W)'`` under a torchrun launch of more than one process, else ``''`` (for messages)."""
    try:
        env = torchrun_env()
    except UsageError:
        return ""
    return f" (rank {env.rank} of {env.world_size})" if env is not None and env.world_size > 1 else ""


def _rank_device(device: torch.device, env: TorchrunEnv) -> torch.device:
    if device.type != "cuda":
        return device
    if device.index is not None and env.world_size > 1:
        raise UsageError(
            f"--device {device}: under torchrun every rank uses its own GPU, cuda:LOCAL_RANK; pass --device cuda (or auto)"
        )
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise UsageError(
            f"LOCAL_RANK={env.local_rank} but this host has {count} CUDA device(s); "
            f"launch at most {count} processes per host (torchrun --nproc-per-node {count})"
        )
    return torch.device("cuda", env.local_rank)


@contextmanager
def launch(device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[Tuple[Ranks, torch.device]]:
    """``(ranks, device)`` for this process: under torchrun with ``WORLD_SIZE > 1`` the default
    process group (initialised here unless it already is, destroyed at the end if initialised here;
    NCCL for a CUDA ``device``, gloo otherwise) and this rank's device (``cuda:LOCAL_RANK``, set as
    the current device); otherwise this process alone on ``device``.

    Raises:
        UsageError: an explicit ``cuda:N`` under a multi-process launch, more
            processes on a host than it has GPUs, a bad environment.
    """
    env = torchrun_env()
    if env is None or env.world_size == 1:
        yield Ranks(), device
        return
    device = _rank_device(device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
    dist = _dist()
    created = False
    if not dist.is_initialized():
        if not timeout_minutes > 0:
            raise UsageError(f"--dist-timeout must be > 0 minutes, got {timeout_minutes}")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: Dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=float(timeout_minutes)), **kwargs)
        except (ValueError, RuntimeError) as exc:  # e.g. MASTER_ADDR unset: not launched by torchrun
            raise UsageError(
                f"WORLD_SIZE={env.world_size} is set but torch.distributed could not start ({type(exc).__name__}: {exc}); "
                "launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE"
            ) from exc
        created = True
    try:
        yield Ranks.resolve(dist.group.WORLD), device
    except Exception as exc:
        if created:
            _report_then_wait(exc, env)
        raise
    else:
        if created:
            # Every rank done before any tears its group down: a gloo rank
            # destroyed while a peer's last collective is still in flight can
            # abort the peer ("terminate called without an active exception").
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


#: How long a failing rank waits, after printing its error, for the others to print theirs.
_SETTLE_SECONDS = 60.0


def _report_then_wait(exc: Exception, env: TorchrunEnv) -> None:
    """Print this rank's error now, then wait (bounded) until every rank has printed its own.

    torchrun stops the remaining workers as soon as one exits with an error; a
    rank slower to print would be killed before saying what went wrong. Errors
    raised at a sync point are raised on every rank, so every rank gets here.
    The exception is marked printed, so that :func:`s3sparse.llm.cli.main` does
    not print it again.
    """
    import sys
    import traceback

    prefix = f"s3sparse (rank {env.rank} of {env.world_size})"
    if isinstance(exc, UsageError):
        print(f"{prefix}: error: {exc}", file=sys.stderr, flush=True)
    else:
        print(f"{prefix}: failed:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    exc._s3sparse_printed = True  # type: ignore[attr-defined]
    try:
        _dist().barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=_SETTLE_SECONDS))
    except Exception:  # a rank that never comes (it failed outside a sync point): exit anyway
        pass

