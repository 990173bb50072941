"""Low-rank (SVD) factors of every attention layer's bias of a SwinV2 or Swin V1 model, for the FlashBias drop-ins.

    python scripts/decompose_bias.py                      # reads ./swin_v2_bias_save (save_bias.py's output)
    python scripts/decompose_bias.py --bias-dir ./swin_v2_bias_save [--max-logit-error 0.05] [--out ./decomposed_bias]
    python scripts/decompose_bias.py --cfg CONFIG.yaml --resume CKPT.pth --rank 16 --published-format B

Per layer, the bias B (H, N, N) is factored as q_bias @ k_bias^T, each (H, N, R), by
``flash_bias_factors.low_rank_bias_factors``. The rank R (one per layer, shared by its heads, at most
min(N, flash_bias_factors.MAX_RANK)) follows one rule:

  --max-logit-error L  the smallest R whose worst logit error (modulo a per-row constant, which
                       softmax ignores) is at most L; a layer where no R meets it keeps its exact
                       bias. The default, L = 0.05.
  --energy E           the FlashBias paper's rule: keep this fraction of sum(sigma^2) in every head.
                       It bounds the energy that is lost, not the error in the logits: check the
                       report's error columns.
  --rank R             this rank in every layer.

By default each row's mean is removed first (softmax ignores it), which usually lowers the rank;
``--no-center`` turns that off. Both variants are measured and reported.

Writes into ``--out`` (default $FLASHBIAS_FACTORS_DIR or ./decomposed_bias), the whole folder or
nothing (an existing one is kept as <out>.previous):
  bias_factors.npz   the factor file the drop-in loads (layers the rule leaves exact have no factors)
  report.md          per layer: rank, energy kept, max/mean logit error, bytes of factors vs dense bias,
                     and the same with/without row centering; warnings
  spectra.png        per layer: singular values and logit error against the rank; one bias beside its
                     approximation and the error
  swin_v2_{TAG}_q_bias_{i}.npy / _k_bias_{i}.npy   with --published-format TAG: the published FlashBias
                     code's file naming (SwinV2 only)

The model comes from the config's MODEL.TYPE (scripts/swin_config.py): a SwinV2 bias is
16 * sigmoid(cpb_mlp(relative_coords_table))[relative_position_index], a Swin V1 bias
relative_position_bias_table[relative_position_index]. The factor file records which (its bias_weights), so
a model of the other family refuses it.
"""
import argparse
import os
import re
import time
from typing import List, Optional, Tuple

import numpy as np
import torch

from swin_config import (UserError, add_model_args, check_model_args, cpu_threads, model_from_args, names_a_model,
                         pyplot, replaced_folder, run_main)
import flash_bias_factors as fbf  # noqa: E402  (swin_config puts the repository root on sys.path)
import flash_bias_runtime as runtime  # noqa: E402
import save_bias  # noqa: E402

DEFAULT_MAX_LOGIT_ERROR = 0.05
REPORT = "report.md"
FIGURE = "spectra.png"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bias-dir", help=f"folder written by save_bias.py (default {save_bias.DEFAULT_OUT} if it "
                                      f"exists and no model is named)")
    add_model_args(p)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--max-logit-error", type=float, metavar="L",
                      help=f"smallest rank whose worst logit error is at most L (default {DEFAULT_MAX_LOGIT_ERROR})")
    rule.add_argument("--energy", type=float, metavar="E",
                      help="the FlashBias paper's rule: keep this fraction of the spectral energy per head "
                           "(bounds the lost energy, not the logit error)")
    rule.add_argument("--rank", type=int, metavar="R", help="this rank in every layer (capped at min(N, "
                                                            f"{fbf.MAX_RANK}))")
    p.add_argument("--no-center", action="store_true", help="do not remove each row's mean before the SVD")
    p.add_argument("--out", default=None, help="output folder (default $FLASHBIAS_FACTORS_DIR or ./decomposed_bias)")
    p.add_argument("--published-format", nargs="?", const="B", default=None, metavar="TAG",
                   help="also write the published FlashBias code's files swin_v2_{TAG}_q_bias_{i}.npy / "
                        "_k_bias_{i}.npy (TAG default B; SwinV2 models only)")
    # the old name of --published-format, kept working for existing command lines
    p.add_argument("--seed-format", nargs="?", const="B", default=None, metavar="TAG", help=argparse.SUPPRESS)
    p.add_argument("--no-figure", action="store_true", help=f"skip {FIGURE}")
    p.add_argument("--no-compare", action="store_true",
                   help="skip measuring the other centering (one SVD per layer instead of four)")
    args = p.parse_args(argv)
    args.rule = rule_from_args(p, args)
    if args.seed_format is not None:
        print("warning: --seed-format is deprecated; it is --published-format", flush=True)
        args.published_format = args.published_format or args.seed_format
    if args.out is None:
        args.out = os.environ.get("FLASHBIAS_FACTORS_DIR") or "./decomposed_bias"
    return args


