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
