"""Real data: two tiny ViTs trained here on scikit-learn's digits. OT fusion keeps much of their accuracy
one-shot, where plain weight averaging collapses."""

from __future__ import annotations

import otfx
from otfx.experiments.data import load_digits_split
from otfx.experiments.train import build_vit, evaluate_accuracy, train_classifier, vit_config


def test_ot_fusion_beats_vanilla_fusion_on_digits(capsys):
    split = load_digits_split(seed=0)
    config = vit_config("digits", hidden=48, mlp=96, layers=2)
    parents = [train_classifier(build_vit(config, seed=s), split, epochs=30, seed=s, progress=False) for s in (0, 1)]
    traced = [otfx.trace(p, (split.x_train[:8],)) for p in parents]
    x, y = split.x_test, split.y_test
    accs = [evaluate_accuracy(p, x, y) for p in parents]
    vanilla = evaluate_accuracy(otfx.vanilla_fuse(*parents), x, y)
    ot = {reg: evaluate_accuracy(otfx.fuse(*traced, solver="sinkhorn", reg=reg), x, y) for reg in (0.02, 0.05)}
    emd = evaluate_accuracy(otfx.fuse(*traced, solver="emd"), x, y)
    with capsys.disabled():
        print(f"\ndigits test accuracy: parents {accs[0]:.3f} / {accs[1]:.3f}, vanilla fusion {vanilla:.3f}, "
              f"OT weights EMD {emd:.3f}, OT weights Sinkhorn " + ", ".join(f"reg {r}: {a:.3f}" for r, a in ot.items()))
    assert min(accs) > 0.85
    assert max(ot.values()) > vanilla + 0.15
