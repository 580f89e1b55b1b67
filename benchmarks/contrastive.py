"""Contrastive (FLYP-style) study: Fashion-MNIST images against learnable class-prompt embeddings.

Setting: the quality study's data (``benchmarks.quality.load_study``: 10k training / 1k clean
validation images, the official 10k test set, timm RandAugment ``rand-m9-mstd0.5`` with 4
precomputed views per image, a share ``--noise`` of the views given a random wrong label). The image
encoder is the small CNN (``augplug.models.SmallCNN`` with a 64-d output instead of class logits),
the "texts" are 10 learnable class embeddings (:class:`augplug.contrastive.ClassEmbeddings`), and the
logits are cosine similarities times ``exp(logit_scale)`` (fixed, CLIP's initial ``1/0.07``). Every
arm trains with that contrastive (C-way) loss through :class:`augplug.contrastive.ContrastiveRefiner`,
on originals plus one augmented view per image; test accuracy is the argmax over the class
embeddings. Arms (the first three by default): ``none`` (originals only), ``upstream``
(``method="none"``), ``saflex`` (augplug's defaults), ``saflex-paper`` (``augplug.SAFLEX_PAPER``).

    python -m benchmarks.contrastive                       # none / upstream / saflex, seeds 0 1 2
    python -m benchmarks.contrastive --arms saflex --seeds 0 --epochs 3 --no-save

Writes ``benchmarks/results/contrastive/contrastive.md`` and ``contrastive.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Dict, List

import torch

from augplug.methods import SAFLEX_PAPER
from augplug.refiner import refiner_kwargs

from .common import fmt_mean_std, mean_std, parse_sets, results_dir, save_bar_plot, set_threads, write_markdown_table

EMBED = 64
ARM_CONFIGS = {
    "none": (None, {}),
    "upstream": ("none", {}),
    "saflex": ("saflex", {}),
    "saflex-paper": ("saflex", dict(SAFLEX_PAPER)),
    # the augmented views' share of the loss learned as in the core refiner (aug_weight="adaptive")
    "saflex-share": ("saflex", {"aug_weight": "adaptive"}),
}
ARMS = ("none", "upstream", "saflex")  # default arms; saflex-paper runs with --arms




def run_arm(data, arm: str, seed: int, *, epochs: int, batch_size: int = 128, lr: float = 2e-3,
            weight_decay: float = 1e-4, overrides: Dict = None) -> Dict[str, float]:
    from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner
    from augplug.models import SmallCNN
    from augplug.demo.study import binary_auc, view_batches

    torch.manual_seed(seed)
    image_encoder = SmallCNN(1, EMBED, img_size=28)
    prompts = ClassEmbeddings(data.num_classes, EMBED, seed=seed)
    params = list(image_encoder.parameters()) + list(prompts.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n, v = data.view_labels.shape
    steps = math.ceil(n / batch_size)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    method, arm_kw = ARM_CONFIGS[arm]
    kw = {**arm_kw, **((overrides or {}) if method == "saflex" else {})}
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_val, data.y_val), batch_size=500,
                                      shuffle=True)
    refiner = ContrastiveRefiner(image_encoder, prompts, opt, val, method=method or "none",
                                 **refiner_kwargs({"budget": None, **kw}, class_prompts=torch.arange(data.num_classes),
                                                  seed=seed, refiner=ContrastiveRefiner))
    g = torch.Generator().manual_seed(seed + 1)
    true_view = data.y_train[:, None].expand(n, v)
    rec_w, rec_clean, rec_share = [], [], []
    t0 = time.perf_counter()
    image_encoder.train()
    prompts.train()
    for idx, vi in view_batches(n, v, batch_size, epochs, g):
        xo, yo = data.x_train[idx], data.y_train[idx]
        if method is None:
            loss = refiner(xo, yo)
        else:
            ya = data.view_labels[idx, vi]
            loss = refiner(torch.cat([xo, data.views[idx, vi]]), torch.cat([yo, ya]), num_original=len(idx))
            st = refiner.stats
            if method == "saflex" and st["active"]:
                rec_w.append(st["weights"][st["augmented"]])
                rec_clean.append(ya == true_view[idx, vi])
                rec_share.append(st["aug_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    image_encoder.eval()
    prompts.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.y_test), 1000):
            s = refiner.model(data.x_test[i:i + 1000], torch.arange(data.num_classes))
            correct += int((s.argmax(1) == data.y_test[i:i + 1000]).sum())
    out = {"test_acc": correct / len(data.y_test), "seconds": time.perf_counter() - t0}
    if rec_w:
        w, clean = torch.cat(rec_w).numpy(), torch.cat(rec_clean).numpy()
        out.update(auc_weight=binary_auc(w, clean), mean_w_clean=float(w[clean].mean()),
                   mean_w_noisy=float(w[~clean].mean()), share_mean=sum(rec_share) / len(rec_share),
                   share_final=float(rec_share[-1]))
    return out


def measure_overhead(steps: int = 30, batch_size: int = 128, seed: int = 0, options: Dict = None) -> Dict[str, float]:
    """Step-time ratio of SAflex against a plain step (``method="none"``), interleaved in one process.

    Same model, optimizer and batches (128 originals + 128 views of Fashion-MNIST-sized images) for
    both; each round times one plain step and one SAflex step, in alternating order. Two settings:
    class prompts (C-way) and pairs (B x B CLIP loss, the "texts" being each image's class embedding).
    ``options``: extra ``ContrastiveRefiner`` options for the SAflex refiner (``--set``).
    """
    import statistics

    from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner
    from augplug.models import SmallCNN

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2 * batch_size,), generator=g)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1000, 1, 28, 28, generator=g),
                                                                     torch.randint(0, 10, (1000,), generator=g)),
                                      batch_size=500, shuffle=True)
    out = {}
    for setting in ("class prompts", "pairs"):
        torch.manual_seed(seed)
        enc, prompts = SmallCNN(1, EMBED, img_size=28), ClassEmbeddings(10, EMBED)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(prompts.parameters()), lr=1e-4)
        kw = dict(class_prompts=torch.arange(10)) if setting == "class prompts" else {}
        # optimizer=None: each refiner counts its own calls as updates (a shared optimizer's step hook
        # would advance both refiners' refresh schedules on every step of either)
        refs = {m: ContrastiveRefiner(enc, prompts, None, val, method=m,
                                      **refiner_kwargs({"budget": None, **kw}, **(options if m == "saflex" else {}),
                                                       refiner=ContrastiveRefiner))
                for m in ("none", "saflex")}
        times = {m: [] for m in refs}
        for k in range(steps + 4):
            order = ("none", "saflex") if k % 2 == 0 else ("saflex", "none")
            for m in order:
                t0 = time.perf_counter()
                loss = refs[m](x, y, num_original=batch_size)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if k >= 4:  # warm-up rounds are not timed
                    times[m].append(time.perf_counter() - t0)
        ratios = [b / a for a, b in zip(times["none"], times["saflex"])]
        out[setting] = {"plain_ms": 1000 * statistics.mean(times["none"]),
                        "saflex_ms": 1000 * statistics.mean(times["saflex"]),
                        "ratio_mean": sum(times["saflex"]) / sum(times["none"]),
                        "ratio_median": statistics.median(ratios)}
    return out


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=tuple(ARM_CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.3, help="share of augmented views with a random wrong label")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="ContrastiveRefiner option for the SAflex arms (e.g. beta=1)")
    ap.add_argument("--out", default="contrastive")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--overhead", action="store_true",
                    help="only measure the step-time ratio SAflex / plain (writes contrastive_overhead.md)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    set_threads(1)
    if args.overhead:
        res = measure_overhead(options=parse_sets(args.set))
        rows = [[k, f"{v['plain_ms']:.0f}", f"{v['saflex_ms']:.0f}", f"{v['ratio_mean']:.2f}", f"{v['ratio_median']:.2f}"]
                for k, v in res.items()]
        pre = (f"Command: `python -m benchmarks.contrastive {' '.join(argv)}`".strip() +
               "\n\nSmallCNN image encoder (64-d) + 10 learnable class embeddings, 128 originals + 128 augmented "
               "images (28×28) per step, AdamW; SAflex with augplug's defaults (validation gradient over 1,000 "
               "images every 4 updates, forward-mode scores every step). 30 timed rounds after 4 warm-up rounds, "
               "plain and SAflex steps interleaved in one process (1 thread, shared 2-core machine). Amortised "
               "ratio: total SAflex time / total plain time (includes the validation refresh every 4th step); "
               "median ratio: the median of the per-round ratios (a step without refresh)."
               + (f" SAflex options on top of the defaults: {parse_sets(args.set)}." if args.set else ""))
        table = write_markdown_table(None if args.no_save else results_dir("contrastive") / f"{args.out}_overhead.md",
                                     ["setting", "plain step (ms, mean)", "SAflex step (ms, mean)",
                                      "amortised ratio SAflex / plain", "median per-step ratio"], rows, title="Contrastive refiner: step-time overhead",
                                     preamble=pre)
        print(table)
        return
    from .quality import load_study

    overrides = parse_sets(args.set)
    results: Dict = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        data = load_study(seed, noise=args.noise)
        for arm in args.arms:
            res = run_arm(data, arm, seed, epochs=args.epochs, overrides=overrides)
            results.setdefault(arm, []).append(res)
            print(json.dumps({"arm": arm, "seed": seed, **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    wall = time.perf_counter() - t0
    headers = ["arm", "test acc % (mean ± std)", "per seed", "AUC(weight, view label clean)",
               "mean weight clean / corrupted views", "share of augmented views: mean / final", "s/run"]
    rows = []
    for arm, rs in results.items():
        accs = [r["test_acc"] for r in rs]
        auc = [r["auc_weight"] for r in rs if "auc_weight" in r]
        mw = (f"{mean_std([r['mean_w_clean'] for r in rs])[0]:.2f} / {mean_std([r['mean_w_noisy'] for r in rs])[0]:.2f}"
              if auc else "–")
        rows.append([arm, fmt_mean_std(accs), " / ".join(f"{100 * a:.2f}" for a in accs),
                     fmt_mean_std(auc, scale=1, digits=3) if auc else "–", mw,
                     (f"{mean_std([r['share_mean'] for r in rs])[0]:.2f} / {mean_std([r['share_final'] for r in rs])[0]:.2f}"
                      if auc else "–"),
                     f"{mean_std([r['seconds'] for r in rs])[0]:.0f}"])
    pre = (f"Command: `python -m benchmarks.contrastive {' '.join(argv)}`".strip() +
           f"\n\nFashion-MNIST, 10k train / 1k clean validation / 10k test; upstream timm RandAugment "
           f"`rand-m9-mstd0.5` (4 precomputed views per image, one per image and epoch), {args.noise:.0%} of the "
           f"views with a random wrong label; image encoder SmallCNN (batch norm) with a {EMBED}-d output, 10 learnable "
           f"class embeddings, cosine similarity × 1/0.07 (fixed), C-way contrastive loss; AdamW (lr 2e-3, "
           f"wd 1e-4), cosine schedule, batch 128 originals (+128 views), {args.epochs} epochs, seeds {args.seeds}, "
           f"1 thread. Scores by forward-mode AD through the image encoder and the class embeddings. "
           f"Refiner: augplug defaults (`augplug.refiner.DEFAULTS`); `saflex-paper` = {SAFLEX_PAPER}"
           + (f"; plus {overrides}" if overrides else "") +
           f"; validation loader batch 500. Wall-clock for the whole command: {wall / 60:.1f} min.")
    table = write_markdown_table(None if args.no_save else results_dir("contrastive") / f"{args.out}.md", headers, rows,
                                 title="Contrastive (FLYP-style): Fashion-MNIST vs class embeddings", preamble=pre)
    print(table)
    if not args.no_save:
        ms = [mean_std([r["test_acc"] * 100 for r in rs]) for rs in results.values()]
        save_bar_plot(results_dir("contrastive") / f"{args.out}.png", list(results), [m for m, _ in ms],
                      [s for _, s in ms], "test accuracy (%)", f"FLYP-style Fashion-MNIST, RandAugment + {args.noise:.0%} corrupted views")


if __name__ == "__main__":
    main()
