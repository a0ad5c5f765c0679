"""What a pruning run did: per-layer and per-block records, the table, the sparsity report.

:class:`PruneReport` is returned by :func:`s3sparse.llm.prune_model`, printed by
the CLI (:meth:`PruneReport.layer_table`, :meth:`PruneReport.sparsity_report`)
and saved next to the pruned model as JSON (:meth:`PruneReport.to_dict`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["LayerReport", "BlockReport", "PruneReport", "count_redone_rows", "format_table"]

_REDONE = re.compile(r"(\d+)\s+of\s+\d+\s+rows\b.*\bredone", re.IGNORECASE | re.DOTALL)


def count_redone_rows(messages: Sequence[str]) -> int:
    """Rows the pruners report as redone in fp32 (from their RuntimeWarnings' text).

    ``"prune_true_obs: 12 of 256 rows hit a non-positive-definite sub-problem and
    were redone …"`` counts 12; a message that says "redone" without a number counts 1.
    """
    total = 0
    for message in messages:
        if "redone" not in message.lower():
            continue
        match = _REDONE.search(message)
        total += int(match[1]) if match else 1
    return total


@dataclass
class LayerReport:
    """One linear layer.

    ``status`` is ``pruned``, ``dense`` (pattern ``dense``), ``skipped`` (skip
    list) or ``not-called`` (the layer saw no calibration input and was left
    alone). ``error`` is the relative output error
    ``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` on the calibration inputs; ``fp32_redos``
    the rows the pruner redid in fp32 (True OBS), ``damping_raised`` whether a
    Hessian needed more damping to be positive definite; ``dead_inputs`` the input
    features that were always zero; ``rank_deficient`` that H could not have
    full rank (fewer calibration tokens than inputs, or dead inputs);
    ``fallback`` why the layer was pruned by magnitude instead (the method failed
    numerically, or its Hessian was all zeros or overflowed), ``None`` normally.
    """

    name: str
    shape: Tuple[int, int]
    pattern: str
    method: str
    status: str = "pruned"
    error: Optional[float] = None
    seconds: float = 0.0
    fp32_redos: int = 0
    damping_raised: bool = False
    dead_inputs: int = 0
    rank_deficient: bool = False
    tokens: int = 0
    sparsity: float = 0.0
    pattern_holds: Optional[bool] = None
    fallback: Optional[str] = None
    warnings: List[str] = field(default_factory=list)

    def notes(self) -> str:
        """Short remarks for the table."""
        parts = []
        if self.status != "pruned":
            parts.append(self.status)
        if self.fallback:
            parts.append("magnitude fallback")
        if self.damping_raised:
            parts.append("damping raised")
        if self.dead_inputs:
            parts.append(f"{self.dead_inputs} dead inputs")
        elif self.rank_deficient:
            parts.append("rank-deficient H")
        if self.pattern_holds is False:
            parts.append("PATTERN VIOLATED")
        return ", ".join(parts)


@dataclass
class BlockReport:
    """One transformer block: its relative output error against the dense block on the same inputs."""

    index: int
    name: str
    seconds: float
    output_error: Optional[float] = None


@dataclass
class PruneReport:
    """The whole run. ``world_size``: the processes that pruned the model together
    (1 alone; ``device`` is then rank 0's, and the timings are rank 0's)."""

    layers: List[LayerReport] = field(default_factory=list)
    blocks: List[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    recipe: Dict[str, Any] = field(default_factory=dict)
    calibration: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    offload: bool = False
    model_parameters: int = 0
    model_zeros: int = 0
    world_size: int = 1

    # ------------------------------------------------------------ summaries
    def pruned_layers(self) -> List[LayerReport]:
        """The layers with status ``pruned`` (by their method or by the magnitude fallback)."""
        return [layer for layer in self.layers if layer.status == "pruned"]

    def fallback_layers(self) -> List[LayerReport]:
        """The layers pruned by magnitude because their method failed numerically."""
        return [layer for layer in self.layers if layer.fallback]

    @property
    def fallback_count(self) -> int:
        """How many layers fell back to magnitude pruning."""
        return len(self.fallback_layers())

    def sparsity_summary(self) -> Dict[str, Any]:
        """Zeros among the pruned layers' weights and among all model parameters."""
        pruned = self.pruned_layers()
        weights = sum(layer.shape[0] * layer.shape[1] for layer in pruned)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in pruned)
        by_pattern: Dict[str, Dict[str, float]] = {}
        for layer in pruned:
            entry = by_pattern.setdefault(layer.pattern, {"layers": 0, "weights": 0, "zeros": 0.0})
            entry["layers"] += 1
            entry["weights"] += layer.shape[0] * layer.shape[1]
            entry["zeros"] += layer.sparsity * layer.shape[0] * layer.shape[1]
        return {
            "pruned_layers": len(pruned),
            "untouched_layers": len(self.layers) - len(pruned),
            "pruned_layer_weights": weights,
            "pruned_layer_sparsity": zeros / weights if weights else 0.0,
            "model_parameters": self.model_parameters,
            "model_sparsity": self.model_zeros / self.model_parameters if self.model_parameters else 0.0,
            "by_pattern": {
                name: {"layers": e["layers"], "weights": e["weights"], "sparsity": e["zeros"] / e["weights"]}
                for name, e in by_pattern.items()
            },
            "fp32_redos": sum(layer.fp32_redos for layer in self.layers),
            "fallbacks": [layer.name for layer in self.fallback_layers()],
            "fallback_count": self.fallback_count,
            "pattern_violations": [layer.name for layer in self.layers if layer.pattern_holds is False],
        }

    def mean_error(self) -> Optional[float]:
        errors = [layer.error for layer in self.pruned_layers() if layer.error is not None and math.isfinite(layer.error)]
        return sum(errors) / len(errors) if errors else None

    # ------------------------------------------------------------ text
    def layer_table(self) -> str:
        """The per-layer table: layer, shape, pattern, method, output error, seconds, fp32 redos, sparsity, notes."""
        rows = [
            [
                layer.name,
                f"{layer.shape[0]}x{layer.shape[1]}",
                layer.pattern if layer.status == "pruned" else "-",
                layer.method if layer.status == "pruned" else "-",
                "-" if layer.error is None else f"{layer.error:.4f}",
                f"{layer.seconds:.2f}",
                str(layer.fp32_redos),
                f"{layer.sparsity:.1%}",
                layer.notes(),
            ]
            for layer in self.layers
        ]
        header = ["layer", "shape", "pattern", "method", "out err", "sec", "fp32 redos", "sparsity", "notes"]
        return format_table(header, rows, right={1, 4, 5, 6, 7})

    def block_table(self) -> str:
        """Per block: seconds and relative output error against the dense block."""
        rows = [
            [b.name, f"{b.seconds:.2f}", "-" if b.output_error is None else f"{b.output_error:.4f}"]
            for b in self.blocks
        ]
        return format_table(["block", "sec", "block out err"], rows, right={1, 2})

    def sparsity_report(self) -> str:
        """A few lines: sparsity of the pruned layers (per pattern) and of the whole model, fallbacks, redos."""
        s = self.sparsity_summary()
        fell_back = s["fallback_count"]
        lines = [
            f"pruned {s['pruned_layers']} linear layers ({s['untouched_layers']} left dense, "
            f"{fell_back} by magnitude after their method failed): "
            f"{s['pruned_layer_sparsity']:.2%} of their {s['pruned_layer_weights']:,} weights are zero",
        ]
        for name, e in s["by_pattern"].items():
            lines.append(f"  {name}: {e['layers']} layers, {e['weights']:,} weights, {e['sparsity']:.2%} zero")
        lines.append(f"whole model: {s['model_sparsity']:.2%} of {s['model_parameters']:,} parameters are zero")
        mean = self.mean_error()
        if mean is not None:
            lines.append(f"mean relative output error of the pruned layers: {mean:.4f}")
        if s["fp32_redos"]:
            lines.append(f"rows redone in fp32: {s['fp32_redos']}")
        if s["fallbacks"]:
            lines.append(f"{fell_back} layers pruned by magnitude after the method failed: {', '.join(s['fallbacks'])}")
        if s["pattern_violations"]:
            lines.append(f"PATTERN VIOLATED in: {', '.join(s['pattern_violations'])}")
        lines.append(f"total time: {self.seconds:.1f} s")
        return "\n".join(lines)

    # ------------------------------------------------------------ data
    def to_dict(self) -> Dict[str, Any]:
        """Plain data (JSON-serialisable).

        ``fallbacks`` counts the layers pruned by magnitude after their method
        failed and gives each one's reason (also in its ``layers`` entry).
        """
        return {
            "recipe": self.recipe,
            "calibration": self.calibration,
            "device": self.device,
            "offload": self.offload,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 3),
            "sparsity": self.sparsity_summary(),
            "fallbacks": {
                "count": self.fallback_count,
                "layers": {layer.name: layer.fallback for layer in self.fallback_layers()},
            },
            "layers": [{**asdict(layer), "shape": list(layer.shape)} for layer in self.layers],
            "blocks": [asdict(block) for block in self.blocks],
        }


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set = frozenset()) -> str:
    """A plain-text table with aligned columns (columns in ``right`` right-aligned)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells):
        return "  ".join(
            (cell.rjust(w) if i in right else cell.ljust(w)) for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
