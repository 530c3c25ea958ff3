"""Orthogonal maps of the residual stream (``residual="orthogonal"``): exact where the graph allows a rotation,
a clear fallback where it does not."""

from __future__ import annotations

import pytest
import torch

import otfx
from otfx import testing
from otfx.align.config import FusionConfig
from otfx.align.maps import TransportMaps
from otfx.align.orthogonal import orthogonal_streams, procrustes
from otfx.align.structure import PairStructure

ROTATABLE = ["hf_vit", "matmul_encoder", "timm_vit", "llama"]  # LayerNorm (pre-norm) and RMSNorm models


def _pair(name: str):
    ma, args = testing.build(name, seed=0)
    mb, _ = testing.build(name, seed=1)
    return ma, mb, otfx.trace(ma, args), otfx.trace(mb, args)


def _out(traced, model, x) -> torch.Tensor:
    with torch.no_grad():
        return traced.main_output(model(*x))


@pytest.mark.parametrize("name", ROTATABLE)
def test_orthogonal_alignment_keeps_the_function(name):
    ma, mb, ta, tb = _pair(name)
    aligned = otfx.align(tb, to=ta, residual="orthogonal")
    x = testing.inputs(name, 3, 8, seed=11)
    assert torch.allclose(_out(tb, aligned, x), _out(tb, mb, x), atol=1e-5, rtol=1e-4)
    streams = [s for s in aligned.otfx_report["maps"] if s["kind"] == "stream"]
    assert streams and all(s["method"].startswith("procrustes") for s in streams)
    # the map is a true rotation, not a permutation: the stream's weights are mixed, not reordered
    maps = TransportMaps(otfx.analyse(ta), otfx.analyse(tb), FusionConfig.alignment(residual="orthogonal"))
    root = next(iter(maps.orthogonal))
    rotation = maps.map(root)
    assert torch.allclose(rotation @ rotation.T, torch.eye(len(rotation), dtype=rotation.dtype), atol=1e-10)
    assert rotation.abs().max() < 0.99
    if maps.orthogonal[root].fix_ones:  # a LayerNorm reads the stream: the map fixes the all-ones direction
        ones = torch.ones(len(rotation), dtype=rotation.dtype)
        assert torch.allclose(rotation @ ones, ones, atol=1e-10)


@pytest.mark.parametrize("name", ["hf_vit", "llama"])
def test_orthogonal_fusion_with_a_symmetric_copy_returns_the_model(name):
    ma, _, ta, _ = _pair(name)
    copy = otfx.random_symmetry(ta, seed=4)
    fused = otfx.fuse(ta, otfx.trace(copy, ta.args), residual="orthogonal", solver="emd", heads="aware", qk="tied")
    x = testing.inputs(name, 2, 8, seed=12)
    assert torch.allclose(_out(ta, fused, x), _out(ta, ma, x), atol=1e-4, rtol=1e-3)


def test_orthogonal_alignment_from_activations_keeps_the_function():
    ma, mb, ta, tb = _pair("hf_vit")
    data = [testing.inputs("hf_vit", 8, 8, seed=s)[0] for s in range(3)]
    aligned = otfx.align(tb, to=ta, residual="orthogonal", cost="activations", data=data)
    streams = [s for s in aligned.otfx_report["maps"] if s["kind"] == "stream"]
    assert streams and any("add" in p for p in streams[0]["producers"])  # read after the residual adds
    x = testing.inputs("hf_vit", 3, 8, seed=13)
    assert torch.allclose(_out(tb, aligned, x), _out(tb, mb, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, why", [("bert", "reaches add"), ("torch_encoder", "reaches add"),
                                       ("gpt2", "ln_f")])
def test_a_stream_that_cannot_rotate_keeps_a_plan_and_says_why(name, why):
    ma, mb, ta, tb = _pair(name)
    with pytest.warns(UserWarning, match=f"keeps a transport plan: .*{why}"):
        aligned = otfx.align(tb, to=ta, residual="orthogonal")
    x = testing.inputs(name, 2, 8, seed=14)
    assert torch.allclose(_out(tb, aligned, x), _out(tb, mb, x), atol=1e-5, rtol=1e-4)


