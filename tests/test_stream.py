"""Streaming fusion of checkpoints on disk: the same numbers as the in-memory fusion, bit for bit, on sharded
pairs; the EMD self-check; inputs untouched; the output a loadable, sharded HF folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import otfx
from otfx.align.config import FusionError
from otfx.stream import INDEX, fuse_checkpoints, parse_size

IDS = (torch.arange(16).reshape(2, 8) % 90,)


def llama(seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tie, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB")  # several shards and an index
    return folder


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("solver", ["sinkhorn_torch", "emd"])
def test_streamed_fusion_equals_in_memory_fusion_bit_for_bit(tmp_path, solver, tie):
    a, b = llama(0, tie), llama(1, tie)
    fa, fb = save(a, tmp_path / "a"), save(b, tmp_path / "b")
    assert (fa / INDEX).is_file()
    before = digest(fa), digest(fb)
    out = fuse_checkpoints(fa, fb, tmp_path / "fused", solver=solver, heads="aware", shard_size="30KB")
    assert (digest(fa), digest(fb)) == before  # inputs never written
    expected = otfx.fuse(otfx.trace(a, IDS), otfx.trace(b, IDS), solver=solver, heads="aware")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    got = dict(loaded.named_parameters(remove_duplicate=False))
    for name, p in expected.named_parameters(remove_duplicate=False):
        assert torch.equal(got[name], p), name
    assert len(json.loads((out / INDEX).read_text())["weight_map"]) >= len(dict(loaded.named_parameters()))
    report = json.loads((out / "report.json").read_text())
    assert report["streamed"] and report["maps"]


def test_streamed_fusion_with_a_permuted_copy_by_emd_returns_the_model(tmp_path):
    a = llama(0)
    traced = otfx.trace(a, IDS)
    permuted = otfx.random_symmetry(traced, seed=3)
    fa, fb = save(a, tmp_path / "a"), save(permuted, tmp_path / "b")
    out = fuse_checkpoints(fa, fb, tmp_path / "fused", solver="emd", residual="shared", heads="aware", qk="tied")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    for (name, p), q in zip(loaded.named_parameters(), a.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*IDS).logits, a(*IDS).logits, atol=1e-5, rtol=0)


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    fa = save(llama(0), tmp_path / "a")
    with pytest.raises(FusionError, match="reads no activations"):
        fuse_checkpoints(fa, fa, tmp_path / "x", cost="activations")
    with pytest.raises(FusionError, match="no model.safetensors"):
        fuse_checkpoints(tmp_path, fa, tmp_path / "y")
    with pytest.raises(FusionError, match="shard size"):
        parse_size("lots")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_fuse_lazy_streams_and_matches_the_python_api(tmp_path, capsys):
    from otfx.cli import main

    fa, fb = save(llama(0), tmp_path / "a"), save(llama(1), tmp_path / "b")
    code = main(["fuse", str(fa), str(fb), "--out", str(tmp_path / "cli"), "--lazy", "--solver", "emd",
                 "--out-shard-size", "40KB", "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "by streaming" in out.out
    api = fuse_checkpoints(fa, fb, tmp_path / "api", solver="emd", shard_size="40KB")
    for (name, p), (_, q) in zip(AutoModelForCausalLM.from_pretrained(tmp_path / "cli").named_parameters(),
                                 AutoModelForCausalLM.from_pretrained(api).named_parameters()):
        assert torch.equal(p, q), name
    code = main(["fuse", str(fa), str(fb), str(fa), "--out", str(tmp_path / "three"), "--lazy", "--quiet"])
    assert code == 2 and "exactly two" in capsys.readouterr().err
