"""Layers whose weight is a part of a parameter. A layer recorded no producer when its weight was not a whole
parameter (or a view of one), so the spaces it makes had no cost ("no transport map can be computed ... no
parameters") and EMD recovery failed.

``nn.MultiheadAttention``'s packed in-projection used for cross-attention (zoo: siglip's attention-pooling
head). When the queries are not the keys, torch cuts ``in_proj_weight`` into the query rows and the key | value
rows (``split``) or into three (``chunk``) before each linear layer; before, a layer whose weight was such a cut
recorded no producer: EMD recovery was off by 0.35 on siglip.

* ``probe_pool``: self-attention blocks (the packed projection used whole), then a learned probe attends over the
  tokens (query rows and key | value rows cut apart), its own residual MLP, and a head (siglip's head).
* ``three_way``: the queries, keys and values all differ (the keys normalised apart), so the weight is cut in
  three, and the probe is repeated over the batch.

Stacked experts (zoo: jetmoe): the experts' weights are one parameter ``[experts, out, in]`` and each expert's
layer reads ``weight[i]`` (a ``select``); its rows are the parameter's rows of every expert (recovery was off by
0.03 on jetmoe).

* ``experts``: a block, then a soft mixture of GLU experts (every expert on every token, weighted by a router),
  the experts' outputs concatenated before one GLU as jetmoe does: each ``weight[i]`` used to count as a reuse of
  the parameter and got its own tied copy of its spaces, so the concatenation saw eight different classes and
  the GLU's halves no producer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otfx
from otfx.trace import main_output

DIM, HEADS, PATCHES, FEATURES = 32, 4, 9, 48


class Block(nn.Module):
    """Pre-norm self-attention (packed projection used whole) and MLP."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ProbePool(nn.Module):
    def __init__(self, three_way: bool = False):
        super().__init__()
        self.three_way = three_way
        self.patch = nn.Linear(FEATURES, DIM)
        self.pos = nn.Parameter(torch.randn(1, PATCHES, DIM) * 0.1)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.probe = nn.Parameter(torch.randn(1, 1, DIM))
        self.pool = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.key_norm = nn.LayerNorm(DIM)
        self.norm = nn.LayerNorm(DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, 5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        probe = self.probe.repeat(x.shape[0], 1, 1)
        keys = self.key_norm(x) if self.three_way else x
        h = self.pool(probe, keys, x, need_weights=False)[0]
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h[:, 0])


MODELS = {"probe_pool": lambda: ProbePool(False), "three_way": lambda: ProbePool(True)}


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():  # biases and gains away from 0 and 1, so a wrong map shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(seed: int, batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, PATCHES, FEATURES, generator=torch.Generator().manual_seed(seed)),)


def outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cut_projection_produces_the_head_spaces(name):
    inference = otfx.analyse(otfx.trace(build(name, 0), inputs(1)))
    assert inference.coverage() == {}, inference.coverage()
    produced = {p.param for p in inference.producer_list}
    assert "pool.in_proj_weight" in produced
    assert ("pool.in_proj_weight", 1) in inference.consumed


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_symmetry_moves_the_pooling_attention(name):
    model = build(name, 0)
    moved = otfx.random_symmetry(otfx.trace(model, inputs(1)), seed=3)
    fresh = inputs(7, batch=3)
    torch.testing.assert_close(outputs(moved, fresh), outputs(model, fresh), atol=1e-5, rtol=0)
    for key in ("pool.in_proj_weight", "pool.out_proj.weight", "up.weight"):
        assert not torch.equal(moved.state_dict()[key], model.state_dict()[key]), key


