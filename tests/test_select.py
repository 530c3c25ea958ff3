"""Label-free choice of fusion options (``otfx.select``): candidates fused, scored by agreement with the parents."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_state_unchanged, state_copy

import otfx
from otfx import testing as zoo
from otfx.align.config import FusionConfig, FusionError
from otfx.select import Agreement, candidate_grid, should_select
from otfx.trace import main_output


def outputs(model, inputs):
    with torch.no_grad():
        return main_output(model.eval()(*inputs))


def batches(name: str, n: int = 3, batch: int = 2, seed: int = 100) -> list[tuple]:
    return [zoo.inputs(name, batch=batch, seq=8, seed=seed + i) for i in range(n)]


def pair(arch: str, seeds=(0, 1)):
    (a, args), (b, _) = zoo.build(arch, seed=seeds[0]), zoo.build(arch, seed=seeds[1])
    return otfx.trace(a, args), otfx.trace(b, args)


@pytest.mark.parametrize("arch", ["hf_vit", "gpt2"])
def test_agreement_is_zero_for_the_parents_mean_and_positive_for_another_model(arch):
    ta, tb = pair(arch)
    data = batches(arch)
    for kind in ("kl", "mse"):
        score = Agreement([ta, ta], data, [0.5, 0.5], kind)
        assert score(ta.model) == pytest.approx(0.0, abs=1e-9)
        assert score(tb.model) > 1e-6
    # KL against the mean of two different parents: each parent is farther than zero, the ensemble's
    # probabilities are the target itself, so no single parent scores below it
    score = Agreement([ta, tb], data, [0.5, 0.5], "kl")
    assert min(score(ta.model), score(tb.model)) > 1e-6


@pytest.mark.parametrize("arch", ["hf_vit", "gpt2"])
def test_fuse_with_data_picks_the_candidate_with_the_lowest_score_and_reports_every_one(arch):
    ta, tb = pair(arch)
    data = batches(arch)
    before = [state_copy(ta.model), state_copy(tb.model)]
    fused = otfx.fuse(ta, tb, data=data)
    assert_state_unchanged(ta.model, before[0])
    assert_state_unchanged(tb.model, before[1])
    selection = fused.otfx_report["selection"]
    rows = [r for r in selection["rows"] if r["status"] == "ok"]
    assert len(rows) == 12, selection["rows"]
    assert {(r["cost"], r["solver"], r["reg"], r["refit"]) for r in rows} == {
        (c, s, g, f) for c in ("weights", "activations") for s, g in (("sinkhorn_torch", 0.1),
                                                                     ("sinkhorn_torch", 0.5), ("emd", None))
        for f in (False, True)}
    best = selection["best"]
    assert best["kl"] == min(r["kl"] for r in rows)
    # the returned model is the best candidate: it scores what the sweep recorded, and its configuration says so
    score = Agreement([ta, tb], data, [0.5, 0.5], "kl")
    assert score(fused) == pytest.approx(best["kl"], rel=1e-6, abs=1e-12)
    config = fused.otfx_report["config"]
    assert (config["cost"], config["solver"], config["residual"], config["refit"]) == (
        best["cost"], best["solver"], "orthogonal", best["refit"])
    if best["reg"] is not None:
        assert config["reg"] == best["reg"]
    # a refitted candidate reuses its twin's fusion: it is what fuse(..., refit=True) returns
    row = next(r for r in rows if r["refit"] and r["cost"] == "weights" and r["reg"] == 0.5
               and r["solver"] == "sinkhorn_torch")
    direct = otfx.fuse(ta, tb, data=data, select="off", cost="weights", reg=0.5, residual="orthogonal", refit=True)
    assert score(direct) == pytest.approx(row["kl"], rel=1e-6, abs=1e-12)


def test_a_model_fused_with_itself_under_selection_is_itself():
    ta, _ = pair("hf_vit")
    fused = otfx.fuse(ta, ta, data=batches("hf_vit"), solver="emd")  # EMD: no reg axis; two costs, refit or not
    assert len([r for r in fused.otfx_report["selection"]["rows"] if r["status"] == "ok"]) == 4
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    torch.testing.assert_close(outputs(fused, x), outputs(ta.model, x), atol=1e-4, rtol=0)


def test_the_progress_hook_sees_every_candidate_and_changes_nothing():
    ta, tb = pair("hf_vit")
    data = batches("hf_vit")
    seen: list[list] = []

    def progress(rows):
        seen.append(list(rows))
        yield from seen[-1]

    hooked = otfx.fuse(ta, tb, data=data, solver="emd", progress=progress)
    plain = otfx.fuse(ta, tb, data=data, solver="emd")
    assert len(seen) == 1 and len(seen[0]) == len(hooked.otfx_report["selection"]["rows"]) == 4
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    torch.testing.assert_close(outputs(hooked, x), outputs(plain, x), atol=0, rtol=0)
    otfx.fuse(ta, tb, data=data, select="off", progress=progress)  # nothing is chosen: nothing to report
    assert len(seen) == 1


def test_select_off_and_fixed_options_fuse_once_as_given():
    ta, tb = pair("hf_vit")
    data = batches("hf_vit")
    off = otfx.fuse(ta, tb, data=data, select="off")
    assert "selection" not in off.otfx_report
    config = off.otfx_report["config"]
    assert (config["cost"], config["reg"], config["residual"], config["repair"], config["refit"]) == (
        "weights", 0.25, "mean", True, True)
    fixed = otfx.fuse(ta, tb, data=data, cost="weights", reg=0.25, residual="mean", refit=True)
    x = zoo.inputs("hf_vit", batch=3, seq=8, seed=7)
    assert "selection" not in fixed.otfx_report
    torch.testing.assert_close(outputs(fixed, x), outputs(off, x), atol=0, rtol=0)
    # without data nothing is chosen
    assert not should_select(FusionConfig(), has_data=False)
    # an open reg with a fixed cost is one axis of two values
    assert candidate_grid(FusionConfig(cost="weights")) == {
        "solver": ("sinkhorn_torch", "emd"), "reg": (0.1, 0.5), "residual": ("orthogonal",), "refit": (False, True)}
    # a solver or a reg the caller gave is kept: no EMD candidate then
    assert "solver" not in candidate_grid(FusionConfig(cost="weights", reg=0.3))
    assert "solver" not in candidate_grid(FusionConfig(cost="weights", solver="sinkhorn"))
    # with every other option fixed, refit is still chosen: with it or without
    assert candidate_grid(FusionConfig(cost="weights", reg=0.25, residual="mean")) == {"refit": (False, True)}


def test_bad_select_values_are_named():
    ta, tb = pair("hf_vit")
    with pytest.raises(FusionError, match="select='max'"):
        otfx.fuse(ta, tb, data=batches("hf_vit"), select="max")
    with pytest.raises(FusionError, match="select='max'"):
        Agreement([ta, tb], batches("hf_vit"), [0.5, 0.5], "max")
