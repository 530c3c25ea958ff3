"""Reading models and data from disk, saving fused models atomically, and the JSON report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import assert_state_unchanged, state_copy

from otfx import testing as zoo
from otfx.io import OtfxInputError, atomic_dir
from otfx.io.data import load_data, load_labelled
from otfx.io.models import InputSpec, example_inputs, load_model, save_model
from otfx.io.report import FusionReport, jsonable, package_versions, write_report

TIMM_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4, "num_classes": 10}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(zoo.VOCAB - 5)]


def tiny_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Two tiny BERTs (the first with a tokenizer) and a tiny ViT, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, arch, seed in (("bert_a", "bert", 0), ("bert_b", "bert", 1), ("vit", "hf_vit", 0)):
        model, _ = zoo.build(arch, seed=seed)
        model.save_pretrained(root / name)
        out[name] = root / name
    tiny_tokenizer().save_pretrained(out["bert_a"])
    return out


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------- models


def test_hf_folder_round_trip(hf_dirs):
    reference, _ = zoo.build("bert", seed=0)
    loaded = load_model(hf_dirs["bert_a"])
    assert loaded.kind == "hf" and type(loaded.model).__name__ == "BertForMaskedLM"
    assert same_state(loaded.model, reference)
    assert loaded.tokenizer is not None and loaded.tokenizer.mask_token_id == 4
    (ids,) = example_inputs(loaded, batch=3, seq=12)
    assert ids.shape == (3, 12) and ids.dtype == torch.long and int(ids.max()) < zoo.VOCAB
    (images,) = example_inputs(load_model(hf_dirs["vit"]))
    assert images.shape == (2, 3, zoo.IMAGE, zoo.IMAGE) and images.dtype == torch.float32
    (explicit,) = example_inputs(loaded, inputs=InputSpec.parse("4x5", "long", 7))
    assert explicit.shape == (4, 5) and int(explicit.max()) < 7


def test_timm_with_safetensors_and_sidecar(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_KWARGS)
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    (tmp_path / "vit.json").write_text(json.dumps(TIMM_KWARGS))
    loaded = load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "vit.safetensors")
    assert loaded.kind == "timm" and same_state(loaded.model, model)
    assert example_inputs(loaded)[0].shape == (2, 3, 16, 16)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "other.pt")  # kwargs given instead of a sidecar
    again = load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "other.pt",
                       model_kwargs=json.dumps(TIMM_KWARGS))
    assert same_state(again.model, model)
    with pytest.raises(OtfxInputError, match="timm has no model 'no_such_net'"):
        load_model("timm:no_such_net")


def test_factory_with_checkpoint(tmp_path):
    target = zoo.matmul_encoder(seed=2)
    torch.save(target.state_dict(), tmp_path / "enc.pt")
    loaded = load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / "enc.pt", model_kwargs={"seed": 1})
    assert loaded.kind == "factory" and same_state(loaded.model, target)
    assert loaded.rebuild == {"kind": "factory", "factory": "otfx.testing:matmul_encoder", "kwargs": {"seed": 1},
                              "checkpoint": str(tmp_path / "enc.pt")}
    with pytest.raises(OtfxInputError, match="--input-shape"):
        example_inputs(loaded)
    (ids,) = example_inputs(loaded, inputs=InputSpec.parse("2x8", "long", zoo.VOCAB))
    assert ids.shape == (2, 8)


@pytest.mark.parametrize(("spec", "kwargs", "message"), [
    ("no_such_pkg.mod:make", None, "cannot import 'no_such_pkg.mod'"),
    ("otfx.testing:no_such_factory", None, "has no 'no_such_factory'"),
    ("otfx.testing:VOCAB", None, "not a callable factory"),
    ("otfx.testing:bert", {"wings": 2}, "rejected the kwargs"),
    ("otfx.testing:inputs", {"name": "bert", "batch": 1, "seq": 2}, "not a torch.nn.Module"),
])
def test_factory_errors(spec, kwargs, message):
    with pytest.raises(OtfxInputError, match=message):
        load_model(spec, model_kwargs=kwargs)


def test_checkpoint_that_does_not_fit(tmp_path, hf_dirs):
    torch.save(zoo.matmul_encoder(hidden=16).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(OtfxInputError, match=r"does not fit MatmulEncoder: .*wrong shape"):
        load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / "narrow.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(OtfxInputError, match=r"missing .* unexpected \(foo\)"):
        load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / "foreign.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OtfxInputError, match="cannot read checkpoint .*junk.safetensors"):
        load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / "junk.safetensors")
    with pytest.raises(OtfxInputError, match="checkpoint .*absent.pt does not exist"):
        load_model("otfx.testing:matmul_encoder", checkpoint=tmp_path / "absent.pt")


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(OtfxInputError, match="no such file or folder: .*nowhere"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(OtfxInputError, match="is not a model: it has no config.json .*notes.txt"):
        load_model(tmp_path)
    with pytest.raises(OtfxInputError, match="is a file, not a model"):
        load_model(tmp_path / "notes.txt")


def test_save_hf_loads_with_from_pretrained(tmp_path, hf_dirs):
    from transformers import BertForMaskedLM

    anchor = load_model(hf_dirs["bert_a"])
    fused, _ = zoo.build("bert", seed=5)
    before = state_copy(anchor.model)
    save_model(anchor, fused, tmp_path / "out")
    again = BertForMaskedLM.from_pretrained(tmp_path / "out")
    assert same_state(again, fused)
    reloaded = load_model(tmp_path / "out")
    assert reloaded.tokenizer is not None and same_state(reloaded.model, fused)
    assert_state_unchanged(anchor.model, before)


def test_save_non_hf_with_tied_weights(tmp_path):
    anchor = load_model("otfx.testing:gpt2", model_kwargs={"seed": 0}, inputs=InputSpec.parse("2x8", "long", 97))
    fused = zoo.gpt2(seed=3)
    assert fused.lm_head.weight is fused.transformer.wte.weight  # tied: plain safetensors would refuse
    save_model(anchor, fused, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "otfx-model.json").read_text())
    assert meta["kind"] == "factory" and meta["factory"] == "otfx.testing:gpt2" and meta["inputs"]["shape"] == [2, 8]
    reloaded = load_model(tmp_path / "out")
    assert same_state(reloaded.model, fused)
    (ids,) = example_inputs(reloaded)
    assert ids.shape == (2, 8)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(ids).logits, fused(ids).logits)


def test_save_model_is_atomic(tmp_path, hf_dirs):
    anchor = load_model(hf_dirs["bert_b"])
    out = tmp_path / "out"
    save_model(anchor, anchor.model, out)
    with pytest.raises(OtfxInputError, match="already exists; pass --overwrite"):
        save_model(anchor, anchor.model, out)

    def fail(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model(anchor, anchor.model, tmp_path / "new", extras=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder, no temp left behind
    with pytest.raises(RuntimeError):
        save_model(anchor, anchor.model, out, overwrite=True, extras=fail)
    assert (out / "config.json").is_file() and not (out / "partial").exists()  # the old folder survives
    save_model(anchor, anchor.model, out, overwrite=True, extras=lambda tmp: (tmp / "extra").write_text("y"))
    assert (out / "extra").read_text() == "y" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OtfxInputError, match="never writes into its inputs"):
        save_model(anchor, anchor.model, hf_dirs["bert_b"], overwrite=True)
    assert (hf_dirs["bert_b"] / "config.json").is_file()


def test_atomic_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OtfxInputError, match="not a folder"), atomic_dir(tmp_path / "f"):
        pass


# --------------------------------------------------------------------------------------------------- data


def test_npz_and_npy(tmp_path, hf_dirs):
    vit = load_model(hf_dirs["vit"])
    x = np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 3)
    batches = load_labelled(tmp_path / "d.npz", vit, batch_size=4)
    assert [b[0][0].shape[0] for b in batches] == [4, 4, 2] and batches[0][1].tolist() == [0, 1, 2, 0]
    np.save(tmp_path / "nhwc.npy", x.transpose(0, 2, 3, 1))  # channels last is accepted
    (first,) = load_data(tmp_path / "nhwc.npy", vit, batch_size=16, limit=5)
    assert first[0].shape == (5, 3, 16, 16) and torch.allclose(first[0], torch.from_numpy(x[:5]))
    bert = load_model(hf_dirs["bert_b"])
    np.save(tmp_path / "ids.npy", np.arange(48).reshape(6, 8))
    assert load_data(tmp_path / "ids.npy", bert, batch_size=4)[1][0].dtype == torch.long
    np.save(tmp_path / "big.npy", np.full((2, 8), 500))
    with pytest.raises(OtfxInputError, match=r"big.npy has ids in \[500, 500\]"):
        load_data(tmp_path / "big.npy", bert)
    with pytest.raises(OtfxInputError, match=r"d.npz has samples of shape \(3, 16, 16\)"):
        load_data(tmp_path / "d.npz", bert)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(OtfxInputError, match="cannot read data .*bad.npy"):
        load_data(tmp_path / "bad.npy", bert)


def test_text_needs_a_tokenizer(tmp_path, hf_dirs):
    (tmp_path / "t.txt").write_text("w1 w2 w3 w4 w5 w6\n\nw7 w8 w9 w10 w11 w12 w13 w14 w15 w16\n" * 4)
    with_tok = load_model(hf_dirs["bert_a"])
    batches = load_data(tmp_path / "t.txt", with_tok, batch_size=8, example=example_inputs(with_tok, seq=8))
    assert [b[0].shape for b in batches] == [(8, 8), (2, 8)]  # 4 x (8 + 12) tokens in blocks of 8
    assert batches[0][0][0, 0] == 2 and batches[0][0][0, 1] == WORDS.index("w1")  # [CLS] w1 ...
    with pytest.raises(OtfxInputError, match="t.txt is text, but .* has no tokenizer"):
        load_data(tmp_path / "t.txt", load_model(hf_dirs["bert_b"]))


def test_image_folder(tmp_path, hf_dirs):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    vit = load_model(hf_dirs["vit"])
    batches = load_labelled(tmp_path / "imgs", vit, batch_size=4)
    assert batches[0][0][0].shape == (4, 3, 16, 16) and torch.cat([b[1] for b in batches]).tolist() == [0] * 3 + [1] * 3
    assert -1.0 <= float(batches[0][0][0].min()) and float(batches[0][0][0].max()) <= 1.0  # (x - 0.5) / 0.5
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OtfxInputError, match="cannot read image .*broken.png"):
        load_data(tmp_path / "imgs", vit)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OtfxInputError, match="holds no images"):
        load_data(tmp_path / "empty", vit)


def test_other_data_errors(tmp_path, hf_dirs):
    vit = load_model(hf_dirs["vit"])
    with pytest.raises(OtfxInputError, match="data .*absent.npz does not exist"):
        load_data(tmp_path / "absent.npz", vit)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(OtfxInputError, match=r"d.csv: unknown format \.csv"):
        load_data(tmp_path / "d.csv", vit)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(OtfxInputError, match="datasets package is not installed"):
            load_data(tmp_path / "ds", vit)
    else:
        with pytest.raises(OtfxInputError, match="cannot read datasets folder"):
            load_data(tmp_path / "ds", vit)


# ------------------------------------------------------------------------------------------------- report


def test_report_is_plain_json(tmp_path):
    report = FusionReport(config={"reg": 0.06}, models=["a", "b"])
    with report.stage("fuse"):
        pass
    report.add_fusion({"spaces": [{"space": 1, "role": "residual", "width": 32, "cost_min": np.float32(0.5),
                                   "cost_max": torch.tensor(2.0), "sharpness": 0.9, "iterations": 12}],
                       "total_cost": float("nan")})
    path = write_report(report.to_dict(), tmp_path / "r" / "report.json")
    data = json.loads(path.read_text())
    assert data["spaces"][0]["cost_max"] == 2.0 and data["space_summary"]["by_role"] == {"residual": 1}
    assert data["fusion"]["total_cost"] == "nan" and "fuse" in data["timings_s"]
    assert set(package_versions()) >= {"torch", "transformers", "POT", "onnx", "onnxruntime", "otfx"}
    assert data["versions"]["torch"] and data["versions"]["otfx"]
    assert jsonable({"t": torch.arange(3)}) == {"t": [0, 1, 2]}
    maps = FusionReport()
    maps.add_fusion({"maps": [{"space": 3, "kind": "heads", "width_anchor": 4, "cost_range": (0.5, 2.5),
                               "sharpness": 0.7, "iterations": 9}], "timings": {"total": 1.0}})
    summary = maps.to_dict()["space_summary"]
    assert summary["by_role"] == {"heads": 1} and summary["cost"]["max"] == 2.5 and summary["width"]["min"] == 4
    assert os.listdir(tmp_path / "r") == ["report.json"]


def test_report_counts_unconverged_and_fallback_maps():
    report = FusionReport()
    report.add_fusion({"maps": [{"space": 1, "converged": True, "fallback": None, "iterations": 5},
                                {"space": 2, "converged": False, "fallback": None, "iterations": 1000},
                                {"space": 3, "converged": True, "fallback": "sinkhorn_torch", "iterations": 0}]})
    summary = report.to_dict()["space_summary"]
    assert summary["not_converged"] == 1 and summary["fallbacks"] == 1
    assert "not_converged" not in FusionReport().to_dict()["space_summary"]  # older stats: no verdict claimed
