"""Shared test setup.

Without a GPU, the Triton kernel runs through Triton's interpreter. Triton decides this when a kernel
is defined, so TRITON_INTERPRET must be set before anything imports triton: here, before any test
module is collected. It changes nothing else: flash_bias_attention's "auto" backend still takes the
PyTorch path on the CPU; tests ask for the kernel with backend="triton" (or FLASHBIAS_BACKEND=triton).

FLASHBIAS_TEST_DEPENDENT_LAUNCH=1 runs the session with flash_bias_triton.DEPENDENT_LAUNCH on (off by default), so
that the GPU suite can be run under both settings without editing the file (benchmarks/gpu_checks.sh
dependent_off, dependent_on).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def apply_test_settings(environ) -> None:
    """The session's settings from the environment (FLASHBIAS_TEST_DEPENDENT_LAUNCH)."""
    if environ.get("FLASHBIAS_TEST_DEPENDENT_LAUNCH") == "1":
        import flash_bias_triton
        flash_bias_triton.DEPENDENT_LAUNCH = True


apply_test_settings(os.environ)
