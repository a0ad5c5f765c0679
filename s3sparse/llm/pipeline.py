"""Sequential, block-by-block pruning of a whole model.

:func:`prune_model` finds the transformer blocks, captures the first block's
inputs once, and then for every block in turn:

1. runs the dense block on the current inputs with forward pre-hooks feeding
   each linear layer's inputs into a :class:`~s3sparse.HessianAccumulator`
   (layers reading the same input tensor, like q/k/v, share one);
2. prunes every linear layer with its recipe's method and pattern, recording
   the relative output error, the time, the pruners' warnings (rows redone in
   fp32, damping raised) and checking the pattern holds;
3. re-runs the block with the pruned weights; its outputs are the next block's
   inputs (and, against the dense outputs, the block's output error).

A layer whose Hessian is rank-deficient or has dead inputs is handled as the
pruners handle it (unit curvature for dead inputs, more damping) and reported.
Only a genuine numerical failure makes a layer fall back to magnitude pruning
to the same pattern: its method raising :class:`~s3sparse.errors.NumericalError`
(any ``FloatingPointError``) or ``torch.linalg.LinAlgError``, or a Hessian the
method cannot use at all (every calibration input of the layer zero, or a sum
that overflowed). Every fallback is recorded with its reason and counted in the
summary line and the JSON report; the run goes on.

Every other error stops the run. Arguments are checked before any work: a
pattern that cannot divide a layer's shape, an unknown name, a weight holding
NaN/Inf raise :class:`~s3sparse.llm.errors.UsageError` naming the layer; so do
calibration inputs of a layer turning NaN/Inf during the run, and any other
:class:`~s3sparse.errors.S3Error` a pruner raises about its arguments (the
layer's weight is left as it was).
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..patterns import PatternChoice
from ..pruners import HessianAccumulator, output_error, prune_magnitude
from ..sparse.layer import LinearLayer
from .blocks import BlockCall, capture_block_inputs, find_blocks, linear_layers, move_outside_blocks
from .blocks import per_block_arguments, run_block
from .calibration import CalibrationSet
from .distributed import Ranks, sum_over_ranks
from .errors import UsageError
from .method_registry import MethodChoice
from .recipe import LayerPlan, Recipe
from .report import BlockReport, LayerReport, PruneReport, count_redone_rows

__all__ = ["prune_model", "check_recipe_fits", "check_model_fits"]

from ..checks import check_finite
from ..errors import NonFiniteError, NumericalError
from ..errors import S3Error as _S3Error

# The errors of a method on a layer that mean "numerically stuck", not "wrong arguments":
# the layer falls back to magnitude pruning, the fallback is reported, and the run goes on.
# NumericalError (what the pruners raise for a damped H that stays indefinite, or
# non-finite results) is a FloatingPointError. Everything else -- an S3Error about an
# argument above all, a plain ValueError or TypeError too -- stops the run.
_NUMERIC_FAILURES = (NumericalError, FloatingPointError, torch.linalg.LinAlgError)


# ------------------------------------------------------------------ progress bars
class _Progress:
    """tqdm bars (blocks, then layers of the current block), or nothing."""

    def __init__(self, enabled: bool, total_blocks: int):
        self._tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
            except ImportError:
                self._tqdm = None
        self.blocks = self._tqdm(total=total_blocks, desc="blocks", unit="block", position=0) if self._tqdm else None
        self.layers = None
        self._layer = ""

    def start_layers(self, total: int, name: str) -> None:
        if self._tqdm:
            self.layers = self._tqdm(total=total, desc=name, unit="layer", position=1, leave=False)

    def layer_started(self, name: str) -> None:
        self._layer = name
        if self.layers is not None:
            self.layers.set_postfix_str(name)

    def message(self, text: str) -> None:
        if self.layers is not None and text:
            self.layers.set_postfix_str(f"{self._layer}: {text[:60]}")

    def layer_done(self) -> None:
        if self.layers is not None:
            self.layers.update(1)

    def block_done(self) -> None:
        if self.layers is not None:
            self.layers.close()
            self.layers = None
        if self.blocks is not None:
            self.blocks.update(1)

    def close(self) -> None:
        if self.layers is not None:
            self.layers.close()
        if self.blocks is not None:
            self.blocks.close()


# ------------------------------------------------------------------ Hessians
class _HessianHooks:
    """Forward pre-hooks that accumulate each layer's input Hessian; layers reading one tensor share it."""

    def __init__(self, layers: Sequence[LinearLayer], device: torch.device, dtype: torch.dtype = torch.float32):
        self.device = device
        self.dtype = dtype
        self.accumulators: Dict[str, HessianAccumulator] = {}
        self._leader: Dict[str, str] = {}
        self._inputs_this_call: Dict[int, tuple] = {}
        self._handles = [layer.module.register_forward_pre_hook(self._hook_for(layer)) for layer in layers]

    def _hook_for(self, layer: LinearLayer) -> Callable:
        def hook(_module, args):
            x = args[0]
            seen = self._inputs_this_call.get(id(x))
            if seen is not None:
                leader = seen[1]
                if self._leader.setdefault(layer.name, leader) != leader:
                    raise RuntimeError(f"{layer.name}: its input changed which layer it shares between batches")
                self.accumulators.setdefault(layer.name, self.accumulators[leader])
                return
            if self._leader.get(layer.name, layer.name) != layer.name:
                raise RuntimeError(f"{layer.name}: its input changed which layer it shares between batches")
            self._leader[layer.name] = layer.name
            acc = self.accumulators.get(layer.name)
            if acc is None:
                acc = self.accumulators[layer.name] = HessianAccumulator(layer.in_features, device=self.device, dtype=self.dtype)
            try:
                acc.add(x, name=f"the calibration inputs of `{layer.name}`")
            except NonFiniteError as exc:
                raise UsageError(
                    f"{exc} (a weight of an earlier module that is not a pruned linear layer, e.g. a norm or an "
                    "embedding, may hold NaN/Inf too)"
                ) from exc
            # Hold x until the block call ends, so its id cannot be reused by another tensor.
            self._inputs_this_call[id(x)] = (x, layer.name)

        return hook

    def end_call(self) -> None:
        self._inputs_this_call.clear()

    def shared_with(self) -> Dict[str, str]:
        """Each layer seen called → the layer whose accumulator it uses (itself, or e.g. q_proj for k_proj)."""
        return dict(self._leader)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._inputs_this_call.clear()


