"""The spine: tracing and transport-space inference, checked by symmetry properties on many architectures."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import assert_state_unchanged, state_copy
from torch import nn

import otfx
from otfx import testing as zoo
from otfx.symmetry import permute_model, space_permutations
from otfx.trace import main_output

LAYERS, HIDDEN, HEADS, MLP = 2, 32, 4, 64
HEAD_DIM = HIDDEN // HEADS
STANDARD = {("residual", HIDDEN): 1, ("hidden", MLP): LAYERS, ("heads", HEADS): LAYERS,
            ("head_dim_qk", HEAD_DIM): LAYERS, ("head_dim_v", HEAD_DIM): LAYERS}
#: free spaces expected per architecture: (role, size) -> count
EXPECTED = {name: STANDARD for name in zoo.ZOO}
# Llama: rotary embeddings pin the query/key head dims; grouped-query attention splits the 4 query heads
# into 2 kv heads x 2 queries per group, both free.
EXPECTED["llama"] = {("residual", HIDDEN): 1, ("hidden", MLP): LAYERS, ("heads", 2): 2 * LAYERS,
                     ("head_dim_v", HEAD_DIM): LAYERS}


def outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*inputs))


def fresh_inputs(name: str) -> tuple:
    return zoo.inputs(name, batch=3, seq=11 if zoo.ZOO[name].varies_seq else 8, seed=123)


def test_free_spaces_match_architecture(arch):
    model, args = zoo.build(arch)
    inference = otfx.analyse(model, args)
    counts = Counter((inference.roles[s], inference.size(s)) for s in inference.free_spaces())
    assert dict(counts) == EXPECTED[arch], inference.summary()
    assert inference.coverage() == {}


def test_random_symmetry_preserves_function(arch):
    model, args = zoo.build(arch)
    before = state_copy(model)
    traced = otfx.trace(model, args)
    inference = otfx.analyse(traced)
    perms = space_permutations(inference, seed=7)
    permuted = permute_model(inference, perms)
    # every free space is really permuted
    for sid in inference.free_spaces():
        assert not torch.equal(perms[inference.coarse(sid)], torch.arange(inference.size(sid))), sid
    x = fresh_inputs(arch)
    torch.testing.assert_close(outputs(permuted, x), outputs(model, x), atol=1e-5, rtol=0)
    # and the parameters did change
    changed = [k for k, v in permuted.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert len(changed) > 5
    assert_state_unchanged(model, before)


def test_public_random_symmetry(arch):
    model, args = zoo.build(arch, seed=3)
    before = state_copy(model)
    permuted = otfx.random_symmetry(otfx.trace(model, args), seed=11)
    x = fresh_inputs(arch)
    torch.testing.assert_close(outputs(permuted, x), outputs(model, x), atol=1e-5, rtol=0)
    assert_state_unchanged(model, before)


def test_negative_control_changes_function(arch):
    """Permuting the rows of one layer only (not its consumers) must change the outputs."""
    model, args = zoo.build(arch)
    inference = otfx.analyse(model, args)
    perms = space_permutations(inference, seed=5)
    hidden = next(s for s in inference.free_spaces() if inference.roles[s] == "hidden")
    fqn, _axis = inference.space_params()[hidden][0]
    broken = permute_model(inference, perms, only={fqn})
    x = fresh_inputs(arch)
    assert (outputs(broken, x) - outputs(model, x)).abs().max() > 1e-3


def test_tied_weights_stay_tied():
    model, args = zoo.build("bert")
    traced = otfx.trace(model, args)
    assert ["bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"] in traced.tied
    permuted = otfx.random_symmetry(traced, seed=2)
    emb = permuted.bert.embeddings.word_embeddings.weight
    dec = permuted.cls.predictions.decoder.weight
    assert emb.data_ptr() == dec.data_ptr()
    assert not torch.equal(emb, model.bert.embeddings.word_embeddings.weight)


def test_trace_keeps_training_flag_and_weights():
    model, args = zoo.build("hf_vit")
    model.train()
    before = state_copy(model)
    otfx.trace(model, args)
    assert model.training
    assert_state_unchanged(model, before)


@torch.library.custom_op("otfx_test::row_scale", mutates_args=())
def row_scale(x: torch.Tensor) -> torch.Tensor:
    """An op no pass knows: scales each feature by its position (so it is not permutation-equivariant)."""
    return x * torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)


@row_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _Cumulative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.cumsum(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.flip(-1).cumsum(-1).flip(-1)


class _Opaque(nn.Module):
    def __init__(self, custom: str):
        super().__init__()
        self.custom = custom
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 12)
        self.c, self.d = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        h = row_scale(h) if self.custom == "custom_op" else _Cumulative.apply(h)
        return self.d(torch.relu(self.c(h)))


@pytest.mark.parametrize("custom, op", [("custom_op", "otfx_test.row_scale.default"),
                                        ("autograd_function", "aten.cumsum.default")])
def test_unknown_op_is_reported_and_freezes(custom, op):
    torch.manual_seed(0)
    model = _Opaque(custom)
    inference = otfx.analyse(model, (torch.randn(2, 8),))
    report = inference.coverage()
    if custom == "custom_op":  # unknown: a gap in coverage
        assert op in report, report
        assert "b.weight axis 0" in report[op]["params"]
        assert report[op]["unknown"]
    else:  # a cumulative sum over features: the model's own order, kept and listed apart from coverage
        assert report == {}, report
        assert "b.weight axis 0" in inference.ordered()[op]
    roles = Counter(inference.size(s) for s in inference.free_spaces())
    assert roles == Counter({16: 1, 6: 1})  # a's rows and c's rows stay free; b's rows are frozen
    permuted = otfx.random_symmetry(otfx.trace(model, (torch.randn(2, 8),)), seed=1)
    x = torch.randn(5, 8)
    torch.testing.assert_close(outputs(permuted, (x,)), outputs(model, (x,)), atol=1e-6, rtol=0)


def test_trace_error_gives_advice():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if self.lin(x).sum() > 0:
                return x
            return -x

    with pytest.raises(otfx.TraceError, match="use_cache=False"):
        otfx.trace(Branchy(), (torch.randn(2, 4),))


def test_flow_graph_has_the_papers_nodes(arch):
    import networkx as nx

    model, args = zoo.build(arch)
    graph = otfx.analyse(model, args).flow_graph
    kinds = Counter(d["kind"] for _, d in graph.nodes(data=True))
    assert nx.is_directed_acyclic_graph(graph)
    assert kinds["residual"] == 2 * LAYERS and kinds["attention"] == LAYERS, kinds
    assert kinds["norm"] >= 2 * LAYERS
    for node, data in graph.nodes(data=True):
        if data["kind"] == "attention":  # q, k, v come from layers; the output goes to a layer (o_proj)
            assert all(graph.nodes[p]["kind"] == "layer" for p in graph.predecessors(node))
            assert [graph.nodes[s]["kind"] for s in graph.successors(node)] == ["layer"]
        if data["kind"] == "residual":
            assert graph.in_degree(node) >= 2
    assert nx.has_path(graph, "input", "output")


# ---- mechanisms beyond the zoo (issue 14): each built in the test, checked by symmetry and recovery ----------

class _MechAttention(nn.Module):
    """q from an einsum projection or a linear; kv heads optionally repeated (repeat_interleave)."""

    def __init__(self, dim: int, heads: int, einsum: bool, kv_heads: int | None):
        super().__init__()
        self.heads, self.kv, self.einsum = heads, kv_heads or heads, einsum
        kv_dim = dim // heads * self.kv
        if einsum:
            self.wq = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        else:
            self.q = nn.Linear(dim, dim)
        self.k, self.v, self.o = nn.Linear(dim, kv_dim), nn.Linear(dim, kv_dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q = torch.einsum("bnd,ed->bne", x, self.wq) if self.einsum else self.q(x)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (p(x).view(b, n, self.kv, -1).transpose(1, 2) for p in (self.k, self.v))
        if self.kv != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv, dim=1) for t in (k, v))
        if self.einsum:
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
            a = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        else:
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


class _MechBlock(nn.Module):
    def __init__(self, dim: int, inplace: bool, einsum: bool, kv_heads: int | None, masked: bool):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _MechAttention(dim, 4, einsum, kv_heads)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.w2 = nn.Parameter(torch.randn(2 * dim, dim) / (2 * dim) ** 0.5)
        self.inplace, self.einsum, self.masked = inplace, einsum, masked

    def forward(self, x):
        if self.inplace:
            x = x.clone()
            x += self.attn(self.n1(x))
        else:
            x = x + self.attn(self.n1(x))
        h = self.fc1(self.n2(x))
        if self.masked:  # a piecewise activation (xIELU-like): comparisons, where, min, expm1
            h = torch.where(h > 0, h * h + h, torch.expm1(torch.min(h, torch.zeros_like(h))) - 0.5 * h)
        else:
            h = torch.nn.functional.gelu(h)
        h = torch.einsum("bnm,md->bnd", h, self.w2) if self.einsum else h @ self.w2
        return x.add_(h) if self.inplace else x + h


class _MechNet(nn.Module):
    """Token + position embeddings, two blocks with an optional pooling or repetition between them."""

    def __init__(self, between: str = "", inplace: bool = False, einsum: bool = False, kv_heads: int | None = None,
                 masked: bool = False):
        super().__init__()
        dim = 32
        self.emb, self.pos = nn.Embedding(50, dim), nn.Parameter(torch.randn(1, 8, dim) * 0.1)
        self.blocks = nn.ModuleList(_MechBlock(dim, inplace, einsum, kv_heads, masked) for _ in range(2))
        self.head, self.between = nn.Linear(dim, 5), between

    def forward(self, ids):
        x = self.blocks[0](self.emb(ids) + self.pos)
        if self.between == "avg_pool":
            x = torch.nn.functional.avg_pool1d(x.transpose(1, 2), 2).transpose(1, 2)
        elif self.between == "repeat_interleave":
            x = x.repeat_interleave(2, dim=1)
        return self.head(self.blocks[1](x).mean(1))


def _tiny_hf(name: str) -> nn.Module:
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=97,
                 max_position_embeddings=40)
    if name == "roberta_position_ids":  # position ids = cumsum of the padding mask; a one-row token-type table
        return tf.RobertaForMaskedLM(tf.RobertaConfig(**small, type_vocab_size=1))
    if name == "partial_rotary":
        return tf.PhiForCausalLM(tf.PhiConfig(**small, partial_rotary_factor=0.5))
    if name == "interleaved_rotary":  # rotary on even/odd dims: x[..., ::2], x[..., 1::2]
        return tf.CohereForCausalLM(tf.CohereConfig(**small, num_key_value_heads=2))
    if name == "one_plus_w_rms_norm":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=8))
    raise KeyError(name)


class _DepthwiseMixer(nn.Module):
    """A Mamba-like causal depthwise convolution between two linears, gated by 2 ** sigmoid(h)."""

    def __init__(self):
        super().__init__()
        self.emb, self.a = nn.Embedding(50, 8), nn.Linear(8, 12)
        self.conv, self.b = nn.Conv1d(12, 12, 3, groups=12, padding=2), nn.Linear(12, 5)

    def forward(self, ids):
        h = self.a(self.emb(ids)).transpose(1, 2)
        h = self.conv(h)[..., :ids.shape[1]].transpose(1, 2)
        return self.b(h * 2 ** torch.sigmoid(h)).mean(1)


MECHANISMS = {
    "depthwise_conv": _DepthwiseMixer,
    "inplace_add": lambda: _MechNet(inplace=True),
    "einsum": lambda: _MechNet(einsum=True),
    "avg_pool": lambda: _MechNet("avg_pool"),
    "repeat_interleave_tokens": lambda: _MechNet("repeat_interleave"),
    "repeat_interleave_kv_heads": lambda: _MechNet(kv_heads=2),
    "masked_activation": lambda: _MechNet(masked=True),
    "roberta_position_ids": lambda: _tiny_hf("roberta_position_ids"),
    "partial_rotary": lambda: _tiny_hf("partial_rotary"),
    "interleaved_rotary": lambda: _tiny_hf("interleaved_rotary"),
    "one_plus_w_rms_norm": lambda: _tiny_hf("one_plus_w_rms_norm"),
}


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_mechanism_symmetry_and_recovery(mechanism):
    torch.manual_seed(0)
    model = MECHANISMS[mechanism]().eval()
    ids = torch.randint(3, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    traced = otfx.trace(model, (ids,))
    inference = otfx.analyse(traced)
    assert inference.coverage() == {}, inference.coverage()
    permuted = otfx.random_symmetry(traced, seed=1)
    x = (torch.randint(3, 50, (3, 8), generator=torch.Generator().manual_seed(5)),)
    torch.testing.assert_close(outputs(permuted, x), outputs(model, x), atol=1e-5, rtol=0)
    state, moved = model.state_dict(), permuted.state_dict()
    matrices = [k for k, v in state.items() if v.ndim == 2 and min(v.shape) > 1]
    assert all(not torch.equal(moved[k], state[k]) for k in matrices), [k for k in matrices
                                                                        if torch.equal(moved[k], state[k])]
    fused = otfx.fuse(traced, otfx.trace(permuted, (ids,)), solver="emd")
    for k, v in state.items():
        torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)


def test_partial_rotary_keeps_the_pass_through_dims_free():
    model = _tiny_hf("partial_rotary").eval()
    inference = otfx.analyse(model, (torch.randint(3, 50, (2, 8)),))
    q_rows = inference.param_axes["model.layers.0.self_attn.q_proj.weight"][0]
    leaves = inference.leaves(q_rows)
    # q rows = heads (4) x head dim (8) = rotary halves (2 + 2, pinned by inv_freq) + pass-through dims (4, free)
    assert [(inference.size(s), inference.is_fixed(s)) for s in leaves] == [(4, False), (2, True), (2, True),
                                                                             (4, False)]