@pytest.mark.parametrize("residual", ["orthogonal", "shared"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_emd_fusion_with_a_symmetry_returns_the_model(name, residual):
    """``shared``: the parameters come back; ``orthogonal`` (the default's choice) rotates the streams it can,
    with their norms' gains folded into the layers they feed, so the function comes back."""
    model = build(name, 0)
    traced = otfx.trace(model, inputs(1))
    copy = otfx.trace(otfx.random_symmetry(traced, seed=4), inputs(1))
    options = {"residual": residual, **({"heads": "aware", "qk": "tied"} if residual == "orthogonal" else {})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = otfx.fuse(traced, copy, solver="emd", **options)
    assert not [w for w in caught if "no transport map" in str(w.message)]  # every space gets a map
    if residual == "orthogonal":
        streams = [s for s in fused.otfx_report["maps"] if s["kind"] == "stream"]
        # probe_pool: the patch stream and the probe's stream both rotate; three_way: the keys' norm gain would
        # have to fold into the key rows alone of a weight that also reads the probe and the values, so the patch
        # stream keeps a plan
        assert len(streams) == (2 if name == "probe_pool" else 1), streams
        if name == "three_way":
            assert any("pool.in_proj_weight" in str(w.message) for w in caught), [str(w.message) for w in caught]
        fresh = inputs(5, batch=3)
        torch.testing.assert_close(outputs(fused, fresh), outputs(model, fresh), atol=1e-4, rtol=0)
        return
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)


def assert_align_keeps_b_and_fused_exports(a, b, tmp_path) -> None:
    """align(B, to=A) by EMD computes B's function on fresh inputs; fuse(A, B) exports with ONNX parity."""
    ta, tb = otfx.trace(a, inputs(1)), otfx.trace(b, inputs(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = otfx.align(tb, to=ta, solver="emd")
        fused = otfx.fuse(ta, tb)
    fresh = inputs(9, batch=3)
    torch.testing.assert_close(outputs(aligned, fresh), outputs(b, fresh), atol=1e-4, rtol=0)
    check = otfx.check_onnx(otfx.export_onnx(fused, inputs(1), tmp_path / "fused.onnx"), fused, inputs(1))
    assert check.passed, check


@pytest.mark.parametrize("name", sorted(MODELS))
def test_align_keeps_the_function_and_fused_model_exports(name, tmp_path):
    assert_align_keeps_b_and_fused_exports(build(name, 0), build(name, 1), tmp_path)


# ---- stacked experts ---------------------------------------------------------------------------------------
EXPERTS, HIDDEN = 3, 24


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(FEATURES, DIM)
        self.block = Block()
        self.norm = nn.LayerNorm(DIM)
        self.router = nn.Linear(DIM, EXPERTS)
        self.w_in = nn.Parameter(torch.randn(EXPERTS, 2 * HIDDEN, DIM) * DIM ** -0.5)
        self.w_out = nn.Parameter(torch.randn(EXPERTS, DIM, HIDDEN) * HIDDEN ** -0.5)
        self.head = nn.Linear(DIM, 5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.block(self.patch(patches))
        h = self.norm(x)
        gates = self.router(h).softmax(-1)
        # as jetmoe lays it out: every expert's rows of the tokens concatenated, one GLU over all of them
        hidden = torch.cat([F.linear(h, self.w_in[i]) for i in range(EXPERTS)], 1)
        gate, up = hidden.chunk(2, dim=-1)
        parts = (F.silu(gate) * up).split(h.shape[1], 1)
        mixed = sum(gates[..., i:i + 1] * F.linear(parts[i], self.w_out[i]) for i in range(EXPERTS))
        return self.head((x + mixed).mean(1))


def build_experts(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Experts().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 + seed)) * 0.1)
    return model


def test_a_selected_expert_weight_produces_with_every_experts_rows():
    inference = otfx.analyse(otfx.trace(build_experts(0), inputs(1)))
    assert inference.coverage() == {}, inference.coverage()
    produced = {(p.param, p.axis) for p in inference.producer_list}
    assert {("w_in", 1), ("w_out", 1)} <= produced
    assert {("w_in", 2), ("w_out", 2)} <= inference.consumed


@pytest.mark.parametrize("residual", [None, "shared"])
def test_stacked_experts_symmetry_and_emd_recovery(residual):
    model = build_experts(0)
    traced = otfx.trace(model, inputs(1))
    moved = otfx.random_symmetry(traced, seed=3)
    fresh = inputs(7, batch=3)
    torch.testing.assert_close(outputs(moved, fresh), outputs(model, fresh), atol=1e-5, rtol=0)
    assert not torch.equal(moved.w_in, model.w_in) and not torch.equal(moved.w_out, model.w_out)
    options = {"residual": residual} if residual else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = otfx.fuse(traced, otfx.trace(moved, inputs(1)), solver="emd", **options)
    assert not [w for w in caught if "no transport map" in str(w.message)]
    if residual is None:  # the default rotates the stream where it can: the function comes back
        torch.testing.assert_close(outputs(fused, fresh), outputs(model, fresh), atol=1e-4, rtol=0)
        return
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)


def test_stacked_experts_align_keeps_the_function_and_exports(tmp_path):
    assert_align_keeps_b_and_fused_exports(build_experts(0), build_experts(1), tmp_path)
