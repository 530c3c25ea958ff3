"""Orthogonal maps of the residual stream (``residual="orthogonal"``): one orthogonal matrix per stream instead
of a permutation, found by orthogonal Procrustes on the cost provider's features of the stream.

A rotation of the stream is a symmetry only where every op on it commutes with rotations: linear layers, adds,
views, token-axis indexing and pooling, and norms. A norm's per-unit gain does not commute, so it is folded
into the linear layers the norm feeds (gain 1, weights scaled), as SliceGPT does; RMSNorm then commutes with
any rotation, LayerNorm with rotations that fix the all-ones direction. ``orthogonal_streams`` checks this op
by op on the traced graph and names what stands in the way; such a stream keeps a transport plan.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from otfx.align.structure import PairStructure
from otfx.infer.result import Inference

aten = torch.ops.aten


class StreamFallbackWarning(UserWarning):
    """A residual stream cannot rotate: it keeps a transport plan (the warning says why)."""

#: ops that move or copy a tensor without arithmetic along its feature axis
_VIEWS = frozenset({
    aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.permute, aten.transpose, aten.t,
    aten.unsqueeze, aten.squeeze, aten.expand, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to,
    aten._to_copy, aten.type_as, aten.dropout, aten.select, aten.slice, aten.index, aten.index_select, aten.cat,
    aten.stack, aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unbind, aten.narrow,
    aten.lift_fresh_copy,
    aten.repeat, aten.roll, aten.flip,
})
#: ops that contract a tensor's last axis with a parameter (a layer's input side)
_CONTRACTIONS = frozenset({aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, aten.baddbmm, aten.einsum,
                           aten.conv1d, aten.conv2d, aten.convolution, aten.tensordot})
#: ops that cut a tensor into parts along one axis (``_Walk.cut_param``)
_CUTS = frozenset({aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.slice, aten.narrow,
                   aten.unsafe_split, aten.unsafe_split_with_sizes})
_LINEAR_MIX = frozenset({aten.add, aten.sub, aten.add_, aten.sub_, aten.neg})
_SCALE = frozenset({aten.mul, aten.div, aten.mul_, aten.div_})
_REDUCE = frozenset({aten.mean, aten.sum, aten.var, aten.std, aten.var_mean})  # linear or rotation-invariant
_SQUARE = frozenset({aten.pow, aten.square})


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _cut_dim(node: fx.Node) -> int:
    """The axis a split, chunk, slice or narrow cuts (non-negative)."""
    position = 1 if _packet(node) in (aten.slice, aten.narrow) else 2
    dim = node.args[position] if len(node.args) > position else node.kwargs.get("dim", 0)
    return dim % len(_shape(node.args[0]) or (0,)) if isinstance(dim, int) else -1


def _packet(node) -> object:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", node.target)


@dataclass
class Gain:
    """A norm's per-unit gain: the parameter ``fqn`` (the gain is its value plus ``offset``, e.g. Gemma's
    ``1 + w``), the norm's bias (divided by the gain when it is folded) and the (parameter, axis) pairs of the
    linear layers that read the gained tensor."""

    fqn: str
    offset: float
    bias: str | None
    consumers: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Stream:
    """A residual stream that an orthogonal map may rotate: its norms' gains (to fold) and whether a LayerNorm
    reads it (then the map must fix the all-ones direction)."""

    root: int
    gains: list[Gain]
    fix_ones: bool


class _Walk:
    """The op-by-op check of one class ``root`` on one model's graph."""

    def __init__(self, inference: Inference, structure: PairStructure, root: int):
        self.inf, self.structure, self.root = inference, structure, root
        self.nodes = {n.name: n for n in inference.traced.graph.nodes}
        self.param_of = inference.traced.placeholder_to_param
        self.fix_ones = False
        self.gains: dict[str, Gain] = {}
        self.norms_seen: set[str] = set()

    def axes(self, node) -> list[int]:
        """The axes of a node's output that carry the class."""
        if not isinstance(node, fx.Node):
            return []
        sids = self.inf.node_axes.get(node.name) or self.inf.param_axes.get(self.param_of.get(node.name, ""), [])
        return [i for i, s in enumerate(sids) if self.structure.root(s) == self.root]

    def param(self, node) -> str | None:
        """The parameter a node reads through views and casts, if it is one."""
        while isinstance(node, fx.Node):
            if node.op == "placeholder":
                return self.param_of.get(node.name)
            if _packet(node) not in _VIEWS:
                return None
            node = next((a for a in node.args if isinstance(a, fx.Node)), None)
        return None

    def cut_param(self, node: fx.Node) -> str | None:
        """The parameter a node is a part of, cut by a split or slice along an axis other than the class's (the
        query rows of a packed in-projection read the stream whole), if it is one."""
        source = node.args[0] if node.target is operator.getitem and node.args else node
        if not isinstance(source, fx.Node) or _packet(source) not in _CUTS or not source.args:
            return None
        whole = source.args[0]
        have, full = _shape(node), _shape(whole)
        if have is None or full is None or len(have) != len(full):
            return None
        cut = [i for i, (a, b) in enumerate(zip(have, full)) if a != b]
        return self.param(whole) if len(cut) == 1 and cut[0] not in self.axes(whole) else None

    def check(self) -> str | None:
        """None if every op on the class commutes with a rotation once the gains are folded, else why not."""
        carriers = [self.nodes[name] for name in self.inf.node_axes
                    if name in self.nodes and self.axes(self.nodes[name])]
        carriers += [n for n in self.nodes.values() if n.op == "placeholder" and self.axes(n)]
        for node in carriers:
            for user in node.users:
                why = self.use(node, user)
                if why:
                    return f"{why} (op {user.name}: {_packet(user)})"
        return None

    def use(self, node: fx.Node, user: fx.Node) -> str | None:
        """Why ``user`` reading ``node`` (which carries the class) does not commute with a rotation, or None."""
        op = _packet(user)
        mine = self.axes(node)
        if str(op).startswith("aten._assert") or op is aten.sym_size:
            return None  # a shape check or query: no value flows on
        if user.op == "output":
            return "the stream is the model's output"
        if op in _CUTS and self.param(node) is not None and _cut_dim(user) not in mine:
            return None  # a parameter cut into parts along another axis: the parts are checked where they are read
        if op in _VIEWS or op in _LINEAR_MIX:
            return None if self.axes(user) else f"{user.name} splits or reshapes the stream's feature axis"
        if op in (aten.layer_norm, aten.rms_norm):
            if user.name in self.norms_seen:
                return None
            self.norms_seen.add(user.name)
            return self.norm(user)
        fqn = self.param(node) or self.cut_param(node)
        if fqn is not None and op in _CONTRACTIONS | {aten.embedding}:
            return None  # a parameter's rows (a producer) or columns (a consumer) in the class
        if fqn is not None and op in _SCALE:
            return None  # a gain: checked from the tensor it scales
        if op in _CONTRACTIONS:
            return None if self.contracted(user, node) else f"{user.name} reads the stream without a parameter"
        if op in _SCALE:
            return self.scale(node, user)
        if op in _SQUARE:
            return None if self.feeds_reduction(user) else f"{user.name} squares the stream element-wise"
        if op in _REDUCE:
            dims = user.args[1] if len(user.args) > 1 else None
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            ndim = node.meta["val"].ndim if isinstance(node.meta.get("val"), torch.Tensor) else 0
            over_features = not dims or not ndim or any(d % ndim in mine for d in dims)
            if over_features and not _is_square(node):
                self.fix_ones = True  # a mean over the features: LayerNorm written out
            return None
        if op in (aten.scaled_dot_product_attention,):
            return f"{user.name} attends over the stream itself"
        return f"{op} is not known to commute with a rotation of the stream"

    def contracted(self, user: fx.Node, node: fx.Node) -> bool:
        """Whether ``user`` contracts ``node``'s features with a parameter axis of the class (a consumer)."""
        for arg in user.args:
            fqn = self.param(arg) or self.cut_param(arg) if isinstance(arg, fx.Node) and arg is not node else None
            if fqn and any((fqn, a) in self.inf.consumed and self.structure.root(s) == self.root
                           for a, s in enumerate(self.inf.param_axes.get(fqn, []))):
                return True
        return False

    def norm(self, user: fx.Node) -> str | None:
        """A norm op: LayerNorm must fix the ones; its gain and bias are folded into what it feeds."""
        if _packet(user) is aten.layer_norm:
            self.fix_ones = True
        weight = user.args[2] if len(user.args) > 2 else user.kwargs.get("weight")
        bias = user.args[3] if _packet(user) is aten.layer_norm and len(user.args) > 3 else user.kwargs.get("bias")
        if weight is None:
            return None
        fqn = self.param(weight)
        if fqn is None:
            return f"{user.name}'s gain is not a parameter"
        return self.add_gain(user, fqn, 0.0, self.param(bias) if bias is not None else None)

    def scale(self, node: fx.Node, user: fx.Node) -> str | None:
        """A mul/div: by something constant along the features (a scalar, a token mask), by the stream's own
        rms (a norm), or by a norm's gain."""
        others = [a for a in user.args if a is not node]
        other = others[0] if others else node
        if not isinstance(other, fx.Node):
            return None
        if not self.axes(other) and _feature_size(other, node, self.axes(node)) == 1:
            return None
        if any(r.kind == "norm" and r.node == user.name for r in self.inf.records):
            return None  # x * rsqrt(mean(x^2)): the normalising op
        if other is node:
            return None if self.feeds_reduction(user) else f"{user.name} squares the stream element-wise"
        if self.gain_param(node)[0] is not None:
            return None  # the gain's side of the product
        fqn, offset = self.gain_param(other)
        if fqn is None:
            return f"{user.name} scales the stream element-wise by a computed tensor"
        if _packet(user) not in (aten.mul, aten.mul_):
            return f"{user.name} divides the stream by {fqn}"
        if not self.after_norm(node):
            return f"{fqn} scales the stream element-wise outside a norm (fold it into its layer first)"
        return self.add_gain(user, fqn, offset, None)

    def gain_param(self, node) -> tuple[str | None, float]:
        """A parameter, or a parameter plus a constant, through views and casts."""
        fqn = self.param(node)
        if fqn is not None:
            return fqn, 0.0
        if _packet(node) is aten.add:
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            consts = [a for a in node.args if isinstance(a, (int, float))]
            if len(tensors) == 1 and len(consts) == 1 and (fqn := self.param(tensors[0])) is not None:
                return fqn, float(consts[0])
        return None, 0.0

    def after_norm(self, node: fx.Node) -> bool:
        """Whether ``node`` is a norm's output (through views and casts)."""
        norms = {r.node for r in self.inf.records if r.kind == "norm"}
        while isinstance(node, fx.Node):
            if node.name in norms:
                return True
            if _packet(node) not in _VIEWS:
                return False
            node = next((a for a in node.args if isinstance(a, fx.Node)), None)
        return False

    def feeds_reduction(self, node: fx.Node) -> bool:
        """Whether a square of the stream only feeds a reduction over the features (its rms)."""
        for user in node.users:
            op = _packet(user)
            if op in _VIEWS:
                if not self.feeds_reduction(user):
                    return False
            elif op not in _REDUCE:
                return False
        return True

    def add_gain(self, gained: fx.Node, fqn: str, offset: float, bias: str | None) -> str | None:
        """Record a gain and the consumers of the gained tensor; why it cannot be folded, or None."""
        if fqn in self.gains:
            return f"{fqn} is used by more than one norm"
        gain = Gain(fqn, offset, bias)
        frontier, seen = [gained], set()
        while frontier:
            current = frontier.pop()
            for user in current.users:
                if user in seen:
                    continue
                seen.add(user)
                op = _packet(user)
                if op in _VIEWS:
                    frontier.append(user)
                elif op in _CONTRACTIONS and self.contracted(user, current):
                    for fqn_c, axis in self.consumer_axes(user, current):
                        if self.uses(fqn_c) > 1:
                            return f"the gain {fqn} would be folded into {fqn_c}, which has another use"
                        gain.consumers.append((fqn_c, axis))
                else:
                    return f"the output of the norm with gain {fqn} reaches {user.name} ({op}), not only linear layers"
        if not gain.consumers:
            return f"the norm with gain {fqn} feeds no linear layer"
        self.gains[fqn] = gain
        return None

    def uses(self, fqn: str) -> int:
        """How many ops (past views and casts) read a parameter."""
        names = [n for n, p in self.param_of.items() if p == fqn]
        count, frontier = 0, [self.nodes[n] for n in names if n in self.nodes]
        while frontier:
            for user in frontier.pop().users:
                if _packet(user) in _VIEWS:
                    frontier.append(user)
                else:
                    count += 1
        return count

    def consumer_axes(self, user: fx.Node, current: fx.Node) -> Iterator[tuple[str, int]]:
        for arg in user.args:
            fqn = self.param(arg) or self.cut_param(arg) if isinstance(arg, fx.Node) and arg is not current else None
            for a, s in enumerate(self.inf.param_axes.get(fqn, []) if fqn else []):
                if (fqn, a) in self.inf.consumed and self.structure.root(s) == self.root:
                    yield fqn, a


