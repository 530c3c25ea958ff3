"""The ``otfx`` command line, run in-process (plus one ``python -m otfx`` subprocess).

Fuse and sweep plumbing is tested with a stand-in ``otfx.fuse`` (a weighted average of the weights) so that it
runs before the fusion stage exists; the tests marked ``needs_fuse`` run the real ``otfx.fuse`` once it does.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import otfx
from otfx import testing as zoo
from otfx.cli import main
from otfx.trace import main_output

TIMM = "timm:vit_tiny_patch16_224"
TIMM_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}
TOKENS = ["--input-shape", "2x8", "--input-dtype", "long", "--input-high", str(zoo.VOCAB)]
needs_fuse = pytest.mark.skipif(not hasattr(otfx, "fuse"), reason="otfx.fuse is not there yet (otfx/api.py)")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("otfx.export.onnx") is None,
                                reason="otfx.export.onnx is not there yet")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models on disk: two BERTs, two ViTs (HF folders), two timm ViT checkpoints with JSON sidecars."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, arch, seed in (("bert_a", "bert", 0), ("bert_b", "bert", 1), ("vit_a", "hf_vit", 0),
                             ("vit_b", "hf_vit", 1)):
        zoo.build(arch, seed=seed)[0].save_pretrained(root / name)
        out[name] = root / name
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = zoo._randomise(timm.create_model(TIMM[5:], pretrained=False, **TIMM_KWARGS), seed)
        save_file(model.state_dict(), root / f"timm_{seed}.safetensors")
        (root / f"timm_{seed}.json").write_text(json.dumps(TIMM_KWARGS))
        out[f"timm_{seed}"] = root / f"timm_{seed}.safetensors"
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.export refuses it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if float(x.sum()) > 0 else -self.lin(x)


def make_untraceable() -> nn.Module:
    return Untraceable()


# ------------------------------------------------------------------------------------------------ inspect


def test_inspect_prints_spaces_and_draws(tmp_path, capsys, models):
    code, out, err = run(capsys, "inspect", models["bert_a"], "--png", tmp_path / "g.png", "--dot",
                         tmp_path / "g.dot", "--graphml", tmp_path / "g.graphml", "--quiet")
    assert code == 0, err
    assert "free spaces: 9 (residual 1, hidden 2, heads 2, head_dim_qk 2, head_dim_v 2)" in out
    nodes = re.search(r"map graph: (\d+) nodes", out)
    assert "head_dim_qk" in out and nodes and "coverage:" in out
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "g.dot").read_text().startswith(("digraph", "strict digraph"))
    assert nx.read_graphml(tmp_path / "g.graphml").number_of_nodes() == int(nodes.group(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.dot", "g.graphml", "g.png"]  # no temp files left


def test_python_dash_m_otfx(models):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-m", "otfx", "inspect", "otfx.testing:matmul_encoder", *TOKENS, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "MatmulEncoder from otfx.testing:matmul_encoder" in done.stdout and "free spaces: 9" in done.stdout


def test_inspect_timm_and_factory(capsys, models):
    code, out, err = run(capsys, "inspect", TIMM, "--checkpoint", models["timm_0"], "--quiet")
    assert code == 0, err
    assert "VisionTransformer from timm:vit_tiny_patch16_224" in out and "free spaces: 9" in out
    code, out, err = run(capsys, "inspect", "otfx.testing:matmul_encoder", "--model-kwargs", '{"seed": 1}', *TOKENS)
    assert code == 0, err
    assert "MatmulEncoder" in out and "no --checkpoint" in err


# ------------------------------------------------------------------------------------------------- errors


def error_cases(models, tmp: Path) -> list[tuple[list, str]]:
    (tmp / "plain").mkdir(exist_ok=True)
    (tmp / "plain" / "readme.md").write_text("hi")
    (tmp / "taken").mkdir(exist_ok=True)
    (tmp / "taken" / "x").write_text("x")
    (tmp / "bad.npz").write_bytes(b"not numpy")
    torch.save(zoo.matmul_encoder(hidden=16).state_dict(), tmp / "narrow.pt")
    pair = [models["bert_a"], models["bert_b"]]
    return [
        (["inspect", tmp / "missing"], "no such file or folder: "),
        (["inspect", tmp / "plain"], "is not a model: it has no config.json"),
        (["inspect", "otfx.testing:nope"], "module 'otfx.testing' has no 'nope'"),
        (["inspect", "otfx.testing:matmul_encoder", "--checkpoint", tmp / "narrow.pt", *TOKENS], "does not fit"),
        (["inspect", "otfx.testing:matmul_encoder"], "pass --input-shape"),
        (["inspect", "test_cli:make_untraceable", "--input-shape", "2x4"], "torch.export could not trace"),
        (["inspect", models["bert_a"], "--png", tmp / "g.svg"], "use a .dot, .graphml or .png"),
        (["fuse", models["bert_a"], models["vit_a"], "--out", tmp / "o1"], "architectures do not match"),
        (["fuse", *pair, "--out", tmp / "taken"], "already exists; pass --overwrite"),
        (["fuse", *pair, "--out", models["bert_b"], "--overwrite"], "never writes into its inputs"),
        (["fuse", *pair, "--out", tmp / "o2", "--data", tmp / "bad.npz"], "cannot read data"),
        (["fuse", *pair, "--out", tmp / "o3", "--data", tmp / "none.npz"], "none.npz does not exist"),
        (["fuse", *pair, "--out", tmp / "o4", "--weights", "0.5"], "--weights has 1 values for 2 models"),
        (["fuse", *pair, "--out", tmp / "o5", "--tokens", "window:x"], "must be all, cls or window:N"),
        (["fuse", *pair, "--out", tmp / "o6", "--anchor", "2"], "--anchor 2 is out of range"),
        (["fuse", models["bert_a"], "--out", tmp / "o7"], "at least two MODELs"),
        (["export", models["bert_a"], "--out", tmp / "taken"], "is a folder; give a file name"),
        (["sweep", *pair, "--data", tmp / "bad.npz", "--eval", tmp / "bad.npz", "--out", tmp / "o8",
          "--solver", "emd"], "no regularisation to sweep"),
    ]


def test_errors_are_short_messages(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr(otfx, "fuse", StubFuse(), raising=False)
    for argv, message in error_cases(models, tmp_path):
        code, _, err = run(capsys, *argv)
        assert code != 0, argv
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.startswith(f"otfx {argv[0]}: error: ") or "error:" in err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # failed runs leave no output


def test_fuse_errors_from_fusion_are_one_line(tmp_path, capsys, models, monkeypatch):
    def refuses(*models, **options):
        raise ValueError("space 7 (heads): widths 4 and 6 cannot be matched with --heads aware")

    monkeypatch.setattr(otfx, "fuse", refuses, raising=False)
    code, _, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--out", tmp_path / "o", "--quiet")
    assert code == 1 and "otfx fuse: error: space 7 (heads)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_demo_dispatch(capsys):
    code, _, err = run(capsys, "demo", "--help")
    if importlib.util.find_spec("otfx.demo") is None:
        assert code == 2 and "demo is not available" in err
    else:
        assert code == 0


# ------------------------------------------------------------------------------------------------- export


@needs_onnx
def test_export_with_check(tmp_path, capsys, models):
    code, out, err = run(capsys, "export", models["bert_a"], "--out", tmp_path / "m.onnx", "--check", "--quiet")
    assert code == 0, err
    assert (tmp_path / "m.onnx").is_file() and "ONNX check PASS" in out


# ------------------------------------------------------------------------------------- fuse, with a stand-in


class StubFuse:
    """A stand-in for otfx.fuse with its signature: weighted average of the weights (no alignment)."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, *models, cost="weights", solver="emd", reg=0.06, data=None, residual="mean",
                 heads="aware", qk="untied", tokens="all", weights=None, progress=None):
        self.calls.append({"models": [m.name for m in models], "cost": cost, "solver": solver, "reg": reg,
                           "data": data, "weights": weights, "tokens": tokens, "progress": progress})
        return average(*(m.model for m in models), weights=weights or [1.0 + 10 * reg] + [1.0] * (len(models) - 1))


