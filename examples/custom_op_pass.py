"""A plug-in pass for a user's own op: a fused attention kernel registered with ``torch.library.custom_op``.

torch.export keeps a custom op as one node (``otfx_example.fused_attention.default``) that no built-in pass
knows, so otfx freezes every space it touches: the query, key and value projections cannot move. A handler
that says how the op's axes relate (heads shared by q, k, v; q and k contracted over the head dim; k and v
sharing the key sequence) makes those spaces free again. Run ``python examples/custom_op_pass.py``.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

import otfx
from otfx.infer.context import InferContext
from otfx.infer.kinds import LinkKind, RecordKind

OP_NAME = "otfx_example::fused_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [batch, heads, seq, head_dim] (a stand-in for a real fused kernel)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.softmax(-1) @ v


@fused_attention.register_fake
def _(q, k, v):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


#: the op as it appears in the exported graph: what the pass is registered for
FUSED_ATTENTION = torch.ops.otfx_example.fused_attention.default


def fused_attention_pass(ctx: InferContext, node: fx.Node) -> None:
    """The axes of q, k, v are [batch, heads, seq, head_dim]; the output is [batch, heads, q seq, v head_dim]."""
    q, k, v = node.args[:3]
    qa, ka, va = ctx.axes_of(q), ctx.axes_of(k), ctx.axes_of(v)
    ctx.link(qa[0], ka[0])                                      # one batch
    ctx.link(ka[0], va[0])
    ctx.link(qa[1], ka[1], LinkKind.heads)                      # head h of q attends with head h of k and v
    ctx.link(ka[1], va[1], LinkKind.heads)
    ctx.link(qa[3], ka[3], LinkKind.contract)                   # q . k over the head dim: one symmetry, two maps
    ctx.link(ka[2], va[2])                                      # keys and values share the key sequence
    ctx.record(RecordKind.attention, node, [qa[3], ka[3], va[3]], va[3], heads=[qa[1], ka[1], va[1]],
               form="custom op")
    ctx.set_axes(node, [qa[0], qa[1], qa[2], va[3]])


class Block(nn.Module):
    """Pre-norm encoder block whose attention is the custom op."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        x = x + self.o(fused_attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyEncoder(nn.Module):
    """Token and position embeddings, two blocks, mean pooling, a classifier."""

    def __init__(self, vocab: int = 50, seq: int = 8, dim: int = 32, heads: int = 4, mlp: int = 64,
                 layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.1)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def build(seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    return model, (torch.randint(0, 50, (2, 8)),)


def main() -> None:
    model, args = build()
    traced = otfx.trace(model, args)
    before = otfx.analyse(traced)
    print("without the pass:", len(before.free_spaces()), "free spaces; coverage:", sorted(before.coverage()))

    otfx.passes.register(FUSED_ATTENTION)(fused_attention_pass)  # from user code; a built-in needs replace=True
    after = otfx.analyse(traced)                                  # the cache sees the new registry state
    print("with the pass:   ", len(after.free_spaces()), "free spaces; coverage:", sorted(after.coverage()))

    permuted = otfx.random_symmetry(traced, seed=1)
    with torch.no_grad():
        diff = (permuted(*args) - model(*args)).abs().max().item()
    moved = not torch.equal(permuted.blocks[0].q.weight, model.blocks[0].q.weight)
    print(f"random symmetry: q rows moved {moved}, output diff {diff:.1e}")
    fused = otfx.fuse(traced, otfx.trace(permuted, args), solver="emd")
    with torch.no_grad():
        print(f"fuse(A, symmetry of A) by EMD: output diff {(fused(*args) - model(*args)).abs().max().item():.1e}")
    # per call, without touching the registry: otfx.analyse(traced, passes={FUSED_ATTENTION: fused_attention_pass})


if __name__ == "__main__":
    main()
