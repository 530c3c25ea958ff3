"""Streams whose producers are computed from the heads that read them (zoo issue 14): with one map per stream
and head-aware queries, keys and values, the output projections' input side is solved from the q/v heads, and
the q/v projections read the stream. Whichever of the two the rewrite reaches first must not decide whether
the map graph can be built: a tied embedding kept under the head's name (gemma, smollm3, starcoder2, ...) puts
the attention projections before the stream, and an embedding written as a concat of tables (canine) reaches
a value projection before the stream's second part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otfx
from otfx.align.config import FusionConfig
from otfx.align.maps import TransportMaps
from otfx.trace import main_output

VOCAB, DIM, SEQ = 29, 16, 6


class Attention(nn.Module):
    """Pre-norm attention with grouped-query heads (``kv_heads < heads``) written as HF does (expand + reshape)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, DIM // heads
        self.q = nn.Linear(DIM, heads * self.head_dim, bias=False)
        self.k = nn.Linear(DIM, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(DIM, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        group = self.heads // self.kv_heads
        k, v = (t[:, :, None].expand(b, self.kv_heads, group, n, self.head_dim).reshape(b, self.heads, n, -1)
                for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class RMSNorm(nn.Module):
    """RMSNorm written out as HF writes it (mul, rsqrt, mean): its gain is recorded after the layers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Block(nn.Module):
    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        # the layers before the norms in parameter order, as HF registers them
        self.attn, self.up, self.down = Attention(heads, kv_heads), nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = RMSNorm(), RMSNorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class LateEmbedding(nn.Module):
    """A decoder whose blocks come before its embedding in parameter order: the rewrite reaches the attention
    projections before the stream's only free producer (the embedding, optionally tied to the head)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, tied: bool = False, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm()
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.embed = nn.Embedding(VOCAB, DIM)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class ConcatEmbedding(nn.Module):
    """An encoder whose stream is a concat of two embedding tables: the stream is a direct sum, and the first
    value projection is reached between its two parts."""

    def __init__(self, heads: int = 4, kv_heads: int = 4, layers: int = 2):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(VOCAB, DIM // 2) for _ in range(2))
        self.blocks = nn.ModuleList(Block(heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([t((ids * (i + 1)) % VOCAB) for i, t in enumerate(self.tables)], dim=-1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


MODELS = {
    "late_gqa": lambda: LateEmbedding(heads=4, kv_heads=2),
    "late_mha": lambda: LateEmbedding(heads=4, kv_heads=4),
    "tied_gqa": lambda: LateEmbedding(heads=4, kv_heads=2, tied=True),
    "concat_mha": lambda: ConcatEmbedding(heads=4, kv_heads=4),
    "concat_gqa": lambda: ConcatEmbedding(heads=4, kv_heads=2),
}


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    with torch.no_grad():  # norm gains away from 1, so a wrong map shows
        for m in model.modules():
            if isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
    return model


def ids(seed: int, batch: int = 3) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed)),)


def outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*inputs))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_stream_keeps_its_embedding_whichever_class_is_reached_first(name):
    traced = otfx.trace(build(name, 0), ids(1))
    inference = otfx.analyse(traced)
    maps = TransportMaps(inference, inference, FusionConfig.alignment())
    g, s = maps.graph, maps.structure
    embeddings = [fqn for fqn in inference.param_axes if "embed" in fqn or "tables" in fqn]
    streams = {s.root(sid) for fqn in embeddings for sid in inference.param_axes[fqn]} & set(g)
    for stream in streams:
        kept = {p.fqn for p in g.nodes[stream]["producers"]}
        assert kept and kept <= set(embeddings), kept  # the projections fed by the heads are left out
    projections = [r for r, kind in g.nodes(data="kind") if kind == "heads"]
    assert projections and all(g.nodes[r]["producers"] for r in projections)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_symmetry_keeps_outputs(name):
    model = build(name, 0)
    moved = otfx.random_symmetry(otfx.trace(model, ids(1)), seed=3)
    torch.testing.assert_close(outputs(moved, ids(7)), outputs(model, ids(7)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_emd_fusion_with_a_symmetry_returns_the_model(name):
    model = build(name, 0)
    traced = otfx.trace(model, ids(1))
    copy = otfx.trace(otfx.random_symmetry(traced, seed=4), ids(1))
    fused = otfx.fuse(traced, copy, solver="emd", residual="shared", heads="aware", qk="tied")
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_align_keeps_the_function_of_an_independent_model(name):
    a, b = build(name, 0), build(name, 1)
    ta, tb = otfx.trace(a, ids(1)), otfx.trace(b, ids(1))
    aligned = otfx.align(tb, to=ta)
    torch.testing.assert_close(outputs(aligned, ids(9)), outputs(b, ids(9)), atol=1e-4, rtol=0)
    assert not torch.equal(aligned.blocks[0].attn.q.weight, b.blocks[0].attn.q.weight)  # something moved
    fused = otfx.fuse(ta, tb)
    assert torch.isfinite(outputs(fused, ids(9))).all()
