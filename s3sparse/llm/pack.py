"""Packing a pruned model for execution, saving it, and loading it back.

:func:`pack_model` swaps every pruned linear layer of a model for a
:class:`~s3sparse.sparse.PackedLinear` (the kept blocks and their in-scope
indices, multiplied by the ``s3sparse::packed_linear`` op) or, for whole-channel
patterns, first compacts the MLPs so that those layers become smaller dense
Linears (:func:`s3sparse.sparse.compact_model`). Every swapped layer is checked
on a few random inputs against the layer it replaces before the swap.

A packed directory (``s3sparse pack PRUNED_DIR --out PACKED_DIR``) holds the
tokenizer and the source's small extra files, the whole state dict in
``s3sparse-packed.safetensors`` (packed buffers included; tied weights stored
once), and ``s3sparse-packed.json``: the model's own config, and for every module
that is not what the config builds (a PackedLinear, a compacted Linear, a
GatherLinear), what to build in its place. :func:`load_packed` builds the model
from that config, swaps those modules in, and loads the state dict strictly; no
spec objects are needed. Writing is atomic, as for ``s3sparse prune``.

Transformers cannot load a packed directory, and must not seem to: with the
model's config it would build dense Linears, find most keys missing or
unexpected, and return random layers. So its ``config.json`` is a guard
(:data:`GUARD_CONFIG`) whose ``model_type`` transformers does not know
(``AutoConfig`` / ``AutoModel*`` / ``pipeline`` refuse it with a message naming
:func:`load_packed`), whose ``tie_word_embeddings`` is text that the models'
configs refuse as a bool (``Qwen3ForCausalLM.from_pretrained`` & co., same
message), and there is no ``model.safetensors`` (a ``config=`` passed by hand
does not help). ``AutoTokenizer`` still loads the tokenizer. A directory written
by an earlier s3sparse (format version 1: the model's ``config.json`` and
``model.safetensors``) still loads with :func:`load_packed`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..patterns import parse_pattern
from ..sparse.compact import _set_module
from ..sparse.layer import as_linear, is_conv1d, is_linear
from .errors import DirectoryError, UsageError
from .progress import progress_bar

__all__ = [
    "PackedLayer", "PackReport", "pack_model", "save_packed_model", "load_packed", "is_packed_dir", "read_manifest",
    "MANIFEST_NAME", "WEIGHTS_NAME", "GUARD_CONFIG",
]

MANIFEST_NAME = "s3sparse-packed.json"
WEIGHTS_NAME = "s3sparse-packed.safetensors"
FORMAT = "s3sparse-packed"
FORMAT_VERSION = 2
_V1_WEIGHTS_NAME = "model.safetensors"  # format version 1 kept the model's config.json and this name

_LOAD_HINT = "s3sparse packed model: transformers cannot load it; load it with s3sparse.llm.load_packed(PACKED_DIR)"
#: The ``config.json`` of a packed directory: every transformers loader refuses it, naming load_packed.
GUARD_CONFIG: Dict[str, Any] = {
    "model_type": "s3sparse-packed (load it with s3sparse.llm.load_packed)",
    "architectures": ["S3SparsePackedModel"],
    "tie_word_embeddings": _LOAD_HINT,
    "s3sparse": _LOAD_HINT,
}

# Pattern constructors whose blocks are whole rows or columns: compacted, not packed.
_CHANNEL_PREFIXES = ("channels:", "columns:", "col-blocks:")
# Those of whole input columns: a layer of them keeps its kept columns (those still nonzero after any MLP
# compaction) as a smaller dense Linear behind a gather (GatherLinear), which reads half the bytes of the
# dense layer at half sparsity; packed, such a weight has no fast kernel (0.17-0.21x dense on an H100).
_COLUMN_PREFIXES = ("columns:", "col-blocks:")


def _layer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class PackedLayer:
    """One layer: what it became (``packed``, ``compacted``, ``gathered``, ``dense``) and its bytes before / after."""

    name: str
    pattern: str
    kind: str
    shape: Tuple[int, int]
    bytes_before: int
    bytes_after: int
    max_abs_diff: Optional[float] = None
    note: str = ""


@dataclass
class PackReport:
    """What :func:`pack_model` did."""

    layers: List[PackedLayer] = field(default_factory=list)
    compaction: Optional[Dict[str, Any]] = None
    seconds: float = 0.0

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def table(self) -> str:
        """Per layer: pattern, what it became, MB before → after, the check's largest difference."""
        from .report import format_table

        rows = [
            (layer.name, layer.pattern, layer.kind, f"{layer.bytes_before / 1e6:.3f}", f"{layer.bytes_after / 1e6:.3f}",
             f"{layer.bytes_after / max(layer.bytes_before, 1):.3f}",
             "" if layer.max_abs_diff is None else f"{layer.max_abs_diff:.2e}", layer.note)
            for layer in self.layers
        ]
        rows.append(("total", "", "", f"{self.bytes_before / 1e6:.3f}", f"{self.bytes_after / 1e6:.3f}",
                     f"{self.bytes_after / max(self.bytes_before, 1):.3f}", "", ""))
        return format_table(("layer", "pattern", "became", "MB before", "MB after", "ratio", "check |Δy|", "note"),
                            rows, right={3, 4, 5, 6})

    def to_dict(self) -> Dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "compaction": self.compaction, "seconds": self.seconds,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


