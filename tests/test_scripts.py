"""End-to-end tests of scripts/: save_bias -> decompose_bias -> factors in the drop-in model, the
user-error paths (exit 2, no traceback), install.sh and demo.py. CPU only, a tiny SwinV2 (128 px,
window 8, N = 64), an official-style yaml with a _BASE_ file, checkpoints of trained-like weights."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import swin_config  # noqa: E402
import decompose_bias  # noqa: E402
import save_bias  # noqa: E402
from flash_bias_triton import flash_bias_attention, logit_error  # noqa: E402

dropin = swin_config.import_dropin()

BASE_YAML = """\
MODEL:
  TYPE: swinv2
  NAME: test_base
  DROP_PATH_RATE: 0.2
  SWINV2:
    EMBED_DIM: 24
    DEPTHS: [ 2, 2, 2, 2 ]
    NUM_HEADS: [ 1, 2, 4, 8 ]
    WINDOW_SIZE: 7
TRAIN:
  EPOCHS: 30
  WEIGHT_DECAY: 1e-8
"""
CHILD_YAML = """\
_BASE_: base/base.yaml
DATA:
  IMG_SIZE: 128
MODEL:
  NAME: test_child
  NUM_CLASSES: 10
  SWINV2:
    WINDOW_SIZE: 8
    PRETRAINED_WINDOW_SIZES: [ 4, 4, 4, 2 ]
TEST:
  CROP: False