def _feature_size(other: fx.Node, node: fx.Node, axes: list[int]) -> int:
    """The size of ``other`` along ``node``'s feature axis, broadcast from the right (1 where absent; 0 where
    it cannot be told)."""
    val, ref = other.meta.get("val"), node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 1
    if not isinstance(ref, torch.Tensor) or not axes:
        return 0
    offset = ref.ndim - axes[0]
    return int(val.shape[val.ndim - offset]) if val.ndim >= offset else 1


def _is_square(node: fx.Node) -> bool:
    """x ** 2 or x * x (through casts)."""
    while _packet(node) in (aten.to, aten._to_copy, aten.type_as, aten.clone):
        node = node.args[0]
    op = _packet(node)
    return op in _SQUARE or op in (aten.mul,) and len(node.args) == 2 and node.args[0] is node.args[1]


def stream_roots(structure: PairStructure) -> list[int]:
    """The classes that residual adds write (the residual streams)."""
    return list(dict.fromkeys(structure.root(r.output) for r in structure.anchor.records
                              if r.kind == "residual" and r.output is not None))


def stream_nodes(structure: PairStructure, root: int) -> list[tuple[str, tuple[int, ...]]]:
    """The graph nodes (name, axes) that hold a stream: the outputs of the residual adds that write it."""
    adds = {r.node for r in structure.anchor.records if r.kind == "residual" and r.output is not None
            and structure.root(r.output) == root}
    return [(name, axes) for name, axes in structure.act_nodes.get(root, []) if name in adds]