def average(*models: nn.Module, weights: list[float]) -> nn.Module:
    fused = copy.deepcopy(models[0])
    params = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in fused.named_parameters():
            p.copy_(sum(w * ps[name] for w, ps in zip(weights, params)) / sum(weights))
    fused.otfx_report = {"spaces": [{"space": 1, "role": "residual", "width": 32, "cost_min": 0.0, "cost_max": 1.0,
                                     "sharpness": 0.5, "iterations": 3}], "solver": "stub"}
    return fused


def test_fuse_hf_folders_with_stub(tmp_path, capsys, models, monkeypatch):
    from transformers import BertForMaskedLM

    stub = StubFuse()
    monkeypatch.setattr(otfx, "fuse", stub, raising=False)
    out = tmp_path / "fused"
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, zoo.VOCAB, (10, 16)))
    code, stdout, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--out", out, "--weights", "1,3",
                            "--anchor", "1", "--reg", "0.03", "--tokens", "window:4", "--data", tmp_path / "ids.npy",
                            "--data-batch", "4", "--quiet")
    assert code == 0, err
    assert f"fused 2 models into {out}" in stdout and err == ""
    call = stub.calls[-1]
    assert call["models"][0].endswith("bert_b") and call["weights"] == [3.0, 1.0]  # the anchor goes first
    assert call["reg"] == 0.03 and call["tokens"] == "window:4" and [len(b[0]) for b in call["data"]] == [4, 4, 2]
    bar = call["progress"](["a", "b"])  # the selection's bar: the CLI console's, so --quiet silences it
    assert list(bar) == ["a", "b"] and bar.disable
    fused = BertForMaskedLM.from_pretrained(out)
    a, b = (BertForMaskedLM.from_pretrained(models[k]) for k in ("bert_a", "bert_b"))
    expected = average(b, a, weights=[3.0, 1.0])
    assert all(torch.allclose(p, q) for p, q in zip(fused.state_dict().values(), expected.state_dict().values()))
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["given"] == {"reg": 0.03, "tokens": "window:4", "weights": [1.0, 3.0]}
    assert report["config"]["options"]["solver"] == otfx.FusionConfig().solver and report["config"]["anchor"] == 1
    assert report["spaces"][0]["width"] == 32 and report["fusion"] == {"solver": "stub"}
    assert set(report["timings_s"]) == {"load", "data", "trace", "fuse", "save"} and report["versions"]["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused", "ids.npy"]


