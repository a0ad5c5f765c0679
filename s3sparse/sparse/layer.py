"""One linear layer, either layout: an ``nn.Linear`` or transformers' GPT-2 ``Conv1D``, seen as ``out × in``.

``nn.Linear`` stores its weight ``out × in``; GPT-2's ``Conv1D`` computes the same
``x W + b`` but stores ``W`` as ``in × out``. Everything in s3sparse that prunes,
compacts or packs a layer works on the ``out × in`` matrix, through this one
adapter: the model pipeline (:mod:`s3sparse.llm`) prunes :meth:`LinearLayer.matrix`
and :meth:`~LinearLayer.commit`\\ s it, channel compaction (:mod:`.compact`) reads
:meth:`~LinearLayer.detached_matrix` and swaps in smaller weights with
:meth:`~LinearLayer.install`, and packing takes :func:`as_linear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["is_conv1d", "is_linear", "as_linear", "LinearLayer"]


def is_conv1d(module: object) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as (in, out)."""
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "weight", None), Tensor)
        and module.weight.ndim == 2
        and hasattr(module, "nf")
    )


def is_linear(module: object) -> bool:
    """An ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or for a ``Conv1D`` a new Linear holding a transposed copy."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return linear


@dataclass
class LinearLayer:
    """A Linear or Conv1D seen as ``out × in``.

    Attributes:
        name: how to call it (its module name, or the argument name in messages).
        module: the ``nn.Linear`` or ``Conv1D`` itself.
    """

    name: str
    module: nn.Module
    _copy: Optional[nn.Parameter] = field(default=None, repr=False, compare=False)

    @property
    def transposed(self) -> bool:
        """True for a ``Conv1D`` (weight stored ``in × out``)."""
        return is_conv1d(self.module)

    @property
    def shape(self) -> Tuple[int, int]:
        """``(out_features, in_features)``."""
        w = self.module.weight
        return (int(w.shape[1]), int(w.shape[0])) if self.transposed else (int(w.shape[0]), int(w.shape[1]))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def bias(self) -> Optional[Tensor]:
        """The bias, detached, or None."""
        b = getattr(self.module, "bias", None)
        return None if b is None else b.detach()

    def numel(self) -> int:
        """Weight and bias elements."""
        return self.module.weight.numel() + (0 if self.bias is None else self.bias.numel())

    # ------------------------------------------------------------ pruning in place
    def matrix(self) -> Tensor:
        """The ``M × K`` weight to prune in place: the ``nn.Linear.weight`` Parameter itself,
        or for a ``Conv1D`` a transposed working copy, which :meth:`commit` writes back."""
        if not self.transposed:
            return self.module.weight
        if self._copy is None:
            self._copy = nn.Parameter(self.module.weight.detach().t().contiguous(), requires_grad=False)
        return self._copy

    @torch.no_grad()
    def commit(self) -> None:
        """Write a transposed working copy back into the module (no-op for ``nn.Linear``)."""
        if self.transposed and self._copy is not None:
            self.module.weight.data.copy_(self._copy.detach().t())
            self._copy = None

    # ------------------------------------------------------------ reading and resizing
    def detached_matrix(self) -> Tensor:
        """The ``out × in`` weight, detached: a view of the module's own (of a Conv1D's ``in × out``, transposed)."""
        w = self.module.weight.detach()
        return w.t() if self.transposed else w

    def install(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Swap in the ``out × in`` ``weight`` (and ``bias``), keeping the module object and requires_grad."""
        m = self.module
        grad = m.weight.requires_grad
        out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
        if self.transposed:
            m.weight = nn.Parameter(weight.t().contiguous(), requires_grad=grad)
            m.nf, m.nx = out_features, in_features
        else:
            m.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
            m.out_features, m.in_features = out_features, in_features
        if bias is not None:
            m.bias = nn.Parameter(bias.contiguous(), requires_grad=m.bias.requires_grad)
