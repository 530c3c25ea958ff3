"""Structures of one space that meet in different shapes (zoo: phi3, gpt_neox_japanese, diffllama, timm eva,
beit and swin, xlnet). A space cut as a sum in one place and as a product in another is a sum of products,
not a conflict; nested sums cut by successive slices are one sum; positions cut into windows and then into
2x2 patches are fixed anyway; a reshape that mixes two position axes leaves the heads beside them alone.

* ``sliced_qkv``: one q|k|v projection cut by three slices (q, then k, then the rest), a gate|up chunk (phi3).
* ``head_sliced_qkv``: the same per head, heads x (q|k|v) dims, with the q/k dims pinned by a buffer as rotary
  frequencies pin them (gpt_neox_japanese): the value dims stay free.
* ``cat_bias_qkv``: a qkv bias concatenated from a q bias, a zero key buffer and a v bias, the projection then
  reshaped to (3, heads, head_dim) and unbound (timm eva, beit).
* ``chunked_heads``: grouped-query heads (kv heads x group) chunked into two halves of the query heads that
  are subtracted (differential attention, diffllama).
* ``patch_merging``: positions cut into windows, later into 2x2 patches whose features are concatenated
  (swin's downsample).
* ``rel_shift``: relative-position scores [b, heads, i, j] shifted by a reshape that mixes i and j (xlnet).
* ``tensor_split``: a gate | up pair cut by ``tensor_split`` at an index, and a split at the sequence's end
  whose second part is empty (mamba): the whole part is the input's space, not a sum with an empty summand.
* ``ExpandedBias``: an output bias added as ``bias.expand_as(residual)`` is a parameter written into the
  stream, not an input-dependent branch of a residual add (gpt_neox_japanese's recovery).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otfx
from otfx.trace import main_output

VOCAB, DIM, SEQ, HEADS, HEAD_DIM = 31, 32, 6, 4, 8


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[b, h, n, d] attention, heads back to [b, n, h*d]."""
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class SlicedQKV(nn.Module):
    """phi3: qkv = one projection, q | k | v taken by three slices; grouped-query heads; gate | up chunked."""

    def __init__(self, kv_heads: int = 2):
        super().__init__()
        self.kv_heads = kv_heads
        self.qkv = nn.Linear(DIM, (HEADS + 2 * kv_heads) * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)
        self.gate_up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x))
        qw, kw = HEADS * HEAD_DIM, self.kv_heads * HEAD_DIM
        q = qkv[..., :qw].view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k = qkv[..., qw:qw + kw].view(b, n, self.kv_heads, HEAD_DIM).transpose(1, 2)
        v = qkv[..., qw + kw:].view(b, n, self.kv_heads, HEAD_DIM).transpose(1, 2)
        group = HEADS // self.kv_heads
        k, v = (t[:, :, None].expand(b, self.kv_heads, group, n, HEAD_DIM).reshape(b, HEADS, n, HEAD_DIM)
                for t in (k, v))
        x = x + self.o(_attend(q, k, v))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class HeadSlicedQKV(nn.Module):
    """gpt_neox_japanese: qkv viewed as heads x (q | k | v) dims, each cut by a slice; the q/k dims are scaled
    by a buffer (rotary frequencies pin them the same way), so they are fixed and the value dims are not."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, HEADS * 3 * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.register_buffer("freq", torch.linspace(0.5, 1.5, HEAD_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, HEADS, 3 * HEAD_DIM)
        q = qkv[..., :HEAD_DIM].permute(0, 2, 1, 3) * self.freq
        k = qkv[..., HEAD_DIM:2 * HEAD_DIM].permute(0, 2, 1, 3) * self.freq
        v = qkv[..., 2 * HEAD_DIM:].permute(0, 2, 1, 3)
        x = x + self.o(_attend(q, k, v))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CatBiasQKV(nn.Module):
    """timm eva/beit: the qkv bias is cat(q_bias, k_bias, v_bias) with a zero key bias buffer, and the output
    is reshaped to (3, heads, head_dim) and unbound."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(DIM) * 0.1), nn.Parameter(torch.randn(DIM) * 0.1)
        self.register_buffer("k_bias", torch.zeros(DIM), persistent=False)
        self.proj = nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(self.norm1(x), self.qkv.weight, bias).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = x + self.proj(_attend(q, k, v))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ChunkedHeads(nn.Module):
    """diffllama: grouped-query heads (kv heads x group, by expand + reshape) whose outputs are chunked into two
    halves of the query heads, the second, weighted by exp(lambda_q . lambda_k), subtracted from the first."""

    def __init__(self, kv_heads: int = 2):
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM)
        self.k = nn.Linear(DIM, kv_heads * HEAD_DIM, bias=False)
        self.v = nn.Linear(DIM, kv_heads * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS // 2 * HEAD_DIM, DIM, bias=False)
        self.lambda_q, self.lambda_k = (nn.Parameter(torch.randn(HEAD_DIM) * 0.3) for _ in range(2))
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (p(h).view(b, n, self.kv_heads, HEAD_DIM).transpose(1, 2) for p in (self.k, self.v))
        group = HEADS // self.kv_heads
        k, v = (t[:, :, None].expand(b, self.kv_heads, group, n, HEAD_DIM).reshape(b, HEADS, n, HEAD_DIM)
                for t in (k, v))
        first, second = F.scaled_dot_product_attention(q, k, v).chunk(2, dim=1)
        weight = torch.exp((self.lambda_q * self.lambda_k).sum(-1))  # a space only these two parameters meet
        out = (first - weight * second).transpose(1, 2).reshape(b, n, -1)
        x = x + self.o(out)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class PatchMerging(nn.Module):
    """swin: a conv patch embedding, a window partition of the 8x8 positions (2x2 windows of 4x4: each axis
    2 x 4), a 2x2 patch merging (each axis 4 x 2; the four patches' features side by side, normed and
    reduced), pooled into a head."""

    def __init__(self):
        super().__init__()
        c = DIM // 2
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.win_qkv, self.win_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm = nn.LayerNorm(4 * c)
        self.reduction = nn.Linear(4 * c, 2 * c, bias=False)
        self.fc1, self.fc2 = nn.Linear(2 * c, 4 * c), nn.Linear(4 * c, 2 * c)
        self.head = nn.Linear(2 * c, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image).permute(0, 2, 3, 1)  # [b, 8, 8, c]
        b, hh, ww, c = x.shape
        windows = x.reshape(b, hh // 4, 4, ww // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        q, k, v = self.win_qkv(windows).reshape(windows.shape[0], 16, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.win_proj(_attend(q, k, v)).reshape(b, hh // 4, ww // 4, 4, 4, c)
        x = x + out.permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        x = x.reshape(b, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.reduction(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(dim=(1, 2)))


class RelShift(nn.Module):
    """xlnet: relative-position scores [b, heads, i, j] (sinusoidal positions made in the forward) shifted by
    reshape [b, h, i, j] -> [b, h, j, i], dropping a row, and reshaping back: the reshape mixes i and j, not
    the batch or the heads."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.r = nn.Linear(DIM, DIM, bias=False)
        self.r_bias = nn.Parameter(torch.randn(HEADS, HEAD_DIM) * 0.1)
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pos = torch.arange(2 * n, 0, -1.0)[:, None] * torch.exp(torch.arange(0, DIM, 2.0) * (-math.log(1e4) / DIM))
        pos = torch.cat([pos.sin(), pos.cos()], dim=-1)  # [2n, dim]
        q, k, v = (p(x).view(b, n, HEADS, HEAD_DIM) for p in (self.q, self.k, self.v))
        r = self.r(pos).view(2 * n, HEADS, HEAD_DIM)
        content = torch.einsum("bihd,bjhd->bhij", q, k)
        position = torch.einsum("bihd,jhd->bhij", q + self.r_bias, r)  # [b, h, n, 2n]
        position = position.reshape(b, HEADS, 2 * n, n)[:, :, 1:].reshape(b, HEADS, n, 2 * n - 1)[..., :n]
        attn = torch.softmax((content + position) / math.sqrt(HEAD_DIM), dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, DIM)
        x = self.norm1(x + self.o(out))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class TensorSplit(nn.Module):
    """mamba and falcon_h1 under transformers 5.25: ``tensor_split`` at indices, into a gate | up pair, and into
    the whole sequence and an empty rest (a split at the sequence's end)."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.tensor_split(self.gate_up(self.norm(x)), [2 * DIM], dim=-1)
        whole, _empty = torch.tensor_split(F.silu(gate) * up, [x.shape[1]], dim=1)
        return x + self.down(whole)


class TokenModel(nn.Module):
    def __init__(self, block: type[nn.Module], layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(block() for _ in range(layers))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


MODELS = {
    "sliced_qkv": lambda: TokenModel(SlicedQKV),
    "head_sliced_qkv": lambda: TokenModel(HeadSlicedQKV),
    "cat_bias_qkv": lambda: TokenModel(CatBiasQKV),
    "chunked_heads": lambda: TokenModel(ChunkedHeads),
    "patch_merging": PatchMerging,
    "rel_shift": lambda: TokenModel(RelShift),
    "tensor_split": lambda: TokenModel(TensorSplit),
}


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a wrong map shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(name: str, seed: int) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "patch_merging":
        return (torch.randn(2, 3, 32, 32, generator=g),)
    return (torch.randint(0, VOCAB, (2, SEQ), generator=g),)


def outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args))


def _leaves(inference, fqn: str, axis: int) -> list[int]:
    return inference.leaves(inference.param_axes[fqn][axis])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_structure_is_reconciled(name):
    inference = otfx.analyse(otfx.trace(build(name, 0), inputs(name, 1)))
    assert inference.coverage() == {}, inference.coverage()


def test_the_free_parts_of_each_structure_stay_free():
    def free(inference, fqn, axis):
        leaves = dict.fromkeys(inference.coarse(s) for s in _leaves(inference, fqn, axis))
        return sorted(inference.size(s) for s in leaves if not inference.is_fixed(s))

    sliced = otfx.analyse(otfx.trace(build("sliced_qkv", 0), inputs("sliced_qkv", 1)))
    assert free(sliced, "blocks.0.qkv.weight", 0) == [2, 2, 8, 8]  # kv heads, group, q/k and v head dims
    head = otfx.analyse(otfx.trace(build("head_sliced_qkv", 0), inputs("head_sliced_qkv", 1)))
    assert free(head, "blocks.0.qkv.weight", 0) == [4, 8]  # the heads and the value dims
    chunked = otfx.analyse(otfx.trace(build("chunked_heads", 0), inputs("chunked_heads", 1)))
    assert 2 in free(chunked, "blocks.0.q.weight", 0)  # the heads within a kv group
    shift = otfx.analyse(otfx.trace(build("rel_shift", 0), inputs("rel_shift", 1)))
    assert free(shift, "blocks.0.r_bias", 0) == [4]  # the heads beside the mixed positions


#: a parameter that lies in the reconciled structure only (fixed while its structures conflicted), and what of it
#: must move: the rows of a bias, or the heads of ``r_bias`` (its row sums do not see the head-dim map)
MOVES = {
    "sliced_qkv": ("blocks.0.qkv.bias", lambda p: p),
    "head_sliced_qkv": ("blocks.0.qkv.bias", lambda p: p),
    "cat_bias_qkv": ("blocks.0.v_bias", lambda p: p),
    "chunked_heads": ("blocks.0.q.bias", lambda p: p),
    "patch_merging": ("norm.weight", lambda p: p),
    "rel_shift": ("blocks.0.r_bias", lambda p: p.sum(1)),
    "tensor_split": ("blocks.0.gate_up.bias", lambda p: p),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_symmetry_keeps_outputs(name):
    model = build(name, 0)
    moved = otfx.random_symmetry(otfx.trace(model, inputs(name, 1)), seed=3)
    torch.testing.assert_close(outputs(moved, inputs(name, 7)), outputs(model, inputs(name, 7)), atol=1e-5, rtol=0)
    fqn, view = MOVES[name]
    assert not torch.allclose(view(moved.state_dict()[fqn]), view(model.state_dict()[fqn]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_emd_fusion_with_a_symmetry_returns_the_model(name):
    model = build(name, 0)
    traced = otfx.trace(model, inputs(name, 1))
    copy = otfx.trace(otfx.random_symmetry(traced, seed=4), inputs(name, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(traced, copy, solver="emd", residual="shared")
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_align_keeps_the_function_of_an_independent_model(name):
    a, b = build(name, 0), build(name, 1)
    ta, tb = otfx.trace(a, inputs(name, 1)), otfx.trace(b, inputs(name, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = otfx.align(tb, to=ta, solver="emd")
        fused = otfx.fuse(ta, tb)
    torch.testing.assert_close(outputs(aligned, inputs(name, 9)), outputs(b, inputs(name, 9)), atol=1e-4, rtol=0)
    assert torch.isfinite(outputs(fused, inputs(name, 9))).all()


def test_the_summary_names_a_fused_heads_value_dims():
    """The value dims of a heads x (q | k | v) head are a part of the head dim, not a factor of the product."""
    inference = otfx.analyse(otfx.trace(build("head_sliced_qkv", 0), inputs("head_sliced_qkv", 1)))
    assert "map graph:" in inference.summary()


class ExpandedBias(nn.Module):
    """gpt_neox_japanese: the output projection's bias kept apart and added as ``bias.expand_as(residual)``:
    expanded like an input-dependent tensor, it is still a parameter written into the stream, not a branch."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))
        self.o = nn.Linear(DIM, DIM, bias=False)
        self.o_bias = nn.Parameter(torch.randn(DIM) * 0.1)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, n, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + (self.o(_attend(q, k, v)) + self.o_bias.expand_as(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def test_a_bias_expanded_as_the_stream_is_written_into_it():
    torch.manual_seed(0)
    model = TokenModel(ExpandedBias).eval()
    traced = otfx.trace(model, inputs("expanded_bias", 1))
    inference = otfx.analyse(traced)
    assert any(p.param == "blocks.0.o_bias" and p.written for p in inference.producer_list)
    copy = otfx.trace(otfx.random_symmetry(traced, seed=4), inputs("expanded_bias", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(traced, copy, solver="emd")  # the automatic residual policy (mean, here)
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)


class HeadChunkedQKV(nn.Module):
    """DeBERTa (v1): one in_proj viewed as heads x (q | k | v) dims and chunked, nothing pinned. Matched across
    heads (the default), the head dim is the marginal of the projection's plan, and the q and v dims, which
    nothing else gives a plan, are its diagonal blocks (before: kept in order, and EMD recovery was off by 0.04)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, HEADS * 3 * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM)
        self.up, self.down = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, HEADS, 3 * HEAD_DIM).permute(0, 2, 1, 3).chunk(3, dim=-1)
        x = x + self.o(_attend(q, k, v))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


@pytest.mark.parametrize("heads", ["cross", "aware"])
def test_a_chunked_head_is_recovered_across_heads(heads):
    torch.manual_seed(0)
    model = TokenModel(HeadChunkedQKV).eval()
    args = inputs("head_chunked_qkv", 1)
    traced = otfx.trace(model, args)
    copy = otfx.trace(otfx.random_symmetry(traced, seed=5), args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = otfx.fuse(traced, copy, solver="emd", heads=heads)
    assert not [w for w in caught if "keeping its order" in str(w.message)]
    for (k, p), q in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0, msg=k)