# ------------------------------------------------------------------ checks before work
def check_recipe_fits(layers: Sequence[LinearLayer], recipe: Recipe) -> Dict[str, LayerPlan]:
    """Every layer's plan, after checking that its pattern divides its shape (on a meta tensor).

    Raises:
        UsageError: naming the first layer whose shape the pattern cannot divide,
            or whose scopes have too many subsets for its method.
    """
    plans = {}
    for layer in layers:
        plan = recipe.plan_for(layer.name)
        plans[layer.name] = plan
        if plan.skipped or plan.pattern.is_dense:
            continue
        M, K = layer.shape
        try:
            scope, nnz = plan.pattern.build(torch.empty(M, K, device="meta"))
        except (_S3Error, ValueError, TypeError) as exc:
            raise UsageError(f"layer {layer.name} (weight {M}x{K}): pattern {plan.pattern} cannot be applied: {exc}")
        plan.method.check_subset_count(scope.numblk_per_scope(), nnz, f"layer {layer.name} (weight {M}x{K}), pattern {plan.pattern}")
    return plans


def check_weights_finite(layers: Sequence[LinearLayer], plans: Mapping[str, LayerPlan]) -> None:
    """Every layer to be pruned has a finite weight (one ``isfinite`` reduction each).

    Raises:
        UsageError: naming the first layer whose weight holds NaN/Inf, the first
            bad index and what to do; nothing has been touched.
    """
    for layer in layers:
        plan = plans[layer.name]
        if plan.skipped or plan.pattern.is_dense:
            continue
        try:
            check_finite(layer.module.weight, f"the weight of `{layer.name}`")
        except NonFiniteError as exc:
            raise UsageError(str(exc)) from exc


