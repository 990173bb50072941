"""FlashBias demo: the official SwinV2 attention math vs the FlashBias drop-in, on one batch.

    python scripts/demo.py                      # SwinV2-B/384 on a GPU (a small SwinV2 on the CPU),
                                                # seeded trained-like weights, a seeded smooth batch
    python scripts/demo.py --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \
        --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --data-path /data/imagenet
    python scripts/demo.py --tiny --device cpu  # a seconds-long check
    python scripts/demo.py --rank-rule logit:0.05 --rank-rule energy:0.995   # two low-rank rows

Runs the same input through the model in several modes: the official math (``fused_attn = False`` on
every attention), FlashBias with the exact bias, FlashBias with low-rank factors per ``--rank-rule``
(default logit:0.05: the smallest rank whose worst logit error is at most 0.05; energy:E is the
FlashBias paper's rule), and with ``--factors`` FlashBias with a factor file. On a GPU all run under
torch.autocast(float16), as the official main.py evaluates; on the CPU in float32. Prints ms/batch
(GPU: CUDA events, median after warm-up; CPU: wall clock, median), peak GPU memory, the logits'
relative L2 error against the official math and top-1 agreement (and top-1 accuracy with
--data-path, labels from the sorted class folders).
"""
import argparse
import copy
import os
import statistics
from typing import List, Optional, Tuple

import numpy as np
import torch

from swin_config import (UserError, add_model_args, model_from_args, rank_rule_option, rel_l2, run_main,
                         smooth_images, timed_call)
import flash_bias_factors as fbf  # noqa: E402  (swin_config puts the repository root on sys.path)
import flash_bias_runtime as runtime  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
DEFAULT_RULE = "logit:0.05"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, embedded_default="swinv2_b_384 on a GPU, small on the CPU")
    p.add_argument("--tiny", action="store_true", help="--embedded tiny (128 px, window 8): a quick check")
    p.add_argument("--data-path", help="ImageFolder-style tree (class folders of images; DIR/val is used if "
                                       "present, as main.py does)")
    p.add_argument("--batches", type=int, default=4, help="batches to run from --data-path (default 4)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32 on a GPU, 4 on the CPU, 2 with --tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--rank-rule", action="append", metavar="RULE",
                   help=f"a low-rank row: rank:R | energy:E (the FlashBias paper's rule) | logit:L; repeat for "
                        f"several rows (default {DEFAULT_RULE})")
    p.add_argument("--factors", help="a row with the factors of this folder/file (decompose_bias.py output)")
    p.add_argument("--iters", type=int, default=None, help="timed repeats per mode (default 10 GPU, 5 CPU)")
    args = p.parse_args(argv)
    args.rank_rule = args.rank_rule or [DEFAULT_RULE]
    if args.tiny:
        if args.embedded or args.cfg:
            p.error("--tiny means --embedded tiny: give one model")
        args.embedded = "tiny"
    if args.data_path and not args.resume:
        p.error("--data-path needs --resume CHECKPOINT.pth (real images need real weights)")
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
# Modes
# ----------------------------------------------------------------------------------------------
def low_rank_summary(model) -> str:
    """Which layers run on low-rank factors (flash_bias_summary): count, ranks, worst logit error."""
    layers = runtime.flash_bias_summary(model)
    low = [s for s in layers if s["mode"] == "low-rank"]
    if not low:
        return f"  no layer low-rank: all {len(layers)} keep the exact bias (no rank up to {fbf.MAX_RANK} met the rule)"
    ranks = [s["rank"] for s in low]
    errors = [s["max_logit_error"] for s in low if s["max_logit_error"] is not None]
    worst = f", worst max logit error {max(errors):.3f}" if errors else ""
    rest = (f"; the other {len(layers) - len(low)} keep the exact bias (no rank up to {fbf.MAX_RANK} met the rule)"
            if len(low) < len(layers) else "")
    return f"  low-rank factors in {len(low)} of {len(layers)} layers, ranks {min(ranks)}-{max(ranks)}{worst}{rest}"


def factor_file_model(model, path: str):
    """A copy of ``model`` running the factors at ``path``, checked before anything runs (the copy
    keeps the other rows on their own settings)."""
    copied = copy.deepcopy(model)
    copied.set_flash_bias(rank_rule="exact", factors_path=path, fused=True)
    try:
        summary = low_rank_summary(copied)
    except (ValueError, OSError) as e:   # FactorFileError is a ValueError naming the file and the layer
        raise UserError(f"--factors {path}: {e}") from None
    print(f"factors from {path}:\n{summary}", flush=True)
    return copied