def test_fuse_timm_and_factory_with_stub(tmp_path, capsys, models, monkeypatch):
    from otfx.io import load_model

    monkeypatch.setattr(otfx, "fuse", StubFuse(), raising=False)
    code, _, err = run(capsys, "fuse", TIMM, TIMM, "--checkpoint", models["timm_0"], "--checkpoint",
                       models["timm_1"], "--out", tmp_path / "timm", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "timm" / "otfx-model.json").read_text())
    assert meta["kind"] == "timm" and meta["kwargs"] == TIMM_KWARGS
    reloaded = load_model(tmp_path / "timm")
    a, b = (load_model(TIMM, checkpoint=models[k]).model for k in ("timm_0", "timm_1"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(x), average(a, b, weights=[1.6, 1.0])(x), atol=1e-6)

    for seed in (1, 2):
        torch.save(zoo.matmul_encoder(seed=seed).state_dict(), tmp_path / f"enc{seed}.pt")
    code, _, err = run(capsys, "fuse", "otfx.testing:matmul_encoder", "otfx.testing:matmul_encoder", "--checkpoint",
                       tmp_path / "enc1.pt", "--checkpoint", tmp_path / "enc2.pt", *TOKENS, "--out",
                       tmp_path / "enc", "--quiet")
    assert code == 0, err
    reloaded = load_model(tmp_path / "enc")
    assert reloaded.kind == "factory" and reloaded.inputs.shape == (2, 8)


def test_sweep_with_stub(tmp_path, capsys, models, monkeypatch):
    stub = StubFuse()
    monkeypatch.setattr(otfx, "fuse", stub, raising=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(12, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 10, 12))
    np.save(tmp_path / "fit.npy", rng.normal(size=(8, 3, 16, 16)).astype(np.float32))
    code, out, err = run(capsys, "sweep", models["vit_a"], models["vit_b"], "--data", tmp_path / "fit.npy", "--eval",
                         tmp_path / "eval.npz", "--regs", "0.01,0.1", "--out", tmp_path / "sweep", "--save-best",
                         "--quiet")
    assert code == 0, err
    assert "accuracy" in out and "best reg:" in out and "input" in out
    assert [c["reg"] for c in stub.calls] == [0.01, 0.1] and {c["solver"] for c in stub.calls} == {"sinkhorn_torch"}
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert result["metric"] == "accuracy" and len(result["rows"]) == 2
    assert set(result["baselines"]) == {str(models["vit_a"]), str(models["vit_b"]), "vanilla fusion", "ensemble"}
    assert result["options"]["reg"] == [0.01, 0.1]  # what was swept, not the default
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sweep" / "best" / "config.json").is_file()
    best = json.loads((tmp_path / "sweep" / "best" / "report.json").read_text())
    assert best["config"]["options"]["reg"] == result["best"]["reg"] and best["config"]["selected_by"]["eval"]
    np.savez(tmp_path / "eval11.npz", x=rng.normal(size=(4, 3, 16, 16)).astype(np.float32), y=np.array([0, 1, 2, 11]))
    code, _, err = run(capsys, "sweep", models["vit_a"], models["vit_b"], "--eval", tmp_path / "eval11.npz",
                       "--regs", "0.1", "--out", tmp_path / "sweep11", "--quiet")
    assert code == 2 and "labels range from 0 to 11 but the model has 10 classes" in err


def test_sweep_mlm_loss_with_stub(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr(otfx, "fuse", StubFuse(), raising=False)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(5, zoo.VOCAB, (6, 16)))
    code, out, err = run(capsys, "sweep", models["bert_a"], models["bert_b"], "--eval", tmp_path / "ids.npy",
                         "--regs", "0.05", "--out", tmp_path / "sweep", "--quiet")
    assert code == 0, err
    assert "loss" in out and json.loads((tmp_path / "sweep" / "sweep.json").read_text())["metric"] == "loss"
    code, _, err = run(capsys, "sweep", models["bert_a"], models["bert_b"], "--eval", tmp_path / "ids.npy",
                       "--metric", "accuracy", "--out", tmp_path / "other", "--quiet")
    assert code == 2 and "has no labels" in err


class ResidualStub(StubFuse):
    """StubFuse that also records the residual policy it was asked for."""

    def __call__(self, *models, residual="mean", **options):
        fused = super().__call__(*models, residual=residual, **options)
        self.calls[-1]["residual"] = residual
        return fused


def test_sweep_axes_with_stub(tmp_path, capsys, models, monkeypatch):
    stub = ResidualStub()
    monkeypatch.setattr(otfx, "fuse", stub, raising=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 10, 8))
    code, out, err = run(capsys, "sweep", models["vit_a"], models["vit_b"], "--eval", tmp_path / "eval.npz", "--regs",
                         "0.1,emd", "--costs", "weights,activations", "--residuals", "mean,shared", "--out",
                         tmp_path / "sweep", "--quiet")
    assert code == 0, err
    assert [(c["cost"], c["residual"], c["solver"], c["reg"]) for c in stub.calls] == [
        ("weights", "mean", "sinkhorn_torch", 0.1), ("weights", "mean", "emd", 0.06),  # emd: no reg passed
        ("weights", "shared", "sinkhorn_torch", 0.1), ("weights", "shared", "emd", 0.06)]
    assert "skipped 4: cost='activations' needs data" in out and "vanilla fusion" in out and "ensemble" in out
    assert re.search(r"best cost: weights, residual: \w+, solver: \w+", out)
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["status"] for r in result["rows"]].count("skipped") == 4 and len(result["rows"]) == 8
    assert result["options"]["cost"] == ["weights", "activations"] and result["options"]["solver"] == [
        "sinkhorn_torch", "emd"]
    assert {"vanilla fusion", "ensemble"} <= set(result["baselines"])
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "sweep" / "sweep.txt").read_text().strip() in out


