"""A small matcher for pattern passes: walk up or down a chain of ops, skipping the ones that do not change
what a pattern is about (casts, copies, dropout, scaling)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

aten = torch.ops.aten

#: casts and copies, which never change a pattern
CASTS = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                   aten.alias.default, aten.contiguous.default, aten.detach.default, aten.type_as.default,
                   aten.dropout.default})


def packet(node) -> object:
    """The overload packet of a call (``aten.mul`` for ``aten.mul.Tensor``), or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", node.target)


def is_op(node, *packets) -> bool:
    return packet(node) in packets


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def skip_up(node, through: Iterable = CASTS) -> object:
    """Follow tensor arguments upward while the op is one of ``through``: the first argument of the node's own
    shape (the data, not a broadcast mask or scale), else the first tensor argument."""
    through = frozenset(through)
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in through:
        args = tensor_args(node)
        same = [a for a in args if _shape(a) == _shape(node)]
        node = (same or args or [None])[0]
    return node


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def downstream(node: fx.Node, accept, through: Iterable = CASTS) -> fx.Node | None:
    """The first user reached through ``through`` ops for which ``accept(user, via)`` holds (``via`` is the node
    it reads), breadth first."""
    through = frozenset(through)
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            if accept(user, current):
                return user
            if user.op == "call_function" and user.target in through:
                frontier.append(user)
    return None
