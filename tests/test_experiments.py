"""The experiment code path end to end on a tiny budget: the demo and an example script on digits with tiny
ViTs trained for one epoch on 300 images, into a temporary cache (seconds). The demo is part of the package; the
examples' helpers (examples/common) are not, and the package imports nothing from them."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import otfx
from otfx import demo

torch.set_num_threads(1)

TINY = ["--epochs", "1", "--hidden", "16", "--mlp", "32", "--layers", "1", "--heads", "2", "--train-limit", "300",
        "--regs", "0.1", "--act-regs", "0.1", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from common import runner as R  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OTFX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_tiny_end_to_end(cache, tmp_path, capsys) -> None:
    out = tmp_path / "fused"
    assert demo.main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    names = ["parent A (seed 0)", "parent B (seed 1)", "ensemble", "vanilla fusion", "OT weights, EMD",
             "OT weights, Sinkhorn", "OT activations, Sinkhorn"]
    lines = {line.split("  ")[0].strip(): line for line in printed.splitlines()}
    for name in names:
        assert name in lines, printed
        accs = lines[name][len(name):].split()[:3]  # val acc, test acc, seconds
        assert all(math.isfinite(float(a)) for a in accs) and 0 <= float(accs[1]) <= 100, lines[name]
    assert "reg 0.1" in lines["OT weights, Sinkhorn"]
    assert f"to {out}" in printed and (out / "config.json").is_file() and (out / "otfx-demo.json").is_file()
    assert any(p.name.endswith(".safetensors") for p in out.iterdir())
    # the parents are cached: a second run trains nothing and refuses to overwrite without --overwrite
    assert len([p for p in (cache / "demo" / "parents").iterdir() if not p.name.startswith(".")]) == 2
    with pytest.raises(ValueError, match="already exists"):
        demo.main([*TINY, "--out", str(out)])
    assert demo.main([*TINY, "--out", str(out), "--overwrite"]) == 0
    assert "loaded from cache" in capsys.readouterr().out


def test_demo_help_and_bad_regs(capsys) -> None:
    assert demo.main(["--help"]) == 0
    assert "--seed" in capsys.readouterr().out
    assert demo.main(["--regs", "0.1,-1"]) == 2
    assert "positive" in capsys.readouterr().err


def test_package_is_the_library() -> None:
    package = Path(otfx.__file__).resolve().parent
    assert importlib.util.find_spec("otfx.experiments") is None and not (package / "zoo.py").exists()
    reach = re.compile(r"^\s*(from|import)\s+(common|examples|otfx\.experiments)\b", re.M)
    assert not [p for p in package.rglob("*.py") if reach.search(p.read_text())]  # nothing uses the examples


@pytest.mark.slow
def test_demo_from_a_non_editable_install(tmp_path) -> None:
    """A plain (non-editable) install holds the demo and runs it from anywhere: no source-tree paths."""
    source, target = tmp_path / "src", tmp_path / "site"
    for folder in ("otfx", "passes"):  # a copy: the build writes build/ and egg-info next to its sources
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True,
                   timeout=300)
    installed = target / "otfx"
    assert (installed / "demo.py").is_file() and (installed / "testing.py").is_file()
    assert not (installed / "experiments").exists() and not (target / "common").exists()
    env = {**os.environ, "PYTHONPATH": str(target), "OTFX_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "otfx", "demo", *TINY, "--out", str(tmp_path / "fused")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OT activations, Sinkhorn" in done.stdout and (tmp_path / "fused" / "config.json").is_file()
    probe = subprocess.run([sys.executable, "-c", "import otfx.demo; print(otfx.demo.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().startswith(str(installed)), probe.stdout  # the run used the installed copy


def test_example_script_writes_table_and_plots(cache, tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("one_shot", EXAMPLES / "01_one_shot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "results"
    assert module.main(["--smoke", "--out", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert text.splitlines()[4] == "```sh" and "python" in text.splitlines()[5]  # the command comes first
    for column in module.COLUMNS:
        assert column in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    values = [float(c.split("±")[0]) for c in cells[2:-1]]
    assert len(values) == len(module.COLUMNS) and all(0 <= v <= 100 for v in values)
    assert (out / "one_shot.png").stat().st_size > 1000 and (out / "results.json").is_file()


def test_runner_tables_and_plots(tmp_path, monkeypatch) -> None:
    table = R.markdown_table(["a", "b"], [["x", 1], ["y|z", 2.5]])
    assert table.splitlines()[1] == "| :--- | ---: |" and "y\\|z" in table
    with pytest.raises(ValueError):
        R.markdown_table(["a", "b"], [["only one"]])
    assert R.fmt_acc(0.12345) == "12.35" and R.fmt_acc(float("nan")) == "-"
    assert R.mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert R.best_row([{"score": None}, {"score": 0.2}, {"score": 0.5}])["score"] == 0.5
    assert R.command_line(["examples/01_one_shot.py", "--smoke"], env=()) == "python examples/01_one_shot.py --smoke"
    page = R.write_markdown(tmp_path / "r" / "README.md", "T", "python x.py", table, 1.0)
    monkeypatch.chdir(tmp_path)  # default outputs are under the current directory, wherever the code lives
    assert R.results_dir("x").resolve() == (tmp_path / "docs" / "results" / "x").resolve()
    assert R.output_dir(R.example_parser("doc", "y").parse_args([]), "y").resolve() == tmp_path / "docs/results/y"
    assert page.read_text().splitlines()[5] == "python x.py"
    R.line_plot(tmp_path / "l.png", {"s": ([1, 2], [3, 4])}, refs={"r": 3.5}, errors={"s": [0.1, 0.2]},
                marks={"m": (1, 3)}, xlabel="x", ylabel="y", logx=True)
    R.bar_plot(tmp_path / "b.png", {"g1": {"a": 1.0, "b": 2.0}, "g2": {"a": 3.0}}, ylabel="y", refs={"r": 1.5})
    assert (tmp_path / "l.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000
