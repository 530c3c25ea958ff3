"""Readable summaries and pictures of an inference result (``otfx.inspect`` / ``otfx inspect``)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import networkx as nx

from otfx.io import atomic_file, atomic_path

ROLES = ("residual", "hidden", "heads", "head_dim_qk", "head_dim_v")
KIND_COLOURS = {"solve": "#4c78a8", "heads": "#e45756", "combine": "#f58518", "sum": "#b279a2",
                "product": "#72b7b2", "factor": "#ff9da6", "marginal": "#9d755d", "fixed": "#bab0ac",
                "keep": "#eeca3b", "input": "#54a24b", "output": "#000000"}
_OTHER_COLOUR = "#9d9d9d"


def inspect_model(model, args: tuple = (), kwargs: dict | None = None, max_rows: int | None = 60) -> str:
    """Trace (if needed), analyse and summarise a model: its transport spaces, map graph and coverage."""
    from otfx.api import analyse

    return render_summary(analyse(model, args, kwargs), max_rows=max_rows)


def render_summary(inference, max_rows: int | None = 60) -> str:
    """The model, its free spaces by role and size, a table of spaces, the map graph and the coverage report."""
    free = inference.free_spaces()
    lines = [f"{inference.traced!r}", ""]
    counts = Counter((inference.roles.get(s, "hidden"), inference.size(s)) for s in free)
    by_role = Counter(inference.roles.get(s, "hidden") for s in free)
    if free:
        lines.append(f"free spaces: {len(free)} (" + ", ".join(f"{role} {by_role[role]}" for role in
                                                           _role_order(by_role)) + ")")
        lines.append(_table(["role", "size", "count"],
                            [[role, size, n] for (role, size), n in sorted(counts.items(), key=_role_size_key)],
                            indent="  "))
    else:
        lines.append("free spaces: none (every parameter axis is fixed)")
    lines += ["", *space_table(inference, max_rows)]
    lines += ["", map_graph_line(display_map_graph(inference))]
    lines += ["", *coverage_lines(inference.coverage())]
    for op, params in sorted(inference.ordered().items()):
        lines.append(f"kept in order (the model reads their order through {op}): {', '.join(params[:4])}"
                     + (f" and {len(params) - 4} more" if len(params) > 4 else ""))
    return "\n".join(lines)


def _role_order(roles) -> list[str]:
    return sorted(roles, key=lambda r: (ROLES.index(r) if r in ROLES else len(ROLES), r))


def _role_size_key(item) -> tuple:
    (role, size), _ = item
    return (ROLES.index(role) if role in ROLES else len(ROLES), role, size)


def space_rows(inference) -> list[dict]:
    """One row per space acting on a parameter (structured spaces followed by their parts), in model order."""
    by_root: dict[int, list[tuple[str, int]]] = {}
    for fqn, axes in inference.param_axes.items():
        for axis, sid in enumerate(axes):
            by_root.setdefault(inference.coarse(sid), []).append((fqn, axis))
    leaf_params = inference.space_params()
    coarse = inference.spaces.coarse
    rows: list[dict] = []
    seen: set[int] = set()

    def add(sid: int, params: list[tuple[str, int]], parent: int | None) -> None:
        root = inference.coarse(sid)
        if root in seen:
            return
        seen.add(root)
        structure = coarse.structure.get(root)
        fixed = inference.is_fixed(root)
        if structure is not None:
            kind, children = structure
            sep = " x " if kind == "prod" else " + "
            shape = sep.join(f"#{inference.coarse(c)}" for c in children)
            role = "product" if kind == "prod" else "sum"
        else:
            shape, children = "-", []
            role = "fixed" if fixed else inference.roles.get(root, "-" if inference.size(root) <= 1 else "hidden")
        if parent is not None:
            shape = f"part of #{parent}" if shape == "-" else f"{shape}, part of #{parent}"
        rows.append({"id": root, "role": role, "size": inference.size(root), "structure": shape,
                     "fixed": "; ".join(inference.fixed_reasons(root)), "params": params or leaf_params.get(root, [])})
        for child in children:
            add(child, leaf_params.get(inference.coarse(child), []), root)

    for root, params in by_root.items():
        add(root, params, None)
    return rows


def space_table(inference, max_rows: int | None = 60) -> list[str]:
    rows = space_rows(inference)
    shown = rows if max_rows is None else rows[:max_rows]
    body = []
    for r in shown:
        params = r["params"]
        example = f"{params[0][0]}:{params[0][1]}" if params else ""
        if len(example) > 64:
            example = "..." + example[-61:]
        if len(params) > 1:
            example += f" (+{len(params) - 1})"
        fixed = r["fixed"] if len(r["fixed"]) <= 60 else r["fixed"][:57] + "..."
        body.append([f"#{r['id']}", r["role"], r["size"], r["structure"], fixed or "-", example or "-"])
    lines = [f"spaces acting on parameters: {len(rows)}"]
    lines.append(_table(["id", "role", "size", "structure", "fixed because", "parameter axes (examples)"], body,
                        indent="  "))
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more (otfx inspect --all shows every space)")
    return lines


def map_graph_line(graph: nx.DiGraph) -> str:
    kinds = Counter(data.get("kind", "?") for _, data in graph.nodes(data=True))
    parts = ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"map graph: {graph.number_of_nodes()} nodes ({parts or 'none'}), {graph.number_of_edges()} edges"


def coverage_lines(coverage: dict[str, dict]) -> list[str]:
    if not coverage:
        return ["coverage: every op that touches a parameter space is understood by a pass"]
    unknown = sum(1 for e in coverage.values() if e["unknown"])
    lines = [f"coverage: {len(coverage)} op(s) froze parameter spaces ({unknown} unknown to every pass)"]
    for op, entry in sorted(coverage.items()):
        what = "unknown op" if entry["unknown"] else "known op, freezes"
        lines.append(f"  {op} ({what}; {len(entry['nodes'])} node(s): {_some(entry['nodes'], 3)})")
        if entry["params"]:
            lines.append(f"    froze: {_some(entry['params'], 4)}")
    return lines


def _some(items: list[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _table(header: list[str], rows: list[list], indent: str = "") -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return indent + "  ".join(c.rjust(w) if num else c.ljust(w)
                                  for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([fmt(cells[0]), indent + "  ".join("-" * w for w in widths), *map(fmt, cells[1:])])


# ------------------------------------------------------------------------------------------------ pictures


def write_graph(inference, path: str | Path) -> Path:
    """Write the map graph (what alignment runs) as ``.dot``, ``.graphml`` or ``.png`` (chosen by suffix),
    atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    graph = display_map_graph(inference) if hasattr(inference, "traced") else inference
    if suffix in (".dot", ".gv"):
        with atomic_file(path) as handle:
            handle.write(to_dot(graph))
    elif suffix == ".graphml":
        with atomic_path(path) as tmp:
            nx.write_graphml(_scalar_attrs(graph), tmp)
    elif suffix == ".png":
        with atomic_path(path) as tmp:
            draw_png(graph, tmp, title=repr(getattr(inference, "traced", "")))
    else:
        raise ValueError(f"cannot write the map graph as {path.name}: use a .dot, .graphml or .png file name")
    return path