def check_model_fits(model: nn.Module, recipe: Recipe) -> Dict[str, LayerPlan]:
    """:func:`check_recipe_fits` on every linear layer of the model's blocks (cheap: no data, no copies)."""
    blocks_name, blocks = find_blocks(model)
    layers = [layer for i, block in enumerate(blocks) for layer in linear_layers(block, f"{blocks_name}.{i}")]
    return check_recipe_fits(layers, recipe)


# ------------------------------------------------------------------ one layer
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unusable_hessian(hessian: Tensor, dtype: torch.dtype) -> Optional[str]:
    """Why no method can use the layer's Hessian ``H`` (the fallback's reason), or None.

    The inputs were checked finite as they were added, so a non-finite H is a sum
    that overflowed (``dtype``: the one it was accumulated in); an all-zero H means every calibration input of the
    layer was zero. Neither is the user's argument: the layer falls back to magnitude.
    """
    if not bool(torch.isfinite(hessian).all()):
        hint = "; accumulate it in float64 (hessian_dtype=torch.float64, --hessian-dtype float64)" if dtype != torch.float64 else ""
        return f"the layer's Hessian overflowed float32 (its inputs were finite, but their squares summed too large){hint}"
    if float(hessian.abs().amax()) == 0.0:
        return "every calibration input of this layer was zero (H = 0): nothing to weigh its weights by"
    return None


@torch.no_grad()
def _prune_layer(
    layer: LinearLayer,
    plan: LayerPlan,
    accumulator: Optional[HessianAccumulator],
    progress_fn: Optional[Callable[[str], None]],
    ranks: Ranks = Ranks(),
) -> LayerReport:
    M, K = layer.shape
    record = LayerReport(layer.name, (M, K), plan.pattern.name, plan.method.name)
    if plan.skipped or plan.pattern.is_dense:
        record.status = "skipped" if plan.skipped else "dense"
    elif accumulator is None or accumulator.num_samples == 0:
        record.status = "not-called"
    if record.status != "pruned":
        weight = layer.module.weight
        record.sparsity = float((weight == 0).sum()) / weight.numel()
        return record

    # Three stretches, each ending in a sync point when several ranks prune together
    # (the pruning itself syncs inside the pruner when it splits rows), so that an
    # error on one rank -- running out of memory, say -- is raised on all of them.
    with ranks.sync(f"preparing {layer.name}"):
        # fp32 for the pruners, whichever dtype it was accumulated (and summed over ranks) in.
        hessian = accumulator.hessian.to(torch.float32)
        record.tokens = accumulator.num_samples
        record.dead_inputs = int((torch.diagonal(hessian) == 0).sum())
        record.rank_deficient = record.dead_inputs > 0 or record.tokens < K
        weight = layer.matrix()
        original = weight.detach().clone()
        scope, nnz = plan.pattern.build(weight)
    _synchronize(weight.device)
    start = time.perf_counter()
    # H is the same on every rank (summed over them), so is this verdict.
    record.fallback = _unusable_hessian(hessian, accumulator.dtype) if plan.method.uses_hessian else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if record.fallback is not None:
                pass  # the method cannot use this H: straight to magnitude, below
            elif ranks.distributed and plan.method.shards_rows:
                # Each rank prunes its rows; every rank gets them all (and any rank's error).
                plan.method.run(scope, nnz, hessian, progress_fn, process_group=ranks.group)
            else:
                with ranks.sync(f"pruning {layer.name}"):
                    plan.method.run(scope, nnz, hessian, progress_fn)
                ranks.broadcast_(weight.data)  # every rank computed it: keep rank 0's, so no rank drifts
        except _NUMERIC_FAILURES as exc:
            # Raised on every rank alike. The pruners write the weight only on success;
            # restore anyway, then keep the pattern by magnitude (the same on every rank).
            record.fallback = f"{type(exc).__name__}: {exc}"
        except _S3Error as exc:
            # An argument the pruner refused (raised on every rank alike): stop the run, naming
            # the layer. The pruners write the weight only on success, so it is as it was.
            raise UsageError(
                f"layer {layer.name} (weight {M}x{K}, method {plan.method.name}, pattern {plan.pattern}): {exc}"
            ) from exc
        with ranks.sync(f"checking {layer.name}"):
            if record.fallback is not None:
                weight.data.copy_(original)
                scope, nnz = plan.pattern.build(weight)
                prune_magnitude(scope, nnz)
            _synchronize(weight.device)
            record.seconds = time.perf_counter() - start
            messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
            record.warnings = messages
            record.fp32_redos = count_redone_rows(messages)
            record.damping_raised = any("damping" in m.lower() for m in messages)
            try:
                record.error = output_error(weight.detach(), original, hessian)
            except ValueError:  # tr(W H Wᵀ) = 0: a layer whose inputs or weights are all zero
                record.error = None
            record.sparsity = float((weight == 0).sum()) / weight.numel()
            record.pattern_holds = plan.pattern.holds(weight)
            layer.commit()
    return record