def plan_modes(args, model) -> List[Tuple[str, torch.nn.Module, Optional[dict]]]:
    """[(label, model, set_flash_bias arguments or None for a model already set)] in the order they run."""
    modes = [("official math (fused_attn off)", model, {"factors_path": False, "fused": False}),
             ("FlashBias, exact bias", model, {"rank_rule": "exact", "factors_path": False, "fused": True})]
    modes += [(f"FlashBias, low-rank {rule}", model, {"rank_rule": rule, "factors_path": False, "fused": True})
              for rule in args.rank_rule]
    if args.factors:
        modes.append(("FlashBias, low-rank factor file", factor_file_model(model, args.factors), None))
    return modes


def run_mode(model, batches, device, autocast, iters, warmup, label):
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
                out, ms = timed_call(lambda: forward(x), device)
                times.append(ms)
            logits.append(out.float().cpu())
            if len(batches) > 1:
                print(f"  {label}: batch {b + 1}/{len(batches)} {ms:.1f} ms", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return torch.cat(logits), statistics.median(times), peak


def input_batches(args, cfg, batch: int) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
    """([batches], labels or None): --data-path images with the official eval transform, else one seeded
    smooth random batch."""
    if not args.data_path:
        return [smooth_images(batch, cfg.DATA.IMG_SIZE, seed=args.seed + 1)], None
    img = cfg.DATA.IMG_SIZE
    samples, classes = list_image_folder(args.data_path)
    samples = samples[:batch * args.batches]
    crop = bool(cfg.TEST.CROP)
    print(f"data: {len(samples)} images of {len(classes)} classes from {args.data_path} "
          f"({'resize+center crop' if crop else 'resize'} to {img})", flush=True)
    batches = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        batches.append(torch.from_numpy(np.stack([load_image(p, img, crop) for p, _ in chunk])))
        print(f"  loaded batch {len(batches)}/{(len(samples) + batch - 1) // batch}", flush=True)
    return batches, torch.tensor([label for _, label in samples])


def print_table(rows, labels, on_gpu: bool) -> None:
    header = f"{'mode':<44} {'ms/batch':>9} {'peak MiB':>9} {'logit rel-L2':>13} {'top-1 agree':>12}"
    header += f" {'top-1 acc':>10}" if labels is not None else ""
    print()
    print(header)
    print("-" * len(header))
    for label, ms, peak, rel, agree, acc in rows:
        line = (f"{label:<44} {ms:>9.1f} {('%.0f' % peak) if peak is not None else 'n/a':>9} "
                f"{rel:>13.2e} {agree * 100:>11.1f}%")
        line += f" {acc * 100:>9.2f}%" if acc is not None else ""
        print(line)
    base = rows[0][1]
    speedups = ", ".join(f"{label.split(', ', 1)[1]} {base / ms:.2f}x" for label, ms, *_ in rows[1:])
    print(f"\nspeed-up vs official math: {speedups}"
          + ("" if on_gpu else "  (CPU: FlashBias runs its PyTorch reference, not the Triton kernel)"))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    on_gpu = device.type == "cuda"
    batch = args.batch or (2 if args.tiny else 32 if on_gpu else 4)
    iters = args.iters or (10 if on_gpu else 5)
    for rule in args.rank_rule:
        rank_rule_option("--rank-rule", rule)
    cfg, model = model_from_args(args, default_embedded="swinv2_b_384" if on_gpu else "small")
    model = model.to(device)
    modes = plan_modes(args, model)
    batches, labels = input_batches(args, cfg, batch)
    if on_gpu:
        batches = [b.pin_memory() for b in batches]
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if on_gpu else ''}, batch {batch}, "
          f"{'float16 autocast' if on_gpu else 'float32'}, {len(batches)} batch(es)", flush=True)
    rows, reference = [], None
    for label, runner, settings in modes:
        if settings is not None:
            runner.set_flash_bias(**settings)
        print(f"running {label} ...", flush=True)
        logits, ms, peak = run_mode(runner, batches, device, on_gpu, iters, 3 if on_gpu else 2, label)
        reference = logits if reference is None else reference
        if "low-rank" in label:
            print(low_rank_summary(runner), flush=True)
        rel = rel_l2(logits, reference)
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        acc = (logits.argmax(-1) == labels).float().mean().item() if labels is not None else None
        rows.append((label, ms, peak, rel, agree, acc))
    print_table(rows, labels, on_gpu)
    return 0


if __name__ == "__main__":
    run_main(main)
