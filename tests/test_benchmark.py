"""The benchmarks on the CPU: benchmarks/bench_model.py end to end on the tests' small config (markdown, JSON,
plot, profile), its user errors, benchmarks/bench_attention.py (every variant runs), bench_batch_sweep.py end to end,
and the other scripts' user errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_model.py")
ATTENTION_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_attention.py")


def run_benchmark(*args, expect=0, script=SCRIPT):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHBIAS_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, script] + [str(a) for a in args]
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
    assert data["meta"]["command"].startswith("benchmarks/bench_model.py") and "--tiny" in data["meta"]["command"]
    assert list(data["meta"]["models"]) == ["test_tiny"] and {r["model"] for r in data["rows"]} == {"test-tiny-64 w8"}
    assert data["meta"]["torch"] and data["meta"]["triton"]

    text = md.read_text()
    assert "| Model | Precision | Method | ms / batch | Speed-up vs official | Peak GB |" in text
    for method in expected:
        assert f"| {method} |" in text
    exact_line = next(line for line in text.splitlines() if "| FlashBias exact |" in line)
    assert "| 100.0% |" in exact_line
    assert "benchmarks/bench_model.py --tiny" in text

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
    assert stderr.startswith("error: --rules bogus:1: FlashBias: bad rank rule 'bogus:1'") and "Traceback" not in stderr
    _, stderr = run_benchmark("--tiny", "--out-dir", tmp_path, "--iters", 0, expect=2)
    assert stderr.startswith("error: --warmup, --iters and --batch must be >= 1") and "Traceback" not in stderr


def test_bench_block_tail_user_errors_exit_2():
    """It needs CUDA, and says so; a malformed --configs is named."""
    script = os.path.join(ROOT, "benchmarks", "bench_block_tail.py")
    _, stderr = run_benchmark("--configs", "128x64x8x2", "--no-model", expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    for bad in ("128xa", "128x64"):
        _, stderr = run_benchmark("--configs", bad, expect=2, script=script)
        assert stderr.startswith(f"error: --configs: '{bad}' is not a comma list") and "Traceback" not in stderr


def test_bench_stage_one_fusions_user_errors_exit_2():
    """It needs CUDA, and says so; a malformed --embed-configs or --tail-configs is named with its fields."""
    script = os.path.join(ROOT, "benchmarks", "bench_stage_one_fusions.py")
    _, stderr = run_benchmark(expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    for option, bad, fields in (("--embed-configs", "64", "BLOCK_MxWARPS"),
                                ("--tail-configs", "64x4", "BLOCK_MxBLOCK_HxWARPSxSTAGES")):
        _, stderr = run_benchmark(option, bad, expect=2, script=script)
        assert stderr.startswith(f"error: {option}: '{bad}' is not a comma list of {fields}")
        assert "Traceback" not in stderr


def test_bench_compile_gap_user_errors_exit_2():
    """It needs CUDA, and says so; an unknown --modes entry is named with the known ones."""
    script = os.path.join(ROOT, "benchmarks", "bench_compile_gap.py")
    _, stderr = run_benchmark("--modes", "default", expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    _, stderr = run_benchmark("--modes", "default,max-autotune", expect=2, script=script)
    assert stderr.startswith("error: --modes: 'default,max-autotune' is not a comma list of default, "
                             "reduce-overhead, freezing") and "Traceback" not in stderr


def test_bench_attention_cpu(tmp_path):
    """Every variant runs on the CPU (float32 inputs; a float16 mask once failed the SDPA row) and agrees
    with the reference; the markdown table has them all."""
    stdout, _ = run_benchmark("--out", tmp_path / "attention.md", script=ATTENTION_SCRIPT)
    assert "FAILED" not in stdout
    rows = [line for line in (tmp_path / "attention.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    labels = [row.split(" | ")[0][2:] for row in rows]
    assert labels == ["official math", "SDPA, dense bias+mask as attn_mask",
                      "SDPA on [q,q_bias]/[k,k_bias], R=16, mask as one-hot columns",
                      "SDPA with no bias and no mask (wrong answer; the floor)",
                      "FlashBias exact, float32 bias (window layout)", "FlashBias exact, float16 bias (window layout)",
                      "FlashBias low-rank R=16 (window layout)",
                      "FlashBias exact, float32 bias, image layout (shift+partition inside)"]
    errors = {label: float(row.rsplit(" | ", 1)[1].strip(" |")) for label, row in zip(labels, rows)}
    for label in ("SDPA, dense bias+mask as attn_mask", "FlashBias exact, float32 bias (window layout)",
                  "FlashBias exact, float32 bias, image layout (shift+partition inside)"):
        assert errors[label] < 1e-5, (label, errors[label])
    assert errors["FlashBias low-rank R=16 (window layout)"] == pytest.approx(
        errors["SDPA on [q,q_bias]/[k,k_bias], R=16, mask as one-hot columns"], rel=1e-2)
    assert errors["SDPA with no bias and no mask (wrong answer; the floor)"] > 0.1


def _load_script(script=SCRIPT, name="benchmark_script"):
    """A benchmark script as a module (its folder on sys.path, for the helpers it imports from its neighbours)."""
    if os.path.dirname(script) not in sys.path:
        sys.path.insert(0, os.path.dirname(script))
    spec = importlib.util.spec_from_file_location(name, script)
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


def test_kernel_parts_groups_kernels_by_part():
    """Kernel names go to the first matching part (the backward before the forward), the rest to "other"."""
    bench = _load_script()

    class Kernel:
        def __init__(self, key, us, count=1):
            self.key, self.us, self.count = key, us, count
    kernels = [Kernel("_flash_bias_bwd", 30.0), Kernel("_flash_bias_fwd", 10.0, 2),
               Kernel("nvjet_sm90_hsh_192x192_64x4_1x2_h_bz_coopB_gelubias_TNN", 40.0, 4),
               Kernel("void at::native::vectorized_elementwise_kernel<8, float16_copy_kernel_cuda>", 15.0, 3),
               Kernel("some_new_kernel", 5.0)]
    parts = {part: (t, share, n) for part, t, share, n in bench.kernel_parts(kernels, lambda e: e.us)}
    assert parts == {"GEMM": (40.0, 0.4, 4), "attention backward": (30.0, 0.3, 1), "casts and copies": (15.0, 0.15, 3),
                     "attention": (10.0, 0.1, 2), "other": (5.0, 0.05, 1)}
    assert [part for part, *_ in bench.kernel_parts(kernels, lambda e: e.us)][:2] == ["GEMM", "attention backward"]


TRAINING_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_training.py")
CURVES_SCRIPT = os.path.join(ROOT, "benchmarks", "plot_train_curves.py")


def test_bench_training_cpu(tmp_path):
    """One training step of the test config, official and drop-in; the same loss from the same weights."""
    out = tmp_path / "training.md"
    stdout, _ = run_benchmark("--out", out, script=TRAINING_SCRIPT)
    row = json.loads((tmp_path / "training.json").read_text())["rows"][0]
    assert row["model"] == "test_mini" and row["official_ms"] > 0 and row["dropin_ms"] > 0
    assert abs(row["loss_official"] - row["loss_dropin"]) < 1e-4 and row["grad_worst_dropin"] < 1e-3
    assert "| test_mini | 2 |" in out.read_text()


def test_bench_training_profile_cpu():
    """--profile prints each step's time by part, the official step and the drop-in's."""
    stdout, _ = run_benchmark("--profile", script=TRAINING_SCRIPT)
    assert "profile of a training step, official math" in stdout and "profile of a training step, drop-in" in stdout
    assert stdout.count("| part | ms per call | share | kernels per call |") == 2


def _train_log(path, losses, s_per_step, peak):
    path.write_text(f"+ main.py ...\ntrain steps {len(losses)}  s/step (after 2 warm-up steps) mean {s_per_step}  "
                    f"peak mem {peak} MB\nlosses {' '.join(f'{v:.4f}' for v in losses)}\n")
    return path


def test_plot_train_curves(tmp_path):
    official = _train_log(tmp_path / "official.log", [0.70, 0.69, 0.68, 0.66], 0.2, 9000)
    close = _train_log(tmp_path / "close.log", [0.7001, 0.6895, 0.6812, 0.66], 0.1, 5000)
    stdout, _ = run_benchmark(official, close, "--out", tmp_path / "curves", script=CURVES_SCRIPT)
    assert "largest 0.0012" in stdout and "tolerance 0.02 met" in stdout
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert "| drop-in | 4 | 0.1000 | 5000 |" in (tmp_path / "curves.md").read_text()
    far = _train_log(tmp_path / "far.log", [0.70, 0.69, 0.75, 0.66], 0.1, 5000)
    stdout, _ = run_benchmark(official, far, "--out", tmp_path / "far", expect=1, script=CURVES_SCRIPT)
    assert "NOT met" in stdout
    _, stderr = run_benchmark(official, tmp_path / "missing.log", "--out", tmp_path / "x", expect=2,
                              script=CURVES_SCRIPT)
    assert stderr.startswith("error: cannot read")
    short = _train_log(tmp_path / "short.log", [0.70], 0.1, 5000)
    _, stderr = run_benchmark(official, short, "--out", tmp_path / "x", expect=2, script=CURVES_SCRIPT)
    assert "1 steps" in stderr


def test_bench_fc1_gemm_user_errors_exit_2():
    """It needs CUDA, and says so; a --seconds that is not positive is named first."""
    script = os.path.join(ROOT, "benchmarks", "bench_fc1_gemm.py")
    _, stderr = run_benchmark("--seconds", "1", expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    _, stderr = run_benchmark("--seconds", "0", expect=2, script=script)
    assert stderr.startswith("error: --seconds must be > 0; got 0.0") and "Traceback" not in stderr


SWEEP_SCRIPT = os.path.join(ROOT, "benchmarks", "bench_batch_sweep.py")


def test_bench_batch_sweep_cpu(tmp_path):
    """The sweep runs end to end on the CPU's test config with compile: every column, the graphs' bits equal eager's,
    the compiled logits near eager's, and the ratios (the graphs against themselves among them) are positive.
    A malformed --batches exits 2."""
    out = tmp_path / "sweep.md"
    run_benchmark("--compile", "test_mini", "--out", out, script=SWEEP_SCRIPT)
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("test_mini", 1), ("test_mini", 2)]
    for row in rows:
        assert row["graph_equals_eager"] is True and row["compile_default_rel_err"] < 1e-4
        for key in ("graph_vs_graph", "compile_default_vs_graph", "compile_reduce-overhead_vs_graph"):
            assert row[key] > 0, key
    assert "| graph_vs_graph | compile_default_vs_graph |" in out.read_text()
    _, stderr = run_benchmark("--batches", "1,x", expect=2, script=SWEEP_SCRIPT)
    assert stderr.startswith("error: --batches takes whole numbers") and "Traceback" not in stderr


def test_bench_profile_user_errors_and_matmul_tags():
    """bench_profile.py needs CUDA and says so; a bad --dtype or a V1 config is named. Its matmul ranges carry each
    call's shape and epilogue (checked on the CPU profiler around a small drop-in), and its report has a row for
    each."""
    script = os.path.join(ROOT, "benchmarks", "bench_profile.py")
    _, stderr = run_benchmark(expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    _, stderr = run_benchmark("--dtype", "fp32", expect=2, script=script)
    assert stderr.startswith("error: --dtype 'fp32': fp16 or bf16") and "Traceback" not in stderr
    _, stderr = run_benchmark("--embedded", "swin_t_224", expect=2, script=script)
    assert stderr.startswith("error: --embedded swin_t_224: a SwinV2 config") and "Traceback" not in stderr

    import torch
    from torch.profiler import ProfilerActivity, profile
    bench = _load_script(script, "bench_profile")
    fc = torch.nn.Linear(8, 12)
    with profile(activities=[ProfilerActivity.CPU]) as prof, bench._TagMatmuls():
        fc(torch.randn(2, 5, 8))
        torch._addmm_activation(fc.bias, torch.randn(3, 8), fc.weight.t(), use_gelu=True)
        torch.nn.functional.linear(input=torch.randn(4, 8), weight=fc.weight)   # as the drop-in's qkv matmul
    tags = sorted(e.name for e in prof.events() if e.name.startswith(bench.GEMM_TAG))
    assert tags == ["matmul 10 8 12 bias", "matmul 3 8 12 gelu+bias", "matmul 4 8 12 none"]
    gemms = {tags[0]: [20.0, 2], tags[1]: [9.0, 1]}
    lines = bench.report({("1", "GEMM"): 49.0, ("head", "other"): 1.0}, gemms, {tags[0]: 8.0, tags[1]: 9.0}, 0.01,
                         "test")
    assert "| (10, 8, 12) | bias | 2 | 10.0 |" in "\n".join(lines) and "| GEMM | 0.049 |" in "\n".join(lines)


def test_sdpa_peer_is_the_official_math(monkeypatch):
    """benchmarks/sdpa_peer.py, the peer bench_model --peers times, computes the official SwinV2 attention: in
    float64, with trained-like weights, shifted windows (the mask path) and unshifted ones, its logits equal the
    official math's; leaving the shift mask out (what a wrong window order would amount to) is caught; the patch is
    gone after the block."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests"))
    import torch
    from model_utils import make_model, swin
    from sdpa_peer import sdpa_attention, sdpa_window_attention

    model = make_model().double()
    model.set_flash_bias(factors_path=False, fused=False)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        official = model(x)
        with sdpa_attention(model, swin.WindowAttention):
            peer = model(x)
            assert all("forward" in vars(m) for m in model.modules() if isinstance(m, swin.WindowAttention))
        assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, swin.WindowAttention))
        assert ((peer - official).norm() / official.norm()).item() < 1e-12

        for m in model.modules():
            if isinstance(m, swin.WindowAttention):
                m.forward = lambda x, mask=None, m=m: sdpa_window_attention(m, x, None)
        wrong = model(x)
        for m in model.modules():
            if isinstance(m, swin.WindowAttention):
                del m.forward
        assert ((wrong - official).norm() / official.norm()).item() > 1e-3


