"""Export of patched timm / transformers models (flash_bias_adapters) and of the drop-in (swin_transformer_v2.py):
torch.export.export and torch.onnx.export record the library's (or the official) math, never a FlashBias op, and the
ONNX graph runs in onnxruntime on the CPU and matches eager within 1e-4. CPU models.

Without a GPU each model is asked for the Triton kernel (backend "triton", through TRITON_INTERPRET=1) and has run
eagerly once (caches warm), so only the exporting switch keeps the kernel out of the graph; test_*_without_the_switch
show that the graph would hold the kernel's op (or the export would fail) without it. On a GPU machine the CPU
models run the PyTorch path ("auto"; the interpreter is off there) and those two tests skip."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
pytest.importorskip("timm")

import bench_adapters as ba  # noqa: E402
import flash_bias_adapters as fa  # noqa: E402
import model_utils as mu  # noqa: E402
from swin_config import rel_l2  # noqa: E402

TOLERANCE = 1e-4
BACKEND = None if torch.cuda.is_available() else "triton"  # the kernel on CPU tensors needs the interpreter
needs_interpreter = pytest.mark.skipif(BACKEND is None, reason="the kernel on CPU tensors: only without a GPU")


class Logits(torch.nn.Module):
    """transformers' model output -> its logits tensor (what an exported classifier returns)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def patched_timm():
    model = ba.build_timm(ba.TIMM_TINY).requires_grad_(False)
    return fa.patch_timm(model, backend=BACKEND), torch.randn(2, 3, 64, 64)


def patched_transformers():
    pytest.importorskip("transformers")
    model = ba.build_transformers(ba.HF_CONFIGS["tiny"]).requires_grad_(False)
    # 80 px: the padded, shifted path
    return Logits(fa.patch_transformers(model, backend=BACKEND)), torch.randn(2, 3, 80, 80)


def dropin(monkeypatch, tmp_path):
    for name in ("FLASHBIAS_RANK", "FLASHBIAS_FACTORS_DIR"):  # the exact bias, no factor files
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./decomposed_bias
    if BACKEND is not None:
        monkeypatch.setenv("FLASHBIAS_BACKEND", BACKEND)
    return mu.make_model(mu.MINI).requires_grad_(False), mu.images(2, 32)


MODELS = {"timm": lambda mp, tmp: patched_timm(), "transformers": lambda mp, tmp: patched_transformers(),
          "drop-in": dropin}


def eager(model, x):
    with torch.no_grad():
        return model(x)


def flash_bias_ops(program) -> list:
    return [str(n.target) for n in program.graph.nodes if "flash_bias" in str(n.target)]


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_records_the_librarys_math(name, monkeypatch, tmp_path):
    model, x = MODELS[name](monkeypatch, tmp_path)
    expected = eager(model, x)  # the kernel, eagerly
    program = torch.export.export(model, (x,))
    assert flash_bias_ops(program) == []
    assert rel_l2(program.module()(x), expected) < TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime(name, monkeypatch, tmp_path):
    pytest.importorskip("onnxscript")  # torch.onnx.export's (dynamo) exporter
    ort = pytest.importorskip("onnxruntime")
    model, x = MODELS[name](monkeypatch, tmp_path)
    expected = eager(model, x)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert rel_l2(torch.from_numpy(out), expected) < TOLERANCE


@needs_interpreter
def test_adapters_without_the_switch(monkeypatch):
    """What the switch prevents: with the caches warm the export would record the kernel's op (or fail in it)."""
    model, x = patched_timm()
    eager(model, x)
    monkeypatch.setattr(fa, "tracing_or_exporting", lambda: False)
    try:
        program = torch.export.export(model, (x,))
    except Exception:  # failing inside the kernel is as good a proof
        return
    assert flash_bias_ops(program)


@needs_interpreter
def test_dropin_without_the_switch(monkeypatch, tmp_path):
    swin = mu.swin
    if not hasattr(swin, "tracing_or_exporting"):
        pytest.fail("swin_transformer_v2.py has no exporting switch: WindowAttention.use_fused_attn must return "
                    "False while torch.jit / torch.export / torch.onnx trace (flash_bias_triton.tracing_or_exporting)")
    model, x = dropin(monkeypatch, tmp_path)
    eager(model, x)
    monkeypatch.setattr(swin, "tracing_or_exporting", lambda: False)
    try:
        program = torch.export.export(model, (x,))
    except Exception:
        return
    assert flash_bias_ops(program)


def test_jit_trace_records_the_librarys_math():
    model, x = patched_timm()
    expected = eager(model, x)
    traced = torch.jit.trace(model, (x,), check_trace=False)
    assert "flash_bias" not in str(traced.inlined_graph)
    assert rel_l2(traced(x), expected) < TOLERANCE
