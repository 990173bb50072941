"""scripts/benchmark.py on the CPU: the tiny config end to end (markdown, JSON, plot, profile), user errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def run_benchmark(*args, expect=0):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHBIAS_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, SCRIPT] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    stdout, _ = run_benchmark("--tiny", "--out-dir", out, "--profile", "--iters", 3, "--warmup", 1,
                              "--rules", "logit:0.05,energy:0.995")
    return out, stdout


def test_outputs_and_rows(tiny_run):
    out, stdout = tiny_run
    md, js = out / "model_cpu.md", out / "model_cpu.json"
    assert md.is_file() and js.is_file()
    data = json.loads(js.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    expected = ["official math", "timm SwinTransformerV2", "FlashBias exact", "FlashBias low-rank logit:0.05",
                "FlashBias low-rank energy:0.995"]
    assert list(rows) == expected
    for r in data["rows"]:
        assert r["precision"] == "fp32" and r["batch"] == 2
        if r["method"] == "timm SwinTransformerV2" and r["status"].startswith("skipped"):
            continue  # a timm that cannot build it: reported, not fatal
        assert r["status"] == "ok", r
        assert len(r["ms"]) == 3 and r["ms_median"] > 0 and r["images_per_s"] > 0 and r["finite"]
        assert r["top1"] is not None and r["rel_l2"] is not None
    official, exact = rows["official math"], rows["FlashBias exact"]
    assert official["rel_l2"] == 0.0 and official["speedup"] == pytest.approx(1.0)
    # the CPU path of FlashBias exact is the official math up to float32 rounding
    assert exact["rel_l2"] < 1e-5 and exact["rel_l2_fp32"] < 1e-5
    assert exact["top1"] == 1.0
    assert exact["ranks"].startswith("all ") and "exact" in exact["ranks"]
    if rows["timm SwinTransformerV2"]["status"] == "ok":
        assert rows["timm SwinTransformerV2"]["rel_l2"] < 1e-5
        assert rows["timm SwinTransformerV2"]["top1"] == 1.0
    low = rows["FlashBias low-rank logit:0.05"]
    assert "low-rank" in low["ranks"] and low["rel_l2"] < 0.1
    assert data["meta"]["command"].startswith("scripts/benchmark.py") and "--tiny" in data["meta"]["command"]
    assert data["meta"]["torch"] and data["meta"]["triton"]

    text = md.read_text()
    assert "| Model | Precision | Method | ms / batch | Speed-up vs official | Peak GB |" in text
    for method in expected:
        assert f"| {method} |" in text
    exact_line = next(line for line in text.splitlines() if "| FlashBias exact |" in line)
    assert "| 100.0% |" in exact_line
    assert "scripts/benchmark.py --tiny" in text

    # the live table and the profile
    assert "FlashBias exact" in stdout and "official math" in stdout
    assert "profile: FlashBias exact, 3 batches" in stdout and "aten::" in stdout
    assert data["profile"] and "Top CPU ops of FlashBias exact" in text


def test_plot(tiny_run):
    out, stdout = tiny_run
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in stdout
        return
    png = out / "model_cpu.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_user_errors_exit_2(tmp_path):
    _, stderr = run_benchmark("--tiny", "--out-dir", tmp_path, "--rules", "bogus:1", expect=2)
    assert stderr.startswith("error:") and "Traceback" not in stderr
    _, stderr = run_benchmark("--tiny", "--out-dir", tmp_path, "--iters", 0, expect=2)
    assert "Traceback" not in stderr


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profiler_time_attribute_names():
    bench = _load_script()

    class New:  # torch >= 2.4: device_time_total
        device_time_total = 5.0
        cpu_time_total = 1.0

    class Old:  # older torch: cuda_time_total only
        cuda_time_total = 7.0

    class Deprecated:  # an attribute that raises on access falls through to the other name
        @property
        def device_time_total(self):
            raise AttributeError("gone")
        cuda_time_total = 3.0

    assert bench._evt_time(New(), "cuda") == 5.0
    assert bench._evt_time(Old(), "cuda") == 7.0
    assert bench._evt_time(Deprecated(), "cuda") == 3.0
    assert bench._evt_time(New(), "cpu") == 1.0
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
