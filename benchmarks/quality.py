"""Quality study on Fashion-MNIST: none / upstream RandAugment / +SAflex / +L2RW.

Setting: 10k training / 1k clean validation images (stratified from the official training set), the
official 10k test set; upstream timm RandAugment (``rand-m9-mstd0.5`` unless ``--aa``, 4 precomputed views per
image) with 30 % of augmented views given a random wrong label; a small CNN, SGD + cosine.
Trained on originals plus augmented views (the paper's setting) and on augmented views alone.

    python -m benchmarks.quality                      # both settings, all arms, 3 seeds
    python -m benchmarks.quality --settings orig+aug --arms saflex --seeds 0 --epochs 6 \
        --set beta=2 --set weighting=hard            # a quick variant (printed, not saved)

Writes ``benchmarks/results/quality/quality.md`` (and ``quality.png``) when run with the default arms.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List

import torch

from augplug.demo.study import StudyData, corrupt_views, make_view_bank
from augplug.methods import SAFLEX_PAPER
from augplug.models import SmallCNN

from .common import (fmt_mean_std, mean_std, paired_difference, parse_sets, results_dir, save_bar_plot, set_threads,
                     share_options, write_markdown_table)

MEAN, STD = 0.2860, 0.3530
#: The upstream augmentation: timm's RandAugment policy string (``--aa``).
AA = "rand-m9-mstd0.5"
#: The paper's rule, literally (hard sign weights, Gumbel-softmax soft labels, beta = tau = 1, raw scores).
PAPER_RULE = SAFLEX_PAPER
#: arm name -> (study arm, refiner options). "saflex-share" runs augplug's defaults unchanged (per-sample
#: weights, normalized by class without originals, and the adaptive share of the augmented rows); "saflex"
#: the per-sample weights as first measured: augmented rows at their upstream share (``aug_weight=1.0``)
#: and weights normalized over all augmented rows (``weight_norm="augmented"``), so its tables reproduce.
ARM_CONFIGS = {
    "none": ("none", {}),
    "upstream": ("upstream", {}),
    "clean": ("clean", {}),
    "oracle-weights": ("oracle-weights", {}),
    "saflex": ("saflex", {"aug_weight": 1.0, "weight_norm": "augmented"}),
    "saflex-paper": ("saflex", PAPER_RULE),
    "saflex-share": ("saflex", {}),
    "l2rw": ("l2rw", {}),
}
ARMS = tuple(ARM_CONFIGS)
SETTINGS = ("orig+aug", "aug-only")




def load_study(seed: int, n_train: int = 10000, n_val: int = 1000, views: int = 4, noise: float = 0.3,
               aa: str = AA, noise_kind: str = "random") -> StudyData:
    from timm.data.auto_augment import rand_augment_transform

    from .datasets import fashion_mnist_splits

    cache_dir = os.path.join(os.path.dirname(__file__), "data")
    os.makedirs(cache_dir, exist_ok=True)
    cache = os.path.join(cache_dir, f"fmnist_bank_{aa}_{n_train}_{n_val}_{views}_s{seed}.pt")
    sp = fashion_mnist_splits(n_train, n_val, seed=seed)
    if os.path.exists(cache):
        bank = torch.load(cache, weights_only=True)
    else:
        tf = rand_augment_transform(aa, {"img_mean": (int(255 * MEAN),)})
        bank = make_view_bank(sp["train"][0], tf, views, seed=seed)
        torch.save(bank, cache)
    norm = lambda u8: ((u8.float() / 255 - MEAN) / STD).unsqueeze(-3)  # noqa: E731
    view_labels, _ = corrupt_views(sp["train"][1], views, noise, 10, seed=seed, kind=noise_kind)
    return StudyData(norm(sp["train"][0]), sp["train"][1], norm(sp["val"][0]), sp["val"][1],
                     norm(sp["test"][0]), sp["test"][1], norm(bank), view_labels, 10)


def paired_summary(acc: Dict) -> str:
    """Paired differences by seed of every refined arm against ``upstream`` and ``none`` of the same
    setting. ``acc``: ``{(setting, arm): {seed: test accuracy %}}``."""
    lines = []
    for (setting, arm), by_seed in acc.items():
        if ARM_CONFIGS[arm][0] not in ("saflex", "l2rw"):
            continue
        for ref in ("upstream", "none"):
            other = acc.get((setting, ref))
            seeds = [sd for sd in by_seed if other and sd in other]
            if not seeds:
                continue
            m, sd_, wins, n = paired_difference([by_seed[sd] for sd in seeds], [other[sd] for sd in seeds])
            lines.append(f"- {setting}, `{arm}` − `{ref}`: {m:+.2f} ± {sd_:.2f} points (better on {wins} of {n} seeds)")
    return ("Paired by seed:\n\n" + "\n".join(lines) + "\n") if lines else ""


def _job(args):
    setting, arm, seed, epochs, overrides, extra = args
    set_threads(1)
    from augplug.demo.study import run_arm

    data = load_study(seed, n_train=extra.get("n_train", 10000), noise_kind=extra.get("noise_kind", "random"),
                      aa=extra.get("aa", AA))
    study_arm, arm_kw = ARM_CONFIGS[arm]
    refined = study_arm in ("saflex", "l2rw")
    ref_kw = share_options({**arm_kw, **overrides}) if refined else {}
    warm = ref_kw.pop("warmup_epochs", 0.0)
    vbs = ref_kw.pop("val_batch_size", 500)
    norm = extra.get("norm", "batch")
    res = run_arm(data, study_arm, seed, epochs=epochs, aug_only=(setting == "aug-only"), refiner_kwargs=ref_kw,
                  warmup_epochs=warm, val_batch_size=vbs, model_fn=lambda: SmallCNN(1, 10, img_size=28, norm=norm))
    return setting, arm, seed, res


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="refiner option for the refined arms, on top of each arm's own (e.g. beta=2, warmup_epochs=1)")
    ap.add_argument("--noise-kind", default="random", choices=("random", "pairflip"),
                    help="wrong labels drawn uniformly (random) or class c -> c+1 (pairflip)")
    ap.add_argument("--aa", default=AA, help="timm RandAugment policy string of the upstream augmentation")
    ap.add_argument("--n-train", type=int, default=10000, help="training images (stratified subset)")
    ap.add_argument("--norm", default="batch", choices=("batch", "group", "none"),
                    help="normalization layers of the small CNN")
    ap.add_argument("--out", default="quality", help="result file stem under benchmarks/results/quality")
    ap.add_argument("--no-save", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    overrides = parse_sets(args.set)
    for seed in args.seeds:  # build the view banks once, before the workers start
        load_study(seed, n_train=args.n_train, aa=args.aa)
    extra = {"norm": args.norm, "noise_kind": args.noise_kind, "n_train": args.n_train, "aa": args.aa}
    jobs = [(s, a, seed, args.epochs, overrides, extra) for s in args.settings for a in args.arms for seed in args.seeds
            if not (a == "none" and s != args.settings[0])]
    results: Dict = {}
    acc: Dict = {}
    with ProcessPoolExecutor(max_workers=args.workers) as ex:
        for setting, arm, seed, res in ex.map(_job, jobs):
            results.setdefault((setting, arm), []).append(res)
            acc.setdefault((setting, arm), {})[seed] = 100 * res["test_acc"]
            print(json.dumps({"setting": setting, "arm": arm, "seed": seed,
                              **{k: round(v, 4) for k, v in res.items()}}), flush=True)
    if "none" in args.arms:
        for s in args.settings[1:]:
            results[(s, "none")] = results[(args.settings[0], "none")]
            acc[(s, "none")] = acc[(args.settings[0], "none")]
    headers = ["setting", "arm", "test acc % (mean ± std)", "per seed", "AUC(weight, clean)", "AUC(y~ᵀg, clean)",
               "kept clean", "kept corrupted", "corrupted relabelled to true class", "share: mean / final", "s/run"]
    rows = []
    for (setting, arm), rs in results.items():
        def col(k, scale=1.0, d=3):
            vals = [r[k] for r in rs if k in r]
            return fmt_mean_std(vals, scale=scale, digits=d) if vals else "–"
        rows.append([setting, arm, col("test_acc", 100, 2), " / ".join(f"{v:.2f}" for v in acc[(setting, arm)].values()),
                     col("auc_weight"), col("auc_agreement"),
                     col("kept_clean"), col("kept_noisy"), col("recovered"),
                     (f"{col('share_mean', d=2)} / {col('share_final', d=2)}" if any("share_mean" in r for r in rs) else "–"),
                     f"{mean_std([r['seconds'] for r in rs])[0]:.0f}"])
    pre = (f"Command: `python -m benchmarks.quality {' '.join(argv)}`".strip() +
           f"\n\nFashion-MNIST, {args.n_train} train / 1k val / 10k test images, small CNN ({args.norm} norm), {args.epochs} epochs, seeds {args.seeds}; "
           f"upstream RandAugment `{args.aa}`; noise: {args.noise_kind}; refiner options: augplug defaults, `saflex-paper` = {PAPER_RULE}"
           + (f", plus {overrides}" if overrides else "") + "; validation loader batch 500 (1k images).")
    table = write_markdown_table(None, headers, rows, title="Quality: Fashion-MNIST", preamble=pre)
    table += "\n" + paired_summary(acc)
    print(table)
    if not args.no_save:
        (results_dir("quality") / f"{args.out}.md").write_text(table, encoding="utf-8")
        labels = [f"{s}\n{a}" for (s, a) in results]
        ms = [mean_std([r["test_acc"] * 100 for r in rs]) for rs in results.values()]
        save_bar_plot(results_dir("quality") / f"{args.out}.png", labels, [m for m, _ in ms], [s for _, s in ms],
                      "test accuracy (%)", f"Fashion-MNIST, RandAugment + 30% {args.noise_kind} corrupted views")


if __name__ == "__main__":
    main()