def stream_rows(acts: Mapping, nodes: list) -> torch.Tensor:
    """A stream's activations as rows (neurons x samples of every node), each node centred and scaled to unit
    mean square so that every layer counts alike. Float64."""
    blocks = []
    for node in nodes:
        x = acts[node].to(torch.float64)
        x = x - x.mean(0)
        blocks.append((x / x.square().mean().sqrt().clamp_min(1e-12)).T)
    return torch.cat(blocks, 1)


def orthogonal_streams(structure: PairStructure) -> tuple[dict[int, Stream], dict[int, str]]:
    """The residual streams an orthogonal map may rotate, and for every other stream why not."""
    ok, why_not = {}, {}
    inf = structure.anchor
    tied = {fqn for group in inf.traced.tied for fqn in group}
    for root in stream_roots(structure):
        n_a, n_b = structure.width(root)
        reason = None
        if n_a != n_b:
            reason = f"its widths differ ({n_a} and {n_b})"
        elif structure.is_fixed(root) or structure.structure(root) is not None or root in structure.carriers:
            reason = "it is fixed or part of a structured space"
        if reason is None:
            walk = _Walk(inf, structure, root)
            reason = walk.check()
            if reason is None:
                shared = [fqn for g in walk.gains.values() for fqn, _ in g.consumers if fqn in tied]
                if shared:
                    reason = f"a norm's gain would be folded into {shared[0]}, which is tied to another use"
        if reason is None:
            ok[root] = Stream(root, list(walk.gains.values()), walk.fix_ones)
        else:
            why_not[root] = reason
    return ok, why_not