def test_sdpa_peer_hands_sdpa_its_mask_in_the_compute_dtype(monkeypatch):
    """Under autocast the peer's attn_mask is in autocast's dtype and contiguous, in shifted and unshifted blocks:
    with a float32, strided mask SDPA ran at its math path's speed and memory on an H100 (benchmarks/sdpa_peer.py)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests"))
    import torch
    import sdpa_peer
    from model_utils import make_model, swin

    model = make_model()
    model.set_flash_bias(factors_path=False, fused=False)
    masks = []
    real = sdpa_peer.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        masks.append((attn_mask.dtype, attn_mask.is_contiguous()))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(sdpa_peer.F, "scaled_dot_product_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            sdpa_peer.sdpa_attention(model, swin.WindowAttention):
        model(torch.randn(2, 3, 64, 64))
    assert len(masks) == sum(isinstance(m, swin.WindowAttention) for m in model.modules())
    assert all(dtype == torch.bfloat16 and contiguous for dtype, contiguous in masks), masks


def test_peer_ratios_pair_flash_bias_with_the_compiled_peer():
    """The markdown's same-run ratio: the compiled SDPA peer's ms over FlashBias exact's, per model and precision,
    only where both ran."""
    bench = _load_script()

    def row(model, prec, method, ms, status="ok"):
        return {"model": model, "precision": prec, "method": method, "ms_median": ms, "status": status}
    rows = [row("B", "fp16", bench.SDPA_COMPILED, 41.0), row("B", "fp16", bench.EXACT, 25.0),
            row("B", "bf16", bench.EXACT, 24.0), row("B", "bf16", bench.SDPA_COMPILED, 0.0, "skipped: no compiler"),
            row("T", "fp16", bench.EXACT, 4.0)]
    assert bench.peer_ratios(rows) == ["- B, fp16: 41.00 / 25.00 ms = 1.64×"]


def test_bench_switches_user_errors_exit_2():
    """It needs CUDA, and says so; an unknown switch, model or dtype and a count below 1 are named."""
    script = os.path.join(ROOT, "benchmarks", "bench_switches.py")
    _, stderr = run_benchmark(expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    _, stderr = run_benchmark("--switches", "dependent_launch,graphs", expect=2, script=script)
    assert stderr.startswith("error: unknown or missing --switches ['graphs']; switches: dependent_launch, "
                             "input_in_place, refresh_beside") and "Traceback" not in stderr
    _, stderr = run_benchmark("--model", "b999", expect=2, script=script)
    assert stderr.startswith("error: unknown --model 'b999'; SwinV2 configs:") and "Traceback" not in stderr
    _, stderr = run_benchmark("--dtype", "fp8", expect=2, script=script)
    assert stderr.startswith("error: unknown --dtype 'fp8'; dtypes: fp16, bf16") and "Traceback" not in stderr
    _, stderr = run_benchmark("--iters", "0", expect=2, script=script)
    assert stderr.startswith("error: --batch, --rounds and --iters must be >= 1")


def test_bench_switches_settings_and_their_undoing():
    """All off, each switch alone, all on; a setting is undone after its block, also when it raises."""
    bench = _load_script(os.path.join(ROOT, "benchmarks", "bench_switches.py"), "bench_switches")
    assert bench.settings_of(["dependent_launch"]) == {bench.ALL_OFF: {"dependent_launch": False},
                                                       "dependent_launch": {"dependent_launch": True}}
    settings = bench.settings_of(["dependent_launch", "input_in_place"])
    assert list(settings) == [bench.ALL_OFF, "dependent_launch", "input_in_place", "all on"]
    assert settings["input_in_place"] == {"dependent_launch": False, "input_in_place": True}
    switches = [getattr(*place) for place in bench.SWITCHES.values()]
    with pytest.raises(RuntimeError, match="inside"):
        with bench.switched(bench.settings_of(list(bench.SWITCHES))["all on"]):
            assert all(getattr(*place) is True for place in bench.SWITCHES.values())
            raise RuntimeError("inside")
    assert [getattr(*place) for place in bench.SWITCHES.values()] == switches


def test_bench_probes_bias_gather_on_the_interpreter(monkeypatch):
    """bench_probes.py's bias-gather probe runs its launches (the real kernel, in Triton's interpreter on a CPU) on a
    small model: other warps, and the table whose sigmoid cpb_table took, give the per-element sigmoid's bits; the
    float16 tables may differ by a rounding. As a script it needs CUDA."""
    script = os.path.join(ROOT, "benchmarks", "bench_probes.py")
    _, stderr = run_benchmark(expect=2, script=script)
    assert stderr.startswith("error: this benchmark needs CUDA") and "Traceback" not in stderr
    pytest.importorskip("triton")
    import torch
    bench = _load_script(script, "bench_probes")
    monkeypatch.setattr(bench, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(bench, "median_ms", lambda fn: fn() is None or 1.0)
    cfg = bench.load_config(embedded="test_mini")
    model = bench.trained_like_(bench.build_model(cfg), 0).eval().requires_grad_(False)
    with torch.no_grad():
        rows = bench.bias_gather_rows(model)
    assert len(rows) == 9 * len(model.layers)
    bits = {row[1]: row[4] for row in rows if "warps" in row[1] or " table" in row[1]}
    assert bits["sigmoid per element, 8 warps"] == bits["gather of the sigmoid'd float32 table (committed)"] == "equal"
    assert len(bits) == 6 and all(b == "equal" or b.startswith("differ (max ") for b in bits.values())


def test_unknown_model_names_are_refused_also_for_the_cpu_smoke_test():
    """On a CPU the smoke test replaces --models with its tiny config; a misspelt name is still an error, not
    silently ignored."""
    bench = _load_script()
    with pytest.raises(bench.UserError, match=r"unknown or missing --models/--dtypes \['b385'\]"):
        bench.make_plan(bench.parse_args(["--models", "b385", "--tiny"]))
    assert bench.make_plan(bench.parse_args(["--models", "b384", "--tiny"])).models == [bench.CPU_MODEL]
