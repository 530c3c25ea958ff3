"""The map graph, the IR of alignment: one node per class that needs a transport map, typed by how its plan is
computed, with an edge for every "this plan is computed from that plan" dependency.

Node kinds: ``fixed`` (identity), ``solve`` (from a cost between the class's neurons), ``heads`` (a produced
product solved head by head; it also yields the factors it ``owns``), ``factor`` (a factor a ``heads`` node
solves), ``combine`` (a residual add or concat: the policy over its inputs' plans), ``sum`` (block-diagonal),
``product`` (Kronecker), ``marginal`` (a factor of a solved product), ``block`` (a part of a sum that is such a
factor), ``keep`` (nothing computes a map: order
kept). Edge kinds: ``rows`` (the source aligns the input side of a producer's rows), ``input``, ``part``,
``carrier``, ``factor``. The graph is a DAG: a producer whose rows depend on the class it produces (a stream
that feeds itself) is left out of that class's cost, and any other cycle is an error naming its ops.
"""

from __future__ import annotations

from collections import deque

import networkx as nx

from otfx.align.config import FusionError
from otfx.align.structure import PairStructure


def build_map_graph(s: PairStructure, names: list[str], reads_rows: bool) -> nx.DiGraph:
    """The map graph of the classes that the rewrite of ``names`` needs (and those they are computed from)."""
    g = nx.DiGraph()
    owners = _head_owners(s)
    todo = deque(s.root(sid) for fqn in names for sid in s.anchor.param_axes[fqn] if not s.trivial(s.root(sid)))
    while todo:
        root = todo.popleft()
        if root in g and "kind" in g.nodes[root]:
            continue
        kind, deps, attrs = _node(s, root, owners, reads_rows)
        n_a, n_b = s.width(root)
        g.add_node(root, kind=kind, width=(n_a, n_b), **attrs)
        for dep, edge_kind, producer in deps:
            if g.has_edge(dep, root):
                g.edges[dep, root]["producers"].add(producer)
            else:
                g.add_edge(dep, root, kind=edge_kind, producers={producer})
            todo.append(dep)
    _drop_self_feeding_producers(g, s, todo_order(s, g, names))
    _check_acyclic(g, s)
    return g


def _node(s: PairStructure, root: int, owners: dict[int, int], reads_rows: bool):
    """(kind, [(dependency, edge kind, producer or None)], attributes) of one class, in the order of precedence
    of how a plan can be had."""
    n_a, n_b = s.width(root)
    if s.is_fixed(root) or n_a == n_b == 1:
        if n_a != n_b:
            raise FusionError(f"a fixed space has width {n_b} in {s.other.traced.name} but {n_a} in the "
                              f"anchor ({s.describe(root)}); only free spaces may differ in width")
        return "fixed", [], {}
    structure = s.structure(root)
    if structure and structure[0] == "sum":
        if s.carriers.get(root) and any(_unplanned(s, owners, c) for c in structure[1]):
            # a head dim of fused q | k | v parts that nothing else gives a plan (cross-head matching):
            # the marginal of the solved product, cut into blocks for its parts
            return "marginal", [(s.carriers[root][0], "carrier", None)], {}
        return "sum", [(s.root(c), "part", None) for c in structure[1]], {}
    if s.producers.get(root):
        deps = []
        if reads_rows:
            for p in s.producers[root]:
                for j, sid in enumerate(s.anchor.param_axes[p.fqn]):
                    if j != p.axis and not s.trivial(s.root(sid)):
                        deps.append((s.root(sid), "rows", p.fqn))
        attrs = {"producers": list(s.producers[root])}
        if s.head_aware(root):
            factors = s.flat_factors(root)
            parts = _inner_parts(s, factors[-1]) if owners.get(factors[-1]) == root else []
            owns = [f for f in factors + parts if owners.get(f) == root]
            deps += [(f, "factor", None) for f in factors + parts if f not in owns]
            return "heads", deps, {**attrs, "owns": owns}
        return "solve", deps, attrs
    if root in s.combines:
        record = s.combines[root]
        return "combine", [(s.root(i), "input", None) for i in record.inputs], {"record": record}
    if structure and structure[0] == "prod":
        return "product", [(s.root(c), "part", None) for c in structure[1]], {}
    if root in owners:
        return "factor", [(owners[root], "carrier", None)], {}
    if s.carriers.get(root):
        return "marginal", [(s.carriers[root][0], "carrier", None)], {}
    whole = _planned_sum(s, owners, root)
    if whole is not None:
        return "block", [(whole, "carrier", None)], {}
    if n_a != n_b:
        raise FusionError(f"cannot align {s.describe(root)}: nothing produces it and widths differ ({n_b} vs {n_a})")
    return "keep", [], {}


def _unplanned(s: PairStructure, owners: dict[int, int], sid: int) -> bool:
    """Whether nothing but the sum it is a part of can give this class a plan."""
    root = s.root(sid)
    return not (s.is_fixed(root) or s.structure(root) or s.producers.get(root) or root in s.combines
                or root in owners or s.carriers.get(root))


def _planned_sum(s: PairStructure, owners: dict[int, int], root: int) -> int | None:
    """A sum that ``root`` is a part of and whose plan is a solved product's marginal (see ``_node``)."""
    for whole, (kind, children) in s.part.structure.items():
        parts = [s.root(c) for c in children]
        if kind == "sum" and root in parts and s.carriers.get(s.root(whole)) and any(
                _unplanned(s, owners, c) for c in parts):
            return s.root(whole)
    return None


