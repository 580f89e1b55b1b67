"""What the paper's SAflex soft labels look like on a UCI table: the scale of the raw scores ``g`` and
the probability the labels put on the given class, per epoch.

Trains the ``orig+cutmix-p0.5+saflex-nogumbel-wnbatch`` arm of :mod:`benchmarks.tabular` (same
model, optimiser, schedule and CutMix) and, for the augmented rows of each epoch, prints the mean
``|g|``, the mean soft-label probability of the given label, the mean largest probability, and the
share of rows whose soft label's argmax is the given label. With small ``g`` the rule's labels are
close to ``softmax(one-hot)``, i.e. ``e / (e + C - 1)`` on the given label.

    python -m benchmarks.tabular_labels --dataset letter --seed 0 --epochs 100
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional

import torch

from .common import set_threads
from .tabular import ARM_CONFIGS, PROPORTION, load_splits

ARM = "orig+cutmix-p0.5+saflex-nogumbel-wnbatch"


def main(argv: Optional[List[str]] = None) -> List[dict]:
    from augplug import AugmentationRefiner
    from augplug.tabular import TabularCutMix, TabularMLP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="letter", choices=("letter", "spambase"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args(argv)
    set_threads(1)
    (xtr, ytr), (xva, yva), _, c = load_splits(args.dataset, args.seed)
    p, _, kw, _ = ARM_CONFIGS[ARM]
    torch.manual_seed(args.seed)
    model = TabularMLP(xtr.shape[1], c, hidden=256, depth=2, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = math.ceil(len(ytr) / 256)
    total = args.epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xva, yva), batch_size=500, shuffle=True)
    refiner = AugmentationRefiner(model, opt, val, method="saflex", seed=args.seed, **kw)
    cutmix = TabularCutMix(p=p, proportion=PROPORTION, seed=args.seed + 17, return_mask=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    print(f"{args.dataset}, {c} classes: softmax(one-hot) puts {math.e / (math.e + c - 1):.3f} on the given label")
    for ep in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        rec = []
        for s in range(steps):
            idx = perm[s * 256:(s + 1) * 256]
            x, y = xtr[idx], ytr[idx]
            xa, ya, aug = cutmix(x, y)
            x, y = torch.cat([x, xa[aug]]), torch.cat([y, ya[aug]])
            aug = torch.cat([torch.zeros(len(idx), dtype=torch.bool), aug[aug]])
            loss = refiner(model(x), y, augmented=aug)
            st = refiner.stats
            if st["active"] and bool(aug.any()):
                a = st["augmented"]
                soft, given = st["soft_targets"][a], y[a]
                rec.append(torch.stack([st["scores"][a].abs().mean(), soft.gather(1, given[:, None]).mean(),
                                        soft.max(1).values.mean(), (soft.argmax(1) == given).float().mean()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        m = torch.stack(rec).mean(0).tolist()
        row = dict(epoch=ep + 1, mean_abs_g=m[0], p_given=m[1], p_max=m[2], argmax_given=m[3])
        rows.append(row)
        print(f"epoch {ep + 1:3d}: mean |g| {m[0]:.3f}  p(given label) {m[1]:.3f}  max p {m[2]:.3f}  "
              f"argmax = given label {m[3]:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