@torch.no_grad()
def _check_same(old: nn.Module, new: nn.Module, in_features: int, name: str) -> float:
    """Largest |new(x) - old(x)| on 4 random rows; raises when it is beyond the dtype's round-off."""
    weight = old.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, in_features, generator=generator).to(device=weight.device, dtype=weight.dtype)
    want = old(x).float()
    got = new(x).float()
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-10}.get(weight.dtype, 1e-5) * max(scale, 1.0)
    if not diff <= tol:
        raise RuntimeError(f"packing {name}: the packed layer's outputs differ from the dense layer's by {diff:.3g} "
                           f"(tolerance {tol:.3g}); nothing was swapped for this layer")
    return diff


def pack_model(
    model: nn.Module,
    layer_patterns: Mapping[str, str],
    *,
    compact_channels: bool = True,
    check: bool = True,
    progress_fn: Optional[Callable[[str], None]] = None,
    progress: bool = False,
) -> PackReport:
    """Swap the pruned linear layers of ``model`` for packed (or compacted, or gathered) ones, in place.

    Args:
        model: a pruned model (e.g. loaded from ``s3sparse prune``'s OUT_DIR).
        layer_patterns: module name → pattern name (as in ``s3sparse.json``'s
            ``layers``: :func:`s3sparse.llm.parse_pattern` names). ``dense`` layers are left alone.
        compact_channels: compact MLPs whose layers carry whole-channel patterns
            (``channels:S``, ``columns:S``, ``col-blocks:W:S``) into smaller dense
            Linears (:func:`s3sparse.sparse.compact_model`); a layer of input
            columns (``columns:S``, ``col-blocks:W:S``) that no MLP compaction covers
            becomes a :class:`~s3sparse.sparse.GatherLinear` (its kept columns as a
            smaller dense Linear behind a gather: ``gathered`` in the report); one of
            output channels (``channels:S``) is packed like the others. ``False``:
            every layer packed.
        check: compare each new layer with the one it replaces on random inputs.
        progress_fn: called with one line per layer.
        progress: a bar on stderr, one step per layer (as ``s3sparse prune`` shows).

    Returns:
        a :class:`PackReport`.

    Raises:
        UsageError: a name that is not a linear layer of ``model``, an unknown
            pattern, or a weight that does not obey its pattern (nothing is swapped then).
    """
    from ..sparse import PackedLinear, compact_inputs, compact_model

    started = time.perf_counter()
    say = progress_fn or (lambda _text: None)
    plans: List[Tuple[str, Any, nn.Module]] = []
    for name, pattern_name in layer_patterns.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"layer {name!r} (from the pattern list) is not a module of {type(model).__name__}")
        if not is_linear(module):
            raise UsageError(f"layer {name!r} is a {type(module).__name__}, not an nn.Linear / Conv1D; it cannot be packed")
        pattern = parse_pattern(pattern_name)
        if not pattern.is_dense and not pattern.holds(as_linear(module).weight):
            raise UsageError(f"layer {name!r} does not obey its pattern {pattern.name!r}: was it pruned to it? "
                             "(pack the OUT_DIR of `s3sparse prune`, or give the pattern it was pruned to)")
        plans.append((name, pattern, module))

    report = PackReport()
    channel_layers = {name for name, pattern, _ in plans if str(pattern).startswith(_CHANNEL_PREFIXES)}
    before_bytes = {name: _layer_bytes(module) for name, _, module in plans}
    compacted: set = set()
    if compact_channels and channel_layers:
        shapes = {name: tuple(module.weight.shape) for name, _, module in plans}
        result = compact_model(model)
        report.compaction = result.to_dict()
        for name, _, _ in plans:
            module = model.get_submodule(name)
            if tuple(module.weight.shape) != shapes[name]:
                compacted.add(name)
        say(f"compacted {len(result.layers)} MLPs: {result.params_saved:,} parameters removed")

    bar = progress_bar(progress, len(plans), "layers", "layer")
    for name, pattern, _ in plans:
        bar.set_postfix_str(name)
        bar.update(1)
        module = model.get_submodule(name)
        shape = (int(as_linear(module).weight.shape[0]), int(as_linear(module).weight.shape[1]))
        if pattern.is_dense:
            report.layers.append(PackedLayer(name, pattern.name, "dense", shape, before_bytes[name], _layer_bytes(module)))
            continue
        linear = as_linear(module)
        if compact_channels and str(pattern).startswith(_COLUMN_PREFIXES):
            # (compacted or not: the input columns still all zero, e.g. the hidden-side ones of an MLP's up rows)
            gathered = compact_inputs(module)
            kept = int(gathered.index.numel())
            if kept < shape[1]:
                diff = _check_same(linear, gathered, shape[1], name) if check else None
                _set_module(model, name, gathered)
                where = f"compacted to {shape[0]}x{shape[1]}, then " if name in compacted else ""
                report.layers.append(PackedLayer(name, pattern.name, "gathered", (shape[0], kept), before_bytes[name],
                                                 _layer_bytes(gathered), diff,
                                                 f"{where}{kept} of {shape[1]} input columns gathered"))
                say(f"{name}: {where}{kept} of {shape[1]} input columns kept (GatherLinear)")
                continue
        if name in compacted:
            report.layers.append(PackedLayer(name, pattern.name, "compacted", shape, before_bytes[name], _layer_bytes(module)))
            say(f"{name}: compacted to {shape[0]}x{shape[1]}")
            continue
        packed = PackedLinear.from_linear(linear, pattern=pattern.name)
        diff = _check_same(linear, packed, shape[1], name) if check else None
        _set_module(model, name, packed)
        report.layers.append(PackedLayer(name, pattern.name, "packed", shape, before_bytes[name], _layer_bytes(packed), diff,
                                         "" if name not in channel_layers else "channel pattern outside a compacted MLP"))
        say(f"{name}: packed {pattern.name}, {before_bytes[name] / 1e6:.2f} MB -> {_layer_bytes(packed) / 1e6:.2f} MB")
    bar.close()
    report.seconds = time.perf_counter() - started
    return report