def test_sweep_bad_flags_are_one_line(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setattr(otfx, "fuse", StubFuse(), raising=False)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(4, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 10, 4))
    pair = [models["vit_a"], models["vit_b"], "--eval", tmp_path / "eval.npz", "--out", tmp_path / "o", "--quiet"]
    for flags, message in ((["--costs", "weights,nope"], "nope is not one of weights"),
                           (["--residuals", ","], "give one of mean"),
                           (["--cost", "weights", "--costs", "all"], "give --cost (one value) or --costs"),
                           (["--regs", "0.1,foo"], "is not a comma-separated list"),
                           (["--regs", "0.1,-1"], "must list positive numbers"),
                           (["--repair", "both"], "--repair both needs --data"),
                           (["--repair", "on"], "--repair needs --data"),
                           (["--repair", "sometimes"], "invalid choice: 'sometimes'"),
                           (["--solver", "lsa"], "--solver lsa has no regularisation to sweep"),
                           (["--costs", "activations"], "no combination of the 4 in the grid")):
        code, out, err = run(capsys, "sweep", *pair, *flags)
        assert code in (1, 2) and message in err and "Traceback" not in err, (flags, err)
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------- fuse, the real one


def python_fuse(loaded: list, seq: int = 16, **options) -> tuple[nn.Module, tuple]:
    """What the CLI does, in Python: trace on the anchor's example inputs, then otfx.fuse."""
    from otfx.io import example_inputs

    example = example_inputs(loaded[0], seq=seq)
    return otfx.fuse(*(otfx.trace(lm.model, example) for lm in loaded), **options), example


