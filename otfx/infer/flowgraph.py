"""The TM flow graph: the paper's nodes (layers, residual adds, attention, concatenations, norms) connected as
data flows between them in the traced graph; each edge carries one transport space (the map between them)."""

from __future__ import annotations

import networkx as nx
from torch import fx

from otfx.infer.context import Record
from otfx.infer.kinds import RecordKind

#: the record kinds that are flow-graph nodes (a plain matmul is part of an attention or a layer)
KINDS = (RecordKind.layer, RecordKind.norm, RecordKind.residual, RecordKind.concat, RecordKind.attention)


def build_flow_graph(graph: fx.Graph, records: list[Record], fine, sizes) -> nx.DiGraph:
    """Connect every flow-graph node to the next ones downstream; ``fine``/``sizes`` name edge spaces."""
    owner: dict[str, str] = {}
    g = nx.DiGraph()
    g.add_node("input", kind="input")
    g.add_node("output", kind="output")
    for r in records:
        if r.kind not in KINDS:
            continue
        name = f"{r.kind.value}:{r.node}"
        attrs = {"kind": r.kind.value, "op": r.node}
        if r.output is not None:
            attrs["space"] = fine(r.output)
            attrs["size"] = sizes(r.output)
        if r.kind == "layer" and r.info.get("weight"):
            attrs["weight"] = r.info["weight"]
        g.add_node(name, **attrs)
        owner[r.node] = name
        if r.kind == "attention" and r.info.get("form") == "matmul+softmax":
            for part in r.info.get("matmuls", []):
                owner[part] = name
    for node in graph.nodes:
        if node.op == "placeholder" and node.users and not node.name.startswith(("p_", "b_", "c_")):
            _connect(g, owner, "input", node)
        elif node.name in owner:
            _connect(g, owner, owner[node.name], node)
    g.remove_nodes_from([n for n in ("input", "output") if g.degree(n) == 0])
    return g


def _connect(g: nx.DiGraph, owner: dict[str, str], src: str, start: fx.Node) -> None:
    """Edges from ``src`` to the first flow-graph nodes reached from ``start`` through other ops."""
    seen, frontier = set(), list(start.users)
    while frontier:
        node = frontier.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        target = owner.get(node.name)
        if node.op == "output":
            target = "output"
        if target is not None and target != src:
            g.add_edge(src, target, space=g.nodes[src].get("space"), size=g.nodes[src].get("size"))
        elif target is None:
            frontier.extend(node.users)
