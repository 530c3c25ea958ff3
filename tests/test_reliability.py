"""Nothing lost, nothing silently wrong (issue 13): the output policy, finiteness checks, strict loading,
solver options, input validation and the messages a user gets. Signal tests run ``python -m otfx`` in a
subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import otfx
from otfx import testing as zoo
from otfx.align.config import FusionConfig, FusionError
from otfx.checks import (
    ModelInputError,
    NonFiniteError,
    NonFiniteParameterError,
    check_finite_output,
    check_finite_params,
    check_inputs,
    dry_run,
)
from otfx.cli import main
from otfx.io import OtfxInputError, load_model, save_model
from otfx.io.output import MARKER, atomic_dir, check_output_dir, check_output_file, clean_stale

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(HERE)}


# ---------------------------------------------------------------------------------------------- helpers


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or the file itself) with its sha256 and mode: 'byte-identical' made checkable."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in files}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders of any otfx writer under ``root``."""
    return sorted(str(p) for p in root.rglob("*") if ".otfx-tmp" in p.name or p.name.endswith((".tmp", ".otfx-old")))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Linear(nn.Module):
    """A two-layer float model for export checks (no tokens, no attention)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8).to(dtype), nn.Linear(8, 3).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def make_linear() -> nn.Module:
    return Linear()


@pytest.fixture(scope="module")
def m(tmp_path_factory) -> Path:
    """m/a, m/b: two tiny HF BERTs; m/nan: one with a NaN bias; link_b -> m/b."""
    root = tmp_path_factory.mktemp("rel")
    for name, seed in (("a", 0), ("b", 1)):
        zoo.build("bert", seed=seed)[0].save_pretrained(root / "m" / name)
    bad = zoo.build("bert", seed=2)[0]
    with torch.no_grad():
        bad.bert.encoder.layer[0].output.dense.bias[3] = float("nan")
    bad.save_pretrained(root / "m" / "nan")
    os.symlink(root / "m" / "b", root / "link_b")
    return root


# ------------------------------------------------------------------------------------------ output policy


def test_dotdot_and_symlink_to_an_input_are_refused(m, capsys):
    before = digest(m / "m")
    for out in (m / "m" / ".." / "m" / "b", m / "link_b", m / "m", m / "m" / "b" / "sub"):
        code, _, err = run(capsys, "fuse", m / "m/a", m / "m/b", "--out", out, "--overwrite", "--quiet")
        assert code == 2 and "otfx never writes into its inputs" in err and "Traceback" not in err, (out, err)
    assert "is the input" in err or "lies inside" in err
    assert digest(m / "m") == before and leftovers(m) == []


def test_export_onto_an_input_file_is_refused(m, capsys):
    before = digest(m / "m")
    code, _, err = run(capsys, "export", m / "m/a", "--out", m / "m/a/model.safetensors", "--overwrite")
    assert code == 2 and f"is the input {m / 'm/a/model.safetensors'}" in err
    code, _, err = run(capsys, "export", m / "m/a", "--out", m / "m/a/new.onnx")
    assert code == 2 and "lies inside the input" in err
    code, _, err = run(capsys, "export", m / "m/a", "--out", m / "m" / "a", "--overwrite")
    assert code == 2 and "is a folder; give a file name" in err
    assert digest(m / "m") == before


def test_overwrite_replaces_only_otfx_outputs(tmp_path, m):
    anchor = load_model(m / "m/a")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = digest(foreign)
    with pytest.raises(OtfxInputError, match="was not written by otfx"):
        save_model(anchor, anchor.model, foreign, overwrite=True)
    assert digest(foreign) == before
    out = save_model(anchor, anchor.model, tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["written_by"] == "otfx"
    save_model(anchor, anchor.model, out, overwrite=True)  # an earlier otfx output may be replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
    with pytest.raises(OtfxInputError, match="not an otfx .png file"):
        (tmp_path / "photo.png").write_bytes(b"JPEG, really")
        check_output_file(tmp_path / "photo.png", overwrite=True)


def test_outputs_get_the_usual_permissions(tmp_path, m):
    old = os.umask(0o022)
    try:
        anchor = load_model(m / "m/a")
        out = save_model(anchor, anchor.model, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("out") == 0o755 and set(modes.values()) == {0o644}, modes  # transformers writes 0600


def test_stale_temporaries_are_removed_and_reported(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.{pid}.abcd1234.otfx-tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / f".other.{pid}.abcd1234.otfx-tmp"  # another output's: not touched
    other.mkdir()
    with pytest.warns(UserWarning, match="left by an interrupted otfx run"):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("y")
    assert not stale.exists() and other.exists() and (tmp_path / "out" / "f").read_text() == "y"
    live = tmp_path / f".x.{os.getppid()}.abcd1234.otfx-tmp"  # a process that is alive: reported, kept
    live.mkdir()
    with pytest.warns(UserWarning, match="still running"):
        assert clean_stale(tmp_path / "x") == []
    assert live.exists()
    legacy = tmp_path / ".o.ab12cd34.tmp"  # an older otfx's temporary (no pid in the name): reported, kept
    legacy.mkdir()
    with pytest.warns(UserWarning, match="probably left by an interrupted run of an older otfx"):
        assert clean_stale(tmp_path / "o") == []
    assert legacy.exists()


def test_check_output_dir_resolves_before_comparing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w.bin").write_bytes(b"w")
    os.symlink(tmp_path / "in" / "w.bin", tmp_path / "w_link")
    with pytest.raises(OtfxInputError, match="is the input"):
        check_output_file(tmp_path / "w_link", overwrite=True, inputs=[tmp_path / "in"])
    with pytest.raises(OtfxInputError, match="holds the input"):
        check_output_dir(tmp_path, overwrite=True, inputs=[tmp_path / "in"])
    assert check_output_dir(tmp_path / "in" / ".." / "new", inputs=[tmp_path / "in"]) == (tmp_path / "new")


SAVE_AND_HANG = """
import sys, time
from pathlib import Path
from otfx.io.output import atomic_dir
with atomic_dir(Path(sys.argv[1]) / "out") as tmp:
    (tmp / "weights.bin").write_bytes(b"x" * 10_000_000)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_save_leaves_no_temporary_folder(tmp_path, sig):
    proc = subprocess.Popen([sys.executable, "-c", SAVE_AND_HANG, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready"
    assert any(p.name.endswith(".otfx-tmp") for p in tmp_path.iterdir())  # it was there while writing
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and list(tmp_path.iterdir()) == []


def test_sigterm_during_onnx_keeps_the_fused_model_and_no_temporaries(tmp_path, m):
    out = tmp_path / "fused"
    proc = subprocess.Popen([sys.executable, "-m", "otfx", "fuse", m / "m/a", m / "m/b", "--out", out, "--onnx",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "report.json").is_file():  # the model is in place, the ONNX export is running
            time.sleep(0.5)
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated by SIGTERM" in err
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()  # saved before the export
    assert leftovers(tmp_path) == [] and not (out / "model.onnx").exists()


def test_sigint_gives_one_line_and_status_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "otfx", "inspect", "test_reliability:make_untraceable",
                             "--input-shape", "2x4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=tmp_path)
    line = proc.stderr.readline()  # the 'no --checkpoint' note: otfx is imported and running
    assert "note:" in line, line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


@pytest.mark.parametrize("delay", [0.05, 0.4])
def test_sigint_while_otfx_is_still_importing_gives_one_line_and_130(tmp_path, delay):
    import time

    proc = subprocess.Popen([sys.executable, "-m", "otfx", "inspect", "otfx.testing:bert"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    time.sleep(delay)  # torch and transformers take seconds to import here
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err


class SlowBranch(nn.Module):
    """Data-dependent control flow, and slow enough to be interrupted."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.5)
        return self.lin(x) if float(x.sum()) > 0 else -self.lin(x)


def make_untraceable() -> nn.Module:
    return SlowBranch()


# ------------------------------------------------------------------------------------------ silent wrongs


def test_nan_bias_is_named_and_nothing_is_written(m, tmp_path, capsys):
    code, _, err = run(capsys, "fuse", m / "m/a", m / "m/nan", "--out", tmp_path / "o", "--quiet")
    assert code == 2 and "bert.encoder.layer.0.output.dense.bias" in err and "1 NaN" in err
    assert not (tmp_path / "o").exists()
    model = zoo.build("matmul_encoder")[0]
    name = next(n for n, _ in model.named_parameters() if n.endswith("bias"))
    with torch.no_grad():
        dict(model.named_parameters())[name][0] = float("inf")
    with pytest.raises(NonFiniteParameterError, match=rf"parameter {name} .* 0 NaN and 1 inf"):
        check_finite_params(model, "model B")
    with pytest.raises(NonFiniteError, match="model B"):
        check_finite_output(model, zoo.build("matmul_encoder")[1], name="model B")


def test_finite_output_check_catches_an_overflow():
    model = Linear(torch.float16)
    with torch.no_grad():
        model.a.weight.fill_(60000.0)
    with pytest.raises(NonFiniteError, match="output .* inf values .* every parameter is finite"):
        check_finite_output(model, (torch.ones(2, 4, dtype=torch.float16),), name="fused")
    check_finite_output(Linear(), (torch.ones(2, 4),))  # a healthy model passes


@pytest.mark.parametrize("weights", [[float("nan"), 1.0], [float("inf"), 1.0], [-1.0, 2.0], ["a", 1.0]])
def test_unusable_weights_are_refused(weights):
    with pytest.raises(FusionError, match=r"weights\[0\]"):
        FusionConfig(weights=tuple(weights)).validate(2, False)
    a, b = zoo.build("matmul_encoder", seed=0)[0], zoo.build("matmul_encoder", seed=1)[0]
    with pytest.raises(FusionError, match=r"weights\[0\]"):
        otfx.vanilla_fuse(a, b, weights=weights)


@pytest.mark.parametrize("option", [{"reg": float("inf")}, {"reg": 0.0}, {"reg": float("nan")}, {"max_iter": 0}])
def test_unusable_solver_options_are_refused(option):
    with pytest.raises(FusionError, match="reg must be a positive finite|max_iter must be an integer"):
        FusionConfig(**option).validate(2, False)


def test_cli_refuses_solver_options_and_missing_data_before_loading(tmp_path, capsys):
    missing = tmp_path / "not_loaded"  # never read: the options are refused first
    for flags, message in ((["--reg", "inf"], "--reg must be a positive finite"),
                           (["--max-iter", "0"], "--max-iter must be at least 1"),
                           (["--cost", "activations"], "--cost activations needs --data"),
                           (["--weights", "nan,1"], "must be finite and non-negative")):
        code, _, err = run(capsys, "fuse", missing, missing, "--out", tmp_path / "o", *flags)
        assert code == 2 and message in err and "no such file" not in err, (flags, err)


def test_unknown_flag_shows_the_subcommands_usage(tmp_path, capsys):
    code, _, err = run(capsys, "fuse", "a", "b", "--out", tmp_path / "o", "--bogus")
    assert code == 2 and "usage: otfx fuse" in err and "unrecognized arguments: --bogus" in err


def test_checkpoint_missing_a_tensor_is_an_error_unless_allowed(tmp_path, m, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "holey"
    zoo.build("bert", seed=3)[0].save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    gone = "bert.encoder.layer.0.attention.self.query.weight"
    del state[gone]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OtfxInputError, match=rf"1 missing \({gone}\).*--allow-missing"):
        load_model(folder)
    loaded = load_model(folder, allow_missing=True)
    assert any(gone in note for note in loaded.notes)
    code, _, err = run(capsys, "inspect", folder, "--quiet")
    assert code == 2 and gone in err
    ckpt = tmp_path / "enc.pt"
    state = zoo.build("matmul_encoder")[0].state_dict()
    state.pop(next(iter(state)))
    torch.save(state, ckpt)
    with pytest.raises(OtfxInputError, match="1 missing"):
        load_model("otfx.testing:matmul_encoder", ckpt)
    assert load_model("otfx.testing:matmul_encoder", ckpt, allow_missing=True).notes


def test_head_count_mismatch_names_both_models():
    a, x = zoo.build("bert", seed=0)
    b, _ = zoo.build("bert", seed=1, heads=8)  # same hidden size 32: 4 x 8 vs 8 x 4
    ta, tb = otfx.trace(a, x, name="model A"), otfx.trace(b, x, name="model B")
    for call in (lambda: otfx.fuse(ta, tb), lambda: otfx.align(tb, to=ta)):
        with pytest.raises(FusionError, match=r"8 heads of width 4 in model B but 4 heads of width 8 in the anchor "
                                              r"model A"):
            call()


# ---------------------------------------------------------------------------------------- input messages


def test_token_ids_that_do_not_fit_are_named():
    model, (ids,) = zoo.build("bert")
    with pytest.raises(ModelInputError, match="word_embeddings .* are float32; token ids must be integers"):
        check_inputs(model, (ids.float(),))
    with pytest.raises(ModelInputError, match=rf"token id {zoo.VOCAB + 5} is out of range .* {zoo.VOCAB} rows"):
        check_inputs(model, (ids + zoo.VOCAB + 5 - int(ids.max()),))
    enc, (x,) = zoo.build("matmul_encoder")  # no get_input_embeddings: the guarded run names the embedding
    with pytest.raises(ModelInputError, match="out of range for"):
        dry_run(enc, (x + 10_000,))


def test_image_dtypes_and_meta_models_get_messages():
    vit, (x,) = zoo.build("timm_vit")  # (HF's ViT casts its pixels itself)
    for bad in (x.double(), x.half(), (x * 100).long()):
        with pytest.raises(ModelInputError, match=r"input 0 is (float64|float16|int64) but .*float32"):
            dry_run(vit, (bad,))
    with torch.device("meta"):
        meta = Linear()
    with pytest.raises(ModelInputError, match=r"parameter a\.weight is on the meta device"):
        check_inputs(meta, (torch.ones(2, 4),))
    with pytest.raises(ModelInputError, match="meta device"):
        check_finite_params(meta)


def test_data_dependent_branch_is_one_short_message(tmp_path):
    done = subprocess.run([sys.executable, "-m", "otfx", "inspect", "test_reliability:make_untraceable",
                           "--input-shape", "2x4", "--quiet"], capture_output=True, text=True, env=ENV, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "branches on the values of a tensor" in lines[0], done.stderr
    assert "test_reliability.py" in lines[0] and "def forward" not in done.stderr


# ------------------------------------------------------------------------------------------------- ONNX


def test_onnx_check_nan_and_tolerances(tmp_path):
    from otfx.export.onnx import TOLERANCES, _abs_diff, check_onnx, export_onnx

    d = _abs_diff(np.array([np.nan, np.nan, np.inf, 1.0]), np.array([np.nan, 1.0, np.inf, 1.5]))
    assert d.tolist() == [np.inf, np.inf, 0.0, 0.5]  # NaN never matches, not even NaN
    assert TOLERANCES[torch.float16][0] > TOLERANCES[torch.float32][0]
    model, x = Linear(), (torch.randn(2, 4),)
    path = export_onnx(model, x, tmp_path / "lin.onnx")
    assert check_onnx(path, model, x).passed
    with torch.no_grad():
        model.b.bias[0] = float("nan")  # torch now says NaN where the file says a number
    check = check_onnx(path, model, x)
    assert not check.passed and check.nonfinite > 0 and "NaN" in str(check)
    nan_path = export_onnx(model, x, tmp_path / "nan.onnx")  # both sides NaN: still a failure
    assert not check_onnx(nan_path, model, x).passed
    with pytest.raises(ValueError, match=r"input 'x' has 3 dims \(2, 1, 4\) but the ONNX graph expects 2"):
        check_onnx(path, Linear(), x, inputs=(torch.randn(2, 1, 4),))
    with pytest.raises(ValueError, match="is a folder"):
        check_onnx(tmp_path, Linear(), x)
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        export_onnx(Linear(), x, tmp_path)


def test_half_precision_checks(tmp_path):
    from otfx.export.onnx import check_onnx, export_onnx

    half = Linear(torch.float16)
    x = (torch.randn(2, 4, dtype=torch.float16),)
    check = check_onnx(export_onnx(half, x, tmp_path / "h.onnx"), half, x)
    assert check.dtype == "float16" and check.atol == 2e-3 and check.passed, check
    bf16 = Linear(torch.bfloat16)
    xb = (torch.randn(2, 4, dtype=torch.bfloat16),)
    check = check_onnx(export_onnx(bf16, xb, tmp_path / "b.onnx"), bf16, xb)
    if check.skipped:  # onnxruntime's CPU provider has no bf16 kernels
        assert "bfloat16" in check.note and "SKIPPED" in str(check)
    else:
        assert check.passed


def test_failed_onnx_export_keeps_the_fused_model(tmp_path, m, capsys, monkeypatch):
    import otfx.export.onnx as onnx_mod

    def broken(*args, **kwargs):
        raise onnx_mod.OnnxExportError("BertForMaskedLM", "Could not find an implementation for Add(14)")

    monkeypatch.setattr(onnx_mod, "export_command", broken)
    code, _, err = run(capsys, "fuse", m / "m/a", m / "m/b", "--out", tmp_path / "o", "--onnx", "--quiet")
    assert code == 1 and "the fused model is saved in" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "Could not find an implementation" in report["onnx"]["error"]
    assert load_model(tmp_path / "o").model is not None and leftovers(tmp_path) == []


def test_warnings_are_single_lines(capsys):
    from otfx.cli import _one_line_warnings

    show = _one_line_warnings("fuse")
    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.warn("first line\nsecond line", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "otfx fuse: warning: first line\n"


# ------------------------------------------------------------------------------------------ everyday use


def test_config_file_with_flags_winning_and_dry_run(tmp_path, m, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(f"models: [{m / 'm/a'}, {m / 'm/b'}]\nout: {tmp_path / 'fused'}\nweights: [0.7, 0.3]\n"
                      "options:\n  solver: sinkhorn\n  reg: 0.03\n")
    code, out, err = run(capsys, "fuse", "--config", config, "--dry-run", "--quiet")
    assert code == 0, err
    assert "dry run: nothing fused, nothing written" in out and "weights=[0.7, 0.3]" in out and "reg=0.03" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yaml"]
    code, _, err = run(capsys, "fuse", "--config", config, "--reg", "0.05", "--quiet")
    assert code == 0, err
    given = json.loads((tmp_path / "fused" / "report.json").read_text())["config"]["given"]
    assert given == {"solver": "sinkhorn", "reg": 0.05, "weights": [0.7, 0.3]}
    (tmp_path / "bad.yaml").write_text("models: [a, b]\nout: x\nbogus: 1\n")
    code, _, err = run(capsys, "fuse", "--config", tmp_path / "bad.yaml")
    assert code == 2 and "unknown key 'bogus'" in err
    (tmp_path / "bad2.yaml").write_text("models: [a, b]\nout: x\nsolver: hungarian\n")
    code, _, err = run(capsys, "fuse", "--config", tmp_path / "bad2.yaml")
    assert code == 2 and "solver='hungarian' is not one of" in err


def test_disk_full_names_the_output_and_leaves_nothing(tmp_path, m, monkeypatch):
    import errno

    anchor = load_model(m / "m/a")
    out = save_model(anchor, anchor.model, tmp_path / "out")
    before = digest(out)

    def full(tmp):
        (tmp / "part").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part"))

    with pytest.raises(OtfxInputError, match=rf"cannot write {out}: the disk is full; nothing was written"):
        save_model(anchor, anchor.model, out, overwrite=True, extras=full)
    assert digest(out) == before and leftovers(tmp_path) == []  # the earlier output is unchanged


def test_a_model_changed_after_tracing_is_refused():
    from otfx.checks import check_traced_unchanged

    model, x = zoo.build("matmul_encoder")
    traced = otfx.trace(model, x, name="model A")
    check_traced_unchanged(traced)
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # edited in place: the trace still describes it
    check_traced_unchanged(traced)
    model.blocks[0].attn.q = nn.Linear(32, 64)
    with pytest.raises(ModelInputError, match=r"model A: parameter blocks.0.attn.q.weight had shape \(32, 32\)"):
        check_traced_unchanged(traced)


def test_solver_warnings_are_one_line_per_kind(tmp_path, m, capsys):
    code, _, err = run(capsys, "fuse", m / "m/a", m / "m/b", "--out", tmp_path / "o", "--max-iter", "2", "--quiet")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "warning:" in line]
    assert 1 <= len(lines) <= 2 and all(line.startswith("otfx fuse: warning: ") for line in lines), err
    assert sum("did not converge" in line for line in lines) <= 1 and sum("fallback" in line for line in lines) <= 1


def test_a_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(OtfxInputError, match="cannot read checkpoint .*corrupt.pt: it is neither a safetensors"):
        load_model("otfx.testing:matmul_encoder", tmp_path / "corrupt.pt")


def test_export_with_mask_has_the_mask_inputs(tmp_path, m, capsys):
    import onnx

    code, out, err = run(capsys, "export", m / "m/a", "--out", tmp_path / "b.onnx", "--with-mask", "--check",
                         "--quiet")
    assert code == 0 and "ONNX check PASS" in out, err
    names = [i.name for i in onnx.load(str(tmp_path / "b.onnx")).graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    code, _, err = run(capsys, "export", "otfx.testing:matmul_encoder", "--input-shape", "2x8", "--input-dtype",
                       "long", "--input-high", str(zoo.VOCAB), "--out", tmp_path / "e.onnx", "--with-mask", "--quiet")
    assert code == 2 and "--with-mask" in err and not (tmp_path / "e.onnx").exists()


def test_truncated_weights_and_corrupt_index_are_named(tmp_path, m, capsys):
    import shutil

    trunc, index = tmp_path / "trunc", tmp_path / "idx"
    shutil.copytree(m / "m/a", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(m / "m/a", index)
    (index / "model.safetensors").rename(index / "model-00001-of-00001.safetensors")
    (index / "model.safetensors.index.json").write_text('{"weight_map": {broken')
    for folder in (trunc, index):
        code, _, err = run(capsys, "inspect", folder, "--quiet")
        assert code == 2 and "Traceback" not in err and str(folder) in err, err
        assert any(why in err for why in (f"cannot load BertForMaskedLM weights from {folder}", "corrupt or truncated",
                                          "is not a shard index")), err


def test_a_non_finite_fused_model_is_not_saved(tmp_path, m, capsys, monkeypatch):
    import copy

    def nan_fuse(*models, **options):
        fused = copy.deepcopy(models[0].model)
        with torch.no_grad():
            fused.cls.predictions.bias.fill_(float("nan"))
        return fused

    monkeypatch.setattr(otfx, "fuse", nan_fuse)
    code, _, err = run(capsys, "fuse", m / "m/a", m / "m/b", "--out", tmp_path / "o", "--quiet")
    assert code == 1 and "the fused model: parameter cls.predictions.bias" in err and "NaN" in err
    assert list(tmp_path.iterdir()) == []