def assert_same_outputs(a: nn.Module, b: nn.Module, example: tuple) -> None:
    with torch.no_grad():
        torch.testing.assert_close(main_output(a(*example)), main_output(b(*example)), atol=1e-5, rtol=1e-5)


@needs_fuse
@pytest.mark.parametrize("onnx", [False, True], ids=["plain", "onnx"])
def test_fuse_hf_matches_python(tmp_path, capsys, models, onnx):
    from transformers import BertForMaskedLM

    from otfx.io import load_model

    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--out", out, "--quiet",
                            *(["--onnx"] if onnx else []))
    assert code == 0, err
    fused_cli = BertForMaskedLM.from_pretrained(out).eval()
    fused_py, example = python_fuse([load_model(models[k]) for k in ("bert_a", "bert_b")])
    assert_same_outputs(fused_cli, fused_py.eval(), example)
    report = json.loads((out / "report.json").read_text())
    assert report["versions"]["otfx"] and "fuse" in report["timings_s"]
    assert report["spaces"] and {"sharpness", "iterations"} <= set(report["spaces"][0])
    assert report["space_summary"]["count"] == len(report["spaces"]) and report["config"]["options"]["reg"] == 0.06
    if onnx:
        assert (out / "model.onnx").is_file() and report["onnx"]["passed"] and "ONNX check PASS" in stdout


@needs_fuse
def test_fuse_timm_and_factory_match_python(tmp_path, capsys, models):
    from otfx.io import InputSpec, load_model

    code, _, err = run(capsys, "fuse", TIMM, TIMM, "--checkpoint", models["timm_0"], "--checkpoint",
                       models["timm_1"], "--out", tmp_path / "timm", "--quiet")
    assert code == 0, err
    fused_py, example = python_fuse([load_model(TIMM, checkpoint=models[k]) for k in ("timm_0", "timm_1")])
    assert_same_outputs(load_model(tmp_path / "timm").model, fused_py.eval(), example)

    for seed in (1, 2):
        torch.save(zoo.matmul_encoder(seed=seed).state_dict(), tmp_path / f"enc{seed}.pt")
    code, _, err = run(capsys, "fuse", "otfx.testing:matmul_encoder", "otfx.testing:matmul_encoder", "--checkpoint",
                       tmp_path / "enc1.pt", "--checkpoint", tmp_path / "enc2.pt", *TOKENS, "--out",
                       tmp_path / "enc", "--quiet")
    assert code == 0, err
    spec = InputSpec.parse("2x8", "long", zoo.VOCAB)
    loaded = [load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / f"enc{s}.pt", inputs=spec)
              for s in (1, 2)]
    fused_py, example = python_fuse(loaded)
    assert_same_outputs(load_model(tmp_path / "enc").model, fused_py.eval(), example)


