"""Save every SwinV2 attention layer's relative-position bias, for decompose_bias.py.

    python scripts/save_bias.py --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \
        --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth [--out ./swin_v2_bias_save]

SwinV2 computes its bias with a small MLP from the relative coordinates, so it depends only on the
weights: no images and no GPU are needed. Writes into the output folder, per attention layer i in
construction order, ``swin_v2_bias_{i}.npy`` (H, N, N) float32 = 16 * sigmoid(cpb_mlp(table))[index],
and ``manifest.json``: the config, the checkpoint, and per layer its index, qualified name, heads,
window, N, the sha256 of its cpb weights (``cpb_checksum``) and its file name.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from swin_config import UserError, build_from_args, import_dropin, run_main

MANIFEST_FORMAT = "flashbias-swinv2-bias-v1"


def bias_file_name(index: int) -> str:
    return f"swin_v2_bias_{index}.npy"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", help="official SwinV2 yaml config (configs/swinv2/...)")
    p.add_argument("--resume", help="checkpoint of that model (.pth)")
    p.add_argument("--embedded", default=None,
                   help="no --cfg/--resume: an embedded config (tiny, small, swinv2_b_384) with seeded "
                        "trained-like weights, for trying the pipeline")
    p.add_argument("--seed", type=int, default=0, help="seed of the trained-like weights (--embedded)")
    p.add_argument("--out", default="./swin_v2_bias_save", help="output folder (default ./swin_v2_bias_save)")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cfg is None and args.embedded is None:
        raise UserError("give --cfg CONFIG.yaml --resume CHECKPOINT.pth (or --embedded NAME to try it out)")
    if args.cfg is not None and args.resume is None:
        raise UserError("--cfg needs --resume CHECKPOINT.pth: the bias comes from the trained weights")
    dropin = import_dropin()
    cfg, model = build_from_args(args.cfg, args.resume, embedded=args.embedded, seed=args.seed)
    layers = dropin.window_attention_layers(model)
    os.makedirs(args.out, exist_ok=True)
    entries, total_bytes, start = [], 0, time.time()
    for index, (name, attn) in enumerate(layers):
        bias = attn.derive_bias().detach().float().cpu()              # (H, N, N)
        heads, n, _ = bias.shape
        file_name = bias_file_name(index)
        np.save(os.path.join(args.out, file_name), bias.numpy())
        window = [int(w) for w in (attn.window_size if hasattr(attn.window_size, "__len__")
                                   else (attn.window_size, attn.window_size))]
        entries.append({"index": index, "name": name, "heads": heads, "window": window, "N": n,
                        "checksum": dropin.cpb_checksum(attn), "file": file_name,
                        "shape": [heads, n, n], "dtype": "float32"})
        total_bytes += bias.numel() * 4
        print(f"[{index + 1}/{len(layers)}] {name}: bias {heads}x{n}x{n} "
              f"(range {bias.min().item():.2f}..{bias.max().item():.2f}) -> {file_name}", flush=True)
    manifest = {"format": MANIFEST_FORMAT, "config": cfg.SOURCE, "model_name": cfg.MODEL.NAME,
                "checkpoint": os.path.abspath(args.resume) if args.resume else None,
                "seed": None if args.resume else args.seed, "num_layers": len(entries), "layers": entries}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"saved {len(entries)} layers ({total_bytes / 2**20:.1f} MiB) and manifest.json to {args.out} "
          f"in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