# ------------------------------------------------------------------ the model
def _error_sums(pruned: Sequence[Tensor], dense: Sequence[Tensor]) -> tuple:
    """``(Σ‖pruned − dense‖², Σ‖dense‖²)``: the block's relative output error is sqrt of their ratio."""
    num = sum(float((p.float() - d.float()).pow(2).sum()) for p, d in zip(pruned, dense))
    den = sum(float(d.float().pow(2).sum()) for d in dense)
    return num, den


def _as_calibration(calibration: Union[CalibrationSet, Tensor]) -> CalibrationSet:
    if isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, Tensor) and calibration.dim() == 2 and not calibration.is_floating_point():
        return CalibrationSet(calibration.long())
    raise UsageError(
        "calibration must be a CalibrationSet (s3sparse.llm.load_calibration) or an (n_samples, seq_len) tensor of token ids"
    )


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_run_options(hessian_dtype: torch.dtype, batch_size: int) -> None:
    """Refuse a Hessian dtype other than fp32/fp64 and a batch size below 1."""
    if hessian_dtype not in (torch.float32, torch.float64):
        raise UsageError(f"hessian_dtype must be torch.float32 or torch.float64, got {hessian_dtype!r}")
    if int(batch_size) < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")


def _run_device(model: nn.Module, device: Union[str, torch.device, None]) -> torch.device:
    """Where blocks run: ``device``, else where the model is; a bare ``cuda`` is the current CUDA device."""
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _checked_plans(block_layers: Sequence[Sequence[LinearLayer]], recipe: Recipe) -> Dict[str, LayerPlan]:
    """Every layer's plan, once the patterns fit every shape and every weight to prune is finite."""
    plans = check_recipe_fits([layer for layers in block_layers for layer in layers], recipe)
    check_weights_finite([layer for layers in block_layers for layer in layers], plans)
    return plans


@dataclass
class _BlockRun:
    """What pruning each block needs from :func:`prune_model`'s arguments, and where it reports."""

    ranks: Ranks
    device: torch.device  # where blocks run and are pruned
    home: torch.device  # where blocks live between their turns (the CPU with offload)
    offload: bool
    hessian_dtype: torch.dtype
    block_error: bool
    blocks_name: str
    plans: Dict[str, LayerPlan]
    report: PruneReport
    bar: _Progress


def _capture_first_inputs(
    model: nn.Module, blocks: nn.ModuleList, calibration: CalibrationSet, batch_size: int, run: _BlockRun
) -> Tuple[List[Tensor], List[BlockCall], Any]:
    """Run this rank's calibration windows up to the first block: its inputs, the calls, per-block arguments."""
    with run.ranks.sync("capturing the first block's inputs"):
        if run.offload:
            blocks.to("cpu")
            move_outside_blocks(model, blocks, run.device)
        else:
            model.to(run.device)
        # This rank's share of the windows (all of them alone).
        windows = calibration.input_ids[run.ranks.share(calibration.n_samples)]
        batches = list(windows.split(int(batch_size))) if windows.shape[0] else []
        calls = capture_block_inputs(model, blocks, batches, run.device)
        own_arguments = per_block_arguments(model, blocks, batches, run.device)
        if run.offload:
            move_outside_blocks(model, blocks, run.home)
    hidden = [call.hidden for call in calls]
    for call in calls:
        call.hidden = None  # the caller's `hidden` holds the only reference
    return hidden, calls, own_arguments


