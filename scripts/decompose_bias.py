"""Low-rank (SVD) factors of every SwinV2 attention layer's bias, for the FlashBias drop-in.

    python scripts/decompose_bias.py --bias-dir ./swin_v2_bias_save [--energy 0.995] [--out ./decomposed_bias]
    python scripts/decompose_bias.py --cfg CONFIG.yaml --resume CKPT.pth --max-logit-error 0.05
    python scripts/decompose_bias.py --cfg CONFIG.yaml --resume CKPT.pth --rank 16 --seed-format B

Per layer, the bias B (H, N, N) is factored as q_bias @ k_bias^T, each (H, N, R), by
``flash_bias_triton.low_rank_bias_factors``. The rank R (one per layer, shared by its heads) follows
one rule: ``--energy`` (the seed's: keep this fraction of sum(sigma^2) in every head; the default,
0.995), ``--max-logit-error`` (the smallest R whose worst logit error, modulo a per-row constant, is
at most this) or ``--rank``. By default each row's mean is removed first (softmax ignores it), which
usually lowers the rank; ``--no-center`` turns that off. Both variants are measured and reported.

Writes into ``--out`` (default ./decomposed_bias):
  bias_factors.npz   the factor file the drop-in loads (layers for which the rule gives no rank stay exact)
  report.md          per layer: rank, energy kept, max/mean logit error, bytes of factors vs dense bias,
                     and the same with/without row centering
  spectra.png        singular-value spectra per layer, one bias beside its approximation and the error
  swin_v2_{TAG}_q_bias_{i}.npy / _k_bias_{i}.npy   with --seed-format TAG (the seed's published naming)
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from swin_config import REPO_ROOT, UserError, build_from_args, import_dropin, run_main

if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from flash_bias_triton import low_rank_bias_factors, logit_error  # noqa: E402

FACTOR_FILE = "bias_factors.npz"
FACTOR_FORMAT = "flashbias-swinv2-factors-v1"
BIAS_MANIFEST_FORMAT = "flashbias-swinv2-bias-v1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input: --bias-dir, or --cfg with --resume")
    src.add_argument("--bias-dir", help="folder written by save_bias.py (checked against its manifest.json)")
    src.add_argument("--cfg", help="official SwinV2 yaml config")
    src.add_argument("--resume", help="checkpoint of that model")
    src.add_argument("--embedded", help="no input given: an embedded config (tiny, small, swinv2_b_384) with "
                                        "seeded trained-like weights")
    src.add_argument("--seed", type=int, default=0, help="seed of the trained-like weights (--embedded)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=float, help="keep this fraction of the spectral energy per head "
                                                   "(default 0.995, the seed's rule)")
    rule.add_argument("--max-logit-error", type=float, help="smallest rank whose worst logit error is at most this")
    rule.add_argument("--rank", type=int, help="this rank in every layer (capped at N and 128)")
    p.add_argument("--no-center", action="store_true", help="do not remove each row's mean before the SVD")
    p.add_argument("--out", default=None, help="output folder (default $FLASHBIAS_FACTORS_DIR or ./decomposed_bias)")
    p.add_argument("--seed-format", nargs="?", const="B", default=None, metavar="TAG",
                   help="also write swin_v2_{TAG}_q_bias_{i}.npy / _k_bias_{i}.npy (TAG default B)")
    p.add_argument("--no-figure", action="store_true", help="skip spectra.png")
    p.add_argument("--no-compare", action="store_true",
                   help="skip measuring the other centering (one SVD per layer instead of four)")
    args = p.parse_args(argv)
    if args.energy is None and args.max_logit_error is None and args.rank is None:
        args.energy = 0.995
    if args.energy is not None and not 0 < args.energy <= 1:
        p.error(f"--energy must be in (0, 1]; got {args.energy}")
    if args.max_logit_error is not None and not args.max_logit_error > 0:
        p.error(f"--max-logit-error must be > 0; got {args.max_logit_error}")
    if args.rank is not None and args.rank < 1:
        p.error(f"--rank must be >= 1; got {args.rank}")
    if args.out is None:
        args.out = os.environ.get("FLASHBIAS_FACTORS_DIR") or "./decomposed_bias"
    return args


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def read_bias_dir(bias_dir: str):
    """(manifest dict, [(layer entry, bias (H, N, N) float32 tensor)]) of a save_bias.py folder.
    Every file is checked against the manifest (present, readable, shape, finite)."""
    manifest_path = os.path.join(bias_dir, "manifest.json")
    if not os.path.isdir(bias_dir):
        raise UserError(f"bias folder not found: {bias_dir}")
    if not os.path.isfile(manifest_path):
        raise UserError(f"{bias_dir} has no manifest.json: give the folder scripts/save_bias.py wrote")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest_path} is corrupt (not JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BIAS_MANIFEST_FORMAT \
            or not isinstance(manifest.get("layers"), list):
        raise UserError(f"{manifest_path} is not a save_bias.py manifest (format {BIAS_MANIFEST_FORMAT})")
    layers = []
    for entry in manifest["layers"]:
        try:
            index, name, file_name = int(entry["index"]), str(entry["name"]), str(entry["file"])
            heads, n = int(entry["heads"]), int(entry["N"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{manifest_path}: layer entry {entry!r} lacks index/name/file/heads/N") from None
        if index != len(layers):
            raise UserError(f"{manifest_path}: layer {len(layers)} is missing (found index {index})")
        path = os.path.join(bias_dir, os.path.basename(file_name))
        where = f"layer {index} ({name})"
        if not os.path.isfile(path):
            raise UserError(f"{where}: bias file {path} is missing")
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{where}: bias file {path} is corrupt ({e})") from None
        if array.shape != (heads, n, n):
            raise UserError(f"{where}: {path} holds shape {array.shape}, the manifest says {(heads, n, n)}")
        if array.dtype.kind != "f" or not np.isfinite(array).all():
            raise UserError(f"{where}: {path} is not a finite float array (dtype {array.dtype})")
        layers.append((entry, torch.from_numpy(array.astype(np.float32))))
    if not layers:
        raise UserError(f"{manifest_path} lists no layers")
    return manifest, layers


def biases_from_model(dropin, model):
    """[(layer entry, bias (H, N, N) float32)] straight from a model's cpb MLPs."""
    layers = []
    with torch.no_grad():
        for index, (name, attn) in enumerate(dropin.window_attention_layers(model)):
            bias = attn.derive_bias().detach().float().cpu()
            layers.append(({"index": index, "name": name, "heads": bias.shape[0], "N": bias.shape[1],
                            "checksum": dropin.cpb_checksum(attn)}, bias))
    return layers


