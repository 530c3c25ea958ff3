"""ONNX export (dynamo exporter) and onnxruntime check: zoo models, failures, atomic writes, providers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from otfx import testing as zoo  # noqa: E402
from otfx.export import onnx as ox  # noqa: E402
from otfx.export.onnx import OnnxCheck, OnnxExportError, check_onnx, export_info, export_onnx  # noqa: E402

torch.set_num_threads(1)

ZOO_MODELS = ["bert", "hf_vit", "gpt2", "llama", "timm_vit", "matmul_encoder"]
slow = pytest.mark.slow  # 2-5 s each (dynamo export); still part of the default run


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()})


def _assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], dict[str, bool]]) -> None:
    state, flags = snap
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v), f"export modified {k}"
    assert {n: m.training for n, m in model.named_modules()} == flags, "export changed training flags"


@slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_export_and_check(name: str, tmp_path) -> None:
    """A fused model (OT fusion of two seeds, the deployment case) exports and matches onnxruntime."""
    import otfx

    parent_a, args = zoo.build(name)
    parent_b, _ = zoo.build(name, seed=1)
    model = otfx.fuse(otfx.trace(parent_a, args), otfx.trace(parent_b, args))
    model.train()  # the export must use eval mode without leaving the caller's model in it
    model.get_submodule(next(n for n, _ in model.named_children())).eval()  # mixed flags survive too
    snap = _snapshot(model)

    path = export_onnx(model, args, tmp_path / f"{name}.onnx")
    _assert_unchanged(model, snap)
    assert path == tmp_path / f"{name}.onnx" and path.is_file()
    assert sorted(os.listdir(tmp_path)) == [f"{name}.onnx"]  # single file, no temp dir left

    info = export_info(path)
    varies_seq = zoo.ZOO[name].varies_seq
    assert info["shapes"] == ("dynamic batch+seq" if varies_seq else "dynamic batch"), info
    assert info["fallbacks"] == [] and info["external_data"] == "false"

    fresh = zoo.inputs(name, batch=3, seq=11 if varies_seq else 8, seed=7)
    check = check_onnx(path, model, args, providers=["CPUExecutionProvider"], inputs=fresh)
    _assert_unchanged(model, snap)
    assert check.provider == "CPUExecutionProvider"
    assert check.input_shapes[0][0] == 3 and (not varies_seq or check.input_shapes[0][1] == 11)
    assert check.passed and check.max_abs_diff < 1e-4, str(check)

    # default fresh inputs: derived from args, one larger on every dynamic axis
    default = check_onnx(path, model, args)
    assert default.passed and default.input_shapes[0][0] == args[0].shape[0] + 1, str(default)
    if varies_seq:
        assert default.input_shapes[0][1] == args[0].shape[1] + 1


@slow
def test_kwargs_become_inputs_sharing_dims(tmp_path) -> None:
    model, (ids,) = zoo.build("bert")
    mask = torch.ones_like(ids)
    path = export_onnx(model, (ids,), tmp_path / "bert.onnx", kwargs={"attention_mask": mask})
    info = export_info(path)
    assert info["inputs"] == ["input_ids", "attention_mask"]
    assert info["dynamic_axes"]["attention_mask"] == info["dynamic_axes"]["input_ids"] == {"0": "batch",
                                                                                           "1": "seq"}
    check = check_onnx(path, model, (ids,), kwargs={"attention_mask": mask})
    assert check.passed and check.input_shapes == [(3, 9), (3, 9)], str(check)
    new_ids = zoo.inputs("bert", 4, 5)[0]
    new_mask = torch.ones_like(new_ids)
    new_mask[:, -2:] = 0  # padded tail
    check = check_onnx(path, model, (ids,), kwargs={"attention_mask": mask}, inputs=(new_ids, new_mask))
    assert check.passed, str(check)


# ----------------------------------------------------------------------------------- small models


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu()


class _DataDependent(_Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # python control flow on tensor data
            return self.lin(x)
        return -self.lin(x)


class _LeavesTorch(torch.autograd.Function):
    """A custom autograd.Function that leaves torch (numpy + scipy) and has no ONNX symbolic."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import scipy.special

        return torch.from_numpy(scipy.special.expit(x.detach().cpu().numpy()))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


