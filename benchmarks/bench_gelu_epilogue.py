#!/usr/bin/env python3
"""Can the MLP's GELU ride on the fc1 GEMM? cuBLASLt's GELU epilogue against the official fc1 + nn.GELU.

    python benchmarks/bench_gelu_epilogue.py [--out FILE.md]

At the SwinV2-B/384, batch 64 fc1 shapes of each stage (tokens x dim -> 4 dim, fp16), it times
``F.gelu(F.linear(x, w, b))`` (the official Mlp: two kernels) against ``torch._addmm_activation(b, x, w.t(),
use_gelu=True)`` (one cuBLASLt GEMM with a GELU epilogue, which uses the tanh approximation), and gives both
results' error against float32 with the exact erf GELU (relative L2 and largest absolute error). The epilogue is
usable only if its error is that of fp16 itself. Medians of 30 calls after 5 warm-ups, CUDA events; seeded
random inputs. Needs CUDA.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from swin_config import UserError, call_ms, run_main  # noqa: E402

# (tokens, dim, hidden) of fc1 per stage of SwinV2-B/384 at batch 64: 96x96, 48x48, 24x24, 12x12 tokens per image
FC1_SHAPES = ((589824, 128, 512), (147456, 256, 1024), (36864, 512, 2048), (9216, 1024, 4096))


def median_ms(fn, iters=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    return statistics.median(call_ms(fn, torch.device("cuda"), iters, sync_each=True))


def print_table(lines, path=None):
    """Print the markdown lines, and write them to path when one is given."""
    print("\n".join(lines))
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="markdown table to write")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs CUDA (cuBLASLt's epilogue)")
    torch.manual_seed(0)
    lines = [f"fc1 + GELU, fp16, {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             "| stage | tokens, dim, hidden | linear + gelu ms | epilogue ms | ratio | rel. L2 (official, epilogue) "
             "| max abs (official, epilogue) |", "|---|---|---:|---:|---:|---|---|"]
    for stage, (m, k, n) in enumerate(FC1_SHAPES, 1):
        x = torch.randn(m, k, device="cuda").half()
        w = (torch.randn(n, k, device="cuda") * k ** -0.5).half()
        b = (torch.randn(n, device="cuda") * 0.1).half()
        reference = F.gelu(F.linear(x.float(), w.float(), b.float()))
        official = F.gelu(F.linear(x, w, b))
        epilogue = torch._addmm_activation(b, x, w.t(), use_gelu=True)

        def errors(y):
            diff = y.float() - reference
            return (diff.norm() / reference.norm()).item(), diff.abs().max().item()
        (rel_o, max_o), (rel_e, max_e) = errors(official), errors(epilogue)
        t_official = median_ms(lambda: F.gelu(F.linear(x, w, b)))
        t_epilogue = median_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
        lines.append(f"| {stage} | {m}, {k}, {n} | {t_official:.3f} | {t_epilogue:.3f} | {t_official / t_epilogue:.2f} "
                     f"| {rel_o:.1e}, {rel_e:.1e} | {max_o:.1e}, {max_e:.1e} |")
        del x, w, b, reference, official, epilogue
    print_table(lines, args.out)
    return 0


if __name__ == "__main__":
    run_main(main)
