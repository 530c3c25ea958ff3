"""The least-squares refit (otfx.align.refit): exact where the parents agree, a large gain where the alignment is
poor, only linear weights and biases change, and options that need data say so."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_state_unchanged, state_copy

import otfx
from otfx import testing as zoo
from otfx.align.config import FusionError
from otfx.align.refit import refit, refit_layers
from otfx.trace import main_output

ARCHS = ["hf_vit", "bert", "gpt2", "llama"]


def outputs(model, inputs):
    with torch.no_grad():
        return main_output(model.eval()(*inputs))


def batches(name: str, n: int = 6, batch: int = 4) -> list[tuple]:
    return [zoo.inputs(name, batch=batch, seq=8, seed=200 + i) for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_of_a_model_fused_with_itself_returns_it(arch):
    model, args = zoo.build(arch)
    traced = otfx.trace(model, args)
    fused = otfx.fuse(traced, traced, solver="emd", residual="mean", select="off", refit=False)
    before = state_copy(fused)
    refitted = refit(fused, [traced, traced], batches(arch))
    assert_state_unchanged(fused, before)
    assert refit_layers(traced), "no linear layer was found"
    x = zoo.inputs(arch, batch=3, seq=8, seed=7)
    torch.testing.assert_close(outputs(refitted, x), outputs(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_refit_pulls_a_damaged_model_back_to_its_parents(arch):
    """A's linear weights with noise added are far from A; refitted towards A and a permuted copy of A (aligned
    back to A, so both targets are A's outputs), the model computes A's function again, and only linear layers'
    weights and biases were changed."""
    model, args = zoo.build(arch, seed=3)
    ta = otfx.trace(model, args)
    tb = otfx.trace(otfx.random_symmetry(ta, seed=11), args)
    layers = refit_layers(ta)
    linear = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    damaged = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in damaged.named_parameters():
            if name in linear and p.ndim == 2:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
    refitted = refit(damaged, [ta, tb], batches(arch, n=16))
    x = zoo.inputs(arch, batch=4, seq=8, seed=9)
    want = outputs(model, x)
    err_damaged = (outputs(damaged, x) - want).abs().mean()
    err_refit = (outputs(refitted, x) - want).abs().mean()
    assert err_refit < 0.05 * err_damaged, (float(err_damaged), float(err_refit))
    changed = {k for (k, p), q in zip(refitted.named_parameters(), damaged.parameters()) if not torch.equal(p, q)}
    assert changed and changed <= linear, sorted(changed - linear)


def test_fuse_refits_by_default_with_data_and_reports_it():
    a, args = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(a, args), otfx.trace(b, args)
    data = batches("hf_vit")
    fused = otfx.fuse(ta, tb, data=data, select="off")
    assert fused.otfx_report["config"]["refit"] is True and "refit" in fused.otfx_report["timings"]
    plain = otfx.fuse(ta, tb, data=data, select="off", refit=False)
    assert plain.otfx_report["config"]["refit"] is False
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    assert not torch.allclose(outputs(fused, x), outputs(plain, x))
    assert otfx.fuse(ta, tb).otfx_report["config"]["refit"] is False  # no data: nothing to refit on


def test_selection_tries_each_candidate_with_and_without_refit():
    a, args = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    ta, tb = otfx.trace(a, args), otfx.trace(b, args)
    fused = otfx.fuse(ta, tb, data=batches("hf_vit"))
    rows = fused.otfx_report["selection"]["rows"]
    assert sorted({r["refit"] for r in rows}) == [False, True]
    best = min(rows, key=lambda r: r["kl"])
    assert fused.otfx_report["config"]["refit"] == best["refit"]


def test_refit_without_data_is_a_clear_error():
    model, args = zoo.build("hf_vit")
    traced = otfx.trace(model, args)
    with pytest.raises(FusionError, match="refit=True needs data"):
        otfx.fuse(traced, traced, refit=True)
    with pytest.raises(FusionError, match="refit must be True or False"):
        otfx.fuse(traced, traced, data=batches("hf_vit", n=1), refit="yes")
