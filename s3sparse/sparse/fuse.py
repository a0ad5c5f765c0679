"""Sibling projections that read the same input, run as one layer: ``fuse_siblings(model)``.

An attention block computes ``q_proj(h)``, ``k_proj(h)`` and ``v_proj(h)`` from one ``h``, an MLP
``gate_proj(x)`` and ``up_proj(x)`` from one ``x``. At decode (a few tokens) each is a weight-bound
call with a fixed cost of its own (a kernel launch, its ramp-up and tail), and on small models those
fixed costs are a large part of a step: serving engines stack such siblings' weights into one layer
(vLLM's QKV and gate-up layers). :func:`fuse_siblings` does the same to a loaded model, dense or packed,
without touching the model's code: the siblings' weights (rows) are stacked into one layer
(``nn.Linear``, or a ``PackedLinear`` re-packed from the stacked pruned rows in the same pattern),
registered once on the parent module, and each sibling becomes a :class:`SiblingSlice` that returns its
columns of the stacked layer's output. The first sibling called with an input runs the stacked layer
and keeps its output until every sibling has taken its part of it; a sibling called with another
input, a second time, in another grad mode, or (eager, not inference tensors) with the same tensor
changed in place runs the stacked layer again, so any call order gives the same numbers as before,
only the sharing is lost. Not detected: an input changed in place between two siblings' calls inside
one compiled graph, or an inference-mode tensor changed in place between them. Cross-attention
modules are left alone (their key and value read the encoder's states, not the query's input).
A sibling's ``weight`` and ``bias`` are its rows of the stacked ones.

Measured on an H200 (random Qwen3-0.6B shape, 2:4, decode step compiled and replayed in a CUDA graph,
``benchmarks/packed_model.py --fuse --compile``): dense 2.377 ms, packed 1.876 (1.27x), dense fused
1.954 (1.22x), packed fused 1.605 ms (1.48x the dense model's tokens/s). ``load_packed(..., fuse=True)``
calls this after loading.

For inference: the fused model's ``state_dict`` has the stacked layers' keys, not the siblings'; save
(``s3sparse pack``, ``save_pretrained``) before fusing, and fuse after loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from s3sparse.errors import ArgumentError, ArgumentTypeError
from s3sparse.sparse.linear import PackedLinear
from s3sparse.sparse.packed import PackedWeight

# Names of sibling projections of one parent module that read the same input (Llama / Qwen / Mistral
# attention and MLP, BERT self-attention).
DEFAULT_GROUPS: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


class StackedSiblings(nn.Module):
    """The stacked layer of a group of siblings and the output it last computed, shared by their slices.

    ``layer`` is the stacked ``nn.Linear`` / ``PackedLinear``; ``bounds[i]`` the output columns of
    sibling ``i``. :meth:`part` serves sibling ``i``'s columns for an input, running ``layer`` once per
    input for all siblings.
    """

    def __init__(self, layer: nn.Module, names: Sequence[str], widths: Sequence[int]) -> None:
        super().__init__()
        self.layer = layer
        self.names = list(names)
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self.bounds = [(s, s + w) for s, w in zip(starts, widths)]
        # The last input, its key (_key), the stacked output, and the bit mask of the siblings served from it.
        self._last: Optional[tuple] = None

    @staticmethod
    def _key(x: Tensor) -> tuple:
        """What must match besides the input's identity for an output to be reused: the grad mode, whether
        this is a compiled trace (an eager entry never serves a trace, nor the reverse), and in eager the
        input's version (an in-place change recomputes; inference tensors have none: not detected there,
        nor inside one compiled graph)."""
        compiling = torch.compiler.is_compiling()
        version = None if compiling or x.is_inference() else x._version
        return torch.is_grad_enabled(), compiling, version

    def part(self, index: int, x: Tensor) -> Tensor:
        """Sibling ``index``'s columns of the stacked output for ``x``: reused when ``x`` is the input of the
        kept output, unchanged, and this sibling has not had its part of it yet; else the stacked layer
        runs again."""
        last, key, bit = self._last, self._key(x), 1 << index
        if last is None or last[0] is not x or last[1] != key or last[3] & bit:
            last = (x, key, self.layer(x), 0)
        served = last[3] | bit
        # Dropped once every sibling has had its part (nothing kept between steps).
        self._last = None if served == (1 << len(self.bounds)) - 1 else (last[0], last[1], last[2], served)
        start, end = self.bounds[index]
        return last[2][..., start:end]

    def forward(self, x: Tensor) -> Tensor:
        """The stacked output (every sibling's columns side by side)."""
        return self.layer(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={b[1] - b[0]}" for n, b in zip(self.names, self.bounds))


class SiblingSlice(nn.Module):
    """One sibling after :func:`fuse_siblings`: its columns of the stacked layer's output.

    Holds the :class:`StackedSiblings` without registering it (the parent module owns it, so its weights
    are in the ``state_dict`` once).
    """

    def __init__(self, stacked: StackedSiblings, index: int, in_features: int) -> None:
        super().__init__()
        self.__dict__["_stacked"] = stacked
        self.index = index
        self.in_features = in_features
        self.out_features = stacked.bounds[index][1] - stacked.bounds[index][0]

    def forward(self, x: Tensor) -> Tensor:
        return self._stacked.part(self.index, x)

    @property
    def weight(self) -> Tensor:
        """This sibling's rows of the stacked weight (decoded, for a packed one: for checks, not speed)."""
        start, end = self._stacked.bounds[self.index]
        return self._stacked.layer.weight[start:end]

    @property
    def bias(self) -> Optional[Tensor]:
        b = self._stacked.layer.bias
        start, end = self._stacked.bounds[self.index]
        return None if b is None else b[start:end]

    def extra_repr(self) -> str:
        return f"{self._stacked.names[self.index]} of the stacked layer, out_features={self.out_features}"


@dataclass
class FuseReport:
    """What :func:`fuse_siblings` did: the groups stacked (``parent.name`` of each, and the new module's
    name) and the groups found but left alone, with the reason."""

    fused: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"stacked {len(self.fused)} groups of sibling projections"]
        lines += [f"  skipped {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


# Attention modules whose key and value read another input than the query (the encoder's states): stacking
# would run all three for the query's input and again for the other.
CROSS_ATTENTION_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention")


def _why_not(parent_name: str, parent: nn.Module, names: Sequence[str], mods: Sequence[nn.Module]) -> Optional[str]:
    """Why these siblings of ``parent`` cannot be stacked (None: they can)."""
    if getattr(parent, "is_cross_attention", False) is True or any(
            part in CROSS_ATTENTION_NAMES for part in parent_name.split(".")):
        return "cross-attention (its siblings read different inputs)"
    if _stacked_name(names) in parent._modules:
        return f"the parent already has a child named {_stacked_name(names)!r}"
    kinds = {type(m) for m in mods}
    if len(kinds) != 1 or not kinds <= {nn.Linear, PackedLinear}:
        return f"not all nn.Linear or all PackedLinear ({', '.join(sorted(k.__name__ for k in kinds))})"
    if len({m.in_features for m in mods}) != 1:
        return "their in_features differ"
    stored = [m.weight if isinstance(m, nn.Linear) else m.values for m in mods]
    if len({(w.dtype, w.device) for w in stored}) != 1:
        return "their dtypes or devices differ"
    if len({m.bias is None for m in mods}) != 1:
        return "some have a bias and some not"
    if isinstance(mods[0], PackedLinear):
        patterns = {(m.pattern or {}).get("registry_name") for m in mods}
        if len(patterns) != 1 or None in patterns:
            return "packed in different or unnamed patterns (fusing re-packs by pattern name)"
    return None


def _stacked_name(names: Sequence[str]) -> str:
    return "fused_" + "_".join(names)


def _copy_paths(src: PackedLinear, dst: PackedLinear) -> None:
    """The first sibling's choices of path (sp24 limit, dense cache, semi-structured) on the stacked layer."""
    if dst._sp24_max_tokens != src._sp24_max_tokens:
        dst.use_sp24(src._sp24_max_tokens or None)
    if src._dense_min_tokens is not None:
        dst.use_dense_cache(src._dense_min_tokens)
    if src._semi_min_tokens is not None:
        dst.use_semi_structured(src._semi_min_tokens)


@torch.no_grad()
def _stack(mods: Sequence[nn.Module]) -> nn.Module:
    weight = torch.cat([m.weight.detach() for m in mods])
    bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
    if isinstance(mods[0], PackedLinear):
        pattern = mods[0].pattern["registry_name"]
        try:
            layer = PackedLinear(PackedWeight.from_pattern(weight, pattern), None if bias is None else bias.clone())
        except ArgumentError as exc:  # (SpecError too) e.g. a column pattern: each sibling keeps its own columns
            raise ValueError(f"the stacked rows are not one {pattern} weight ({str(exc).splitlines()[0]})") from None
        if not torch.equal(layer.weight, weight):  # a pattern whose scopes straddle the siblings' seams
            raise ValueError(f"the stacked weight is not {pattern} at the seams between siblings")
        _copy_paths(mods[0], layer)
        return layer
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def fuse_siblings(model: nn.Module, groups: Optional[Iterable[Sequence[str]]] = None) -> FuseReport:
    """Stack sibling projections that read the same input into one layer each, in place; see the module doc.

    Args:
        model: a loaded model (dense, packed by ``s3sparse pack`` / ``pack_model``, or mixed); modified in place.
        groups: names of the children of one module to stack, each a sequence of two or more (default
            :data:`DEFAULT_GROUPS`: q/k/v and gate/up projections, BERT's query/key/value). A group is
            stacked only where a module has all of its children, all ``nn.Linear`` or all ``PackedLinear``
            of the same pattern, dtype, device and input width, each with a bias or none.

    Returns a :class:`FuseReport`. Outputs equal the unfused model's (the stacked layer's columns are the
    siblings' outputs; the packed kernels and cuBLAS may sum in another order, so fp16 results may differ
    in the last bit). Inference only: no gradients flow to the siblings' old parameters, and the
    ``state_dict`` keys change (save before fusing).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if groups is None:
        groups = DEFAULT_GROUPS
    if isinstance(groups, str) or any(isinstance(g, str) for g in groups):
        raise ArgumentError(f"`groups` must be a list of tuples of child names, e.g. [('gate_proj', 'up_proj')], "
                            f"got {groups!r}")
    groups = [tuple(g) for g in groups]
    for g in groups:
        if len(g) < 2 or len(set(g)) != len(g) or not all(isinstance(n, str) and n and "." not in n for n in g):
            raise ArgumentError(f"each of `groups` must name two or more different direct children (no dots), "
                                f"got {g!r}")
    report = FuseReport()
    for parent_name, parent in list(model.named_modules()):
        for names in groups:
            mods = [parent._modules.get(n) for n in names]
            if any(m is None for m in mods):
                continue
            where = f"{parent_name + '.' if parent_name else ''}{'/'.join(names)}"
            reason = _why_not(parent_name, parent, names, mods)
            if reason is None:
                try:
                    layer = _stack(mods)
                except ValueError as exc:
                    reason = str(exc)
            if reason is not None:
                report.skipped.append((where, reason))
                continue
            stacked = StackedSiblings(layer, names, [m.out_features for m in mods])
            stacked_name = _stacked_name(names)
            parent.add_module(stacked_name, stacked)
            for i, n in enumerate(names):
                setattr(parent, n, SiblingSlice(stacked, i, mods[i].in_features))
            report.fused.append((where, f"{parent_name + '.' if parent_name else ''}{stacked_name}"))
    return report
