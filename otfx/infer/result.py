"""The result of inference, as data: parameter axis -> transport space, the spaces' structure, and the TM flow
graph (a networkx DiGraph) whose nodes are the paper's layers, residual, attention, concat and norm nodes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from otfx.infer.context import Conflict, Frozen, InferContext, Producer, Record
from otfx.infer.spaces import Spaces
from otfx.trace import Traced


@dataclass
class Inference:
    """Transport spaces of one traced model. Space ids index ``spaces``; use ``coarse``/``fine`` for classes."""

    traced: Traced
    spaces: Spaces
    param_axes: dict[str, list[int]]
    buffer_axes: dict[str, list[int]]
    #: (space, parameter, axis, node): the parameter rows that create a space (a layer's output)
    producer_list: list[Producer]
    records: list[Record]
    frozen_by: list[Frozen]
    #: parameter axes contracted with an input activation (a layer's input side)
    consumed: set[tuple[str, int]] = field(default_factory=set)
    node_axes: dict[str, list[int]] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    flow_graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    #: structures that could not be reconciled, by op (their spaces are fixed); reported by ``coverage()``
    conflicts: list[Conflict] = field(default_factory=list)

    @classmethod
    def build(cls, traced: Traced, ctx: InferContext) -> Inference:
        result = cls(traced, ctx.spaces, ctx.param_axes, ctx.buffer_axes, list(ctx.producers), list(ctx.records),
                     ctx.frozen_by, set(ctx.consumed), conflicts=list(ctx.conflicts))
        result.node_axes = {n.name: ax for n, ax in ctx.axes.items()  # computed tensors, for activations
                            if n.op == "call_function" and isinstance(ax, list) and all(isinstance(a, int) for a in ax)}
        result.roles = result._roles()
        result.flow_graph = result._flow_graph()
        return result

    # ---- spaces --------------------------------------------------------------------------------------
    def coarse(self, sid: int) -> int:
        return self.spaces.coarse.find(sid)

    def fine(self, sid: int) -> int:
        return self.spaces.fine.find(sid)

    def is_fixed(self, sid: int) -> bool:
        return self.spaces.coarse.is_fixed(sid)

    def size(self, sid: int) -> int:
        return self.spaces.size(sid)

    def leaves(self, sid: int, partition: str = "coarse") -> list[int]:
        """The atomic spaces a (possibly structured) space is made of."""
        part = getattr(self.spaces, partition)
        root = part.find(sid)
        structure = part.structure.get(root)
        if structure is None:
            return [root]
        return [leaf for child in structure[1] for leaf in self.leaves(child, partition)]

    def free_spaces(self) -> list[int]:
        """Atomic coarse spaces that act on some parameter and may be permuted."""
        seen: dict[int, None] = {}
        for axes in self.param_axes.values():
            for sid in axes:
                for leaf in self.leaves(sid):
                    if not self.is_fixed(leaf) and self.size(leaf) > 1:
                        seen[leaf] = None
        return list(seen)

    def space_params(self) -> dict[int, list[tuple[str, int]]]:
        """For each free atomic space, the parameter axes it acts on (directly or as a part)."""
        table: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for fqn, axes in self.param_axes.items():
            for axis, sid in enumerate(axes):
                for leaf in self.leaves(sid):
                    if not self.is_fixed(leaf) and self.size(leaf) > 1:
                        table[leaf].append((fqn, axis))
        return dict(table)

    def fixed_reasons(self, sid: int) -> list[str]:
        return self.spaces.coarse.fixed.get(self.coarse(sid), [])

    def _roles(self) -> dict[int, str]:
        roles: dict[int, str] = {}

        def mark(sid: int | None, role: str) -> None:
            if sid is None:
                return
            for leaf in self.leaves(sid):
                roles.setdefault(leaf, role)

        for r in self.records:
            if r.kind == "attention":
                for h in r.info.get("heads", []):
                    mark(h, "heads")
        for r in self.records:
            if r.kind == "residual":
                mark(r.output, "residual")
        for r in self.records:
            if r.kind == "attention":
                mark(r.inputs[0], "head_dim_qk")
                mark(r.inputs[2], "head_dim_v")
        for sid in self.free_spaces():
            roles.setdefault(sid, "hidden")
        return {sid: role for sid, role in roles.items() if sid in set(self.free_spaces())}

    # ---- flow graph ----------------------------------------------------------------------------------
    def _flow_graph(self) -> nx.DiGraph:
        from otfx.infer.flowgraph import build_flow_graph

        return build_flow_graph(self.traced.graph, self.records, self.fine, self.size)

    # ---- reporting -----------------------------------------------------------------------------------
    def _params_by_space(self) -> dict[int, list[str]]:
        by_space: dict[int, list[str]] = defaultdict(list)  # a parameter axis is listed under each of its parts
        for fqn, axes in self.param_axes.items():
            for axis, sid in enumerate(axes):
                for leaf in {self.coarse(sid), *self.leaves(sid)}:
                    by_space[leaf].append(f"{fqn} axis {axis}")
        return by_space

    def _touched_params(self, spaces: list[int], by_space: dict[int, list[str]]) -> list[str]:
        return sorted({p for sid in spaces for leaf in [sid, *self.leaves(sid)]
                       for p in by_space.get(self.coarse(leaf), [])})

    def coverage(self) -> dict[str, dict]:
        """Ops that no pass understands, known ops that froze spaces acting on parameters, and ops where
        structures of parameter spaces conflicted (those spaces are fixed too).

        ``{op: {"nodes": [...], "unknown": bool, "params": ["name axis k", ...], "conflicts": [why, ...]}}``;
        harmless mask bookkeeping (known ops that touch no parameter space) is left out, and so are axes whose
        order the model's function depends on or reads as ids (see ``ordered``): no pass can free those.
        """
        by_space = self._params_by_space()
        report: dict[str, dict] = {}

        def entry(op: str, unknown: bool) -> dict:
            return report.setdefault(op, {"nodes": [], "unknown": unknown, "params": [], "conflicts": []})

        for op, node, unknown, touched, ordered in self.frozen_by:
            if not unknown:  # a model output keeps its order whatever a known op does to it (picked logits)
                touched = [sid for sid in touched if "model output" not in self.fixed_reasons(sid)]
            params = self._touched_params(touched, by_space)
            if ordered or (not unknown and not params):
                continue
            found = entry(op, unknown)
            found["nodes"].append(node)
            found["params"] = sorted(set(found["params"]) | set(params))
        for op, node, why, spaces in self.conflicts:  # conflicts among positions only are harmless
            params = self._touched_params(spaces, by_space)
            if not params:
                continue
            found = entry(op, False)
            found["params"] = sorted(set(found["params"]) | set(params))
            if node and node not in found["nodes"]:
                found["nodes"].append(node)
            if why not in found["conflicts"]:
                found["conflicts"].append(why)
        return report

    def ordered(self) -> dict[str, list[str]]:
        """Parameter axes kept in their order because the model's function depends on it (an FFT over them) or
        reads positions along them as ids (a router's top-k over experts): ``{op: ["name axis k", ...]}``."""
        by_space = self._params_by_space()
        out: dict[str, set[str]] = defaultdict(set)
        for op, _node, _unknown, touched, ordered in self.frozen_by:
            if ordered:
                out[op] |= set(self._touched_params(touched, by_space))
        return {op: sorted(params) for op, params in out.items() if params}

    def summary(self) -> str:
        from otfx.inspection import render_summary

        return render_summary(self)

