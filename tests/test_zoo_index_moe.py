"""Index ops and mixture-of-experts layers (zoo issue 14). Advanced indexing, gather and index_put fix only the
axes they read by position and pass the others through; a router's top-k makes the expert axis ids (kept in
order, listed by ``ordered``, not by ``coverage``); a grouped matmul is a layer whose output units move together
across experts. Before, every space these ops touched was frozen: an MoE model's residual stream and experts
did not move at all."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import otfx
from otfx.trace import main_output

VOCAB = 53


def _mixtral(seed: int):
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=32, use_cache=False)
    torch.manual_seed(seed)
    return tf.MixtralForCausalLM(config).eval()


def _ids(seed: int, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(model, *args) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args))


def test_a_moe_model_is_covered_and_its_experts_move_under_a_symmetry():
    model = _mixtral(0)
    traced = otfx.trace(model, (_ids(0),))
    inference = otfx.analyse(traced)
    assert inference.coverage() == {}
    ordered = {p for params in inference.ordered().values() for p in params}
    assert "model.layers.0.mlp.gate.weight axis 0" in ordered  # the router's rows are the expert ids
    assert "model.layers.0.mlp.experts.gate_up_proj axis 0" in ordered
    permuted = otfx.random_symmetry(traced, seed=3)
    fresh = _ids(11, batch=3, seq=10)
    torch.testing.assert_close(_out(permuted, fresh), _out(model, fresh), atol=1e-5, rtol=0)
    before, after = model.state_dict(), permuted.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight", "model.embed_tokens.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not move"


def test_a_permuted_moe_model_is_recovered_and_align_keeps_the_function():
    a, b = _mixtral(0), _mixtral(1)
    args = (_ids(0),)
    ta = otfx.trace(a, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(ta, otfx.trace(otfx.random_symmetry(ta, seed=2), args), solver="emd")
        aligned = otfx.align(otfx.trace(b, args), to=ta, solver="emd")
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    fresh = _ids(5, batch=3, seq=9)
    torch.testing.assert_close(_out(aligned, fresh), _out(b, fresh), atol=1e-5, rtol=0)


class RelativeBias(nn.Module):
    """Attention with a learned relative-position bias table looked up by an index buffer (BEiT, Swin)."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5, classes: int = 3):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.table = nn.Parameter(torch.randn(2 * tokens - 1, heads))
        pos = torch.arange(tokens)
        self.register_buffer("index", pos[:, None] - pos[None, :] + tokens - 1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.embed(x)

        def split(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        bias = self.table[self.index].permute(2, 0, 1)  # (heads, n, n)
        att = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        h = h + self.o((att @ v).transpose(1, 2).reshape(b, n, -1))
        return self.head(self.norm(h).mean(1))


class GatheredTokens(nn.Module):
    """Keeps the k best-scored tokens with gather (token pruning) and reads them with a layer."""

    def __init__(self, dim: int = 16, keep: int = 3, classes: int = 3):
        super().__init__()
        self.keep = keep
        self.embed, self.score = nn.Linear(6, dim), nn.Linear(dim, 1)
        self.mlp, self.head = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim)), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        top = self.score(h).squeeze(-1).topk(self.keep, dim=1).indices  # (b, keep): token positions
        h = h.gather(1, top.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return self.head(h + self.mlp(h)).sum(1)


class SpanConv(nn.Module):
    """ConvBERT's span convolution: nn.Unfold (im2col) windows over tokens, read per channel and window."""

    def __init__(self, dim: int = 8, window: int = 3, classes: int = 3):
        super().__init__()
        self.window = window
        self.embed, self.unfold = nn.Linear(6, dim), nn.Unfold((window, 1), padding=((window - 1) // 2, 0))
        self.mix = nn.Parameter(torch.randn(dim, window))
        self.out, self.head = nn.Linear(dim, dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.embed(x)
        windows = self.unfold(h.transpose(1, 2).unsqueeze(-1))  # (b, dim * window, n)
        windows = windows.transpose(1, 2).reshape(b, n, -1, self.window)
        h = h + self.out((windows * self.mix).sum(-1))
        return self.head(h).mean(1)


@pytest.mark.parametrize("cls, moving", [(RelativeBias, ["table", "q.weight", "embed.weight"]),
                                         (GatheredTokens, ["embed.weight", "mlp.0.weight", "head.weight"]),
                                         (SpanConv, ["mix", "embed.weight", "out.weight"])])
def test_index_and_unfold_ops_pass_the_axes_they_do_not_read(cls, moving):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 5, 6)
    traced = otfx.trace(model, (x,))
    assert otfx.analyse(traced).coverage() == {}
    permuted = otfx.random_symmetry(traced, seed=4)
    fresh = torch.randn(3, 5, 6)
    torch.testing.assert_close(_out(permuted, fresh), _out(model, fresh), atol=1e-5, rtol=0)
    for name in moving:
        assert not torch.equal(model.state_dict()[name], permuted.state_dict()[name]), f"{name} did not move"
    fused = otfx.fuse(traced, otfx.trace(permuted, (x,)), solver="emd")
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)


def _hf(arch: str, seed: int):
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32)
    torch.manual_seed(seed)
    if arch == "llama4":  # complex rotary (view_as_complex, polar), experts as one bmm, router scatter_
        config = tf.Llama4TextConfig(**small, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                     intermediate_size_mlp=48, use_cache=False)
        return tf.Llama4ForCausalLM(config).eval()
    if arch == "phimoe":  # a router written with max, gather, scatter and a no_grad block
        config = tf.PhimoeConfig(**small, num_key_value_heads=2, num_local_experts=4, use_cache=False)
        return tf.PhimoeForCausalLM(config).eval()
    if arch == "fnet":  # token mixing by an FFT over (tokens, features): the features keep their order
        return tf.FNetForMaskedLM(tf.FNetConfig(**small)).eval()
    raise KeyError(arch)


@pytest.mark.parametrize("arch", ["llama4", "phimoe", "fnet"])
def test_routers_complex_rotary_and_fourier_mixing_are_covered(arch):
    a, b = _hf(arch, 0), _hf(arch, 1)
    args = (_ids(0),)
    ta = otfx.trace(a, args)
    inference = otfx.analyse(ta)
    assert inference.coverage() == {}
    assert inference.ordered()  # experts (llama4, phimoe) or FFT-mixed features (fnet) keep their order
    fresh = _ids(9, batch=3, seq=8)
    permuted = otfx.random_symmetry(ta, seed=5)
    torch.testing.assert_close(_out(permuted, fresh), _out(a, fresh), atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(ta, otfx.trace(permuted, args), solver="emd")
        aligned = otfx.align(otfx.trace(b, args), to=ta, solver="emd")
    for k, v in a.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(fused.state_dict()[k], v, atol=1e-5, rtol=0, msg=k)
    torch.testing.assert_close(_out(aligned, fresh), _out(b, fresh), atol=1e-5, rtol=0)


class ConvStem(nn.Module):
    """A conv stem with eval-mode batch norm (XCiT, LeViT), a no_grad block and an in-place copy in forward."""

    def __init__(self, dim: int = 16, classes: int = 3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, dim, 4, stride=4), nn.BatchNorm2d(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 24), nn.GELU(), nn.Linear(24, dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        with torch.no_grad():
            scale = torch.zeros_like(h[..., :1]).copy_(h[..., :1].abs().mean(1, keepdim=True) * 0 + 1)
        h = h * scale
        h = h + self.mlp(h)
        return self.head(self.norm(h).mean(1))


def test_batch_norm_no_grad_blocks_and_copies_are_understood():
    torch.manual_seed(0)
    model = ConvStem().eval()
    x = torch.randn(2, 3, 16, 16)
    traced = otfx.trace(model, (x,))
    assert otfx.analyse(traced).coverage() == {}
    permuted = otfx.random_symmetry(traced, seed=6)
    fresh = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(_out(permuted, fresh), _out(model, fresh), atol=1e-5, rtol=0)
    state, moved = model.state_dict(), permuted.state_dict()
    assert not torch.equal(state["mlp.0.weight"], moved["mlp.0.weight"])
    # the conv channels are kept in order by the running statistics: buffers, which otfx does not rewrite
    assert torch.equal(state["bn.weight"], moved["bn.weight"])
    assert torch.equal(state["conv.weight"], moved["conv.weight"])
