"""Shared test setup.

Without a GPU, the Triton kernel runs through Triton's interpreter. Triton decides this when a kernel
is defined, so TRITON_INTERPRET must be set before anything imports triton: here, before any test
module is collected. It changes nothing else: flash_bias_attention's "auto" backend still takes the
PyTorch path on the CPU; tests ask for the kernel with backend="triton" (or FLASHBIAS_BACKEND=triton).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