def display_map_graph(inference, config=None) -> nx.DiGraph:
    """The map graph alignment runs for this model (``config``: a ``FusionConfig``, the defaults of ``fuse``
    if None), with readable names: module paths, node kinds, edges labelled with their space's role and width,
    and distinct ``input``/``output`` nodes for where the maps start and end."""
    from otfx.align.config import FusionConfig
    from otfx.align.mapgraph import node_label
    from otfx.align.maps import TransportMaps

    maps = TransportMaps(inference, inference, config or FusionConfig())
    g = maps.graph
    names = {root: f"{node_label(maps.structure, g, root)} #{root}" for root in g}
    out = nx.DiGraph()
    out.add_node("input", kind="input", op="input")
    for root, data in g.nodes(data=True):
        out.add_node(names[root], kind=data["kind"], op=names[root], width=data["width"][0], space=root)
    out.add_node("output", kind="output", op="output")
    for u, v, data in g.edges(data=True):
        label = f"{_role(inference, maps, u)} {g.nodes[u]['width'][0]}"
        out.add_edge(names[u], names[v], kind=data["kind"], label=label)
    for root in g:
        if g.in_degree(root) == 0:
            out.add_edge("input", names[root], kind="input", label="")
        if g.out_degree(root) == 0:
            out.add_edge(names[root], "output", kind="output", label=f"{_role(inference, maps, root)} "
                                                                     f"{g.nodes[root]['width'][0]}")
    return out


def _role(inference, maps, root: int) -> str:
    structure = maps.structure.structure(root)
    if structure is not None:
        return "product" if structure[0] == "prod" else "sum"
    if maps.structure.is_fixed(root):
        return "fixed"
    return inference.roles.get(inference.coarse(root), "hidden")


