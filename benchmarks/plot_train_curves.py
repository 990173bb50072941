#!/usr/bin/env python3
"""Loss curves of two official main.py training runs, official model file against the drop-in.

    python benchmarks/plot_train_curves.py OFFICIAL.log DROPIN.log --out benchmarks/train_curves_<device>
        [--tolerance 0.02] [--title TEXT]

Each log is the output of the shared tool ``official_main_eval.py --mode train`` (its lines
``train steps N  s/step ... mean S  peak mem M MB`` and ``losses l1 l2 ...``: main.py's per-step loss as
it prints it, 4 decimals). Writes OUT.png (both curves and their difference) and OUT.md (s/step, peak
memory, the largest and mean absolute loss difference, and whether every step is within --tolerance).
Exits 1 when a step differs by more than the tolerance, 2 on unreadable input.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, pyplot, run_main  # noqa: E402


def read_run(path):
    """{"losses": [float], "s_per_step": float, "peak_mb": int} of one tool output."""
    try:
        text = open(path).read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    summary = re.search(r"train steps (\d+)\s+s/step .*? mean ([0-9.]+)\s+peak mem (\d+) MB", text)
    losses = re.search(r"^losses ((?:[0-9.]+ ?)+)$", text, re.M)
    if not summary or not losses:
        raise UserError(f"{path} holds no 'train steps ...' and 'losses ...' lines of official_main_eval.py "
                        f"--mode train")
    values = [float(v) for v in losses.group(1).split()]
    if len(values) != int(summary.group(1)):
        raise UserError(f"{path}: {len(values)} losses but {summary.group(1)} steps")
    return {"losses": values, "s_per_step": float(summary.group(2)), "peak_mb": int(summary.group(3))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official")
    p.add_argument("dropin")
    p.add_argument("--out", required=True, help="output path without extension (.png and .md are written)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest accepted |loss difference| per step (default 0.02: fp16 noise over a few hundred "
                        "steps, against losses of ~0.7)")
    p.add_argument("--title", default="official main.py training, official model file vs FlashBias drop-in")
    args = p.parse_args(argv)
    official, dropin = read_run(args.official), read_run(args.dropin)
    if len(official["losses"]) != len(dropin["losses"]):
        raise UserError(f"the runs have {len(official['losses'])} and {len(dropin['losses'])} steps")
    diff = [d - o for o, d in zip(official["losses"], dropin["losses"])]
    worst = max(abs(v) for v in diff)
    mean = sum(abs(v) for v in diff) / len(diff)
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = range(1, len(diff) + 1)
    top.plot(steps, official["losses"], label=f"official ({official['s_per_step']:.3f} s/step)", lw=1.5)
    top.plot(steps, dropin["losses"], label=f"drop-in ({dropin['s_per_step']:.3f} s/step)", lw=1, ls="--")
    top.set_ylabel("training loss (main.py)")
    top.set_title(args.title, fontsize=10)
    top.legend()
    bottom.plot(steps, diff, lw=1, color="k")
    bottom.axhline(args.tolerance, color="r", lw=0.8, ls=":")
    bottom.axhline(-args.tolerance, color="r", lw=0.8, ls=":")
    bottom.set_ylabel("drop-in − official")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    within = worst <= args.tolerance
    lines = [f"# {args.title}", "",
             "| run | steps | s/step | peak memory (MB) |", "|---|---:|---:|---:|",
             f"| official | {len(diff)} | {official['s_per_step']:.4f} | {official['peak_mb']} |",
             f"| drop-in | {len(diff)} | {dropin['s_per_step']:.4f} | {dropin['peak_mb']} |", "",
             f"Speed-up {official['s_per_step'] / dropin['s_per_step']:.2f}x. Loss difference per step: largest "
             f"{worst:.4f}, mean {mean:.4f}; tolerance {args.tolerance} {'met' if within else 'NOT met'} "
             f"(main.py prints 4 decimals). Plot: {os.path.basename(args.out)}.png"]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return 0 if within else 1


if __name__ == "__main__":
    run_main(main)