def _block_hessians(
    run: _BlockRun, block: nn.Module, block_calls: Sequence[BlockCall], to_prune: Sequence[LinearLayer], label: str
) -> Tuple[_HessianHooks, List[Tensor]]:
    """Run the dense block with Hessian hooks: the hooks (Hessians summed over ranks) and the dense outputs."""
    dense_out: List[Tensor] = []
    with run.ranks.sync(f"running {label} on its calibration windows") as sync:
        if run.offload:
            block.to(run.device)
        hooks = _HessianHooks(to_prune, run.device, run.hessian_dtype)
        try:
            for call in block_calls:
                out = run_block(block, call, call.hidden)
                hooks.end_call()
                if run.block_error:
                    dense_out.append(out)
        finally:
            hooks.remove()
        sync.payload = hooks.shared_with()
    run.ranks.sum_hessians(hooks.accumulators, sync.results, {layer.name: layer.in_features for layer in to_prune},
                           run.device, run.hessian_dtype)
    return hooks, dense_out


def _prune_block(
    run: _BlockRun,
    index: int,
    block: nn.Module,
    layers: Sequence[LinearLayer],
    hidden: List[Tensor],
    arguments: Sequence[Any],
) -> List[Tensor]:
    """Prune one block's layers on its inputs ``hidden``; the pruned block's outputs (the next block's inputs)."""
    block_start = time.perf_counter()
    label = f"{run.blocks_name}.{index}"
    block_calls = [BlockCall(states, a.args, a.kwargs, a.hidden_key) for states, a in zip(hidden, arguments)]
    run.bar.start_layers(len(layers), label)

    plans = run.plans
    to_prune = [layer for layer in layers if not (plans[layer.name].skipped or plans[layer.name].pattern.is_dense)]
    hooks, dense_out = _block_hessians(run, block, block_calls, to_prune, label)
    for layer in layers:
        run.bar.layer_started(layer.name[len(run.blocks_name) + len(str(index)) + 2 :])
        record = _prune_layer(layer, plans[layer.name], hooks.accumulators.get(layer.name), run.bar.message, run.ranks)
        run.report.layers.append(record)
        run.bar.layer_done()
    del hooks

    with run.ranks.sync(f"running the pruned {label}") as sync:
        hidden = [run_block(block, call, call.hidden) for call in block_calls]
        sync.payload = _error_sums(hidden, dense_out) if run.block_error else (0.0, 0.0)
    num, den = sum_over_ranks(sync.results)
    error = math.sqrt(num / den) if run.block_error and den > 0 else None
    del dense_out
    if run.offload:
        block.to(run.home)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    _synchronize(run.device)
    run.report.blocks.append(BlockReport(index, label, time.perf_counter() - block_start, error))
    run.bar.block_done()
    return hidden