def test_layer_scale_outside_a_norm_is_refused():
    """An element-wise learned scale on the stream (CaiT's layer scale) does not commute with a rotation."""
    model, args = testing.build("matmul_encoder")

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = torch.nn.Parameter(torch.rand(32) + 0.5)

        def forward(self, ids):
            x = self.inner.embed(ids) * self.scale
            for block in self.inner.blocks:
                x = block(x)
            return self.inner.head(self.inner.norm(x)[:, 0])

    inf = otfx.analyse(otfx.trace(Scaled(model), args))
    ok, why_not = orthogonal_streams(PairStructure(inf, inf, FusionConfig.make(residual="orthogonal")))
    assert not ok and "scale" in next(iter(why_not.values()))


def test_procrustes_recovers_a_planted_rotation():
    g = torch.Generator().manual_seed(0)
    n = 12
    rows_a = torch.randn(n, 50, generator=g, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    rows_b = rotation @ rows_a  # rows_a = rotation^T rows_b
    assert torch.allclose(procrustes(rows_b, rows_a, fix_ones=False), rotation, atol=1e-8)
    # fixing the ones: the best rotation among those with M 1 = 1, exact when the planted one is such
    eye = torch.eye(n, dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64), eye[:, :-1]], 1)).Q
    inner = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=g, dtype=torch.float64)).Q
    fixed = basis[:, :1] @ basis[:, :1].T + basis[:, 1:] @ inner @ basis[:, 1:].T
    found = procrustes(fixed @ rows_a, rows_a, fix_ones=True)
    assert torch.allclose(found, fixed, atol=1e-8)
    assert torch.allclose(found @ torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), atol=1e-10)


def test_streamed_orthogonal_fusion_equals_in_memory(tmp_path):
    """Folding reads the gains from disk as the maps need them: the streamed result is the in-memory one."""
    from transformers import AutoModelForCausalLM

    from otfx.stream import fuse_checkpoints

    a, args = testing.build("llama", seed=0)
    b, _ = testing.build("llama", seed=1)
    for model, name in ((a, "a"), (b, "b")):
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
    out = fuse_checkpoints(tmp_path / "a", tmp_path / "b", tmp_path / "fused", residual="orthogonal")
    expected = otfx.fuse(otfx.trace(a, args), otfx.trace(b, args), residual="orthogonal")
    loaded = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters(remove_duplicate=False))
    for name, p in expected.named_parameters(remove_duplicate=False):
        torch.testing.assert_close(loaded[name], p, atol=1e-6, rtol=1e-5, msg=name)
    assert torch.equal(loaded["model.norm.weight"], torch.ones_like(loaded["model.norm.weight"]))  # gain folded


def test_the_automatic_default_rotates_where_it_can_and_averages_elsewhere():
    """No data: ``residual=None`` is orthogonal on a pre-norm ViT and the paper's mean on post-norm BERT, quietly."""
    import warnings

    for name, kind in (("hf_vit", "stream"), ("bert", "residual")):
        _, _, ta, tb = _pair(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            fused = otfx.fuse(ta, tb)
        kinds = {s["kind"] for s in fused.otfx_report["maps"]}
        assert fused.otfx_report["config"]["residual"] == "orthogonal"
        assert ("stream" in kinds) == (kind == "stream")
    assert FusionConfig().resolved(has_data=True).residual == "mean"


def test_with_data_three_models_default_to_activations_and_rotations():
    """``fuse(A, B, C, data=..., select="off")``: activations cost, orthogonal stream, repair; with EMD, A fused
    with two of its symmetric copies is A again."""
    ma, _, ta, _ = _pair("hf_vit")
    copies = [otfx.trace(otfx.random_symmetry(ta, seed=s), ta.args) for s in (5, 6)]
    data = [testing.inputs("hf_vit", 8, 8, seed=s)[0] for s in range(3)]
    fused = otfx.fuse(ta, *copies, data=data, solver="emd", heads="aware", qk="tied", select="off")
    config = fused.otfx_report["config"]
    assert (config["cost"], config["residual"], config["repair"]) == ("activations", "orthogonal", True)
    assert "stream" in {s["kind"] for s in fused.otfx_report["maps"]}
    x = testing.inputs("hf_vit", 2, 8, seed=13)
    assert torch.allclose(_out(ta, fused, x), _out(ta, ma, x), atol=1e-4, rtol=1e-3)
    two = FusionConfig().resolved(has_data=True, n_models=2)
    assert (two.cost, two.residual) == ("weights", "mean")  # two models with data: weights + the paper's mean