def _scalar_attrs(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy whose attributes GraphML can hold: None dropped, non-scalars as strings."""
    def clean(attrs: dict) -> dict:
        return {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in attrs.items()
                if v is not None}

    out = nx.DiGraph()
    out.add_nodes_from((n, clean(d)) for n, d in graph.nodes(data=True))
    out.add_edges_from((u, v, clean(d)) for u, v, d in graph.edges(data=True))
    return out


def to_dot(graph: nx.DiGraph) -> str:
    """DOT text: through pydot when it is installed, else written by hand."""
    styled = _scalar_attrs(graph)
    for node, data in styled.nodes(data=True):
        data["label"] = f"{data.get('op', node)}\\n{data.get('kind', '')}"
        data["fillcolor"] = KIND_COLOURS.get(data.get("kind"), _OTHER_COLOUR)
        data["style"] = "filled"
    if importlib.util.find_spec("pydot") is not None:
        from networkx.drawing.nx_pydot import to_pydot

        dot = to_pydot(styled)
        dot.set_rankdir("LR")
        return dot.to_string()

    def quote(value) -> str:
        text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\\\\n", "\\n")
        return f'"{text}"'

    def attrs(data: dict) -> str:
        return ", ".join(f"{k}={quote(v)}" for k, v in data.items())

    lines = ["digraph flow {", "  rankdir=LR;"]
    lines += [f"  {quote(n)} [{attrs(d)}];" for n, d in styled.nodes(data=True)]
    lines += [f"  {quote(u)} -> {quote(v)} [{attrs(d)}];" for u, v, d in styled.edges(data=True)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def layered_positions(graph: nx.DiGraph, order: dict | None = None) -> dict:
    """Left-to-right layers: longest path over the edges that go forward in ``order`` (node -> rank; default
    insertion order), so that cycles (if any) do not collapse it into one layer."""
    rank = {n: (order.get(n, len(order)) if order else 0, i) for i, n in enumerate(graph.nodes)}
    layer: dict = {}
    for node in sorted(graph.nodes, key=rank.__getitem__):
        layer[node] = max((layer[u] + 1 for u in graph.predecessors(node) if rank[u] < rank[node]), default=0)
    layers: dict[int, list] = {}
    for node in sorted(graph.nodes, key=rank.__getitem__):
        layers.setdefault(layer[node], []).append(node)
    pos = {}
    for depth, nodes in layers.items():
        for i, node in enumerate(nodes):
            pos[node] = (float(depth), (len(nodes) - 1) / 2.0 - i)
    return pos


def draw_png(graph: nx.DiGraph, path: str | Path, title: str = "", order: dict | None = None) -> None:
    """Draw the map graph with matplotlib (no pyplot, no graphviz), nodes coloured by kind."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if order is None and nx.is_directed_acyclic_graph(graph):
        order = {n: i for i, n in enumerate(nx.topological_sort(graph))}
    pos = layered_positions(graph, order)
    depth = max((x for x, _ in pos.values()), default=0) + 1
    height = max((abs(y) for _, y in pos.values()), default=0) * 2 + 1
    fig = Figure(figsize=(min(max(6.0, 2.0 * depth), 120.0), min(max(3.0, 0.9 * height + 1.5), 30.0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for u, v in graph.edges:
        ax.annotate("", xy=pos[v], xytext=pos[u], arrowprops={"arrowstyle": "-|>", "color": "#888888", "lw": 0.7,
                                                              "shrinkA": 7, "shrinkB": 7,
                                                              "connectionstyle": "arc3,rad=0.08"})
    if graph.number_of_edges() <= 200:
        for u, v, data in graph.edges(data=True):
            if data.get("label"):
                (x0, y0), (x1, y1) = pos[u], pos[v]
                ax.text((x0 + x1) / 2, (y0 + y1) / 2, data["label"], fontsize=4.5, color="#555555", ha="center")
    kinds = [graph.nodes[n].get("kind") for n in graph.nodes]
    if pos:
        xs, ys = zip(*(pos[n] for n in graph.nodes))
        ax.scatter(xs, ys, s=140, c=[KIND_COLOURS.get(k, _OTHER_COLOUR) for k in kinds], zorder=3,
                   edgecolors="black", linewidths=0.5)
    if graph.number_of_nodes() <= 400:
        for i, n in enumerate(sorted(graph.nodes, key=lambda n: pos[n])):
            x, y = pos[n]
            offset = 0.12 + 0.14 * (i % 2)  # staggered: long module paths of neighbours do not overlap
            ax.text(x, y - offset, str(graph.nodes[n].get("op", n)), ha="center", va="top", fontsize=6)
    present = sorted(set(kinds) - {None}, key=lambda k: list(KIND_COLOURS).index(k) if k in KIND_COLOURS else 99)
    handles = [Line2D([], [], marker="o", ls="", color=KIND_COLOURS.get(k, _OTHER_COLOUR), label=k) for k in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False)
    ax.set_title(f"{title}\nmap graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges",
                 fontsize=9)
    ax.set_axis_off()
    ax.margins(0.05, 0.15)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