def rule_from_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The rank rule of --max-logit-error / --energy / --rank (flash_bias_factors.parse_rank_rule syntax)."""
    if args.energy is not None:
        if not 0 < args.energy <= 1:
            p.error(f"--energy must be in (0, 1]; got {args.energy}")
        return f"energy:{args.energy}"
    if args.rank is not None:
        if args.rank < 1:
            p.error(f"--rank must be >= 1; got {args.rank}")
        return f"rank:{args.rank}"
    bound = DEFAULT_MAX_LOGIT_ERROR if args.max_logit_error is None else args.max_logit_error
    if not bound > 0:
        p.error(f"--max-logit-error must be > 0; got {bound}")
    return f"logit:{bound}"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def biases_from_model(model) -> List[Tuple[dict, torch.Tensor]]:
    """[(layer entry, bias (H, N, N) float32)] straight from a model's weights (each layer's derive_bias)."""
    layers = []
    with torch.no_grad():
        for index, (name, attn) in enumerate(runtime.window_attention_layers(model)):
            bias = attn.derive_bias().detach().float().cpu()
            layers.append(({"index": index, "name": name, "heads": bias.shape[0], "N": bias.shape[1],
                            "checksum": runtime.bias_checksum(attn), "bias_weights": list(attn.bias_weights())},
                           bias))
    return layers


def bias_weights_of(entry: dict) -> Tuple[str, ...]:
    """What a layer entry's bias is derived from; manifests of an older save_bias.py (SwinV2 only) lack it."""
    return tuple(entry.get("bias_weights") or fbf.BIAS_WEIGHTS["SwinV2"])


def check_against_model(model, layers, bias_dir: str) -> None:
    """Refuse a bias folder saved from another checkpoint or model (names and checksums of the bias weights)."""
    model_layers = runtime.window_attention_layers(model)
    if len(model_layers) != len(layers):
        raise UserError(f"{bias_dir} holds {len(layers)} layers, the model has {len(model_layers)}: it was saved "
                        f"from another model")
    for (entry, _), (name, attn) in zip(layers, model_layers):
        if entry["name"] != name or entry.get("checksum") != runtime.bias_checksum(attn):
            raise UserError(f"layer {entry['index']} ({name}): the bias in {bias_dir} was saved from another "
                            f"checkpoint (checksum of {', '.join(attn.bias_weights())} differs)")


def input_bias_dir(args: argparse.Namespace) -> Optional[str]:
    """--bias-dir, or save_bias.py's default folder when no input is named and it exists."""
    if args.bias_dir is not None or names_a_model(args):
        if args.opts and not names_a_model(args):
            raise UserError("--opts changes a model's config: give it with --cfg or --embedded (a bias folder is "
                            "read as it was saved)")
        return args.bias_dir
    check_model_args(args)
    if not os.path.isdir(save_bias.DEFAULT_OUT):
        raise UserError(f"give --bias-dir FOLDER (from save_bias.py) or --cfg CONFIG.yaml --resume CHECKPOINT.pth "
                        f"(there is no {save_bias.DEFAULT_OUT} here)")
    print(f"no input given: reading {save_bias.DEFAULT_OUT}, the folder scripts/save_bias.py writes by default",
          flush=True)
    return save_bias.DEFAULT_OUT