def _head_owners(s: PairStructure) -> dict[int, int]:
    """For each free factor of a head-aware product, the product that solves it: products whose only head
    factor it is come first (grouped-query attention: kv heads from the keys and values, the query heads
    within a group from the queries), then graph order."""
    aware = [r for r in s.producers if s.head_aware(r)]
    aware.sort(key=lambda r: len(s.flat_factors(r)) != 2)  # stable: graph order within each group
    owners: dict[int, int] = {}
    for carrier in aware:
        factors = s.flat_factors(carrier)
        for f in factors:
            if not s.is_fixed(f) and f not in owners and (not s.solved_alone(f) or _reads(s, f, carrier)):
                owners[f] = carrier
        if owners.get(factors[-1]) == carrier:  # the head dim's free parts are solved with it
            for part in _inner_parts(s, factors[-1]):
                if part not in owners and part not in s.producers and part not in s.combines:
                    owners[part] = carrier
    return owners


def _reads(s: PairStructure, factor: int, carrier: int) -> bool:
    """Whether a producer of ``factor`` reads ``carrier`` (a per-head gate computed from the values): then the
    product solves the factor head by head; otherwise the factor is solved from its own producers and the
    product reads its plan (a depthwise convolution's channels are the stream it reads)."""
    return any(j != p.axis and s.root(sid) == carrier for p in s.producers.get(s.root(factor), [])
               for j, sid in enumerate(s.anchor.param_axes[p.fqn]))


def _inner_parts(s: PairStructure, inner: int) -> list[int]:
    """The free parts of a head dim that is a direct sum (partial rotary's pass-through dims, a fused head's
    value dims), each once; empty where the head dim is one part."""
    parts = [root for root, _, _, free in s.dim_parts(inner) if free and root != s.root(inner)]
    return list(dict.fromkeys(parts))


def todo_order(s: PairStructure, g: nx.DiGraph, names: list[str]) -> list[int]:
    """The classes in the order the rewrite of ``names`` first reaches them, depth first through what each is
    computed from (the order in which cycles are broken)."""
    reverse = g.reverse(copy=False)
    order: dict[int, None] = {}
    for fqn in names:
        for sid in s.anchor.param_axes[fqn]:
            root = s.root(sid)
            if root in g and root not in order:
                order.update(dict.fromkeys(n for n in nx.dfs_preorder_nodes(reverse, root) if n not in order))
    return list(order)


def _drop_self_feeding_producers(g: nx.DiGraph, s: PairStructure, order: list[int]) -> None:
    """Leave out of a class's cost the producers whose input side is computed from that class itself (its
    rows cannot be aligned before the class is); the first class reached keeps the others' producers.

    A class every producer of which reads itself back (a query or value projection reached before the stream
    it reads, when the stream's own producers, the output projections, are computed from the heads) waits
    until a later class has cut the loop (the stream keeps its embedding and drops the projections); only
    when no class left can keep a producer is it an error."""
    pending = deque(r for r in order if g.nodes[r]["kind"] in ("solve", "heads"))
    waited = 0  # classes tried in a row without one keeping a producer
    while pending:
        root = pending.popleft()
        data = g.nodes[root]
        # what is computed from this class; dropping edges into it below never changes that set
        downstream = nx.descendants(g, root) | {root}
        rows = {p.fqn: [u for u, _, e in g.in_edges(root, data=True) if e["kind"] == "rows"
                        and p.fqn in e["producers"]] for p in data["producers"]}
        dropped = {p.fqn for p in data["producers"] if any(u in downstream for u in rows[p.fqn])}
        kept = [p for p in data["producers"] if p.fqn not in dropped]
        if not kept:
            if waited >= len(pending):
                raise FusionError(f"no producer of {s.describe(root)} can be aligned: each reads the stream it "
                                  "writes; try residual='mean'")
            pending.append(root)
            waited += 1
            continue
        waited = 0
        for fqn in dropped:
            for u in rows[fqn]:
                e = g.edges[u, root]
                e["producers"].discard(fqn)
                if not e["producers"]:
                    g.remove_edge(u, root)
        data["producers"] = kept


def _check_acyclic(g: nx.DiGraph, s: PairStructure) -> None:
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    ops = " -> ".join(node_label(s, g, u) for u, _ in cycle)
    raise FusionError(f"the transport maps depend on each other in a cycle: {ops}. This happens when a module "
                      "is used twice in one forward or a stream feeds itself; try residual='shared'")


def node_label(s: PairStructure, g: nx.DiGraph, root: int) -> str:
    """A readable name: the module path of the class's first producer or record, with its kind."""
    data = g.nodes[root]
    kind = data.get("kind", "?")
    if data.get("producers"):
        return f"{data['producers'][0].fqn.rsplit('.', 1)[0]} ({kind})"
    carriers = [u for u, _, k in g.in_edges(root, data="kind") if k == "carrier"]
    if carriers and g.nodes[carriers[0]].get("producers"):
        factors = s.flat_factors(carriers[0])  # a part of the head dim (a fused head's value dims) is no factor
        where = f"factor {factors.index(root)}" if root in factors else "head-dim part"
        return f"{g.nodes[carriers[0]]['producers'][0].fqn.rsplit('.', 1)[0]} {where} ({kind})"
    if data.get("record") is not None:
        return f"{module_path(s, data['record'].node)} {data['record'].kind} ({kind})"
    params = s.params_of(root)
    return f"{params[0] if params else f'space {root}'} ({kind})"


def module_path(s: PairStructure, node_name: str) -> str:
    """The module path of a traced node (from torch.export's ``nn_module_stack``), else the node's name."""
    node = next((n for n in s.anchor.traced.graph.nodes if n.name == node_name), None)
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return node_name
    path = list(stack.values())[-1][0]
    return path.replace("L['self'].", "").replace("L__self___", "") or node_name
