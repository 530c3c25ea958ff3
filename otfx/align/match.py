"""Checks that two traced models are the same architecture (up to the widths of free spaces)."""

from __future__ import annotations

from otfx.align.config import FusionError
from otfx.infer.result import Inference


def check_same_architecture(anchor: Inference, other: Inference) -> None:
    """Raise FusionError naming the first difference that makes the two models impossible to fuse."""
    a_name, b_name = anchor.traced.name, other.traced.name
    a_ops = [str(n.target) for n in anchor.traced.graph.nodes if n.op == "call_function"]
    b_ops = [str(n.target) for n in other.traced.graph.nodes if n.op == "call_function"]
    a_params, b_params = list(anchor.param_axes), list(other.param_axes)
    if a_params != b_params:
        missing = sorted(set(a_params) ^ set(b_params))
        hint = f"parameters only in one of them: {missing[:4]}" if missing else "parameters in another order"
        layers = sum(1 for p in a_params if p.endswith("weight")), sum(1 for p in b_params if p.endswith("weight"))
        raise FusionError(f"{b_name} and the anchor {a_name} are different architectures or depths ({hint}; "
                          f"{layers[1]} vs {layers[0]} weight tensors). Fusion needs the same layers in both models.")
    if a_ops != b_ops:
        at = next(i for i, (x, y) in enumerate(zip(a_ops + [""], b_ops + [""])) if x != y)
        theirs = b_ops[at] if at < len(b_ops) else "missing"
        ours = a_ops[at] if at < len(a_ops) else "missing"
        raise FusionError(f"{b_name} and the anchor {a_name} trace to different graphs: op {at} is {theirs} vs {ours}")
    _check_heads(anchor, other)
    for fqn, axes in anchor.param_axes.items():
        b_axes = other.param_axes[fqn]
        if len(axes) != len(b_axes):
            raise FusionError(f"{fqn} has {len(b_axes)} axes in {b_name} but {len(axes)} in the anchor {a_name}")
        for axis, (sa, sb) in enumerate(zip(axes, b_axes)):
            fixed = anchor.is_fixed(sa)
            if fixed and anchor.size(sa) != other.size(sb):
                why = ", ".join(anchor.fixed_reasons(sa)[:2])
                raise FusionError(f"{fqn} axis {axis} has width {other.size(sb)} in {b_name} but {anchor.size(sa)} "
                                  f"in the anchor, and that axis cannot be aligned ({why})")
    if len(anchor.spaces.coarse.parent) != len(other.spaces.coarse.parent):
        raise FusionError(f"{b_name} and the anchor {a_name} have different flow graphs")
    if _canonical(anchor) != _canonical(other):
        raise FusionError(f"{b_name} and the anchor {a_name} have different transport-space structure")


def _canonical(inference: Inference) -> list[int]:
    """The fine partition as a list: each space's class named by its first member."""
    first: dict[int, int] = {}
    return [first.setdefault(inference.fine(sid), sid) for sid in range(len(inference.spaces.fine.parent))]


def _check_heads(anchor: Inference, other: Inference) -> None:
    """Attention layers must have the same head counts: with equal hidden sizes (4 x 16 vs 8 x 8) the graphs and
    parameter shapes agree, but no transport map turns one head layout into the other."""
    a_att = [r for r in anchor.records if r.kind == "attention"]
    b_att = [r for r in other.records if r.kind == "attention"]
    for i, (ra, rb) in enumerate(zip(a_att, b_att)):
        heads_a = [anchor.size(h) for h in ra.info.get("heads", [])]
        heads_b = [other.size(h) for h in rb.info.get("heads", [])]
        if heads_a == heads_b:
            continue
        dim_a = anchor.size(ra.inputs[0]) if ra.inputs else "?"
        dim_b = other.size(rb.inputs[0]) if rb.inputs else "?"
        if heads_a and heads_b and dim_a != "?" and heads_a[0] * dim_a != heads_b[0] * dim_b:
            continue  # different widths: heterogeneous fusion maps heads to heads, nothing is mistaken for another
        gqa = len(set(heads_a)) > 1 or len(set(heads_b)) > 1  # grouped-query: fewer key/value heads
        kv = f" ({heads_b[1]} vs {heads_a[1]} key/value heads)" if gqa and heads_a[1:2] != heads_b[1:2] else ""
        raise FusionError(f"attention {i} (node {ra.node}) has {heads_b[0] if heads_b else '?'} heads of width "
                          f"{dim_b} in {other.traced.name} but {heads_a[0] if heads_a else '?'} heads of width "
                          f"{dim_a} in the anchor {anchor.traced.name}{kv}; models with different head counts "
                          "cannot be fused or aligned, even when their hidden sizes agree")
