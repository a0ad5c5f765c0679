"""SparsityBuilder: a fluent way to put blocks, couplings and scopes together by name.

Example::

    spec = (
        SparsityBuilder()
        .add_block(up.weight, (1, -1), "up_rows")        # one block per row of W_up (F, D)
        .add_block(down.weight, (-1, 1), "down_cols")    # one block per column of W_down (D, F)
        .couple_blocks(["up_rows", "down_cols"], [(0, 1), (1, 0)], "neurons")
        .add_scope("neurons", (-1, 1), "ffn")            # all F neurons compete
    )
    spec.get_scope("ffn").hard_threshold(nnz=F // 2)

Rules (checked when a call is made, with an error naming the culprit):

* Block names and scope names are two namespaces; a name is used once in each.
* A block that is a member of a coupling gets no scope of its own (scope the
  coupling), and a block, or coupling, has at most one scope.
* A block joins at most one coupling, and so does a scope.
* :meth:`get_all_scopes` returns the scopes that decide on their own: every
  ScopeCoupling and every ScopeSpec that is not a member of one. A member stays
  reachable by name through :meth:`get_scope`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from .block import BlockCoupling, BlockSpec, SparseBlock
from .errors import ArgumentTypeError, CouplingError, SpecError, UnknownNameError
from .scope import ScopeCoupling, ScopeSpec
from .view import View

__all__ = ["SparsityBuilder"]

Scope = Union[ScopeSpec, ScopeCoupling]
Orders = Optional[Sequence[Optional[Sequence[int]]]]


class SparsityBuilder:
    """Builds and names the blocks and scopes of a sparsity pattern (see the module doc)."""

    def __init__(self) -> None:
        self._blocks: dict[str, SparseBlock] = {}
        self._scopes: dict[str, Scope] = {}
        self._block_coupling: dict[str, str] = {}  # member block -> its coupling
        self._block_scope: dict[str, str] = {}  # block or coupling -> its scope
        self._scope_coupling: dict[str, str] = {}  # member scope -> its coupling

    # ------------------------------------------------------------ names
    @staticmethod
    def _check_new_name(name: object, taken: dict, kind: str) -> str:
        if not isinstance(name, str) or not name:
            raise ArgumentTypeError(f"`name` of a {kind} must be a non-empty str, got {name!r}")
        if name in taken:
            raise SpecError(f"a {kind} named {name!r} already exists")
        return name

    def _lookup(self, name: str, table: dict, kind: str, arg: str) -> object:
        if name not in table:
            known = ", ".join(repr(n) for n in table) or "none yet"
            raise UnknownNameError(f"`{arg}`: no {kind} named {name!r} (known: {known})")
        return table[name]

    # ------------------------------------------------------------ blocks
    def add_block(self, param: Union[Tensor, View], block_shape: Sequence[int], name: str) -> "SparsityBuilder":
        """Add a :class:`BlockSpec` of ``param`` (a tensor, Parameter or :class:`View`) named ``name``."""
        self._check_new_name(name, self._blocks, "block")
        self._blocks[name] = BlockSpec(param, block_shape, name=name)
        return self

    def couple_blocks(self, names: Sequence[str], orders: Orders, name: str) -> "SparsityBuilder":
        """Couple the blocks ``names`` into a :class:`BlockCoupling` named ``name`` (``orders`` as there)."""
        self._check_new_name(name, self._blocks, "block")
        if isinstance(names, str) or not names:
            raise ArgumentTypeError(f"`names` must be a non-empty sequence of block names, got {names!r}")
        if len(set(names)) != len(names):
            raise CouplingError(f"`names` repeats a block: {list(names)}")
        specs = []
        for member in names:
            block = self._lookup(member, self._blocks, "block", "names")
            if not isinstance(block, BlockSpec):
                raise CouplingError(f"`names`: {member!r} is a coupling; couple BlockSpecs only")
            if member in self._block_coupling:
                raise CouplingError(f"`names`: block {member!r} is already coupled in {self._block_coupling[member]!r}")
            if member in self._block_scope:
                raise CouplingError(
                    f"`names`: block {member!r} already has the scope {self._block_scope[member]!r}; "
                    "couple blocks before scoping them"
                )
            specs.append(block)
        self._blocks[name] = BlockCoupling(specs, orders, name=name)
        for member in names:
            self._block_coupling[member] = name
        return self

    def get_block(self, name: str) -> SparseBlock:
        """The BlockSpec or BlockCoupling named ``name``."""
        return self._lookup(name, self._blocks, "block", "name")  # type: ignore[return-value]

    def get_all_blocks(self) -> list[SparseBlock]:
        """The blocks not coupled into another: every BlockCoupling and every uncoupled BlockSpec."""
        return [b for n, b in self._blocks.items() if n not in self._block_coupling]

    # ------------------------------------------------------------ scopes
    def add_scope(self, block_name: str, scope_shape: Sequence[int], name: str) -> "SparsityBuilder":
        """Add a :class:`ScopeSpec` of shape ``scope_shape`` over the block (or coupling) ``block_name``."""
        self._check_new_name(name, self._scopes, "scope")
        block = self._lookup(block_name, self._blocks, "block", "block_name")
        if block_name in self._block_coupling:
            raise CouplingError(
                f"`block_name`: block {block_name!r} is a member of the coupling "
                f"{self._block_coupling[block_name]!r}; scope the coupling instead"
            )
        if block_name in self._block_scope:
            raise SpecError(
                f"`block_name`: block {block_name!r} already has the scope {self._block_scope[block_name]!r}"
            )
        self._scopes[name] = ScopeSpec(block, scope_shape, name=name)  # type: ignore[arg-type]
        self._block_scope[block_name] = name
        return self

    def couple_scopes(self, names: Sequence[str], orders: Orders, name: str) -> "SparsityBuilder":
        """Couple the scopes ``names`` into a :class:`ScopeCoupling` named ``name`` (``orders`` as there)."""
        self._check_new_name(name, self._scopes, "scope")
        if isinstance(names, str) or not names:
            raise ArgumentTypeError(f"`names` must be a non-empty sequence of scope names, got {names!r}")
        if len(set(names)) != len(names):
            raise CouplingError(f"`names` repeats a scope: {list(names)}")
        members = []
        for member in names:
            scope = self._lookup(member, self._scopes, "scope", "names")
            if not isinstance(scope, ScopeSpec):
                raise CouplingError(f"`names`: {member!r} is a coupling; couple ScopeSpecs only")
            if member in self._scope_coupling:
                raise CouplingError(f"`names`: scope {member!r} is already coupled in {self._scope_coupling[member]!r}")
            members.append(scope)
        self._scopes[name] = ScopeCoupling(members, orders, name=name)
        for member in names:
            self._scope_coupling[member] = name
        return self

    def get_scope(self, name: str) -> Scope:
        """The ScopeSpec or ScopeCoupling named ``name`` (members of a coupling included)."""
        return self._lookup(name, self._scopes, "scope", "name")  # type: ignore[return-value]

    def get_all_scopes(self) -> list[Scope]:
        """The scopes that decide on their own, in the order added: couplings and uncoupled ScopeSpecs."""
        return [s for n, s in self._scopes.items() if n not in self._scope_coupling]

    def __repr__(self) -> str:
        return f"SparsityBuilder(blocks={list(self._blocks)}, scopes={list(self._scopes)})"
