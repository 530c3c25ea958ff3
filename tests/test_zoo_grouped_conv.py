"""Grouped convolutions (zoo: squeezebert, timm pit). A convolution with 1 < groups reads its input channels as
(group, channel in group) and writes (group, unit in group): the groups move together in and out, the
channels in a group and the units in a group each get one permutation shared by every group. Before, such a
convolution froze every space it touched ("grouped or unbatched convolution", unknown op).

* ``grouped_stream``: SqueezeBERT's block, channels first: q, k, v and the MLP are 1x1 grouped conv1d layers
  that read the residual stream in 4 groups, so the stream is (group x channel) and its two factors get their
  plans from the stream's own residual plan.
* ``depthwise_multiplier``: PiT's pooling, a depthwise conv2d with a channel multiplier of 2 (each channel
  becomes 2 units: channel x copy) beside a linear layer that widens the class token into the same space;
  the channel factor is the stream before the pooling, solved on its own, and only the copies are matched.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otfx
from otfx.trace import main_output

VOCAB, DIM, SEQ, HEADS, GROUPS = 29, 32, 6, 4, 4


class GroupedBlock(nn.Module):
    """Post-norm block on [batch, channels, seq] with grouped 1x1 convolutions (SqueezeBERT)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Conv1d(DIM, DIM, 1, groups=GROUPS) for _ in range(3))
        self.post = nn.Conv1d(DIM, DIM, 1)
        self.up = nn.Conv1d(DIM, 2 * DIM, 1, groups=GROUPS)
        self.down = nn.Conv1d(2 * DIM, DIM, 1, groups=GROUPS)
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        q, k, v = (p(x).view(b, HEADS, c // HEADS, n).transpose(2, 3) for p in (self.q, self.k, self.v))
        context = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, n)
        x = self.norm1((self.post(context) + x).transpose(1, 2)).transpose(1, 2)
        h = self.down(F.gelu(self.up(x)))
        return self.norm2((h + x).transpose(1, 2)).transpose(1, 2)


class GroupedStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.blocks = nn.ModuleList(GroupedBlock() for _ in range(2))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.transpose(1, 2))


class TokenBlock(nn.Module):
    """Pre-norm attention and MLP on [batch, tokens, width]."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = width // 8
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DepthwiseMultiplier(nn.Module):
    """PiT: patches -> block at width 16 -> depthwise conv (16 -> 32, stride 2) on the patch grid and a linear
    layer on the class token -> block at width 32 -> head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 16, 4, 4) * 0.1)
        self.block1, self.block2 = TokenBlock(16), TokenBlock(32)
        self.pool = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=16)
        self.cls_fc = nn.Linear(16, 32)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images) + self.pos
        b, c, h, w = x.shape
        x = self.block1(torch.cat([self.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1))
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, h, w)
        grid = self.pool(grid).flatten(2).transpose(1, 2)
        x = self.block2(torch.cat([self.cls_fc(cls), grid], 1))
        return self.head(self.norm(x[:, 0]))


MODELS = {"grouped_stream": GroupedStream, "depthwise_multiplier": DepthwiseMultiplier}
#: a grouped convolution's weight in each model, which must move under a symmetry
GROUPED = {"grouped_stream": "blocks.0.up.weight", "depthwise_multiplier": "pool.weight"}


def build(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():  # norm gains and biases away from 1 and 0, so a wrong map shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(name: str, seed: int, batch: int = 2) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name == "depthwise_multiplier":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    return (torch.randint(0, VOCAB, (batch, SEQ), generator=g),)


def outputs(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(*args))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grouped_convolutions_are_covered(name):
    inference = otfx.analyse(otfx.trace(build(name, 0), inputs(name, 1)))
    assert inference.coverage() == {}, inference.coverage()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_symmetry_moves_grouped_weights_and_keeps_outputs(name):
    model = build(name, 0)
    moved = otfx.random_symmetry(otfx.trace(model, inputs(name, 1)), seed=3)
    fresh = inputs(name, 7, batch=3)
    torch.testing.assert_close(outputs(moved, fresh), outputs(model, fresh), atol=1e-5, rtol=0)
    assert not torch.equal(moved.state_dict()[GROUPED[name]], model.state_dict()[GROUPED[name]])


@pytest.mark.parametrize("residual", [None, "shared"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_emd_fusion_with_a_symmetry_returns_the_model(name, residual):
    model = build(name, 0)
    traced = otfx.trace(model, inputs(name, 1))
    copy = otfx.trace(otfx.random_symmetry(traced, seed=4), inputs(name, 1))
    options = {"residual": residual} if residual else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(traced, copy, solver="emd", **options)
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
    fresh = inputs(name, 9, batch=3)
    torch.testing.assert_close(outputs(aligned, fresh), outputs(b, fresh), atol=1e-4, rtol=0)
    assert torch.isfinite(outputs(fused, fresh)).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_model_exports_to_onnx(name, tmp_path):
    a, b = build(name, 0), build(name, 1)
    args = inputs(name, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = otfx.fuse(otfx.trace(a, args), otfx.trace(b, args))
    check = otfx.check_onnx(otfx.export_onnx(fused, args, tmp_path / "fused.onnx"), fused, args)
    assert check.passed, check