"""


def run_script(name, *args, cwd=None, expect=0):
    """Run scripts/<name> on the CPU; returns (stdout, stderr); asserts the exit status."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHBIAS_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    cmd = (["bash", os.path.join(SCRIPTS, name)] if name.endswith(".sh")
           else [sys.executable, os.path.join(SCRIPTS, name)]) + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    if expect == 2:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, proc.stderr


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "epoch": 3}, path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A config (child yaml with a _BASE_), two checkpoints of it (seeds 0 and 1), one of another
    model, and the pipeline run once: save_bias, decompose (energy rule, from the bias folder) and
    decompose (max-logit-error rule and rank 2, from --cfg/--resume)."""
    tmp = tmp_path_factory.mktemp("scripts")
    (tmp / "configs" / "base").mkdir(parents=True)
    (tmp / "configs" / "base" / "base.yaml").write_text(BASE_YAML)
    cfg_path = tmp / "configs" / "child.yaml"
    cfg_path.write_text(CHILD_YAML)
    cfg = swin_config.load_config(str(cfg_path))
    ckpts = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = swin_config.trained_like_(swin_config.build_model(cfg), seed)
        ckpts[seed] = tmp / f"ckpt_seed{seed}.pth"
        save_checkpoint(model, ckpts[seed])
    other = tmp / "other_model.pth"
    other_cfg = cfg.clone()
    other_cfg.defrost()
    other_cfg.MODEL.SWINV2.EMBED_DIM = 32                # a SwinV2 of another width
    torch.manual_seed(0)
    save_checkpoint(swin_config.build_model(other_cfg), other)
    return {"tmp": tmp, "cfg": cfg_path, "ckpt": ckpts[0], "ckpt_other_weights": ckpts[1],
            "ckpt_other_model": other}


@pytest.fixture(scope="module")
def pipeline(work):
    tmp = work["tmp"]
    out = {}
    out["save_stdout"], _ = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt"],
                                       "--out", tmp / "bias")
    out["energy_stdout"], _ = run_script("decompose_bias.py", "--bias-dir", tmp / "bias", "--energy", 0.995,
                                         "--out", tmp / "fac_energy")
    out["logit_stdout"], _ = run_script("decompose_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt"],
                                        "--max-logit-error", 0.05, "--seed-format", "--no-figure",
                                        "--out", tmp / "fac_logit")
    # rank 2 through the bias folder + model check (names and checksums must agree)
    out["rank_stdout"], _ = run_script("decompose_bias.py", "--bias-dir", tmp / "bias", "--cfg", work["cfg"],
                                       "--resume", work["ckpt"], "--rank", 2, "--no-figure", "--no-compare",
                                       "--out", tmp / "fac_rank2")
    return out


def load_model(work, ckpt=None):
    """The drop-in model from the test config and a checkpoint, set to the exact bias (no factor files
    from ./decomposed_bias or the environment)."""
    _, model = swin_config.build_from_args(str(work["cfg"]), str(ckpt or work["ckpt"]), verbose=False)
    model.set_flash_bias(rank_rule="exact", factors_path=False)
    return model


def factor_meta(folder):
    with np.load(os.path.join(folder, "bias_factors.npz"), allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


# ----------------------------------------------------------------------------------------------
def test_config_base_resolution(work, tmp_path):
    cfg = swin_config.load_config(str(work["cfg"]))
    s = cfg.MODEL.SWINV2
    assert (cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.NAME) == (128, 10, "test_child")
    assert (s.EMBED_DIM, list(s.DEPTHS), list(s.NUM_HEADS), s.WINDOW_SIZE) == (24, [2, 2, 2, 2], [1, 2, 4, 8], 8)
    assert cfg.MODEL.DROP_PATH_RATE == 0.2 and list(s.PRETRAINED_WINDOW_SIZES) == [4, 4, 4, 2]
    assert s.MLP_RATIO == 4.0 and s.PATCH_SIZE == 4  # official defaults
    # the official style: BASE: [''] / a list
    (tmp_path / "official.yaml").write_text("BASE: ['']\nMODEL:\n  TYPE: swinv2\n")
    (tmp_path / "child.yaml").write_text("BASE: ['official.yaml']\nDATA:\n  IMG_SIZE: 256\n")
    cfg = swin_config.load_config(str(tmp_path / "child.yaml"))
    assert cfg.DATA.IMG_SIZE == 256 and cfg.MODEL.SWINV2.WINDOW_SIZE == 7 and cfg.MODEL.NUM_CLASSES == 1000
    (tmp_path / "in22k.yaml").write_text("DATA:\n  DATASET: imagenet22K\nMODEL:\n  TYPE: swinv2\n")
    assert swin_config.load_config(str(tmp_path / "in22k.yaml")).MODEL.NUM_CLASSES == 21841
    (tmp_path / "bad.yaml").write_text("_BASE_: nowhere.yaml\n")
    with pytest.raises(swin_config.UserError, match="nowhere.yaml"):
        swin_config.load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "swin1.yaml").write_text("MODEL:\n  TYPE: swin\n")
    with pytest.raises(swin_config.UserError, match="SwinV2"):
        swin_config.load_config(str(tmp_path / "swin1.yaml"))


def test_save_bias_manifest(work, pipeline):
    folder = work["tmp"] / "bias"
    manifest = json.loads((folder / "manifest.json").read_text())
    model = load_model(work)
    layers = dropin.window_attention_layers(model)
    assert manifest["num_layers"] == len(layers) == 8
    assert "[8/8]" in pipeline["save_stdout"]
    for entry, (name, attn) in zip(manifest["layers"], layers):
        assert entry["name"] == name and entry["checksum"] == dropin.cpb_checksum(attn)
        bias = np.load(folder / entry["file"], allow_pickle=False)
        assert bias.shape == (entry["heads"], entry["N"], entry["N"]) and bias.dtype == np.float32
        assert np.allclose(bias, attn.derive_bias().numpy(), atol=1e-6)
    assert manifest["layers"][0]["N"] == 64 and manifest["layers"][-1]["N"] == 16  # last stage: window 4


def test_decompose_outputs_and_report(work, pipeline):
    fac = work["tmp"] / "fac_energy"
    assert (fac / "spectra.png").stat().st_size > 10_000
    report = (fac / "report.md").read_text()
    assert "uncentered: rank (same rule)" in report and report.count("layers.") == 8
    assert "[8/8]" in pipeline["energy_stdout"]
    meta = factor_meta(fac)
    assert meta["centered"] and meta["rule"] == "energy 0.995" and all(r for r in meta["ranks"])
    # the seed naming: one pair per layer, (H, N, R)
    logit_meta = factor_meta(work["tmp"] / "fac_logit")
    for i, rank in enumerate(logit_meta["ranks"]):
        if rank:
            q = np.load(work["tmp"] / "fac_logit" / f"swin_v2_B_q_bias_{i}.npy", allow_pickle=False)
            assert q.shape[2] == rank
    assert max(logit_meta["max_logit_error"]) <= 0.05
    assert factor_meta(work["tmp"] / "fac_rank2")["ranks"] == [2] * 8
    assert "not measured (--no-compare)" in (work["tmp"] / "fac_rank2" / "report.md").read_text()


def test_factors_load_and_error_matches_report(work, pipeline):
    """Per layer, the loaded factors' logit error is the reported one, and attention outputs move by
    no more than that error allows: |softmax change|_1 <= exp(2 * max error) - 1."""
    model = load_model(work)
    layers = dropin.window_attention_layers(model)
    for folder in ("fac_logit", "fac_rank2"):
        meta = factor_meta(work["tmp"] / folder)
        loaded = dropin.load_bias_factors(model, str(work["tmp"] / folder))
        assert sorted(loaded) == [i for i, r in enumerate(meta["ranks"]) if r]
        gen = torch.Generator().manual_seed(0)
        for i, (q_bias, k_bias) in loaded.items():
            attn = layers[i][1]
            bias = attn.derive_bias()
            max_err, mean_err = logit_error(bias, q_bias @ k_bias.transpose(1, 2))
            assert max_err == pytest.approx(meta["max_logit_error"][i], rel=1e-3, abs=1e-5)
            H, N = bias.shape[:2]
            qkv = torch.randn(3, N, 3 * 8 * H, generator=gen)
            exact = flash_bias_attention(qkv, H, attn.logit_scale.detach(), bias=bias, backend="torch")
            approx = flash_bias_attention(qkv, H, attn.logit_scale.detach(), bias_factors=(q_bias, k_bias),
                                          backend="torch")
            v_max = qkv[..., 2 * 8 * H:].abs().max()
            assert (exact - approx).abs().max() <= (np.exp(2 * max_err) - 1) * v_max + 1e-5


def test_model_output_low_rank_vs_exact(work, pipeline):
    x = swin_config.smooth_images(2, 128, seed=3)
    with torch.no_grad():
        exact = load_model(work)(x)
        diffs = {}
        for folder in ("fac_logit", "fac_rank2"):
            model = load_model(work)
            dropin.load_bias_factors(model, str(work["tmp"] / folder))
            diffs[folder] = ((model(x) - exact).norm() / exact.norm()).item()
    assert diffs["fac_rank2"] > 1e-3                      # rank 2 is clearly not exact
    assert diffs["fac_logit"] < diffs["fac_rank2"] / 3   # a 0.05-logit bound is much closer
    assert diffs["fac_logit"] < 0.05


def test_factors_of_another_checkpoint_rejected(work, pipeline, tmp_path):
    model = load_model(work, work["ckpt_other_weights"])
    with pytest.raises(ValueError, match=r"layer 0|layers\.0\.blocks\.0\.attn"):
        dropin.load_bias_factors(model, str(work["tmp"] / "fac_energy"))
    # a bias folder of checkpoint 0 against checkpoint 1
    with pytest.raises(swin_config.UserError, match=r"layer 0 \(layers\.0\.blocks\.0\.attn\).*another checkpoint"):
        decompose_bias.main(["--bias-dir", str(work["tmp"] / "bias"), "--cfg", str(work["cfg"]),
                             "--resume", str(work["ckpt_other_weights"]), "--out", str(tmp_path / "x")])


def test_corrupt_and_missing_files(work, pipeline, tmp_path):
    import shutil
    bias = tmp_path / "bias"
    shutil.copytree(work["tmp"] / "bias", bias)
    out = str(tmp_path / "out")
    (bias / "swin_v2_bias_3.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*corrupt"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    (bias / "swin_v2_bias_3.npy").unlink()
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*missing"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    np.save(bias / "swin_v2_bias_3.npy", np.zeros((2, 64, 63), np.float32))
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*shape"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    (bias / "manifest.json").write_text("{not json")
    with pytest.raises(swin_config.UserError, match="corrupt"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    with pytest.raises(swin_config.UserError, match="no manifest.json"):
        decompose_bias.main(["--bias-dir", str(tmp_path), "--out", out])
    # checkpoints: missing, corrupt
    with pytest.raises(swin_config.UserError, match="not found"):
        save_bias.main(["--cfg", str(work["cfg"]), "--resume", str(tmp_path / "nope.pth"), "--out", out])
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(swin_config.UserError, match="cannot read checkpoint"):
        save_bias.main(["--cfg", str(work["cfg"]), "--resume", str(tmp_path / "corrupt.pth"), "--out", out])
    # a corrupt factor file
    (tmp_path / "fac").mkdir()
    (tmp_path / "fac" / "bias_factors.npz").write_bytes(b"garbage")
    import demo
    with pytest.raises(swin_config.UserError, match="corrupt"):
        demo.main(["--cfg", str(work["cfg"]), "--resume", str(work["ckpt"]), "--factors", str(tmp_path / "fac")])
    with pytest.raises(swin_config.UserError, match="no factor files"):
        demo.main(["--cfg", str(work["cfg"]), "--resume", str(work["ckpt"]), "--factors", str(tmp_path / "none")])


def test_cli_user_errors_exit_2(work, pipeline, tmp_path):
    _, err = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt_other_model"],
                        "--out", tmp_path / "b", expect=2)
    assert "checkpoint of another model" in err and "layers." in err
    _, err = run_script("decompose_bias.py", "--bias-dir", tmp_path / "missing", expect=2)
    assert "not found" in err
    # demo: factors of another checkpoint, caught before anything runs
    _, err = run_script("demo.py", "--cfg", work["cfg"], "--resume", work["ckpt_other_weights"],
                        "--factors", work["tmp"] / "fac_energy", expect=2)
    assert "layer" in err and "layers.0.blocks.0.attn" in err


def test_install_sh(tmp_path):
    checkout = tmp_path / "Swin-Transformer"
    (checkout / "models").mkdir(parents=True)
    (checkout / "models" / "swin_transformer_v2.py").write_text("# official\n")
    (checkout / "main.py").write_text("")
    (checkout / "config.py").write_text("")
    out, _ = run_script("install.sh", checkout)
    assert "backed up" in out and "copied flash_bias_triton.py" in out
    for name in ("swin_transformer_v2.py", "flash_bias_triton.py"):
        assert (checkout / "models" / name).read_bytes() == open(os.path.join(ROOT, name), "rb").read()
    assert (checkout / "models" / "swin_transformer_v2.py.orig").read_text() == "# official\n"
    out, _ = run_script("install.sh", checkout)  # again: the backup stays the official file
    assert "kept the existing backup" in out
    assert (checkout / "models" / "swin_transformer_v2.py.orig").read_text() == "# official\n"
    not_checkout = tmp_path / "elsewhere"
    (not_checkout / "models").mkdir(parents=True)
    _, err = run_script("install.sh", not_checkout, expect=2)
    assert "not a microsoft/Swin-Transformer checkout" in err and "main.py" in err
    assert not (not_checkout / "models" / "flash_bias_triton.py").exists()
    run_script("install.sh", tmp_path / "no_such_dir", expect=2)


def test_demo_tiny_cpu(work, pipeline):
    out, _ = run_script("demo.py", "--tiny", "--batch", 1, "--iters", 1, "--device", "cpu")
    lines = out.splitlines()
    assert any(l.startswith("mode") and "ms/batch" in l and "logit rel-L2" in l for l in lines)
    rows = [l for l in lines if l.startswith(("official math", "FlashBias,"))]
    assert len(rows) == 3
    assert "0.00e+00" in rows[0] and "100.0%" in rows[0]


def test_demo_real_weights_and_images(work, pipeline, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("class_a", "class_b"):
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        for k in range(2):
            PIL.fromarray(rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "val" / c / f"{k}.jpg")
    out, _ = run_script("demo.py", "--cfg", work["cfg"], "--resume", work["ckpt"], "--data-path",
                        tmp_path / "data", "--batch", 2, "--batches", 2, "--factors", work["tmp"] / "fac_logit")
    assert "4 images of 2 classes" in out and "top-1 acc" in out and "low-rank factor file" in out