# ------------------------------------------------------------------ manifest: what to build where
def _module_entry(module: nn.Module) -> Optional[Dict[str, Any]]:
    """How to rebuild ``module`` empty, or ``None`` for a module the config builds as it is."""
    from ..sparse import GatherLinear, PackedLinear

    if isinstance(module, PackedLinear):
        return {"kind": "packed", "config": module.config()}
    if isinstance(module, GatherLinear):
        return {"kind": "gather", "in_features": module.in_features, "kept": int(module.index.numel()),
                "out_features": module.out_features, "bias": module.linear.bias is not None}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if is_conv1d(module):
        return {"kind": "conv1d", "nx": int(module.weight.shape[0]), "nf": int(module.weight.shape[1])}
    return None


def _manifest_modules(model: nn.Module, fresh_shapes: Mapping[str, Tuple[str, Tuple[int, ...]]]) -> Dict[str, Dict[str, Any]]:
    """Entries for the modules whose type or weight shape differs from what the config builds."""
    from ..sparse import GatherLinear

    out = {}
    gathers = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, GatherLinear))
    for name, module in model.named_modules():
        if name.startswith(gathers):  # (a GatherLinear's inner Linear: its entry builds it)
            continue
        entry = _module_entry(module)
        if entry is None:
            continue
        weight = getattr(module, "weight", None)
        mine = (type(module).__name__, tuple(weight.shape) if isinstance(weight, Tensor) else ())
        if entry["kind"] in ("packed", "gather") or fresh_shapes.get(name) != mine:
            out[name] = entry
    return out


