"""otfx.testing, the tiny model zoo users self-test their passes with: every builder runs, optional imports are
guarded with the pip package to install."""

from __future__ import annotations

import sys

import pytest
import torch

from otfx import testing

torch.set_num_threads(1)


@pytest.mark.parametrize("builder, module, package", [("timm_vit", "timm", "timm"),
                                                      ("vit_pytorch", "vit_pytorch", "vit-pytorch")])
def test_missing_optional_package_is_named(monkeypatch, builder, module, package) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes ``import module`` raise ImportError
    with pytest.raises(ImportError, match=f"otfx.testing.{builder} needs the optional package '{package}': "
                                          f"pip install {package}"):
        testing.build(builder)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="matmul_encoder"):
        testing.build("no_such_model")


@pytest.mark.parametrize("name", ["matmul_encoder", "hf_vit"])
def test_build_and_inputs_run(name) -> None:
    model, args = testing.build(name)
    with torch.no_grad():
        out = model(*args)
        again = model(*testing.inputs(name, 3, 8))
    assert not model.training and out is not None and again is not None
