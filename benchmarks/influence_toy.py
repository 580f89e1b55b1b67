"""The 2-D toy of the influence-augmentation papers: validation data shifted downward; a learned
augmentation trained on the influence objective moves training samples toward it.

Setting: two Gaussian classes in the plane (class 0 above, class 1 below, horizontal boundary);
the validation set is the same two classes shifted down by ``--shift``. The classifier is an
L2-regularised logistic regression (the head ``nn.Linear(2, 2)`` on the raw coordinates, fitted
with L-BFGS). The augmentation is a learned per-sample translation ``x~ = x + t(x, z)`` with
``t = max_shift * tanh(E(x, z))`` (the 2-D counterpart of the image network's flow field: a
translation is a constant flow), ``E`` a small MLP on the point and a noise vector. Staged as in
the papers:

1. fit the classifier on the training points;
2. ``s_val = (H + lambda I)^-1 grad L_val`` on its head (:class:`augplug.influence.InfluenceScorer`);
3. train ``E`` to maximise the replacement score ``s_val^T (grad l(x~) - grad l(x))`` through the
   frozen classifier (Adam), with a penalty on the squared translation length (without it the
   translations saturate at their bound in every direction the score does not care about);
4. refit the classifier on the training points plus their augmented copies and compare the
   validation loss and accuracy with step 1, and with random translations of the same length.

    python -m benchmarks.influence_toy                 # 5 seeds; writes results/influence/influence_toy.{md,png}
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from augplug.influence import InfluenceScorer

from .common import fmt_mean_std, results_dir, set_threads, write_markdown_table


def make_data(seed: int, n: int = 100, n_val: int = 100, shift: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    scale = torch.tensor([1.2, 0.5])

    def draw(m, offset):
        y = torch.arange(m) % 2
        x = centers[y] + scale * torch.randn(m, 2, generator=g) + torch.tensor([0.0, -offset])
        return x, y

    x, y = draw(2 * n, 0.0)
    xv, yv = draw(n_val, shift)
    return x, y, xv, yv


def fit_logreg(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(2, 2)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * lam * sum(p.pow(2).sum() for p in head.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return head


class Translator(nn.Module):
    """``x~ = x + max_shift * tanh(E(x, z))``: a learned per-sample translation."""

    def __init__(self, noise_dim: int = 2, hidden: int = 32, max_shift: float = 2.0):
        super().__init__()
        self.noise_dim, self.max_shift = noise_dim, max_shift
        self.net = nn.Sequential(nn.Linear(2 + noise_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x, generator=None):
        z = torch.randn(x.shape[0], self.noise_dim, generator=generator)
        return x + self.max_shift * torch.tanh(self.net(torch.cat([x, z], 1)))


def evaluate(head, xv, yv) -> Dict[str, float]:
    with torch.no_grad():
        logits = head(xv)
        return {"val_loss": float(F.cross_entropy(logits, yv)), "val_acc": float((logits.argmax(1) == yv).float().mean())}


def run(seed: int, shift: float = 1.5, steps: int = 300, lam: float = 1e-2, copies: int = 2,
        move_penalty: float = 0.5, label_weight: float = 1.0) -> Dict:
    torch.manual_seed(seed)
    x, y, xv, yv = make_data(seed, shift=shift)
    head = fit_logreg(x, y, lam)
    before = evaluate(head, xv, yv)
    scorer = InfluenceScorer(head, damping=lam, solver="explicit").fit(x)
    scorer.set_validation(xv, yv)
    for p in head.parameters():
        p.requires_grad_(False)
    aug = Translator()
    opt = torch.optim.Adam(aug.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    base = scorer.upweight_scores(x, head(x), y)
    scale = base.pow(2).mean().sqrt()
    for _ in range(steps):
        xt = aug(x, g)
        score = scorer.upweight_scores(xt, head(xt), y) - base
        loss = (-score.mean() / scale + move_penalty * (xt - x).pow(2).sum(1).mean()
                + label_weight * F.cross_entropy(head(xt), y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xt = torch.cat([aug(x, g) for _ in range(copies)])
        score = scorer.replacement_scores(xt, head(xt), y.repeat(copies), x.repeat(copies, 1), head(x.repeat(copies, 1)),
                                          y.repeat(copies))
    disp = xt - x.repeat(copies, 1)
    after_head = fit_logreg(torch.cat([x, xt]), torch.cat([y, y.repeat(copies)]), lam)
    after = evaluate(after_head, xv, yv)
    # control: random translations with the same lengths
    ang = 2 * torch.pi * torch.rand(disp.shape[0], generator=g)
    rand_disp = disp.norm(dim=1, keepdim=True) * torch.stack([ang.cos(), ang.sin()], 1)
    rand_head = fit_logreg(torch.cat([x, x.repeat(copies, 1) + rand_disp]), torch.cat([y, y.repeat(copies)]), lam)
    rand = evaluate(rand_head, xv, yv)

    def gap(points, labels):  # distance of each class mean to the validation class mean, averaged over classes
        return float(sum((points[labels == c].mean(0) - xv[yv == c].mean(0)).norm() for c in (0, 1)) / 2)

    return dict(seed=seed, x=x, y=y, xv=xv, yv=yv, xt=xt, head=head, after_head=after_head,
                before=before, after=after, random=rand, dy=float(disp[:, 1].mean()), dx=float(disp[:, 0].mean()),
                dy0=float(disp[y.repeat(copies) == 0, 1].mean()), dy1=float(disp[y.repeat(copies) == 1, 1].mean()),
                adx=float(disp[:, 0].abs().mean()),
                gap_train=gap(x, y), gap_aug=gap(xt, y.repeat(copies)), helpful=float((score > 0).float().mean()))


def _boundary(ax, head, xlim, **kw):
    w, b = head.weight.detach(), head.bias.detach()
    dw, db = w[1] - w[0], b[1] - b[0]
    xs = torch.linspace(*xlim, 50)
    if abs(float(dw[1])) > 1e-8:
        ax.plot(xs, -(dw[0] * xs + db) / dw[1], **kw)


def plot(res: Dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, xv, yv, xt = res["x"], res["y"], res["xv"], res["yv"], res["xt"]
    n = len(x)
    cols = ["#1f77b4", "#d62728"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharex=True, sharey=True)
    lims = (-4, 4)
    for ax in axes:
        ax.set_xlim(*lims)
        ax.set_ylim(-4.5, 3.5)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    for c in (0, 1):
        axes[0].scatter(*x[y == c].t(), s=8, color=cols[c], label=f"class {c}")
        axes[1].scatter(*xv[yv == c].t(), s=8, color=cols[c], marker="^")
        axes[2].scatter(*x[y == c].t(), s=6, color=cols[c], alpha=0.25)
        yt = y.repeat(len(xt) // n)
        axes[2].scatter(*xt[yt == c].t(), s=8, color=cols[c], marker="x")
        axes[3].scatter(*xv[yv == c].t(), s=8, color=cols[c], marker="^", alpha=0.6)
    for i in range(0, n, 4):
        axes[2].annotate("", xy=tuple(xt[i].tolist()), xytext=tuple(x[i].tolist()),
                         arrowprops=dict(arrowstyle="->", color="gray", lw=0.6, alpha=0.7))
    for ax in axes[:3]:
        _boundary(ax, res["head"], lims, color="k", lw=1.2)
    _boundary(axes[3], res["head"], lims, color="k", lw=1.2, ls="--", label="before")
    _boundary(axes[3], res["after_head"], lims, color="green", lw=1.8, label="after")
    b, a = res["before"], res["after"]
    axes[0].set_title("training data + classifier")
    axes[1].set_title(f"validation (shifted down)\nacc {b['val_acc']:.2f}, loss {b['val_loss']:.3f}")
    axes[2].set_title(f"learned augmentation (x)\nmean shift ({res['dx']:+.2f}, {res['dy']:+.2f})")
    axes[3].set_title(f"after: train + augmented\nacc {a['val_acc']:.2f}, loss {a['val_loss']:.3f}")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[3].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--shift", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--move-penalty", type=float, default=0.5,
                    help="weight of the mean squared translation length in the augmentation loss")
    ap.add_argument("--label-weight", type=float, default=1.0,
                    help="weight of the frozen classifier's cross-entropy on the augmented points (keeps labels)")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(1)
    runs = [run(s, shift=args.shift, steps=args.steps, move_penalty=args.move_penalty, label_weight=args.label_weight)
            for s in args.seeds]
    rows = []
    for r in runs:
        rows.append([r["seed"], f"{r['dy0']:+.3f}", f"{r['dy1']:+.3f}", f"{r['adx']:.3f}", f"{r['gap_train']:.3f}", f"{r['gap_aug']:.3f}",
                     f"{r['helpful']:.2f}", f"{r['before']['val_loss']:.3f}", f"{r['after']['val_loss']:.3f}",
                     f"{r['random']['val_loss']:.3f}", f"{r['before']['val_acc']:.2f}", f"{r['after']['val_acc']:.2f}",
                     f"{r['random']['val_acc']:.2f}"])
    col = lambda f: fmt_mean_std([f(r) for r in runs], scale=1, digits=3)  # noqa: E731
    rows.append(["mean ± std", col(lambda r: r["dy0"]), col(lambda r: r["dy1"]), col(lambda r: r["adx"]), col(lambda r: r["gap_train"]),
                 col(lambda r: r["gap_aug"]), col(lambda r: r["helpful"]), col(lambda r: r["before"]["val_loss"]),
                 col(lambda r: r["after"]["val_loss"]), col(lambda r: r["random"]["val_loss"]),
                 col(lambda r: r["before"]["val_acc"]), col(lambda r: r["after"]["val_acc"]),
                 col(lambda r: r["random"]["val_acc"])])
    headers = ["seed", "shift y, class 0", "shift y, class 1", "mean abs shift x", "class-mean gap to val (train)", "gap (augmented)",
               "share with score > 0", "val loss before", "val loss after", "val loss random shifts",
               "val acc before", "val acc after", "val acc random shifts"]
    pre = (f"Command: `python -m benchmarks.influence_toy {' '.join(argv)}`".strip() + "\n\n"
           f"Two Gaussian classes (200 training points, 100 validation points shifted down by {args.shift}); "
           f"L2 logistic regression (lambda = 1e-2, also the damping of H); learned translation "
           f"x~ = x + 2 tanh(E(x, z)), {args.steps} Adam steps on -(replacement score) / rms(originals' scores) "
           f"+ {args.move_penalty} * mean squared translation length + {args.label_weight} * cross-entropy of the "
           "frozen classifier on the augmented points; two augmented copies "
           "per training point. 'gap' = distance between each class's mean and the validation class mean "
           "(averaged over the classes), for the training points and for their augmented copies; shifts are "
           f"augmented minus original coordinates (the validation set sits {args.shift} lower).  'random "
           "shifts' refits on translations of the same lengths in random directions. Plot: seed "
           f"{runs[0]['seed']}.")
    table = write_markdown_table(None if args.no_save else results_dir("influence") / "influence_toy.md", headers, rows,
                                 title="Influence augmentation: 2-D toy", preamble=pre)
    print(table)
    if not args.no_save:
        plot(runs[0], results_dir("influence") / "influence_toy.png")


if __name__ == "__main__":
    main()