def check_against_model(dropin, model, layers, bias_dir):
    """Refuse a bias folder saved from another checkpoint or model (names and cpb checksums)."""
    model_layers = dropin.window_attention_layers(model)
    if len(model_layers) != len(layers):
        raise UserError(f"{bias_dir} holds {len(layers)} layers, the model has {len(model_layers)}: it was saved "
                        f"from another model")
    for (entry, bias), (name, attn) in zip(layers, model_layers):
        if entry["name"] != name or entry.get("checksum") != dropin.cpb_checksum(attn):
            raise UserError(f"layer {entry['index']} ({name}): the bias in {bias_dir} was saved from another "
                            f"checkpoint (cpb weights checksum differs)")


# ----------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------
def rule_kwargs(args, n: int) -> dict:
    if args.rank is not None:
        return {"rank": min(args.rank, n, 128)}
    if args.energy is not None:
        return {"energy": args.energy}
    return {"max_logit_error": args.max_logit_error}


def rule_text(args) -> str:
    if args.rank is not None:
        return f"rank {args.rank}"
    if args.energy is not None:
        return f"energy {args.energy}"
    return f"max logit error {args.max_logit_error}"


def decompose_layer(bias: torch.Tensor, rule: dict, center: bool, compare: bool = True) -> dict:
    """Factors of one layer's bias (H, N, N) under ``rule`` with and without row centering.

    Returns q_bias, k_bias (H, N, R) or None; info (rank, energy, errors) of the chosen variant;
    alt_info: the other centering under the same rule; alt_same_rank: (max, mean) error of the other
    centering at the chosen rank; alt_rank_same_error: the rank the other centering needs for the same
    max logit error (None: none up to 128). Both None when the layer stays exact; all three None
    with compare=False (one SVD instead of four)."""
    q_bias, k_bias, info = low_rank_bias_factors(bias, center_rows=center, **rule)
    alt_info = alt_same_rank = alt_rank_same_error = None
    if compare:
        _, _, alt_info = low_rank_bias_factors(bias, center_rows=not center, **rule)
    if compare and info["rank"] is not None:
        _, _, same = low_rank_bias_factors(bias, rank=info["rank"], center_rows=not center)
        alt_same_rank = (same["max_logit_error"], same["mean_logit_error"])
        _, _, same = low_rank_bias_factors(bias, max_logit_error=info["max_logit_error"] * (1 + 1e-9) + 1e-12,
                                           center_rows=not center)
        alt_rank_same_error = same["rank"]
    return {"q_bias": q_bias, "k_bias": k_bias, "info": info, "alt_info": alt_info, "alt_same_rank": alt_same_rank,
            "alt_rank_same_error": alt_rank_same_error}