def _finish_report(report: PruneReport, model: nn.Module, started: float) -> None:
    """The whole model's parameter and zero counts, and the run's wall time."""
    report.model_parameters = sum(p.numel() for p in model.parameters())
    report.model_zeros = int(sum(int((p == 0).sum()) for p in model.parameters()))
    report.seconds = time.perf_counter() - started


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: Union[CalibrationSet, Tensor],
    pattern: Union[str, PatternChoice] = "2:4",
    method: Union[str, MethodChoice] = "sparsegpt",
    *,
    method_options: Optional[Mapping[str, Any]] = None,
    overrides: Union[None, Sequence[Any], Mapping[str, Any]] = None,
    skip: Sequence[str] = ("lm_head",),
    recipe: Optional[Recipe] = None,
    device: Union[str, torch.device, None] = None,
    offload: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    block_error: bool = True,
    hessian_dtype: torch.dtype = torch.float64,
    process_group: Any = "auto",
) -> PruneReport:
    """Prune every linear layer of the model's transformer blocks, block by block, in place.

    Args:
        model: a Hugging Face model (``AutoModelForCausalLM``, ``AutoModel``, …)
            or any module holding its blocks in an ``nn.ModuleList`` and taking
            ``input_ids`` / ``attention_mask``.
        calibration: a :class:`~s3sparse.llm.CalibrationSet` or an
            ``(n_samples, seq_len)`` tensor of token ids.
        pattern: default pattern name (see :func:`s3sparse.patterns.parse_pattern`).
        method: default method name (see :mod:`s3sparse.llm.method_registry`).
        method_options: options of the default method (e.g. ``{"ng": 32}``).
        overrides: per-layer settings by module-name glob (see :mod:`s3sparse.llm.recipe`).
        skip: module-name globs left dense.
        recipe: a ready :class:`~s3sparse.llm.Recipe` (replaces the five arguments above).
        device: where blocks run and are pruned (default: where the model is).
        offload: keep the model on the CPU and move only the block being pruned
            (and, while the inputs are captured, the embeddings) to ``device``.
        batch_size: calibration windows per forward pass.
        progress: tqdm progress bars on stderr.
        block_error: also measure each block's output error against the dense block
            (keeps the dense outputs of one block: one more copy of the activations).
        hessian_dtype: ``torch.float64`` (default) or ``torch.float32``: the dtype
            the Hessians ``Σ xᵀx`` are accumulated (and summed over ranks) in; the
            pruners get H rounded to fp32 either way. fp64 makes that fp32 H
            independent of the order of the sums -- how the windows were batched or
            split over ranks -- so 1 and N ranks (and any ``batch_size``) give the
            same masks and weights; fp32 halves the memory of the accumulators and is
            faster on GPUs with slow fp64 arithmetic, but then the result depends on
            the number of ranks through the fp32 round-off of the sums (a few mask
            entries of near-tied weights may flip). With fp64 on CUDA, 16-bit
            activations take the tensor cores one window at a time (fp32 within a
            window, fp64 across windows: the promise above holds).
        process_group: prune on several processes (see :mod:`s3sparse.llm.distributed`):
            ``'auto'`` (default) uses the default torch.distributed group when it is
            initialised with more than one rank, ``None`` prunes in this process
            alone, a ProcessGroup uses that group. Every rank of the group calls
            ``prune_model`` with the same model and arguments; each runs its share
            of the calibration windows, the Hessians are all-reduced, each layer's
            rows are split over the ranks (SparseGPT, True OBS), and every rank
            ends with the whole pruned model. Progress bars on rank 0 only. With
            CUDA, set each rank's device first (``torch.cuda.set_device``).

    Returns:
        a :class:`~s3sparse.llm.PruneReport` (the same on every rank, but for
        timings). The model is left on ``device`` (on the CPU with ``offload``),
        in the train/eval mode it had.

    Raises:
        UsageError: unknown names, a pattern that cannot divide a layer, bad
            calibration, a weight or a layer's calibration inputs holding NaN/Inf,
            or any other S3Error a pruner raises about a layer's arguments (the
            message names the layer). A method failing numerically on a layer
            does not raise: the layer falls back to magnitude pruning, and the
            report records and counts it (``LayerReport.fallback``,
            ``PruneReport.fallback_count``).
        With a process group, an error on any rank is raised on every rank.
    """
    started = time.perf_counter()
    ranks = Ranks.resolve(process_group)
    if recipe is None:
        recipe = Recipe.create(pattern, method, method_options, overrides, skip)
    calibration = _as_calibration(calibration)
    _check_run_options(hessian_dtype, batch_size)
    device = _run_device(model, device)
    blocks_name, blocks = find_blocks(model)
    block_layers = [linear_layers(block, f"{blocks_name}.{i}") for i, block in enumerate(blocks)]
    plans = _checked_plans(block_layers, recipe)
    report = PruneReport(recipe=recipe.to_dict(), calibration=calibration.describe(), device=str(device),
                         offload=bool(offload), world_size=ranks.world_size)
    run = _BlockRun(ranks, device, torch.device("cpu") if offload else device, offload, hessian_dtype, block_error,
                    blocks_name, plans, report, _Progress(progress and ranks.is_main, len(blocks)))
    try:
        with _eval_mode(model):
            hidden, calls, own_arguments = _capture_first_inputs(model, blocks, calibration, batch_size, run)
            for index, block in enumerate(blocks):
                arguments = own_arguments[index] if own_arguments else calls
                # `hidden` holds the only reference to a block's inputs: freed as blocks advance.
                hidden = _prune_block(run, index, block, block_layers[index], hidden, arguments)
    finally:
        run.bar.close()
    _finish_report(report, model, started)
    return report