class _CustomFunction(_Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LeavesTorch.apply(self.lin(x))


@torch.library.custom_op("otfx_test_onnx::wobble", mutates_args=())
def _wobble(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOp(_Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _wobble(self.lin(x))


class _FixedSeq(nn.Module):
    """Hard-codes the sequence length in a reshape: only the batch axis can be dynamic."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).reshape(ids.shape[0], 2, 16)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[_Tiny, tuple, object]:
    torch.manual_seed(0)
    model, args = _Tiny(), (torch.randn(2, 4),)
    return model, args, export_onnx(model, args, tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.mark.parametrize("cls, needle", [
    (_DataDependent, "x.sum() > 0"),
    (_CustomFunction, "numpy"),
    (_CustomOp, "otfx_test_onnx.wobble"),
])
def test_unexportable_model_raises_and_leaves_nothing(cls: type, needle: str, tmp_path) -> None:
    model, args = cls(), (torch.randn(2, 4),)
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(OnnxExportError) as info:
        export_onnx(model, args, target)
    err = info.value
    assert err.model_class == cls.__name__ and cls.__name__ in str(err)
    assert needle in err.reason, err.reason
    assert len(str(err)) < 1500  # the reason, not an IR dump
    assert err.attempts == ["dynamic batch", "static"]
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() or p.name.endswith(".tmp")]
    assert leftovers == []


def test_failed_export_keeps_existing_file(tmp_path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(OnnxExportError):
        export_onnx(_CustomOp(), (torch.randn(2, 4),), target, dynamic=False)
    assert target.read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_fallback_to_fewer_dynamic_axes_is_recorded(tmp_path) -> None:
    model, args = _FixedSeq(), (torch.randint(0, 10, (2, 8)),)
    path = export_onnx(model, args, tmp_path / "f.onnx")
    info = export_info(path)
    assert info["shapes"] == "dynamic batch" and info["dynamic_axes"] == {"ids": {"0": "batch"}}
    assert info["fallbacks"], info
    check = check_onnx(path, model, args)
    assert check.passed and check.input_shapes == [(3, 8)], str(check)


def test_static_export(tmp_path) -> None:
    model, args = _Tiny(), (torch.randn(2, 4),)
    path = export_onnx(model, args, tmp_path / "s.onnx", dynamic=False, opset=18)
    assert export_info(path)["shapes"] == "static"
    check = check_onnx(path, model, args)
    assert check.passed and check.input_shapes == [(2, 4)]


def test_unavailable_provider_is_a_clear_error(tiny_file) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    model, args, path = tiny_file
    with pytest.raises(ValueError, match="CUDAExecutionProvider.*not available"):
        check_onnx(path, model, args, providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match="not available"):
        check_onnx(path, model, args, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ox.default_providers() == ["CPUExecutionProvider"]


def test_check_result_and_failure(tiny_file) -> None:
    model, args, path = tiny_file
    check = check_onnx(path, model, args, seed=3)
    assert isinstance(check, OnnxCheck) and check.passed and check.provider == "CPUExecutionProvider"
    line = str(check)
    assert "\n" not in line and "PASS" in line and "CPUExecutionProvider" in line
    other = _Tiny()  # different weights: the check must notice
    bad = check_onnx(path, other, args)
    assert not bad.passed and bad.max_abs_diff > 1e-3 and "FAIL" in str(bad)


def test_external_data_and_replacing_an_export(tmp_path, monkeypatch) -> None:
    model, args = _Tiny(), (torch.randn(2, 4),)
    target = tmp_path / "m.onnx"
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)
    export_onnx(model, args, target)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert export_info(target)["external_data"] == "true"
    assert check_onnx(target, model, args).passed
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 2**40)
    export_onnx(model, args, target)  # single file again: the stale weights go
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert check_onnx(target, model, args).passed


def test_export_command(tmp_path) -> None:
    model, args = _Tiny(), (torch.randn(2, 4),)
    assert ox.export_command(model, args, tmp_path / "a" / "m.onnx", check=False) is None
    check = ox.export_command(model, args, tmp_path / "b" / "m.onnx", check=True)
    assert check is not None and check.passed
