"""The map graph (the IR of alignment) checked against the architecture it was built from: node kinds, the
edges between them, and that evaluating it in topological order is what fusion runs."""

from __future__ import annotations

import networkx as nx
import pytest

import otfx
from otfx import testing as zoo
from otfx.align.config import FusionConfig, FusionError
from otfx.align.mapgraph import _check_acyclic, node_label
from otfx.align.maps import TransportMaps


def map_graph(arch: str, config: FusionConfig, **build) -> tuple[TransportMaps, nx.DiGraph]:
    model, args = zoo.build(arch, **build)
    inference = otfx.analyse(otfx.trace(model, args))
    maps = TransportMaps(inference, inference, config)
    return maps, maps.graph


def kinds(g: nx.DiGraph, kind: str) -> list[int]:
    return [n for n, k in g.nodes(data="kind") if k == kind]


def in_edges(g: nx.DiGraph, node: int, kind: str) -> list[int]:
    return [u for u, _, k in g.in_edges(node, data="kind") if k == kind]


@pytest.mark.parametrize("arch", ["bert", "llama", "timm_vit"])
def test_one_combine_node_per_residual_add_and_none_when_shared(arch):
    maps, g = map_graph(arch, FusionConfig(residual="mean"))
    adds = [r for r in maps.anchor.records if r.kind == "residual"]
    combines = kinds(g, "combine")
    assert len(adds) >= 4 and len(combines) == len(adds)
    for node in combines:
        record = g.nodes[node]["record"]
        assert record.kind == "residual" and maps.root(record.output) == node
        assert sorted(in_edges(g, node, "input")) == sorted({maps.root(s) for s in record.inputs})
    _, shared = map_graph(arch, FusionConfig(residual="shared"))
    assert not kinds(shared, "combine")
    assert nx.is_directed_acyclic_graph(g) and nx.is_directed_acyclic_graph(shared)


@pytest.mark.parametrize("heads", ["cross", "aware"])
def test_grouped_query_heads_are_kv_heads_times_the_group(heads):
    maps, g = map_graph("llama", FusionConfig(heads=heads), heads=8, kv_heads=2)
    s = maps.structure
    queries = [n for n in kinds(g, "heads") if len(s.flat_factors(n)) == 3]
    keys = [n for n in kinds(g, "heads") if len(s.flat_factors(n)) == 2]
    assert len(queries) == 2 and len(keys) >= 2  # 2 layers: q products, k (and v for aware) products
    for q in queries:
        kv, group, head_dim = s.flat_factors(q)
        assert s.width(kv) == (2, 2) and s.width(group) == (4, 4) and s.is_fixed(head_dim)  # rotary pins it
        owner = next(iter(in_edges(g, kv, "carrier")))
        assert s.flat_factors(owner)[0] == kv and owner in keys  # kv heads are solved from the keys
        assert kv in in_edges(g, q, "factor") and group in g.nodes[q]["owns"]
        assert in_edges(g, group, "carrier") == [q]


def test_fused_qkv_is_a_sum_of_three_products_and_rows_edges_follow_the_input_side():
    maps, g = map_graph("timm_vit", FusionConfig())
    sums = kinds(g, "sum")
    assert len(sums) == 2
    for node in sums:
        assert len(in_edges(g, node, "part")) == 3
    for node in kinds(g, "solve"):
        data = g.nodes[node]
        assert data["producers"], node_label(maps.structure, g, node)
        for p in data["producers"]:  # every non-trivial input-side class of a kept producer is an edge
            for j, sid in enumerate(maps.anchor.param_axes[p.fqn]):
                root = maps.root(sid)
                if j != p.axis and not maps.structure.trivial(root):
                    assert g.has_edge(root, node) and p.fqn in g.edges[root, node]["producers"]


def test_a_stream_that_feeds_itself_leaves_its_readers_out_of_its_cost():
    maps, g = map_graph("bert", FusionConfig(residual="shared"))
    stream = max(kinds(g, "solve"), key=lambda n: len(g.nodes[n].get("producers", [])) and g.out_degree(n))
    used = {p.fqn for p in g.nodes[stream]["producers"]}
    assert any("embeddings" in f for f in used)
    assert not any("output.dense" in f for f in used)  # written from the stream's own readers: left out
    assert nx.is_directed_acyclic_graph(g)


def test_a_real_cycle_is_an_error_naming_the_modules():
    maps, g = map_graph("bert", FusionConfig())
    a, b = kinds(g, "solve")[:2]
    cyclic = g.copy()
    cyclic.add_edge(a, b, kind="rows", producers=set())
    cyclic.add_edge(b, a, kind="rows", producers=set())
    with pytest.raises(FusionError, match="cycle") as err:
        _check_acyclic(cyclic, maps.structure)
    assert "encoder.layer" in str(err.value) or "embeddings" in str(err.value)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_the_graph_is_what_runs_every_node_once(arch):
    model, args = zoo.build(arch)
    other, _ = zoo.build(arch, seed=1)
    a, b = otfx.analyse(otfx.trace(model, args)), otfx.analyse(otfx.trace(other, args))
    maps = TransportMaps(a, b, FusionConfig(solver="emd", heads="aware" if arch == "llama" else "cross"))
    evaluated: list[int] = []
    original = maps._evaluate

    def spy(root: int) -> None:
        evaluated.append(root)
        original(root)

    maps._evaluate = spy
    maps.release = True
    maps.run(list(a.param_axes), lambda fqn, value: None)
    g = maps.graph_for(list(a.param_axes))
    factors = set(kinds(g, "factor"))  # written by the heads node that owns them
    assert len(evaluated) == len(set(evaluated)) and set(evaluated) | factors == set(g) and not factors & set(evaluated)
    position = {n: i for i, n in enumerate(evaluated)}
    assert all(position[u] < position[v] for u, v in g.edges if u in position and v in position)
    for f in factors:  # a factor's owner runs before every node that reads the factor
        owner = next(iter(g.predecessors(f)))
        assert all(position[owner] < position[v] for v in g.successors(f) if v in position)
    assert maps.recomputed == 0 and not maps.maps  # all released at the end
    layer_stats = sorted(st.space for st in maps.stats if st.kind in ("layer", "stream"))
    assert layer_stats == sorted(kinds(g, "solve"))  # one solver call per solve node
