"""The state an inference pass reads and writes while the graph is walked: the space of every tensor axis."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx

from otfx.infer.kinds import LinkKind, RecordKind
from otfx.infer.spaces import Spaces

Axes = list[int]
aten = torch.ops.aten
#: ops that cut a tensor along one axis into parts (``part_of``)
_CUTS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
         aten.tensor_split.indices, aten.slice.Tensor, aten.narrow.default, aten.unsafe_split.Tensor,
         aten.unsafe_split_with_sizes.default}
#: ops that take one index of an axis (``part_of``: one expert's weight from stacked experts)
SELECTS = {aten.select.int}
_PARTS = _CUTS | SELECTS


@dataclass
class Record:
    """A flow-graph event seen by a pass: a residual add, a concat, an attention, a norm or a layer.

    ``kind`` is a ``RecordKind`` (a ``str`` enum: ``record.kind == "residual"`` works); ``inputs``/``output``
    are space ids; ``info`` holds the kind's extras (see ``RecordKind``).
    """

    kind: RecordKind
    node: str
    inputs: list[int]
    output: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = RecordKind.parse(self.kind)


class Producer(NamedTuple):
    """Parameter rows that create (or describe) a space: a layer's output, a class token, a position table.
    ``written``: the parameter is put into the stream as it is (added or concatenated: a bias, a class token,
    an attention sink), not the rows of a layer."""

    space: int
    param: str
    axis: int
    node: str
    written: bool = False


class Frozen(NamedTuple):
    """An op that froze spaces: its target, node, whether no pass knows it, the spaces it touched, and whether
    the freeze is the model's own (``ordered``): the function depends on the order of that axis (an FFT or a
    cumulative sum over it) or reads its positions as ids (a router's top-k over experts, table rows looked up
    by index), so no permutation of it can be applied as it is and no pass could free it."""

    op: str
    node: str
    unknown: bool
    spaces: list[int]
    ordered: bool = False


class Conflict(NamedTuple):
    """Structures that could not be reconciled (sizes or products that do not align) at one op."""

    op: str
    node: str
    why: str
    spaces: list[int] = []


@dataclass
class InferContext:
    """Per-walk state. Passes use ``axes_of``, ``set_axes``, ``link`` and the record helpers."""

    spaces: Spaces = field(default_factory=Spaces)
    axes: dict[fx.Node, object] = field(default_factory=dict)
    #: param-derived nodes: node -> (parameter name, node axis -> parameter axis or None)
    param_view: dict[fx.Node, tuple[str, list[int | None]]] = field(default_factory=dict)
    #: nodes whose value depends on the model's inputs (the rest depend on parameters and buffers only)
    dynamic: set[fx.Node] = field(default_factory=set)
    #: table reads: parameter rows looked up by ids (embeddings), and views and casts of them
    tables: set[fx.Node] = field(default_factory=set)
    #: parameters already read by an op, and those whose axes are a tied copy during the current op
    used_params: set[fx.Node] = field(default_factory=set)
    secondary: set[fx.Node] = field(default_factory=set)
    param_axes: dict[str, Axes] = field(default_factory=dict)
    buffer_axes: dict[str, Axes] = field(default_factory=dict)
    producers: list[Producer] = field(default_factory=list)
    #: parameter axes contracted with an activation (a layer's input side)
    consumed: set[tuple[str, int]] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)
    #: ops that froze spaces: (op, node, unknown to every pass?, spaces frozen)
    frozen_by: list[Frozen] = field(default_factory=list)
    #: conflicts between structures, by the op where they appeared
    conflicts: list[Conflict] = field(default_factory=list)
    #: factor spaces split by select/unbind: factor root -> (parent space, copies per index)
    factor_splits: dict[int, tuple[int, list[dict[int, int]]]] = field(default_factory=dict)

    _order: dict[fx.Node, int] = field(default_factory=dict)

    # ---- reading ---------------------------------------------------------------------------------------
    def order(self, node: fx.Node) -> dict[fx.Node, int]:
        """The position of every node of ``node``'s graph (topological order)."""
        if node not in self._order:
            self._order = {n: i for i, n in enumerate(node.graph.nodes)}
        return self._order

    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        """Concrete sizes; a size only known at run time (tokens routed to one expert) reads as 0, a position
        axis that meets nothing of its size."""
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return tuple(_concrete(s) for s in val.shape)
        return None

    def axes_of(self, node) -> Axes | None:
        """The spaces of a tensor node's axes, or None for non-tensors (numbers, shapes)."""
        if not isinstance(node, fx.Node):
            return None
        value = self.axes.get(node)
        return value if isinstance(value, list) and all(isinstance(a, int) for a in value) else None

    def is_param_derived(self, node) -> bool:
        return isinstance(node, fx.Node) and node in self.param_view

    # ---- writing ---------------------------------------------------------------------------------------
    def set_axes(self, node: fx.Node, axes) -> None:
        self.axes[node] = axes

    def fresh(self, shape, fixed: str | None = None) -> Axes:
        return [self.spaces.new(s, fixed) for s in shape]

    def link(self, a: int, b: int, kind: LinkKind | str = LinkKind.exact) -> None:
        self.spaces.link(a, b, kind)

    def pass_view(self, node: fx.Node, source: fx.Node) -> None:
        """A view-like op of a parameter reads the same parameter: its axis j is the parameter axis whose space
        it carries. Only whole views pass (no axis longer than 1 dropped or cut), so a sliced table does not."""
        view = self.param_view.get(source)
        in_axes, out_axes = self.axes_of(source), self.axes_of(node)
        if view is None or in_axes is None or out_axes is None:
            return
        kept = set(out_axes)
        if any(sid not in kept and self.spaces.size(sid) > 1 for sid in in_axes):
            return
        where = {sid: view[1][i] for i, sid in enumerate(in_axes)}
        self.param_view[node] = (view[0], [where.get(sid) for sid in out_axes])

    def produce(self, space: int, weight: fx.Node, axis: int, node: fx.Node) -> None:
        """Record that ``space`` is created by the rows of ``weight`` along ``axis`` (a layer's output). Through
        a part of a parameter (``part_of``), the rows are the parameter's: one expert's weight selected from a
        stacked expert tensor has the rows of every expert, and a weight cut along ``axis``
        (``nn.MultiheadAttention``'s packed in-projection split into the query and key | value rows) makes the
        parameter's whole axis produced: its structure is the sum of the parts, so each part gets its rows."""
        view = self.param_view.get(weight)
        if view is None and (part := self.part_of(weight)) is not None:
            source, where, cut = part
            view, axis = self.param_view[source], where[axis]
            if axis == cut:
                space = self.axes_of(source)[axis]
        if view is not None and view[1][axis] is not None:
            producer = Producer(space, view[0], view[1][axis], node.name)
            if all(p[:3] != producer[:3] for p in self.producers):
                self.producers.append(producer)
        self.records.append(Record(RecordKind.layer, node.name, [], space, {"weight": view[0] if view else None}))

    def part_of(self, node: fx.Node) -> tuple[fx.Node, list[int], int] | None:
        """(the parameter-derived tensor ``node`` is a part of, the source axis of each of ``node``'s axes, the
        source axis that was cut or selected away) where ``node`` is one index of a parameter's axis (``select``)
        or a part of it cut by a split or slice with every other axis whole; None otherwise."""
        source = node.args[0] if node.target is operator.getitem and node.args else node
        if not isinstance(source, fx.Node) or source.target not in _PARTS or not source.args:
            return None
        whole = source.args[0]
        have, full = self.shape(node), self.shape(whole)
        if whole not in self.param_view or have is None or full is None:
            return None
        if source.target in SELECTS:
            dim = source.args[1] % len(full) if isinstance(source.args[1], int) and full else -1
            if len(have) + 1 != len(full) or dim < 0:
                return None
            return whole, [j + (j >= dim) for j in range(len(have))], dim
        cut = [i for i, (a, b) in enumerate(zip(have, full)) if a != b]
        if len(have) != len(full) or len(cut) != 1:
            return None
        return whole, list(range(len(have))), cut[0]

    def write(self, space: int, param: fx.Node, axis: int, node: fx.Node) -> None:
        """Record that a parameter is added into ``space`` as it is (a class token or position table): its
        values along ``axis`` describe the neurons of that space, like a layer's rows."""
        view = self.param_view.get(param)
        if view is not None and axis < len(view[1]) and view[1][axis] is not None:
            self.producers.append(Producer(space, view[0], view[1][axis], node.name, written=True))

    def consume(self, weight: fx.Node, axis: int) -> None:
        """Record that ``weight``'s ``axis`` is contracted with an input activation (also through a part of a
        parameter cut along another axis or selected from stacked ones)."""
        view = self.param_view.get(weight)
        if view is None and (part := self.part_of(weight)) is not None and part[1][axis] != part[2]:
            weight, view, axis = part[0], self.param_view[part[0]], part[1][axis]
        if view is not None and view[1][axis] is not None and not self._is_secondary(weight):
            self.consumed.add((view[0], view[1][axis]))

    def _is_secondary(self, node: fx.Node) -> bool:
        """Whether ``node`` reads a parameter through the tied copy of a later use."""
        while node is not None and node not in self.secondary:
            if node.op == "placeholder" or not node.args or not isinstance(node.args[0], fx.Node):
                return False
            node = node.args[0]
        return node is not None

    def record(self, kind: RecordKind | str, node: fx.Node, inputs: list[int], output: int | None = None,
               **info) -> None:
        self.records.append(Record(RecordKind.parse(kind), node.name, inputs, output, info))

    def freeze(self, node: fx.Node, spaces: list[int], reason: str, *, ordered: bool = False) -> None:
        """Fix some spaces a known op depends on the order of (reported by ``coverage`` where they act on
        parameters; ``ordered``: the model's function depends on their order or reads them as ids, reported by
        ``ordered()`` instead)."""
        for sid in spaces:
            self.spaces.fix(sid, reason)
        self.frozen_by.append(Frozen(str(node.target), node.name, False, list(spaces), ordered))

    def fix_node(self, node: fx.Node, reason: str, *, unknown: bool) -> None:
        """Make every space that this node reads or writes fixed (used for ops no pass understands)."""
        touched = [sid for a in _tensor_args(node) for sid in self.axes_of(a) or []]
        for sid in touched:
            self.spaces.fix(sid, reason)
        self.set_axes(node, self.fresh_like(node.meta.get("val"), reason))
        self.frozen_by.append(Frozen(str(node.target), node.name, unknown, touched))

    def fresh_like(self, val, fixed: str | None = None):
        if isinstance(val, torch.Tensor):
            return self.fresh([_concrete(s) for s in val.shape], fixed)
        if isinstance(val, (tuple, list)):
            return [self.fresh_like(v, fixed) for v in val]
        return None


def _concrete(size) -> int:
    if isinstance(size, int):
        return size
    try:
        return int(size)
    except Exception:  # noqa: BLE001 - torch raises a data-dependent guard error for unbacked sizes
        return 0


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a):
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return found
