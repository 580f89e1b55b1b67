"""What the paper's SAflex soft labels look like on a UCI table: the scale of the raw scores ``g`` and
the probability the labels put on the given class, per epoch.

Trains the ``orig+cutmix-p0.5+saflex-nogumbel-wnbatch`` arm of :mod:`benchmarks.tabular` (with its
``run_arm``: same model, optimiser, schedule and CutMix) and, for the augmented rows of each epoch,
prints (after training) the mean ``|g|``, the mean soft-label probability of the given label, the mean largest
probability, the share of rows whose soft label's argmax is the given label, and the augmented rows'
share of the loss (``refiner.stats["aug_weight"]``: 1 for a fixed share, moving with
``aug_weight="adaptive"``). With small ``g`` the rule's labels are close to ``softmax(one-hot)``,
i.e. ``e / (e + C - 1)`` on the given label. ``--arm`` trains another SAflex arm of the study.

    python -m benchmarks.tabular_labels --dataset letter --seed 0 --epochs 100
    python -m benchmarks.tabular_labels --dataset letter --seed 5 --arm orig+cutmix-p0.5+saflex-share
    python -m benchmarks.tabular_labels --dataset spambase --seed 5 --arm orig+cutmix-p0.5+saflex-share --set share_evidence=3
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional

import torch

from .common import parse_sets, set_threads
from .tabular import ARM_CONFIGS, load_splits, run_arm

ARM = "orig+cutmix-p0.5+saflex-nogumbel-wnbatch"


def main(argv: Optional[List[str]] = None) -> List[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="letter", choices=("letter", "spambase"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--arm", default=ARM, choices=[a for a, cfg in ARM_CONFIGS.items() if cfg[1] == "saflex"],
                    help=f"a SAflex arm of benchmarks.tabular (default {ARM})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="refiner option on top of the arm's (e.g. share_evidence=3)")
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    set_threads(1)
    c = load_splits(args.dataset, args.seed)[3]
    print(f"{args.dataset}, {c} classes: softmax(one-hot) puts {math.e / (math.e + c - 1):.3f} on the given label")
    per_epoch: Dict[int, List[torch.Tensor]] = {}
    rows: List[dict] = []

    def observe(epoch: int, st: Dict, y: torch.Tensor) -> None:
        a = st["augmented"]
        if not st["active"] or not bool(a.any()):
            return
        soft, given = st["soft_targets"][a], y[a]
        per_epoch.setdefault(epoch, []).append(torch.stack([
            st["scores"][a].abs().mean(), soft.gather(1, given[:, None]).mean(),
            soft.max(1).values.mean(), (soft.argmax(1) == given).float().mean(),
            torch.as_tensor(st["aug_weight"], dtype=soft.dtype)]))

    run_arm(args.dataset, args.arm, args.seed, epochs=args.epochs, overrides=overrides, observe=observe)
    for epoch in sorted(per_epoch):
        m = torch.stack(per_epoch[epoch]).mean(0).tolist()
        rows.append(dict(epoch=epoch + 1, mean_abs_g=m[0], p_given=m[1], p_max=m[2], argmax_given=m[3], share=m[4]))
        print(f"epoch {epoch + 1:3d}: mean |g| {m[0]:.3f}  p(given label) {m[1]:.3f}  max p {m[2]:.3f}  "
              f"argmax = given label {m[3]:.3f}  share {m[4]:.3f}")
    if rows:
        print(f"share of the augmented rows, mean over epochs: {sum(r['share'] for r in rows) / len(rows):.3f}")
    return rows


if __name__ == "__main__":
    main()