def read_inputs(args: argparse.Namespace) -> Tuple[str, List[Tuple[dict, torch.Tensor]]]:
    """(a description of the source, [(layer entry, bias)]) from a bias folder and/or a model."""
    bias_dir = input_bias_dir(args)
    if bias_dir is not None and os.path.abspath(bias_dir) == os.path.abspath(args.out):
        raise UserError(f"--out {args.out} is the input folder; give another output folder")
    model = None
    if names_a_model(args):
        cfg, model = model_from_args(args)
    if bias_dir is None:
        weights = f"checkpoint {args.resume}" if args.resume else f"trained-like weights (seed {args.seed})"
        return f"config {cfg.SOURCE}, {weights}", biases_from_model(model)
    manifest, layers = save_bias.read_bias_dir(bias_dir)
    if model is not None:
        check_against_model(model, layers, bias_dir)
    print(f"read {len(layers)} layers from {bias_dir}", flush=True)
    return f"bias folder {bias_dir} ({save_bias.describe_manifest(manifest)})", layers


# ----------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------
def decompose_layer(bias: torch.Tensor, rule: dict, center: bool, compare: bool = True) -> dict:
    """Factors of one layer's bias (H, N, N) under ``rule`` with and without row centering.

    Returns q_bias, k_bias (H, N, R) or None; info (rank, energy, errors) of the chosen variant;
    alt_info: the other centering under the same rule; alt_same_rank: (max, mean) error of the other
    centering at the chosen rank; alt_rank_same_error: the rank the other centering needs for the same
    max logit error (None: none up to the rank cap). Both None when the layer stays exact; all three
    None with compare=False (one SVD instead of four)."""
    q_bias, k_bias, info = fbf.low_rank_bias_factors(bias, center_rows=center, **rule)
    alt_info = alt_same_rank = alt_rank_same_error = None
    if compare:
        _, _, alt_info = fbf.low_rank_bias_factors(bias, center_rows=not center, **rule)
    if compare and info["rank"] is not None:
        _, _, same = fbf.low_rank_bias_factors(bias, rank=info["rank"], center_rows=not center)
        alt_same_rank = (same["max_logit_error"], same["mean_logit_error"])
        _, _, same = fbf.low_rank_bias_factors(bias, max_logit_error=info["max_logit_error"] * (1 + 1e-9) + 1e-12,
                                               center_rows=not center)
        alt_rank_same_error = same["rank"]
    return {"q_bias": q_bias, "k_bias": k_bias, "info": info, "alt_info": alt_info, "alt_same_rank": alt_same_rank,
            "alt_rank_same_error": alt_rank_same_error}


def progress_line(r: dict, count: int, center: bool) -> str:
    info, alt = r["info"], r["alt_info"]
    line = f"[{r['index'] + 1}/{count}] {r['name']}: H {r['heads']} N {r['N']} "
    if info["rank"]:
        line += (f"rank {info['rank']} energy {info['energy']:.4f} max/mean logit err "
                 f"{info['max_logit_error']:.4f}/{info['mean_logit_error']:.5f}")
    else:
        line += f"exact (no rank up to {rank_cap(r['N'])} meets the rule)"
    if alt:
        line += f" | {'un' if center else ''}centered: " + (
            f"rank {alt['rank']} max err {alt['max_logit_error']:.4f}" if alt["rank"] else "exact")
    return line


def decompose_all(layers, rule: str, center: bool, compare: bool) -> List[dict]:
    """One result per layer (:func:`decompose_layer` plus index, name, heads, N, checksum, bias_weights),
    printing progress."""
    kwargs, results, start = fbf.parse_rank_rule(rule), [], time.time()
    for entry, bias in layers:
        H, N, _ = bias.shape
        r = decompose_layer(bias, kwargs, center, compare=compare)
        r.update(index=entry["index"], name=entry["name"], checksum=entry["checksum"],
                 bias_weights=bias_weights_of(entry), heads=H, N=N)
        results.append(r)
        print(progress_line(r, len(layers), center) + f" ({time.time() - start:.1f} s)", flush=True)
    return results


def rank_cap(n: int) -> int:
    return min(n, fbf.MAX_RANK)


def layer_bytes(r: dict) -> Tuple[Optional[int], int]:
    """(bytes of the layer's float32 factors or None when it stays exact, bytes of its dense bias)."""
    dense = r["heads"] * r["N"] * r["N"] * 4
    return (2 * r["heads"] * r["N"] * r["info"]["rank"] * 4 if r["info"]["rank"] else None), dense


def totals(results: List[dict]) -> Tuple[int, int]:
    """(bytes of the biases the model reads: factors, or the dense bias of exact layers; all dense)."""
    pairs = [layer_bytes(r) for r in results]
    return sum(f if f is not None else d for f, d in pairs), sum(d for _, d in pairs)