def write_factor_file(path, layers, factors, meta):
    """The factor file in the documented format, from a bias folder's manifest (no model at hand).

    layers: [(entry with index/name/checksum, bias)]; factors: {index: (q_bias, k_bias) (H, N, R)}."""
    arrays = {"format": np.array(FACTOR_FORMAT), "num_layers": np.array(len(layers)),
              "meta": np.array(json.dumps(meta))}
    for entry, _ in layers:
        i = entry["index"]
        arrays[f"layer{i}_name"] = np.array(entry["name"])
        arrays[f"layer{i}_checksum"] = np.array(entry["checksum"])
        if i in factors:
            arrays[f"layer{i}_q_bias"] = factors[i][0].float().numpy()
            arrays[f"layer{i}_k_bias"] = factors[i][1].float().numpy()
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------------------------
# Report and figure
# ----------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def write_report(path, results, args, source, center):
    primary, other = ("centered", "uncentered") if center else ("uncentered", "centered")
    lines = [f"# FlashBias bias decomposition", "",
             f"- source: {source}", f"- rule: {rule_text(args)}; rows {primary} (the factors saved); "
             f"the {other} variant is measured for comparison",
             "- logit error: of q_bias k_biasᵀ as attention logits, modulo a constant per row (softmax "
             "ignores it): max = worst row's half range, mean = mean absolute deviation", "",
             f"| # | layer | H | N | rank | energy kept | max logit err | mean logit err | factor bytes | "
             f"dense bytes | {other}: rank (same rule) | {other}: max err (same rule) | "
             f"{other}: max / mean err at same rank | {other}: rank for same max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    total_factor = total_dense = 0
    for r in results:
        H, N = r["heads"], r["N"]
        info, alt = r["info"], r["alt_info"]
        dense = H * N * N * 4
        factor = 2 * H * N * info["rank"] * 4 if info["rank"] else dense
        total_factor += factor
        total_dense += dense
        rank = info["rank"] if info["rank"] else "exact (no rank meets the bound)"
        same = (f"{r['alt_same_rank'][0]:.4f} / {r['alt_same_rank'][1]:.5f}" if r["alt_same_rank"] else "-")
        same_err = "-" if not r["alt_same_rank"] else (r["alt_rank_same_error"] or f"> {min(N, 128)}")
        alt_cols = (f"{alt['rank'] or 'none'} | {alt['max_logit_error']:.4f}" if alt else "- | -")
        lines.append(f"| {r['index']} | {r['name']} | {H} | {N} | {rank} | {info['energy']:.5f} | "
                     f"{info['max_logit_error']:.4f} | {info['mean_logit_error']:.5f} | {fmt_bytes(factor)} | "
                     f"{fmt_bytes(dense)} | {alt_cols} | {same} | {same_err} |")
    ranked = [r for r in results if r["info"]["rank"]]
    compared = all(r["alt_info"] for r in results)
    alt_ranked = [r for r in results if compared and r["alt_info"]["rank"]]
    mean_rank = np.mean([r["info"]["rank"] for r in ranked]) if ranked else float("nan")
    alt_mean_rank = np.mean([r["alt_info"]["rank"] for r in alt_ranked]) if alt_ranked else float("nan")
    worst = max(r["info"]["max_logit_error"] for r in results)
    alt_worst = max(r["alt_info"]["max_logit_error"] for r in results) if compared else float("nan")
    lines += ["", "## Summary", "",
              f"- layers factored: {len(ranked)} of {len(results)} (the rest stay exact)",
              f"- bytes: factors {fmt_bytes(total_factor)} vs dense bias {fmt_bytes(total_dense)} "
              f"({total_factor / total_dense:.3f}x)",
              f"- {primary}: mean rank {mean_rank:.1f}, worst max logit error {worst:.4f}",
              f"- {other} (same rule): " + (f"mean rank {alt_mean_rank:.1f}, worst max logit error {alt_worst:.4f}"
                                             if compared else "not measured (--no-compare)")]
    same_error = [(r["info"]["rank"], r["alt_rank_same_error"]) for r in ranked]
    if same_error and compared:
        capped = sum(1 for _, a in same_error if a is None)
        mean_alt = np.mean([a if a is not None else min(r["N"], 128) for r, (_, a) in zip(ranked, same_error)])
        lines.append(f"- for the same max logit error per layer, {other} rows need mean rank {mean_alt:.1f} "
                     f"(vs {mean_rank:.1f})" + (f"; {capped} layers not reachable up to rank min(N, 128), "
                                                  f"counted at that cap" if capped else ""))
    if args.energy is not None and compared:
        lines += ["", "Note: the energy rule is not comparable across centering: an uncentered bias (values "
                  "around 8) spends most of its energy on the per-row constant that softmax ignores, so "
                  "keeping 99.5% of it can still leave large logit errors. Compare the error columns."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"mean_rank": mean_rank, "alt_mean_rank": alt_mean_rank, "worst": worst, "alt_worst": alt_worst,
            "factor_bytes": total_factor, "dense_bytes": total_dense}


def write_figure(path, layers, results, center) -> str:
    """spectra.png: per-layer singular values (head-mean, normalised) and, for the first layer with
    the largest N, head 0's bias, its approximation and the error. Returns a status message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped spectra.png (pip install matplotlib)"
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    cmap = plt.get_cmap("viridis")
    for (entry, bias), r in zip(layers, results):
        b = bias.double()
        target = b - b.mean(-1, keepdim=True) if center else b
        s = torch.linalg.svdvals(target)
        s = (s / s[:, :1].clamp_min(1e-30)).mean(0).numpy()
        axes[0].semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12),
                         color=cmap(r["index"] / max(1, len(results) - 1)), lw=1,
                         label=f"{r['index']}" if len(results) <= 12 else None)
        if r["info"]["rank"]:
            axes[0].plot(r["info"]["rank"], max(s[r["info"]["rank"] - 1], 1e-12), "o",
                         color=cmap(r["index"] / max(1, len(results) - 1)), ms=3)
    axes[0].set_xlabel("index k")
    axes[0].set_ylabel("σ_k / σ_1 (mean over heads)")
    axes[0].set_title(f"singular values per layer ({'row-centered' if center else 'raw'}; dot = chosen rank)")
    axes[0].set_xlim(1, max(r["N"] for r in results))
    axes[0].set_ylim(bottom=1e-6)
    if len(results) <= 12:
        axes[0].legend(fontsize=7, ncol=2, title="layer")
    pick = max(range(len(results)), key=lambda i: (results[i]["N"], -i))
    bias = layers[pick][1][0].double()
    r = results[pick]
    if r["q_bias"] is not None:
        approx = r["q_bias"][0].double() @ r["k_bias"][0].double().T
        err = bias - approx
        shift = err.mean(-1, keepdim=True)           # the per-row constant softmax ignores
        approx, err = approx + shift, err - shift
        title = f"rank-{r['info']['rank']} approximation"
    else:
        approx, err = bias, torch.zeros_like(bias)
        title = "exact (no rank met the bound)"
    lo, hi = bias.min().item(), bias.max().item()
    for ax, img, t, kw in ((axes[1], bias, f"bias, layer {r['index']} head 0 ({r['N']}x{r['N']})",
                            {"vmin": lo, "vmax": hi}),
                           (axes[2], approx, title, {"vmin": lo, "vmax": hi}),
                           (axes[3], err, f"error mod row constant (max |e| {err.abs().max().item():.3f})",
                            {"cmap": "coolwarm", "vmin": -err.abs().max().item() - 1e-9,
                             "vmax": err.abs().max().item() + 1e-9})):
        im = ax.imshow(img.numpy(), **kw)
        ax.set_title(t, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    center = not args.no_center
    dropin, model = None, None
    if args.bias_dir is None and args.cfg is None and args.embedded is None:
        raise UserError("give --bias-dir FOLDER (from save_bias.py) or --cfg CONFIG.yaml --resume CHECKPOINT.pth")
    if args.cfg is not None and args.resume is None:
        raise UserError("--cfg needs --resume CHECKPOINT.pth: the bias comes from the trained weights")
    if args.cfg is not None or (args.embedded is not None and args.bias_dir is None):
        dropin = import_dropin()
        cfg, model = build_from_args(args.cfg, args.resume, embedded=args.embedded, seed=args.seed)
    if args.bias_dir is not None:
        manifest, layers = read_bias_dir(args.bias_dir)
        source = f"bias folder {args.bias_dir} (config {manifest.get('config')}, checkpoint {manifest.get('checkpoint')})"
        if model is not None:
            check_against_model(dropin, model, layers, args.bias_dir)
        print(f"read {len(layers)} layers from {args.bias_dir}", flush=True)
    else:
        layers = biases_from_model(dropin, model)
        source = f"config {cfg.SOURCE}, " + (f"checkpoint {args.resume}" if args.resume
                                              else f"trained-like weights (seed {args.seed})")
    os.makedirs(args.out, exist_ok=True)
    results, factors, start = [], {}, time.time()
    for entry, bias in layers:
        H, N, _ = bias.shape
        r = decompose_layer(bias, rule_kwargs(args, N), center, compare=not args.no_compare)
        r.update(index=entry["index"], name=entry["name"], heads=H, N=N)
        results.append(r)
        info, alt = r["info"], r["alt_info"]
        if info["rank"]:
            factors[entry["index"]] = (r["q_bias"].cpu(), r["k_bias"].cpu())
        print(f"[{len(results)}/{len(layers)}] {entry['name']}: H {H} N {N} rank "
              f"{info['rank'] or 'exact'} energy {info['energy']:.4f} max/mean logit err "
              f"{info['max_logit_error']:.4f}/{info['mean_logit_error']:.5f}"
              + (f" | {'un' if center else ''}centered: rank {alt['rank'] or 'none'} max err "
                 f"{alt['max_logit_error']:.4f}" if alt else "") + f" ({time.time() - start:.1f} s)", flush=True)
    meta = {"rule": rule_text(args), "centered": center, "source": source,
            "ranks": [r["info"]["rank"] for r in results],
            "max_logit_error": [r["info"]["max_logit_error"] for r in results],
            "mean_logit_error": [r["info"]["mean_logit_error"] for r in results],
            "created_by": "scripts/decompose_bias.py"}
    factor_path = os.path.join(args.out, FACTOR_FILE)
    if model is not None:
        dropin.save_bias_factors(factor_path, model, factors, meta)
    else:
        write_factor_file(factor_path, layers, factors, meta)
    print(f"wrote {factor_path}: {len(factors)} of {len(layers)} layers low-rank", flush=True)
    if args.seed_format:
        exact = [r["index"] for r in results if not r["info"]["rank"]]
        if exact:
            print(f"warning: layers {exact} have no rank meeting the rule; the seed format cannot say 'exact', "
                  f"so their files are not written", flush=True)
        for i, (q_bias, k_bias) in factors.items():
            np.save(os.path.join(args.out, f"swin_v2_{args.seed_format}_q_bias_{i}.npy"), q_bias.float().numpy())
            np.save(os.path.join(args.out, f"swin_v2_{args.seed_format}_k_bias_{i}.npy"), k_bias.float().numpy())
        print(f"wrote {len(factors)} pairs swin_v2_{args.seed_format}_q_bias_i.npy / _k_bias_i.npy", flush=True)
    summary = write_report(os.path.join(args.out, "report.md"), results, args, source, center)
    other = "uncentered" if center else "centered"
    compared = "" if args.no_compare else f" ({other} {summary['alt_mean_rank']:.1f})"
    compared_err = "" if args.no_compare else f" ({other} {summary['alt_worst']:.4f})"
    print(f"wrote {os.path.join(args.out, 'report.md')}: mean rank {summary['mean_rank']:.1f}{compared}, worst "
          f"max logit error {summary['worst']:.4f}{compared_err}, factors {fmt_bytes(summary['factor_bytes'])} "
          f"vs dense {fmt_bytes(summary['dense_bytes'])}", flush=True)
    if not args.no_figure:
        print(write_figure(os.path.join(args.out, "spectra.png"), layers, results, center), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
