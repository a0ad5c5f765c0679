"""Transformer blocks: finding them, capturing their inputs, running them, their linear layers.

Found generically: the repeated blocks of a Hugging Face model (Llama, Qwen,
Mistral: ``model.layers``; GPT-2: ``transformer.h``; BERT: ``encoder.layer``)
are the largest ``nn.ModuleList`` whose children all have one type.

The inputs of the first block — the hidden states and every other argument the
model passes (attention masks, rotary position embeddings, position ids,
cache objects; they differ between families and versions) — are captured by
running the model with a forward pre-hook on the first block that stores its
``args`` and ``kwargs`` and raises a sentinel exception, so nothing after the
embeddings runs. Models whose blocks get different arguments (alternating
sliding-window and full-attention masks, ``config.layer_types``) get a second
pass in which every block is stubbed to record its own arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..sparse.layer import LinearLayer, is_linear
from .errors import UsageError

__all__ = [
    "find_blocks",
    "BlockCall",
    "capture_block_inputs",
    "per_block_arguments",
    "run_block",
    "linear_layers",
    "move_outside_blocks",
]


# ------------------------------------------------------------------ finding the blocks
def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(name, module_list)`` of the model's repeated transformer blocks.

    The largest (by parameter count) ``nn.ModuleList`` of at least one module
    whose children all share one type.

    Raises:
        UsageError: the model has no such list.
    """
    best: Optional[Tuple[int, int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size == 0:
            continue
        key = (size, len(module))
        if best is None or key > best[:2]:
            best = (size, len(module), name, module)
    if best is None:
        raise UsageError(
            f"found no repeated transformer blocks in {type(model).__name__}: no nn.ModuleList of identical modules with weights"
        )
    return best[2], best[3]


# ------------------------------------------------------------------ linear layers
def linear_layers(block: nn.Module, prefix: str) -> List[LinearLayer]:
    """Every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside ``block``, named ``prefix.<name in block>``.

    Each is a :class:`~s3sparse.sparse.layer.LinearLayer`: ``matrix()`` is the
    ``M × K`` weight to prune in place, ``commit()`` writes a Conv1D's back.
    """
    layers = []
    for name, module in block.named_modules():
        if is_linear(module):
            layers.append(LinearLayer(f"{prefix}.{name}" if name else prefix, module))
    return layers


# ------------------------------------------------------------------ moving the rest of the model
@torch.no_grad()
def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` to ``device`` (ties kept)."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


# ------------------------------------------------------------------ capturing the inputs
class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are stored."""


@dataclass
class BlockCall:
    """The arguments of one block call for one calibration batch.

    The hidden states are held apart (``hidden``); ``args`` and ``kwargs`` are
    the rest, and ``hidden_key`` is ``None`` when the hidden states were the first
    positional argument, else their keyword.
    """

    hidden: Optional[Tensor]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    hidden_key: Optional[str] = None

    def with_arguments_of(self, other: "BlockCall") -> "BlockCall":
        """This call's hidden states with ``other``'s remaining arguments."""
        return BlockCall(self.hidden, other.args, other.kwargs, other.hidden_key)


def _split_hidden(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> BlockCall:
    if args and isinstance(args[0], Tensor):
        return BlockCall(args[0], tuple(args[1:]), dict(kwargs))
    for key in ("hidden_states", "hidden_state", "x", "input"):
        if isinstance(kwargs.get(key), Tensor):
            rest = {k: v for k, v in kwargs.items() if k != key}
            return BlockCall(kwargs[key], tuple(args), rest, key)
    raise RuntimeError("could not find the hidden states among the first block's arguments")


def _forward_kwargs(model: nn.Module, input_ids: Tensor) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Tensor], device: torch.device
) -> List[BlockCall]:
    """The first block's inputs, one :class:`BlockCall` per batch of token ids.

    The model must be in eval mode with everything outside ``blocks`` on
    ``device``; the blocks themselves may be anywhere (none of them runs).
    """
    calls: List[BlockCall] = []

    def hook(_module, args, kwargs):
        calls.append(_split_hidden(args, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**_forward_kwargs(model, batch.to(device)))
            except _StopForward:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward never called its first block")
    finally:
        handle.remove()
    return calls


def _needs_per_block_arguments(model: nn.Module) -> bool:
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return isinstance(types, (list, tuple)) and len(set(types)) > 1


@torch.no_grad()
def per_block_arguments(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Tensor], device: torch.device
) -> Optional[List[List[BlockCall]]]:
    """Each block's own arguments (``[block][batch]``), or ``None`` when all blocks share the first's.

    Only for models whose ``config.layer_types`` differ between blocks (e.g.
    sliding-window and full attention): one more pass with every block's forward
    stubbed to record its arguments and return its input unchanged.
    """
    if not _needs_per_block_arguments(model):
        return None
    recorded: List[List[BlockCall]] = [[] for _ in blocks]

    def stub_for(index: int):
        def stub(*args, **kwargs):
            call = _split_hidden(args, kwargs)
            recorded[index].append(BlockCall(None, call.args, call.kwargs, call.hidden_key))
            return call.hidden

        return stub

    for i, block in enumerate(blocks):
        block.forward = stub_for(i)
    try:
        for batch in batches:
            model(**_forward_kwargs(model, batch.to(device)))
    finally:
        for block in blocks:
            del block.forward
    if any(len(r) != len(batches) for r in recorded):
        raise RuntimeError("the blocks were not all called once per batch while recording their arguments")
    return recorded


# ------------------------------------------------------------------ running a block
def _hidden_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise RuntimeError(f"a block returned {type(output).__name__}, not hidden states")


@torch.no_grad()
def run_block(block: nn.Module, call: BlockCall, hidden: Tensor) -> Tensor:
    """``block``'s output hidden states for ``hidden`` with the other arguments of ``call``."""
    if call.hidden_key is None:
        return _hidden_of(block(hidden, *call.args, **call.kwargs))
    return _hidden_of(block(*call.args, **{call.hidden_key: hidden}, **call.kwargs))
