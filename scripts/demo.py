"""FlashBias demo: the official SwinV2 attention math vs the FlashBias drop-in, on one batch.

    python scripts/demo.py                      # SwinV2-B/384 on a GPU (a small SwinV2 on the CPU),
                                                # seeded trained-like weights, a seeded smooth batch
    python scripts/demo.py --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \
        --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --data-path /data/imagenet
    python scripts/demo.py --tiny --device cpu  # a seconds-long check

Runs the same input through the model three times: the official math (``fused_attn = False`` on every
attention), FlashBias with the exact bias, and FlashBias with low-rank factors (``--rank-rule``, or a
factor file with ``--factors``). On a GPU all run under torch.autocast(float16), as the official
main.py evaluates; on the CPU in float32. Prints ms/batch (GPU: CUDA events, median after warm-up;
CPU: wall clock, median), peak GPU memory, the logits' relative L2 error against the official math
and top-1 agreement (and top-1 accuracy with --data-path, labels from the sorted class folders).
"""
import argparse
import copy
import os
import zipfile
import statistics
import sys
import time

import numpy as np
import torch

from swin_config import UserError, build_from_args, import_dropin, run_main, smooth_images

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", help="official SwinV2 yaml config (with --resume)")
    p.add_argument("--resume", help="checkpoint of that model")
    p.add_argument("--data-path", help="ImageFolder-style tree (class folders of images; DIR/val is used if "
                                       "present, as main.py does)")
    p.add_argument("--batches", type=int, default=4, help="batches to run from --data-path (default 4)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32 on a GPU, 4 on the CPU, 2 with --tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="a tiny SwinV2 (128 px, window 8): a quick check")
    p.add_argument("--embedded", help="embedded config name: swinv2_b_384, small or tiny")
    p.add_argument("--rank-rule", default="energy:0.995",
                   help="low-rank row: rank:R | energy:E | logit:L (default energy:0.995, the seed's rule)")
    p.add_argument("--factors", help="low-rank row from this factor folder/file instead (decompose_bias.py output)")
    p.add_argument("--iters", type=int, default=None, help="timed repeats per mode (default 10 GPU, 3 CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.cfg and not args.resume:
        p.error("--cfg needs --resume CHECKPOINT.pth")
    if args.resume and not args.cfg:
        p.error("--resume needs --cfg CONFIG.yaml")
    if args.data_path and not args.cfg:
        p.error("--data-path needs --cfg and --resume (real images need real weights)")
    return args


# ----------------------------------------------------------------------------------------------
# Images: PIL + numpy, the official eval transform
# ----------------------------------------------------------------------------------------------
def list_image_folder(root: str):
    """[(path, label)] of an ImageFolder tree (labels = index of the sorted class folder), classes."""
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root} is not a folder")
    if os.path.isdir(os.path.join(root, "val")):
        root = os.path.join(root, "val")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = []
    for label, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise UserError(f"no images under {root}: expected class folders of images (ImageFolder layout)")
    return samples, classes


def load_image(path: str, img_size: int, crop: bool) -> np.ndarray:
    """(3, img_size, img_size) float32, normalised with the ImageNet mean/std. crop=True: resize the
    short side to img_size * 256/224 then centre-crop (official TEST.CROP); else resize straight."""
    try:
        from PIL import Image
    except ImportError:
        raise UserError("--data-path needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop:
                size = int(256 / 224 * img_size)
                w, h = im.size
                scale = size / min(w, h)
                im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - img_size) // 2, (h - img_size) // 2
                im = im.crop((left, top, left + img_size, top + img_size))
            else:
                im = im.resize((img_size, img_size), Image.BICUBIC)
            array = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return ((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).copy()


# ----------------------------------------------------------------------------------------------
# Modes and timing
# ----------------------------------------------------------------------------------------------
def set_mode(dropin, model, fused: bool, rule: str = "exact", factors_path=False):
    """fused=False: the official math everywhere; else FlashBias with ``rule``, or the factor files at
    ``factors_path`` (False: none, whatever ./decomposed_bias or $FLASHBIAS_FACTORS_DIR hold)."""
    if hasattr(model, "set_flash_bias"):
        model.set_flash_bias(rank_rule=rule, factors_path=factors_path, fused=fused)
        return
    for _, attn in dropin.window_attention_layers(model):  # a drop-in without set_flash_bias
        attn.fused_attn = fused
        attn.flash_bias_rank_rule = rule


def count_low_rank_layers(dropin, model):
    """(layers that run on low-rank factors, layers), from each layer's (cached) FlashBias operands."""
    layers = dropin.window_attention_layers(model)
    with torch.no_grad():
        return sum("bias_factors" in attn.flash_bias_operands() for _, attn in layers), len(layers)


class Timer:
    """Per-call ms: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3


def run_mode(model, batches, device, autocast, timer, iters, warmup, label):
    """(logits of every batch (float32 CPU), median ms per batch, peak MiB or None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    forward = lambda x: model(x)
    logits, times = [], []
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=autocast):
        for b, images in enumerate(batches):
            x = images.to(device, non_blocking=True)
            for _ in range(warmup if b == 0 else 0):
                forward(x)
            out = None
            for _ in range(iters if len(batches) == 1 else 1):
                out, ms = timer(lambda: forward(x))
                times.append(ms)
            logits.append(out.float().cpu())
            if len(batches) > 1:
                print(f"  {label}: batch {b + 1}/{len(batches)} {ms:.1f} ms", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return torch.cat(logits), statistics.median(times), peak


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    on_gpu = device.type == "cuda"
    embedded = "tiny" if args.tiny else (args.embedded or ("swinv2_b_384" if on_gpu else "small"))
    batch = args.batch or (2 if args.tiny else 32 if on_gpu else 4)
    iters = args.iters or (10 if on_gpu else 5)
    dropin = import_dropin()
    try:
        dropin.parse_rank_rule(args.rank_rule)
    except ValueError as e:
        raise UserError(f"--rank-rule: {e}") from None
    cfg, model = build_from_args(args.cfg, args.resume, embedded=embedded, seed=args.seed)
    model = model.to(device)
    img = cfg.DATA.IMG_SIZE
    lowrank_model = model
    if args.factors:  # validated before anything runs; a copy, so the exact rows keep the exact bias
        lowrank_model = copy.deepcopy(model)
        npz = args.factors if args.factors.endswith(".npz") else os.path.join(args.factors, "bias_factors.npz")
        if os.path.isfile(npz) and not zipfile.is_zipfile(npz):
            raise UserError(f"factor file {npz} is corrupt (not an .npz archive): write it again with "
                            f"scripts/decompose_bias.py")
        set_mode(dropin, lowrank_model, True, "exact", factors_path=args.factors)
        try:
            loaded = dropin.load_bias_factors(lowrank_model, args.factors)
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserError(f"factor file {args.factors}: {e}") from None
        print(f"factors: {len(loaded)} of {len(dropin.window_attention_layers(model))} layers low-rank from "
              f"{args.factors}", flush=True)

    labels = None
    if args.data_path:
        samples, classes = list_image_folder(args.data_path)
        samples = samples[:batch * args.batches]
        crop = bool(cfg.get("TEST", {}).get("CROP", True))
        print(f"data: {len(samples)} images of {len(classes)} classes from {args.data_path} "
              f"({'resize+center crop' if crop else 'resize'} to {img})", flush=True)
        batches = []
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            batches.append(torch.from_numpy(np.stack([load_image(p, img, crop) for p, _ in chunk])))
            print(f"  loaded batch {len(batches)}/{(len(samples) + batch - 1) // batch}", flush=True)
        labels = torch.tensor([label for _, label in samples])
    else:
        batches = [smooth_images(batch, img, seed=args.seed + 1)]
    if on_gpu:
        batches = [b.pin_memory() for b in batches]

    timer = Timer(device)
    warmup = 3 if on_gpu else 2
    modes = [("official math (fused_attn off)", False, "exact", False),
             ("FlashBias, exact bias", True, "exact", False),
             (f"FlashBias, low-rank {'factor file' if args.factors else args.rank_rule}", True, args.rank_rule,
              bool(args.factors))]
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if on_gpu else ''}, batch {batch}, "
          f"{'float16 autocast' if on_gpu else 'float32'}, {len(batches)} batch(es)", flush=True)
    rows, reference = [], None
    for label, fused, rule, from_file in modes:
        if not from_file:
            set_mode(dropin, model, fused, rule)
        print(f"running {label} ...", flush=True)
        try:
            logits, ms, peak = run_mode(lowrank_model if from_file else model, batches, device, on_gpu, timer,
                                        iters, warmup, label)
        except ValueError as e:  # e.g. an invalid rank rule, found when the factors are derived
            raise UserError(f"{label}: {e}") from None
        if reference is None:
            reference = logits
        if fused and rule != "exact" or from_file:
            counted = count_low_rank_layers(dropin, lowrank_model if from_file else model)
            if counted is not None:
                print(f"  low-rank factors in {counted[0]} of {counted[1]} layers (the others use the exact "
                      f"bias: no rank up to 128 met the rule)" if counted[0] < counted[1] else
                      f"  low-rank factors in all {counted[1]} layers", flush=True)
        rel = ((logits - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        acc = (logits.argmax(-1) == labels).float().mean().item() if labels is not None else None
        rows.append((label, ms, peak, rel, agree, acc))

    print()
    header = f"{'mode':<44} {'ms/batch':>9} {'peak MiB':>9} {'logit rel-L2':>13} {'top-1 agree':>12}"
    header += f" {'top-1 acc':>10}" if labels is not None else ""
    print(header)
    print("-" * len(header))
    for label, ms, peak, rel, agree, acc in rows:
        line = (f"{label:<44} {ms:>9.1f} {('%.0f' % peak) if peak is not None else 'n/a':>9} "
                f"{rel:>13.2e} {agree * 100:>11.1f}%")
        line += f" {acc * 100:>9.2f}%" if acc is not None else ""
        print(line)
    base = rows[0][1]
    print(f"\nspeed-up vs official math: exact {base / rows[1][1]:.2f}x, low-rank {base / rows[2][1]:.2f}x"
          + ("" if on_gpu else "  (CPU: FlashBias runs its PyTorch reference, not the Triton kernel)"))
    return 0


if __name__ == "__main__":
    run_main(main)
