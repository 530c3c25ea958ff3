"""Real data: two tiny ViTs trained here on scikit-learn's digits. OT fusion keeps much of their accuracy
one-shot, where plain weight averaging collapses."""

from __future__ import annotations

import otfx
from otfx.demo import ViTSpec, accuracy, load_digits, train


def test_ot_fusion_beats_vanilla_fusion_on_digits(capsys):
    digits = load_digits(seed=0)
    spec = ViTSpec(hidden=48, mlp=96, layers=2, epochs=30)
    parents = [train(spec.build(s), digits.x["train"], digits.y["train"], spec, seed=s) for s in (0, 1)]
    traced = [otfx.trace(p, (digits.x["train"][:8],)) for p in parents]
    x, y = digits.x["test"], digits.y["test"]
    accs = [accuracy(p, x, y) for p in parents]
    vanilla = accuracy(otfx.vanilla_fuse(*parents), x, y)
    ot = {reg: accuracy(otfx.fuse(*traced, solver="sinkhorn", reg=reg), x, y) for reg in (0.02, 0.05)}
    emd = accuracy(otfx.fuse(*traced, solver="emd"), x, y)
    with capsys.disabled():
        print(f"\ndigits test accuracy: parents {accs[0]:.3f} / {accs[1]:.3f}, vanilla fusion {vanilla:.3f}, "
              f"OT weights EMD {emd:.3f}, OT weights Sinkhorn " + ", ".join(f"reg {r}: {a:.3f}" for r, a in ot.items()))
    assert min(accs) > 0.85
    assert max(ot.values()) > vanilla + 0.15
