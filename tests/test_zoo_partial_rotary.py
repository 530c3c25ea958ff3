"""Partial rotary embeddings (zoo issue 14): rotary applied to part of each query/key head's dims, the rest
passed through. A map inside those head dims keeps the function only if it commutes with the rotary op: the
rotary dims stay put (the frequencies pin them) and the pass-through dims move among themselves, never mixed
with rotary dims; in a fused q|k|v head (GPT-NeoX) the value dims move among themselves too."""

from __future__ import annotations

import warnings

import pytest
import torch

import otfx
from otfx.align.config import FusionConfig
from otfx.align.maps import TransportMaps
from otfx.trace import main_output

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=40)


def _config(arch: str):
    import transformers as tf

    if arch == "phi":  # q/k/v projections, rotary on the first half of each head, no kv groups
        return tf.PhiForCausalLM, tf.PhiConfig(**SMALL, partial_rotary_factor=0.5)
    if arch == "stablelm":  # a quarter of each head rotary, grouped-query heads
        return tf.StableLmForCausalLM, tf.StableLmConfig(**SMALL, num_key_value_heads=2, partial_rotary_factor=0.25)
    if arch == "gpt_neox":  # one fused q|k|v projection laid out heads x (q | k | v) dims
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(**SMALL, rotary_pct=0.25)
    if arch == "glm":  # interleaved rotary (even/odd dims) on half of each head
        return tf.GlmForCausalLM, tf.GlmConfig(**SMALL, num_key_value_heads=2, head_dim=8, partial_rotary_factor=0.5,
                                                    pad_token_id=0)
    if arch == "nemotron":
        return tf.NemotronForCausalLM, tf.NemotronConfig(**SMALL, num_key_value_heads=2, partial_rotary_factor=0.5)
    raise KeyError(arch)


ARCHS = ["phi", "stablelm", "gpt_neox", "glm", "nemotron"]


def _model(arch: str, seed: int):
    cls, config = _config(arch)
    torch.manual_seed(seed)
    return cls(config).eval()


def _ids(seed: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_align_keeps_the_function_of_a_partial_rotary_model(arch):
    a, b = _model(arch, 0), _model(arch, 1)
    args = (_ids(0),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = otfx.align(otfx.trace(b, args), to=otfx.trace(a, args), solver="emd")
    fresh = _ids(7, batch=3, seq=10)
    torch.testing.assert_close(_out(aligned, fresh), _out(b, fresh), atol=1e-5, rtol=0)
    moved = [k for k, v in b.state_dict().items() if v.ndim == 2 and not torch.equal(aligned.state_dict()[k], v)]
    assert moved, "the alignment moved nothing"


@pytest.mark.parametrize("arch", ["gpt_neox", "phi"])
def test_a_permuted_partial_rotary_model_is_recovered(arch):
    model = _model(arch, 0)
    args = (_ids(0),)
    traced = otfx.trace(model, args)
    permuted = otfx.random_symmetry(traced, seed=1)
    fused = otfx.fuse(traced, otfx.trace(permuted, args), solver="emd")
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("heads, qk", [("aware", "tied"), ("cross", "untied")])
def test_head_dim_maps_keep_rotary_dims_and_never_mix_them_with_pass_through_dims(heads, qk):
    """Under either head policy, the plan of a query head's dims is the identity on its rotary dims and moves
    the pass-through dims only among themselves."""
    a, b = _model("phi", 0), _model("phi", 1)
    args = (_ids(0),)
    ia, ib = otfx.analyse(a, args), otfx.analyse(b, args)
    config = FusionConfig.make(solver="emd", heads=heads, qk=qk).resolved(has_data=False)
    maps = TransportMaps(ia, ib, config)
    q_rows = ia.param_axes["model.layers.0.self_attn.q_proj.weight"][0]
    plan = maps.map(q_rows) * 32  # a permutation matrix of the 4 heads x 8 dims
    assert torch.allclose(plan.sum(0), torch.ones(32, dtype=torch.float64))
    head_dim = plan.reshape(4, 8, 4, 8).sum((0, 2)) / 4  # the dims' map, summed over heads
    rotary, passed = slice(0, 4), slice(4, 8)
    torch.testing.assert_close(head_dim[rotary, rotary], torch.eye(4, dtype=torch.float64))
    assert float(head_dim[rotary, passed].abs().sum()) == 0 and float(head_dim[passed, rotary].abs().sum()) == 0


def test_fused_qkv_value_dims_are_solved_with_their_heads():
    """GPT-NeoX's q|k|v head dim is a sum: the value dims are a part the heads node owns (they were kept in
    order, with a warning, while the whole head dim was solved as one)."""
    a, b = _model("gpt_neox", 0), _model("gpt_neox", 1)
    args = (_ids(0),)
    maps = TransportMaps(otfx.analyse(a, args), otfx.analyse(b, args), FusionConfig.alignment(solver="emd"))
    kinds = dict(maps.graph.nodes(data="kind"))
    assert "keep" not in kinds.values(), kinds
    heads = [r for r, kind in kinds.items() if kind == "heads"]
    assert all(len(maps.graph.nodes[r]["owns"]) == 4 for r in heads)  # heads, q|k|v dims, q/k pass-through, v