class FoldedParams(Mapping):
    """A model's parameters with the gains of ``streams`` folded into the layers they feed, computed when read
    (the base mapping may read from disk): gains become 1 (``offset`` subtracted), their norms' biases are
    divided by them, and every consumer's input axis is scaled by them."""

    def __init__(self, base: Mapping[str, torch.Tensor], streams: Mapping[int, Stream]):
        self.base = base
        self.gain_of: dict[str, Gain] = {}
        self.bias_of: dict[str, Gain] = {}
        self.consumer_of: dict[str, list[tuple[Gain, int]]] = {}
        for stream in streams.values():
            for g in stream.gains:
                self.gain_of[g.fqn] = g
                if g.bias:
                    self.bias_of[g.bias] = g
                for fqn, axis in g.consumers:
                    self.consumer_of.setdefault(fqn, []).append((g, axis))

    @property
    def invariant(self) -> set[str]:
        """Parameters that no map may move: the folded gains (constant along the stream)."""
        return set(self.gain_of)

    def gain(self, g: Gain) -> torch.Tensor:
        return self.base[g.fqn].to(torch.float64) + g.offset

    def __getitem__(self, fqn: str) -> torch.Tensor:
        value = self.base[fqn]
        if fqn in self.gain_of:
            return torch.full_like(value, 1.0 - self.gain_of[fqn].offset)
        if fqn in self.bias_of:
            gain = self.gain(self.bias_of[fqn])
            if bool((gain.abs() < 1e-12).any()):
                raise ZeroDivisionError(f"{self.bias_of[fqn].fqn} has a zero gain; its norm's bias cannot be folded")
            return torch.div(value, gain).to(value.dtype)  # float64 by promotion: no separate conversion
        for g, axis in self.consumer_of.get(fqn, ()):
            shape = [1] * value.ndim
            shape[axis] = -1
            value = torch.mul(value, self.gain(g).reshape(shape)).to(value.dtype)
        return value

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def procrustes(rows_b: torch.Tensor, rows_a: torch.Tensor, fix_ones: bool) -> torch.Tensor:
    """The orthogonal (n x n) ``M`` minimising ||M^T rows_b - rows_a|| (rows: neurons x features); with
    ``fix_ones``, among those with ``M 1 = 1``. Float64."""
    cross = rows_b.to(torch.float64) @ rows_a.to(torch.float64).T
    n = cross.shape[0]
    if not fix_ones:
        return _polar(cross)
    ones = torch.full((n, 1), n ** -0.5, dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([ones, torch.eye(n, dtype=torch.float64)[:, : n - 1]], 1)).Q[:, 1:]
    inner = _polar(basis.T @ cross @ basis)
    return ones @ ones.T + basis @ inner @ basis.T


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(matrix)
    return u @ vh