def _build(entry: Mapping[str, Any], dtype: torch.dtype, where: str) -> nn.Module:
    from ..sparse import GatherLinear, PackedLinear

    kind = entry.get("kind")
    if kind == "packed":
        return PackedLinear.from_config(entry["config"])
    if kind == "gather":
        inner = nn.Linear(int(entry["kept"]), int(entry["out_features"]), bias=bool(entry["bias"]), dtype=dtype)
        return GatherLinear(torch.arange(int(entry["kept"])), inner, int(entry["in_features"]))
    if kind == "linear":
        return nn.Linear(int(entry["in_features"]), int(entry["out_features"]), bias=bool(entry["bias"]), dtype=dtype)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        return Conv1D(int(entry["nf"]), int(entry["nx"])).to(dtype)
    raise UsageError(f"{where}: unknown module kind {kind!r} in {MANIFEST_NAME} (written by a newer s3sparse?)")


def _model_class(config: Any, kind: str):
    import transformers

    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    return cls


def _fresh_model(config: Any, kind: str, dtype: torch.dtype) -> nn.Module:
    cls = _model_class(config, kind)
    if hasattr(cls, "_from_config"):
        return cls._from_config(config, dtype=dtype)
    return cls.from_config(config, dtype=dtype)


def _shapes(model: nn.Module) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    out = {}
    for name, module in model.named_modules():
        if is_linear(module):
            out[name] = (type(module).__name__, tuple(module.weight.shape))
    return out