@needs_fuse
def test_fuse_with_activation_data(tmp_path, capsys, models):
    from otfx.io import load_model

    ids = np.random.default_rng(0).integers(5, zoo.VOCAB, (6, 12))  # 12 tokens: the example inputs follow
    np.save(tmp_path / "ids.npy", ids)
    code, _, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--cost", "activations", "--data",
                       tmp_path / "ids.npy", "--data-batch", "4", "--out", tmp_path / "fused", "--quiet")
    assert code == 0, err
    data = [(torch.from_numpy(ids[:4]),), (torch.from_numpy(ids[4:]),)]
    fused_py, example = python_fuse([load_model(models[k]) for k in ("bert_a", "bert_b")], seq=12,
                                    cost="activations", data=data)
    assert_same_outputs(load_model(tmp_path / "fused").model, fused_py.eval(), example)
    report = json.loads((tmp_path / "fused" / "report.json").read_text())
    assert report["config"]["inputs"] == [[2, 12]] and report["config"]["given"] == {"cost": "activations"}
    code, _, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--cost", "activations", "--data",
                       tmp_path / "ids.npy", "--seq", "16", "--out", tmp_path / "other", "--quiet")
    assert code == 2 and "sequences of 12 tokens but the models are traced with 16" in err


@needs_fuse
def test_fuse_with_data_chooses_options_without_labels_and_says_which(tmp_path, capsys, models):
    ids = np.random.default_rng(1).integers(5, zoo.VOCAB, (6, 12))
    np.save(tmp_path / "ids.npy", ids)
    code, out, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--data", tmp_path / "ids.npy",
                         "--data-batch", "4", "--out", tmp_path / "fused")
    assert code == 0, err
    report = json.loads((tmp_path / "fused" / "report.json").read_text())
    selection = report["selection"]
    best = selection["best"]
    assert len([r for r in selection["rows"] if r["status"] == "ok"]) == 12
    reg = f"reg {best['reg']}, " if best["reg"] is not None else ""
    assert (f"chose cost {best['cost']}, solver {best['solver']}, {reg}residual orthogonal, refit {best['refit']} "
            "among 12 candidates") in out
    options = report["config"]["options"]
    assert options["cost"] == best["cost"] and options["solver"] == best["solver"]
    assert best["reg"] is None or options["reg"] == best["reg"]
    code, out, err = run(capsys, "fuse", models["bert_a"], models["bert_b"], "--data", tmp_path / "ids.npy",
                         "--data-batch", "4", "--select", "off", "--out", tmp_path / "once")
    assert code == 0, err
    assert "chose" not in out
    assert "selection" not in json.loads((tmp_path / "once" / "report.json").read_text())


@needs_fuse
def test_sweep_real(tmp_path, capsys, models):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.normal(size=(8, 3, 16, 16)).astype(np.float32), y=rng.integers(0, 10, 8))
    code, out, err = run(capsys, "sweep", models["vit_a"], models["vit_b"], "--data", tmp_path / "eval.npz",
                         "--eval", tmp_path / "eval.npz", "--regs", "0.03,0.1", "--out", tmp_path / "sweep", "--quiet")
    assert code == 0, err
    assert "best reg:" in out and (tmp_path / "sweep" / "sweep.png").is_file()
    code, out, err = run(capsys, "sweep", models["vit_a"], models["vit_b"], "--data", tmp_path / "eval.npz",
                         "--eval", tmp_path / "eval.npz", "--regs", "0.1,emd", "--residuals", "mean,shared",
                         "--repair", "both", "--out", tmp_path / "axes", "--save-best", "--quiet")
    assert code == 0, err
    result = json.loads((tmp_path / "axes" / "sweep.json").read_text())
    rows = [(r["residual"], r["solver"], r["repair"], r["status"]) for r in result["rows"]]
    assert rows == [(res, solver, repair, "ok") for res in ("mean", "shared") for solver in ("sinkhorn_torch", "emd")
                    for repair in (False, True)]
    assert [r.get("reused_alignment", False) for r in result["rows"]] == [False, True] * 4
    best = json.loads((tmp_path / "axes" / "best" / "report.json").read_text())["config"]
    assert best["options"]["residual"] == result["best"]["residual"] and best["selected_by"]["rows"] == 8
    assert set(result["baselines"]) == {str(models["vit_a"]), str(models["vit_b"]), "vanilla fusion", "ensemble"}
