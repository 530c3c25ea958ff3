"""otfx.sweep: grid search over fusion options on validation data (the CLI's sweep is tested in test_cli.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import otfx
from otfx import testing as zoo
from otfx.align.combiners import COMBINERS, register_combiner
from otfx.align.config import choices
from otfx.sweep import combinations, default_grid, score_batches


@pytest.fixture(scope="module")
def pair():
    """Two tiny HF ViTs traced once, calibration inputs and labelled validation batches."""
    a, example = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, *example[0].shape[1:], generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    traced = [otfx.trace(m, example) for m in (a, b)]
    return traced, [x[:8], x[8:]], [(x[:8], y[:8]), (x[8:], y[8:])]


class ByReg:
    """A stand-in for otfx.fuse: the anchor's copy tagged with its reg (or raising for one reg)."""

    def __init__(self, fail_at: float | None = None):
        self.calls: list[dict] = []
        self.fail_at = fail_at

    def __call__(self, *models, data=None, **options):
        self.calls.append(options)
        if options.get("reg") == self.fail_at:
            raise ArithmeticError("Sinkhorn underflow at this reg")
        fused = copy.deepcopy(models[0].model)
        fused.tag = options.get("reg")
        return fused


def by_tag(model) -> float:
    """The score of a tagged stand-in fusion (its reg), 0.5 for the parents and baselines."""
    return getattr(model, "tag", None) or 0.5


@pytest.mark.parametrize("higher, expected", [(True, 0.9), (False, 0.1)], ids=["accuracy-like", "loss-like"])
def test_best_row_follows_the_metric_direction(pair, higher, expected):
    traced, _, _ = pair
    result = otfx.sweep(*traced, evaluate=by_tag, higher_is_better=higher, grid={"reg": [0.3, 0.1, 0.9, 0.6]},
                        fuse=ByReg())
    assert result.best.options == {"reg": expected} and result.best_model.tag == expected
    assert result.best_config.reg == expected and [r.score for r in result.rows] == [0.3, 0.1, 0.9, 0.6]
    assert result.parents == [0.5, 0.5] and result.vanilla == 0.5 and result.ensemble == 0.5
    assert "<- best" in result.table() and "vanilla fusion" in result.table() and "ensemble" in result.table()


def test_metric_names_say_the_direction(pair):
    traced, _, _ = pair
    loss = otfx.sweep(*traced, evaluate=by_tag, metric="loss", grid={"reg": [0.2, 0.4]}, fuse=ByReg())
    assert loss.best.options["reg"] == 0.2 and not loss.higher_is_better
    with pytest.raises(otfx.FusionError, match="say which way is better"):
        otfx.sweep(*traced, evaluate=by_tag, grid={"reg": [0.2]}, fuse=ByReg())
    with pytest.raises(otfx.FusionError, match="evaluate=callable"):
        otfx.sweep(*traced, grid={"reg": [0.2]}, fuse=ByReg())


def test_invalid_combinations_are_skipped_and_failures_recorded(pair):
    traced, _, _ = pair
    stub = ByReg(fail_at=0.2)
    result = otfx.sweep(*traced, evaluate=by_tag, metric="accuracy", fuse=stub,
                        grid={"cost": ["weights", "activations"], "reg": [0.1, 0.2]})  # no data
    status = {(r.options["cost"], r.options["reg"]): (r.status, r.reason) for r in result.rows}
    assert status[("weights", 0.1)] == ("ok", None)
    assert status[("weights", 0.2)] == ("failed", "Sinkhorn underflow at this reg")
    for reg in (0.1, 0.2):
        kind, why = status[("activations", reg)]
        assert kind == "skipped" and "needs data" in why
    assert len(stub.calls) == 2  # skipped rows never reach the fusion
    assert "skipped 2: cost='activations' needs data" in result.table()
    assert result.to_dict()["rows"][1]["status"] == "failed"
    with pytest.raises(otfx.FusionError, match="no combination of the 2 in the grid"):
        otfx.sweep(*traced, evaluate=by_tag, metric="accuracy", grid={"cost": ["activations"], "reg": [0.1, 0.2]})
    with pytest.raises(otfx.FusionError, match="grid cost='nope'"):  # a typo is an error, not a skipped row
        otfx.sweep(*traced, evaluate=by_tag, metric="accuracy", grid={"cost": ["nope"]}, fuse=ByReg())


def test_default_grid_comes_from_the_registries():
    name = "test_sweep_policy"
    register_combiner(name)(lambda maps, inputs, plans: sum(plans) / len(plans))
    try:
        grid = default_grid(has_data=True)
        assert name in grid["residual"] and tuple(grid["cost"]) == choices()["cost"]
        assert grid["repair"] == (False, True) and default_grid(has_data=False)["repair"] == (False,)
    finally:
        COMBINERS.pop(name)
    rows = combinations({"solver": ["sinkhorn_torch", "emd"], "reg": [0.1, 0.2], "repair": [False, True]})
    emd = [r for r in rows if r["solver"] == "emd"]
    assert emd == [{"solver": "emd", "reg": None, "repair": False}, {"solver": "emd", "reg": None, "repair": True}]
    assert len(rows) == 6 and all(list(r)[-1] == "repair" for r in rows)
    assert combinations([{"reg": 0.1}, {"solver": "emd", "reg": 0.1}]) == [{"reg": 0.1}, {"solver": "emd", "reg": None}]
    with pytest.raises(otfx.FusionError, match="grid must map options"):
        combinations("reg")


def test_real_fusion_with_val_data_and_shared_repair(pair):
    """On real fusion: rows scored on val, vanilla and ensemble there, and a repaired row that reuses its twin's
    alignment equals otfx.fuse(..., repair=True)."""
    traced, data, val = pair
    seen = []
    result = otfx.sweep(*traced, data=data, val=val, metric="loss",
                        grid={"solver": ["sinkhorn_torch", "emd"], "reg": [0.1], "residual": ["mean"],
                              "repair": [False, True]})
    assert [(r.options["solver"], r.options["repair"], r.status) for r in result.rows] == [
        ("sinkhorn_torch", False, "ok"), ("sinkhorn_torch", True, "ok"), ("emd", False, "ok"), ("emd", True, "ok")]
    assert [r.reused_alignment for r in result.rows] == [False, True, False, True]
    assert result.vanilla is not None and result.ensemble is not None
    assert result.best.score == min(r.score for r in result.rows)
    assert score_batches(result.best_model, val, "loss") == pytest.approx(result.best.score)

    result = otfx.sweep(*traced, data=data, evaluate=lambda m: seen.append(m) or 0.0, metric="loss",
                        grid={"reg": [0.1], "repair": [False, True]})
    direct = otfx.fuse(*traced, data=data, reg=0.1, repair=True, select="off", refit=False)
    x = val[0][0]
    with torch.no_grad():
        torch.testing.assert_close(seen[-1](x).logits, direct(x).logits)
    assert result.rows[1].config.repair and result.rows[1].config.reg == 0.1


def test_modules_are_traced_once_and_need_args(pair):
    a, example = zoo.build("hf_vit", seed=0)
    b, _ = zoo.build("hf_vit", seed=1)
    stub = ByReg()
    otfx.sweep(a, b, args=example, evaluate=by_tag, metric="accuracy", grid={"reg": [0.1, 0.2]}, fuse=stub)
    assert len(stub.calls) == 2
    with pytest.raises(otfx.FusionError, match="pass args="):
        otfx.sweep(a, b, evaluate=by_tag, metric="accuracy", grid={"reg": [0.1]}, fuse=stub)