def warnings_of(results: List[dict]) -> List[str]:
    """What the user should know before using the factors: layers (and the total) where the factors
    are larger than the dense bias, layers with a worst logit error above LARGE_LOGIT_ERROR."""
    found = []
    for r in results:
        factor, dense = layer_bytes(r)
        where = f"layer {r['index']} ({r['name']})"
        if factor is not None and factor > dense:
            found.append(f"{where}: its rank-{r['info']['rank']} factors ({fmt_bytes(factor)}) are larger than its "
                         f"dense bias ({fmt_bytes(dense)}): 2 R > N = {r['N']}")
        if r["info"]["rank"] and r["info"]["max_logit_error"] > fbf.LARGE_LOGIT_ERROR:
            found.append(f"{where}: worst logit error {r['info']['max_logit_error']:.3f} is above "
                         f"{fbf.LARGE_LOGIT_ERROR} (softmax weights move by up to "
                         f"{100 * (np.exp(2 * r['info']['max_logit_error']) - 1):.0f}%)")
    factor_total, dense_total = totals(results)
    if factor_total > dense_total:
        found.append(f"in total the factors and exact biases ({fmt_bytes(factor_total)}) are larger than the "
                     f"dense biases ({fmt_bytes(dense_total)})")
    return found


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


DASH = "—"


def table_row(r: dict) -> str:
    info, alt = r["info"], r["alt_info"]
    factor, dense = layer_bytes(r)
    if info["rank"]:
        own = (f"{info['rank']} | {info['energy']:.5f} | {info['max_logit_error']:.4f} | "
               f"{info['mean_logit_error']:.5f} | {fmt_bytes(factor)}")
    else:
        own = f"exact | {DASH} | {DASH} | {DASH} | {DASH}"
    if alt is None:
        other = f"{DASH} | {DASH}"
    else:
        other = (f"{alt['rank']} | {alt['max_logit_error']:.4f}" if alt["rank"] else f"exact | {DASH}")
    same = f"{r['alt_same_rank'][0]:.4f} / {r['alt_same_rank'][1]:.5f}" if r["alt_same_rank"] else DASH
    same_err = DASH if not r["alt_same_rank"] else (r["alt_rank_same_error"] or f"> {rank_cap(r['N'])}")
    return (f"| {r['index']} | {r['name']} | {r['heads']} | {r['N']} | {own} | {fmt_bytes(dense)} | {other} | "
            f"{same} | {same_err} |")


def summary_lines(results: List[dict], primary: str, other: str, compared: bool) -> List[str]:
    ranked = [r for r in results if r["info"]["rank"]]
    factor_total, dense_total = totals(results)
    lines = [f"- layers factored: {len(ranked)} of {len(results)}"
             + (f" (the other {len(results) - len(ranked)} keep their exact bias: no rank up to the cap "
                f"min(N, {fbf.MAX_RANK}) meets the rule)" if len(ranked) < len(results) else ""),
             f"- bytes: factors (and dense bias of exact layers) {fmt_bytes(factor_total)} vs dense biases "
             f"{fmt_bytes(dense_total)} ({factor_total / dense_total:.3f}x)"]
    if ranked:
        lines.append(f"- {primary}: mean rank of the factored layers {np.mean([r['info']['rank'] for r in ranked]):.1f}, "
                     f"worst max logit error {max(r['info']['max_logit_error'] for r in ranked):.4f}")
    else:
        lines.append(f"- {primary}: no layer is factored; the factor file only records that every layer stays exact")
    if not compared:
        return lines + [f"- {other}: not measured (--no-compare)"]
    alt_ranked = [r for r in results if r["alt_info"]["rank"]]
    lines.append(f"- {other} (same rule): " + (
        f"{len(alt_ranked)} layers factored, mean rank {np.mean([r['alt_info']['rank'] for r in alt_ranked]):.1f}, "
        f"worst max logit error {max(r['alt_info']['max_logit_error'] for r in alt_ranked):.4f}"
        if alt_ranked else "no layer is factored"))
    if ranked:
        needed = [r["alt_rank_same_error"] or rank_cap(r["N"]) for r in ranked]
        capped = sum(1 for r in ranked if r["alt_rank_same_error"] is None)
        lines.append(f"- for the same max logit error per factored layer, {other} rows need mean rank "
                     f"{np.mean(needed):.1f} (vs {np.mean([r['info']['rank'] for r in ranked]):.1f})"
                     + (f"; {capped} layers not reachable up to the rank cap, counted at the cap" if capped else ""))
    return lines