def save_packed_model(
    model: nn.Module,
    tokenizer,
    out_dir: str,
    info: Mapping[str, Any],
    *,
    kind: str,
    model_dir: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write a packed ``model`` to ``out_dir`` atomically (see the module docstring); returns its absolute path.

    ``info`` goes into the manifest (e.g. the :class:`PackReport` and versions);
    ``kind`` is ``"causal-lm"`` or ``"encoder"``; ``model_dir``, the pruned source,
    gives the extra files to copy and is checked not to overlap ``out_dir``.
    """
    from safetensors.torch import save_model

    from .save import _copy_extra_files, check_output_dir, write_atomically

    check_output_dir(os.path.abspath(out_dir), model_dir, overwrite)
    model = model.to("cpu")
    dtype = next(iter(model.parameters())).dtype
    fresh = _fresh_model(model.config, kind, dtype)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "model_class": type(model).__name__, "model_kind": kind,
        "dtype": str(dtype).replace("torch.", ""), "weights": WEIGHTS_NAME,
        "config": json.loads(model.config.to_json_string(use_diff=True)),
        "modules": _manifest_modules(model, _shapes(fresh)), **info,
    }
    del fresh

    def write(staging: str) -> None:
        with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
            json.dump(GUARD_CONFIG, f, indent=1)  # written first: the source's config.json is not copied over it
            f.write("\n")
        if getattr(model, "generation_config", None) is not None and kind == "causal-lm":
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if model_dir is not None:
            _copy_extra_files(model_dir, staging)
        save_model(model, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt", "s3sparse": FORMAT})
        with open(os.path.join(staging, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.write("\n")

    return write_atomically(out_dir, write, model_dir=model_dir, overwrite=overwrite)


def is_packed_dir(path: str) -> bool:
    """Whether ``path`` is a directory written by ``s3sparse pack`` (it holds ``s3sparse-packed.json``)."""
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def read_manifest(packed_dir: str) -> Dict[str, Any]:
    """The ``s3sparse-packed.json`` of ``packed_dir`` (a :class:`DirectoryError` when it is not a packed directory)."""
    path = os.path.join(packed_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DirectoryError(f"{packed_dir!r} is not a packed model directory (no {MANIFEST_NAME}); make one with "
                         "`s3sparse pack PRUNED_DIR --out PACKED_DIR`")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise UsageError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not one this "
                         f"s3sparse reads ({FORMAT} <= {FORMAT_VERSION})")
    return manifest


def _manifest_config(packed_dir: str, manifest: Mapping[str, Any]):
    """The model's transformers config: kept in the manifest (format 2), or the directory's config.json (format 1)."""
    import transformers

    if "config" not in manifest:  # format version 1
        return transformers.AutoConfig.from_pretrained(packed_dir, local_files_only=True)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(manifest["config"])
    model_type = values.get("model_type")
    try:
        config_class = CONFIG_MAPPING[model_type]
    except KeyError:
        raise UsageError(f"{packed_dir}: the packed model's type {model_type!r} is not one this transformers "
                         f"({transformers.__version__}) knows; install the transformers version that packed it "
                         f"({manifest.get('transformers', 'unknown')})")
    return config_class.from_dict(values)


def load_packed(
    packed_dir: str,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
    fuse: bool = False,
) -> nn.Module:
    """The model saved by ``s3sparse pack`` in ``packed_dir``, with its packed / compacted layers, in eval mode.

    Builds the model class of the checkpoint from the config kept in the
    manifest, swaps in the modules the manifest lists (empty), and loads the
    weights strictly (every key present, no key left over). This is the only
    way to load a packed directory: transformers' loaders refuse it (see the
    module docstring).

    Args:
        packed_dir: the directory ``s3sparse pack`` wrote.
        device: where the model runs, e.g. ``"cuda"`` (default: the CPU, where it is read).
            The packed layers run there through the ``s3sparse::packed_linear`` kernel
            of that device.
        dtype: a floating dtype for the parameters, the packed values and the other
            floating buffers (e.g. ``torch.float16`` on a GPU); default: the dtype it was
            packed in. The packed index tensors keep their integer dtypes. Casting
            packed values is exact where the dense model's cast is: the packed model
            equals the pruned dense model cast the same way.
        fuse: stack the sibling projections that read one input (q/k/v, gate/up) into one layer each
            after loading (:func:`s3sparse.sparse.fuse_siblings`, which says which groups it stacked
            and why it left others: call it yourself for that report). Same outputs; fewer, larger
            weight reads at decode: on an H200 a compiled, graph-replayed decode step of a 2:4
            Qwen3-0.6B shape ran 1.48x the dense model's tokens/s fused, 1.27x unfused. The model's
            ``state_dict`` then has the stacked layers' keys: do not save it as a packed directory.

    Example::

        model = s3sparse.llm.load_packed("out-packed", device="cuda", dtype=torch.float16, fuse=True)
    """
    from safetensors.torch import load_model

    from ..sparse import PackedLinear

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"`dtype` must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")
    if not isinstance(fuse, bool):
        raise UsageError(f"`fuse` must be True or False, got {fuse!r}")
    manifest = read_manifest(packed_dir)
    config = _manifest_config(packed_dir, manifest)
    saved_dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = _fresh_model(config, manifest.get("model_kind", "encoder"), saved_dtype)
    for name, entry in manifest.get("modules", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"{packed_dir}: {MANIFEST_NAME} names {name!r}, which the config's model does not have")
        _set_module(model, name, _build(entry, saved_dtype, f"{packed_dir}: {name}"))
    weights = os.path.join(packed_dir, manifest.get("weights", _V1_WEIGHTS_NAME))
    if not os.path.isfile(weights):
        raise UsageError(f"{packed_dir}: the weights file {os.path.basename(weights)} is missing; pack the model again")
    missing, unexpected = load_model(model, weights, strict=False)
    if missing or unexpected:
        raise UsageError(f"{packed_dir}: the saved state does not fit the rebuilt model (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.eval()
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if fuse:
        from ..sparse import fuse_siblings

        fuse_siblings(model)
    for module in model.modules():  # bad tables raise here, and later calls (compiled too) need no sync
        if isinstance(module, PackedLinear) and module.values.is_cuda:
            module.check_tables()
    return model
