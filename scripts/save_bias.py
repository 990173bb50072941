"""Save every attention layer's relative-position bias of a SwinV2 or Swin V1 model, for decompose_bias.py.

    python scripts/save_bias.py --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \\
        --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth [--out ./swin_v2_bias_save]
    python scripts/save_bias.py --cfg configs/swin/swin_tiny_patch4_window7_224.yaml --resume swin_tiny.pth

The config's MODEL.TYPE says which model it is (swinv2, or swin for V1). The bias depends only on the
weights (SwinV2: a small MLP of the relative coordinates; V1: a learned table), so no images and no GPU
are needed. Writes into the output folder, per attention layer i in construction order,
``swin_v2_bias_{i}.npy`` (H, N, N) float32 (the name is the same for V1) = the layer's derive_bias():
16 * sigmoid(cpb_mlp(relative_coords_table))[index] for SwinV2, relative_position_bias_table[index] for
V1; and ``manifest.json``: the config, its MODEL.TYPE, the checkpoint, and per layer its index, qualified
name, heads, window, N, the names of the weights its bias is derived from (``bias_weights``) and their
sha256 (``checksum``), its file name and the file's sha256.

The folder is written whole or not at all: into a temporary folder beside it, renamed into place at
the end. An existing output folder is kept as ``<out>.previous`` (replacing an older one), so an
interrupted run never leaves layers of two checkpoints side by side.
"""
import argparse
import hashlib
import json
import os
import time
from typing import List, Tuple

import numpy as np
import torch

from swin_config import UserError, add_model_args, model_from_args, replaced_folder, run_main
import flash_bias_runtime as runtime  # noqa: E402  (swin_config puts the repository root on sys.path)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "flashbias-swinv2-bias-v2"
DEFAULT_OUT = "./swin_v2_bias_save"


def bias_file_name(index: int) -> str:
    return f"swin_v2_bias_{index}.npy"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def describe_manifest(manifest: dict) -> str:
    """Config, weights and layer count of a bias folder's manifest."""
    weights = (f"checkpoint {manifest['checkpoint']}" if manifest.get("checkpoint")
               else f"trained-like weights, seed {manifest.get('seed')}")
    return f"config {manifest.get('config')}, {weights}, {len(manifest['layers'])} layers"


def describe_bias_dir(folder: str) -> str:
    """What an existing bias folder holds (:func:`describe_manifest`), for the message that replaces it."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return describe_manifest(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        return f"a {MANIFEST} that cannot be read"


def save_layer(folder: str, index: int, name: str, attn) -> dict:
    """Write one layer's bias into ``folder``; its manifest entry."""
    bias = attn.derive_bias().detach().float().cpu()              # (H, N, N)
    heads, n, _ = bias.shape
    file_name = bias_file_name(index)
    np.save(os.path.join(folder, file_name), bias.numpy())
    return {"index": index, "name": name, "heads": heads, "window": [int(w) for w in attn.window_size], "N": n,
            "bias_weights": list(attn.bias_weights()), "checksum": runtime.bias_checksum(attn), "file": file_name,
            "sha256": file_sha256(os.path.join(folder, file_name)), "shape": [heads, n, n], "dtype": "float32",
            "range": [bias.min().item(), bias.max().item()]}


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, model = model_from_args(args)
    layers = runtime.window_attention_layers(model)
    start = time.time()
    with replaced_folder(args.out, MANIFEST, describe_bias_dir) as folder:
        entries = []
        for index, (name, attn) in enumerate(layers):
            entry = save_layer(folder, index, name, attn)
            entries.append(entry)
            print(f"[{index + 1}/{len(layers)}] {name}: bias {'x'.join(map(str, entry['shape']))} (range "
                  f"{entry['range'][0]:.2f}..{entry['range'][1]:.2f}) -> {entry['file']}", flush=True)
        manifest = {"format": MANIFEST_FORMAT, "config": cfg.SOURCE, "model_type": cfg.MODEL.TYPE,
                    "model_name": cfg.MODEL.NAME,
                    "checkpoint": os.path.abspath(args.resume) if args.resume else None,
                    "seed": None if args.resume else args.seed, "num_layers": len(entries), "layers": entries}
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    mib = sum(np.prod(e["shape"]) * 4 for e in entries) / 2**20
    print(f"saved {len(entries)} layers ({mib:.1f} MiB) and {MANIFEST} to {args.out} in "
          f"{time.time() - start:.1f} s", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Reading (decompose_bias.py)
# ----------------------------------------------------------------------------------------------
def read_manifest(bias_dir: str) -> dict:
    """The manifest of a bias folder; :class:`UserError` naming the folder or file that is wrong."""
    manifest_path = os.path.join(bias_dir, MANIFEST)
    if not os.path.isdir(bias_dir):
        raise UserError(f"bias folder not found: {bias_dir}")
    if not os.path.isfile(manifest_path):
        raise UserError(f"{bias_dir} has no {MANIFEST}: give the folder scripts/save_bias.py wrote")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest_path} is corrupt (not JSON: {e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise UserError(f"{manifest_path} is not a save_bias.py manifest (format {MANIFEST_FORMAT})")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, not {MANIFEST_FORMAT!r} (an "
                        f"older save_bias.py, without file hashes): run scripts/save_bias.py again")
    if not manifest["layers"]:
        raise UserError(f"{manifest_path} lists no layers")
    return manifest


def read_layer(bias_dir: str, entry, expected_index: int) -> Tuple[dict, torch.Tensor]:
    """(entry, bias (H, N, N) float32) of one manifest entry after checking its file: present, the
    file the manifest recorded (sha256), readable, of the recorded shape, finite."""
    try:
        index, name, file_name = int(entry["index"]), str(entry["name"]), str(entry["file"])
        heads, n, sha256 = int(entry["heads"]), int(entry["N"]), str(entry["sha256"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{os.path.join(bias_dir, MANIFEST)}: layer entry {entry!r} lacks "
                        f"index/name/file/heads/N/sha256") from None
    if index != expected_index:
        raise UserError(f"{os.path.join(bias_dir, MANIFEST)}: layer {expected_index} is missing (found index {index})")
    path = os.path.join(bias_dir, os.path.basename(file_name))
    where = f"layer {index} ({name})"
    if not os.path.isfile(path):
        raise UserError(f"{where}: bias file {path} is missing")
    if file_sha256(path) != sha256:
        raise UserError(f"{where}: bias file {path} is not the one {MANIFEST} recorded (sha256 differs): it was "
                        f"changed or comes from another run; run scripts/save_bias.py again")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{where}: bias file {path} is corrupt ({e})") from None
    if array.shape != (heads, n, n):
        raise UserError(f"{where}: {path} holds shape {array.shape}, the manifest says {(heads, n, n)}")
    if array.dtype.kind != "f" or not np.isfinite(array).all():
        raise UserError(f"{where}: {path} is not a finite float array (dtype {array.dtype})")
    return entry, torch.from_numpy(array.astype(np.float32))


def read_bias_dir(bias_dir: str) -> Tuple[dict, List[Tuple[dict, torch.Tensor]]]:
    """(manifest, [(layer entry, bias (H, N, N) float32)]) of a folder this script wrote, every file
    checked against the manifest (:func:`read_layer`)."""
    manifest = read_manifest(bias_dir)
    return manifest, [read_layer(bias_dir, entry, i) for i, entry in enumerate(manifest["layers"])]


if __name__ == "__main__":
    run_main(main)