def write_report(path: str, results: List[dict], rule: str, source: str, center: bool,
                 warnings: List[str]) -> None:
    primary, other = ("centered", "uncentered") if center else ("uncentered", "centered")
    compared = all(r["alt_info"] for r in results)
    lines = ["# FlashBias bias decomposition", "",
             f"- source: {source}", f"- rule: {rule}; rows {primary} (the factors saved); "
             f"the {other} variant is measured for comparison",
             "- logit error (flash_bias_factors.logit_error): of q_bias k_biasᵀ as attention logits, modulo a "
             "constant per row (softmax ignores it): max = worst row's half range, mean = mean absolute deviation",
             f"- exact: no rank up to min(N, {fbf.MAX_RANK}) meets the rule; the layer keeps its dense bias", "",
             f"| # | layer | H | N | rank | energy kept | max logit err | mean logit err | factor bytes | "
             f"dense bytes | {other}: rank (same rule) | {other}: max err (same rule) | "
             f"{other}: max / mean err at same rank | {other}: rank for same max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r) for r in results]
    lines += ["", "## Summary", ""] + summary_lines(results, primary, other, compared)
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    if rule.startswith("energy:"):
        lines += ["", "Note: the energy rule (the FlashBias paper's) bounds the energy that is lost, not the logit "
                  "error; it is not comparable across centering either: an uncentered bias (values around 8) "
                  "spends most of its energy on the per-row constant that softmax ignores. Compare the error "
                  "columns."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------
def spectrum_curves(bias: torch.Tensor, center: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(sigma_k / sigma_1 averaged over heads for k = 1..N, max logit_error of the rank-r truncation
    for r = 1..min(N, MAX_RANK)): the table's error definition, at every rank."""
    b = bias.double()
    target = b - b.mean(-1, keepdim=True) if center else b
    U, S, Vh = torch.linalg.svd(target)
    errors = torch.zeros(b.shape[0], rank_cap(b.shape[-1]), dtype=torch.float64)
    # one head and one rank-1 term at a time: N^2 work per rank (not N^2 R), and buffers small enough
    # for the allocator to reuse (whole-layer ones cost a page-faulting allocation each)
    for h in range(b.shape[0]):
        approx = torch.zeros_like(b[h])
        for k in range(errors.shape[1]):
            approx.addr_(U[h, :, k], Vh[h, k, :], alpha=S[h, k].item())
            errors[h, k] = fbf.logit_error(b[h], approx)[0]
    return (S / S[:, :1].clamp_min(1e-300)).mean(0).numpy(), errors.amax(0).numpy()


def stage_of(name: str) -> str:
    m = re.match(r"layers\.(\d+)\.", name)
    return f"stage {m.group(1)}" if m else "layers"


def plot_curves(ax_sv, ax_err, layers, results, center: bool, colors: dict) -> None:
    """Per layer, coloured by stage: singular values and logit error against the rank, the chosen
    rank marked (a dot; a cross at the cap where the layer stays exact)."""
    for (_, bias), r in zip(layers, results):
        sv, errors = spectrum_curves(bias, center)
        color = colors[stage_of(r["name"])]
        ax_sv.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-12), color=color, lw=0.8, alpha=0.7)
        ax_err.semilogy(np.arange(1, len(errors) + 1), np.maximum(errors, 1e-9), color=color, lw=0.8, alpha=0.7)
        rank = r["info"]["rank"]
        if rank:
            ax_sv.plot(rank, max(sv[rank - 1], 1e-12), "o", color=color, ms=3.5)
            ax_err.plot(rank, max(errors[rank - 1], 1e-9), "o", color=color, ms=3.5)
        else:
            ax_err.plot(len(errors), max(errors[-1], 1e-9), "x", color=color, ms=6)


def mark_bounds(ax_sv, ax_err, results, rule: dict) -> None:
    """The rank cap (vertical), the rule's bound and the warning level (horizontal)."""
    cap = rank_cap(max(r["N"] for r in results))
    for ax in (ax_sv, ax_err):
        ax.axvline(cap, color="0.4", ls=":", lw=1.2, label=f"rank cap min(N, {fbf.MAX_RANK})")
    if "max_logit_error" in rule:
        ax_err.axhline(rule["max_logit_error"], color="black", lw=1.2,
                       label=f"bound of the rule: {rule['max_logit_error']:g}")
    ax_err.axhline(fbf.LARGE_LOGIT_ERROR, color="tab:red", ls="--", lw=1.2,
                   label=f"warning level {fbf.LARGE_LOGIT_ERROR:g}")


def stage_legend(ax, results, colors: dict) -> None:
    """One entry per stage (readable at 24 layers) plus the marked lines."""
    from matplotlib.lines import Line2D
    handles = []
    for stage, color in colors.items():
        members = [r for r in results if stage_of(r["name"]) == stage]
        ns = sorted({r["N"] for r in members})
        handles.append(Line2D([], [], color=color, lw=2, label=f"{stage}: layers {members[0]['index']}-"
                                                             f"{members[-1]['index']}, N {'/'.join(map(str, ns))}"))
    handles += ax.get_legend_handles_labels()[0]
    handles += [Line2D([], [], color="0.3", marker="o", ls="", label="chosen rank"),
                Line2D([], [], color="0.3", marker="x", ls="", label="stays exact")]
    # the error falls with the rank: the lower left is where no curve runs
    ax.legend(handles=handles, fontsize=8, loc="lower left", framealpha=0.9)


def plot_example(fig, axes, bias: torch.Tensor, r: dict) -> None:
    """Head 0 of one layer: its bias, the approximation and the error modulo the row constant (the
    row's midrange, so the colour scale's end is the head's logit_error)."""
    bias = bias[0].double()
    lo, hi = bias.min().item(), bias.max().item()
    panels = [(bias, f"bias, layer {r['index']} head 0 ({r['N']}x{r['N']})", {"vmin": lo, "vmax": hi})]
    if r["q_bias"] is not None:
        e = bias - r["q_bias"][0].double() @ r["k_bias"][0].double().T
        e = e - (e.amax(-1, keepdim=True) + e.amin(-1, keepdim=True)) / 2
        worst = fbf.logit_error(bias, bias - e)[0]
        panels += [(bias - e, f"rank-{r['info']['rank']} approximation (+ row constant)", {"vmin": lo, "vmax": hi}),
                   (e, f"error mod row constant: max logit error {worst:.3f} (all heads: "
                       f"{r['info']['max_logit_error']:.3f})",
                    {"cmap": "coolwarm", "vmin": -worst - 1e-9, "vmax": worst + 1e-9})]
    for ax, (img, text, kw) in zip(axes, panels):
        im = ax.imshow(img.numpy(), **kw)
        ax.set_title(text, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes[len(panels):]:
        ax.axis("off")
    if len(panels) == 1:
        axes[1].text(0, 0.5, f"every layer keeps its exact bias:\nno rank up to min(N, {fbf.MAX_RANK}) meets the rule",
                     fontsize=12, va="center")


def write_figure(path: str, layers, results: List[dict], center: bool, rule: dict) -> Optional[str]:
    """spectra.png: singular values and logit error against the rank per layer (coloured by stage),
    and head 0 of one layer (the first factored one of the largest N) beside its approximation and the error.
    Returns None, or why it was skipped."""
    plt = pyplot()
    if plt is None:
        return f"matplotlib is not installed: skipped {FIGURE} (pip install matplotlib)"
    fig = plt.figure(figsize=(19, 10))
    grid = fig.add_gridspec(2, 6, height_ratios=[1.15, 1])
    ax_sv, ax_err = fig.add_subplot(grid[0, :3]), fig.add_subplot(grid[0, 3:6])
    stages = list(dict.fromkeys(stage_of(r["name"]) for r in results))
    colors = {s: plt.get_cmap("viridis")(i / max(1, len(stages) - 1) * 0.9) for i, s in enumerate(stages)}
    plot_curves(ax_sv, ax_err, layers, results, center, colors)
    mark_bounds(ax_sv, ax_err, results, rule)
    rows = "row-centered" if center else "raw"
    ax_sv.set(xlabel="index k", ylabel="σ_k / σ_1 (mean over heads)", ylim=(1e-6, 1.5),
              title=f"singular values per layer ({rows})")
    floor = min(1e-3, rule.get("max_logit_error", 1.0) / 3)   # below this no logit error matters
    ax_err.set(xlabel="rank R", ylabel="max logit error (log)", ylim=(floor, None),
               xlim=(0.5, rank_cap(max(r["N"] for r in results)) + 2),
               title=f"max logit error of the rank-R factors per layer ({rows})")
    ax_sv.grid(alpha=0.3)
    ax_err.grid(alpha=0.3, which="both")
    stage_legend(ax_err, results, colors)
    # a factored layer if there is one, the largest N, the first
    pick = max(range(len(results)), key=lambda i: (results[i]["q_bias"] is not None, results[i]["N"], -i))
    example_axes = [fig.add_subplot(grid[1, slice(*cols)]) for cols in ((0, 2), (2, 4), (4, 6))]
    plot_example(fig, example_axes, layers[pick][1], results[pick])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
def describe_factor_dir(folder: str) -> str:
    """What an existing output folder holds, from its factor file's meta: rule and source."""
    try:
        found = fbf.read_factor_file(folder)
    except ValueError:
        return f"a {fbf.FACTORS_FILE} that cannot be read"
    factored = sum(1 for r in found.layers.values() if r.rank)
    return (f"rule {found.meta.get('rule')}, {factored} of {found.num_layers} layers factored, from "
            f"{found.meta.get('source')}")


def write_outputs(folder: str, args: argparse.Namespace, layers, results: List[dict], source: str,
                  warnings: List[str]) -> List[str]:
    """Everything into ``folder``; the names of what was written."""
    center = not args.no_center
    records = [fbf.LayerFactors(r["index"], r["name"], r["checksum"], r["q_bias"], r["k_bias"],
                                bias_weights=r["bias_weights"]) for r in results]
    meta = {"rule": args.rule, "centered": center, "source": source,
            "ranks": [r["info"]["rank"] for r in results],
            "max_logit_error": [r["info"]["max_logit_error"] if r["info"]["rank"] else None for r in results],
            "mean_logit_error": [r["info"]["mean_logit_error"] if r["info"]["rank"] else None for r in results],
            "created_by": "scripts/decompose_bias.py"}
    fbf.write_factor_file(os.path.join(folder, fbf.FACTORS_FILE), records, meta)
    written = [fbf.FACTORS_FILE]
    if args.published_format:
        files = fbf.write_published_factors(folder, args.published_format, records)
        written.append(f"{len(files) // 2} pairs " + fbf.published_file_name(args.published_format, "{q,k}", "{i}"))
    write_report(os.path.join(folder, REPORT), results, args.rule, source, center, warnings)
    written.append(REPORT)
    if not args.no_figure:
        status = write_figure(os.path.join(folder, FIGURE), layers, results, center,
                                                   fbf.parse_rank_rule(args.rule))
        if status is None:
            written.append(FIGURE)
        else:
            print(status, flush=True)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    source, layers = read_inputs(args)
    other = {bias_weights_of(entry) for entry, _ in layers} - {fbf.BIAS_WEIGHTS["SwinV2"]}
    if args.published_format and other:
        raise UserError(f"--published-format: the published FlashBias code's naming (swin_v2_*) holds SwinV2 "
                        f"factors; this model's bias is a {fbf.describe_bias_weights(other.pop())}")
    # many small SVDs: more threads only spin against each other on a busy machine
    with replaced_folder(args.out, fbf.FACTORS_FILE, describe_factor_dir) as folder, cpu_threads(1):
        results = decompose_all(layers, args.rule, not args.no_center, compare=not args.no_compare)
        warnings = warnings_of(results)
        exact = [r["index"] for r in results if not r["info"]["rank"]]
        if args.published_format and exact:
            warnings.append(f"layers {exact} stay exact: the published naming cannot say so, they get no "
                            f"swin_v2_{args.published_format}_*_bias_<i>.npy files (bias_factors.npz records them)")
        written = write_outputs(folder, args, layers, results, source, warnings)
    print(f"wrote {args.out}: {', '.join(written)}; {len(results) - len(exact)} of {len(results)} layers "
          f"low-rank (rule {args.rule})", flush=True)
    for w in warnings:
        print(f"warning: {w}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
