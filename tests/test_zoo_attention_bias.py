"""A bias per head passed to scaled_dot_product_attention as its mask (T5's relative position bias, shared by
every layer): its head axis is the attention's heads, so it moves with them. Before, the mask was fixed while
the heads moved, and random_symmetry changed the outputs of every T5 model (0.2-2.2)."""

from __future__ import annotations

import warnings

import pytest
import torch

import otfx


class _Seq2Seq(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, decoder_input_ids=ids).logits


def _t5(seed: int, **extra):
    import transformers as tf

    config = tf.T5Config(vocab_size=61, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, **extra)
    torch.manual_seed(seed)
    return _Seq2Seq(tf.T5ForConditionalGeneration(config)).eval()


def _ids(seed: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(3, 61, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{}, {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}])
def test_t5_symmetry_recovery_and_align(extra):
    a, b = _t5(0, **extra), _t5(1, **extra)
    args = (_ids(0),)
    ta = otfx.trace(a, args)
    permuted = otfx.random_symmetry(ta, seed=2)
    fresh = _ids(4, batch=3, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(permuted(fresh), a(fresh), atol=2e-5, rtol=0)
    table = "model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert not torch.equal(permuted.state_dict()[table], a.state_dict()[table]), "the bias table did not move"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(ta, otfx.trace(permuted, args), solver="emd")
        aligned = otfx.align(otfx.trace(b, args), to=ta, solver="emd")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(aligned(fresh), b(fresh), atol=2e-5, rtol=0)
