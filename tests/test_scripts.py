"""End-to-end tests of scripts/: save_bias -> decompose_bias -> factors in the drop-in model, the
user-error paths (exit 2, no traceback) and demo.py. CPU only, a tiny SwinV2 (128 px, window 8,
N = 64), an official-style yaml with a _BASE_ file, checkpoints of trained-like weights."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import swin_config  # noqa: E402
import decompose_bias  # noqa: E402
import demo  # noqa: E402
import save_bias  # noqa: E402
import flash_bias_factors as fbf  # noqa: E402
import flash_bias_runtime as runtime  # noqa: E402
from flash_bias_triton import flash_bias_attention  # noqa: E402

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
# the tiny config at 96 px with window 12: two stages of N = 144 > MAX_RANK, so a tight bound leaves
# every layer exact
WINDOW_12 = ["--embedded", "tiny", "--opts", "DATA.IMG_SIZE", "96", "MODEL.SWINV2.WINDOW_SIZE", "12",
             "MODEL.SWINV2.DEPTHS", "[2, 2]", "MODEL.SWINV2.NUM_HEADS", "[1, 2]",
             "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES", "[0, 0]"]


def script_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLASHBIAS_") and k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    return env


def run_script(name, *args, cwd=None, expect=0):
    """Run scripts/<name> on the CPU; returns (stdout, stderr); asserts the exit status."""
    cmd = [sys.executable, os.path.join(SCRIPTS, name)] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    if expect == 2:
        assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, proc.stderr


def run_in_process(main, argv, capsys):
    """(exit status, stdout, stderr) of ``run_main(main(argv))`` in this process: the scripts' exit path
    without a subprocess's start-up time."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        swin_config.run_main(lambda: main([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def save_checkpoint(model, path):
    torch.save({"model": model.state_dict(), "epoch": 3}, path)


@pytest.fixture(autouse=True)
def no_flashbias_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith("FLASHBIAS_")]:
        monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A config (child yaml with a _BASE_), two checkpoints of it (seeds 0 and 1), one of another
    model."""
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
    """The pipeline run once as a user runs it: save_bias, decompose (energy rule, from the bias folder),
    decompose (the default rule, from --cfg/--resume, published naming) and decompose (rank 2 through
    the bias folder checked against the model, the deprecated option name)."""
    tmp = work["tmp"]
    out = {}
    out["save_stdout"], _ = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt"],
                                       "--out", tmp / "bias")
    out["energy_stdout"], _ = run_script("decompose_bias.py", "--bias-dir", tmp / "bias", "--energy", 0.995,
                                         "--out", tmp / "fac_energy")
    out["logit_stdout"], _ = run_script("decompose_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt"],
                                        "--published-format", "--no-figure", "--out", tmp / "fac_logit")
    out["rank_stdout"], _ = run_script("decompose_bias.py", "--bias-dir", tmp / "bias", "--cfg", work["cfg"],
                                       "--resume", work["ckpt"], "--rank", 2, "--no-figure", "--no-compare",
                                       "--seed-format", "X", "--out", tmp / "fac_rank2")
    return out


def load_model(work, ckpt=None):
    """The drop-in model from the test config and a checkpoint, set to the exact bias (no factor files
    from ./decomposed_bias or the environment)."""
    _, model = swin_config.build_from_args(str(work["cfg"]), str(ckpt or work["ckpt"]), verbose=False)
    model.set_flash_bias(rank_rule="exact", factors_path=False)
    return model


def factor_meta(folder):
    return fbf.read_factor_file(str(folder)).meta


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def test_config_base_resolution(work, tmp_path):
    cfg = swin_config.load_config(str(work["cfg"]))
    s = cfg.MODEL.SWINV2
    assert (cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES, cfg.MODEL.NAME) == (128, 10, "test_child")
    assert (s.EMBED_DIM, list(s.DEPTHS), list(s.NUM_HEADS), s.WINDOW_SIZE) == (24, [2, 2, 2, 2], [1, 2, 4, 8], 8)
    assert cfg.MODEL.DROP_PATH_RATE == 0.2 and list(s.PRETRAINED_WINDOW_SIZES) == [4, 4, 4, 2]
    assert s.MLP_RATIO == 4.0 and s.PATCH_SIZE == 4 and cfg.TEST.CROP is False  # official defaults, the yaml
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
    (tmp_path / "swin1.yaml").write_text("MODEL:\n  TYPE: swin\n  SWIN:\n    WINDOW_SIZE: 12\n")
    cfg = swin_config.load_config(str(tmp_path / "swin1.yaml"))  # Swin V1: MODEL.SWIN, the official defaults
    assert swin_config.model_type(cfg) == "swin" and swin_config.model_kwargs(cfg)["window_size"] == 12
    assert "pretrained_window_sizes" not in swin_config.model_kwargs(cfg)
    (tmp_path / "moe.yaml").write_text("MODEL:\n  TYPE: swin_moe\n")
    with pytest.raises(swin_config.UserError, match=r"MODEL.TYPE='swin_moe'; these scripts handle SwinV2 "
                                                    r"\(MODEL.TYPE: swinv2\) and Swin V1 \(MODEL.TYPE: swin\)"):
        swin_config.load_config(str(tmp_path / "moe.yaml"))


def test_opts_after_the_yaml(work, tmp_path, capsys):
    cfg = swin_config.load_config(str(work["cfg"]), opts=["DATA.IMG_SIZE", "64", "MODEL.SWINV2.DEPTHS", "[2, 2, 2, 4]"])
    assert cfg.DATA.IMG_SIZE == 64 and list(cfg.MODEL.SWINV2.DEPTHS) == [2, 2, 2, 4]
    assert cfg.MODEL.NAME == "test_child" and cfg.SOURCE.endswith("--opts DATA.IMG_SIZE 64 MODEL.SWINV2.DEPTHS [2, 2, 2, 4]")
    # through save_bias: at 64 px the last stage's 2x2 map clips its window to 2 (N = 4)
    code, out, _ = run_in_process(save_bias.main, ["--embedded", "tiny", "--opts", "DATA.IMG_SIZE", 64,
                                                   "--out", tmp_path / "b"], capsys)
    assert code == 0 and "--opts DATA.IMG_SIZE 64" in out
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"] == "embedded:tiny --opts DATA.IMG_SIZE 64" and manifest["layers"][-1]["N"] == 4


@pytest.mark.parametrize("opts,wording", [
    (["MODEL.SWINV2.WINDOWSIZE", "12"], "--opts: unknown config key 'MODEL.SWINV2.WINDOWSIZE'"),
    (["DATA.IMG_SIZE"], "--opts takes KEY VALUE pairs; got 1 items: DATA.IMG_SIZE"),
    (["DATA.IMG_SIZE", "'big'"], "--opts DATA.IMG_SIZE 'big':"),
])
def test_opts_errors(opts, wording, tmp_path, capsys):
    code, _, err = run_in_process(save_bias.main, ["--embedded", "tiny", "--out", tmp_path / "b", "--opts"] + opts,
                                  capsys)
    assert code == 2 and err.startswith("error: ") and wording in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv,wording", [
    (["--resume", "x.pth"], "--resume x.pth needs --cfg CONFIG.yaml (or --embedded NAME)"),
    (["--cfg", "a.yaml"], "--cfg needs --resume CHECKPOINT.pth"),
    (["--cfg", "a.yaml", "--resume", "x.pth", "--embedded", "tiny"], "give --cfg a.yaml or --embedded tiny, not both"),
    (["--embedded", "nope"], "unknown config name 'nope'; registered: swinv2_b_384, b256"),
    ([], "give --cfg CONFIG.yaml --resume CHECKPOINT.pth (or --embedded NAME to try it out)"),
])
def test_model_argument_errors(argv, wording, tmp_path, capsys):
    code, _, err = run_in_process(save_bias.main, argv + ["--out", tmp_path / "b"], capsys)
    assert code == 2 and err.startswith("error: ") and wording in err


# ----------------------------------------------------------------------------------------------
# save_bias.py
# ----------------------------------------------------------------------------------------------
def test_save_bias_manifest(work, pipeline):
    folder = work["tmp"] / "bias"
    manifest = json.loads((folder / "manifest.json").read_text())
    model = load_model(work)
    layers = runtime.window_attention_layers(model)
    assert manifest["num_layers"] == len(layers) == 8
    assert "[8/8]" in pipeline["save_stdout"]
    for entry, (name, attn) in zip(manifest["layers"], layers):
        assert entry["name"] == name and entry["checksum"] == runtime.bias_checksum(attn)
        assert entry["sha256"] == save_bias.file_sha256(str(folder / entry["file"]))
        bias = np.load(folder / entry["file"], allow_pickle=False)
        assert bias.shape == (entry["heads"], entry["N"], entry["N"]) and bias.dtype == np.float32
        assert np.allclose(bias, attn.derive_bias().numpy(), atol=1e-6)
    assert manifest["layers"][0]["N"] == 64 and manifest["layers"][-1]["N"] == 16  # last stage: window 4
    assert not [f for f in os.listdir(work["tmp"]) if ".partial-" in f]


def folder_digest(folder):
    return {f: save_bias.file_sha256(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}


def test_interrupted_save_keeps_the_old_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bias"
    assert run_in_process(save_bias.main, ["--embedded", "tiny", "--out", out], capsys)[0] == 0
    before = folder_digest(out)
    real_save, calls = np.save, []

    def failing_save(*args, **kwargs):   # the run dies while writing layer 3
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)
    monkeypatch.setattr(np, "save", failing_save)
    code, out_text, err = run_in_process(save_bias.main, ["--embedded", "tiny", "--seed", 1, "--out", out], capsys)
    assert code == 130 and "interrupted" in err
    assert "exists (config embedded:tiny, trained-like weights, seed 0, 8 layers)" in out_text
    assert folder_digest(out) == before                         # the old checkpoint's layers, all of them
    assert sorted(os.listdir(tmp_path)) == ["bias"]             # no partial folder, no .previous
    monkeypatch.setattr(np, "save", real_save)
    code, out_text, _ = run_in_process(save_bias.main, ["--embedded", "tiny", "--seed", 1, "--out", out], capsys)
    assert code == 0 and f"kept as {out}.previous" in out_text
    assert folder_digest(f"{out}.previous") == before
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert run_in_process(save_bias.main, ["--embedded", "tiny", "--seed", 2, "--out", out], capsys)[0] == 0
    assert json.loads((tmp_path / "bias.previous" / "manifest.json").read_text())["seed"] == 1  # one generation
    assert sorted(os.listdir(tmp_path)) == ["bias", "bias.previous"]


def test_out_folder_of_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_in_process(save_bias.main, ["--embedded", "tiny", "--out", tmp_path / "mine"], capsys)
    assert code == 2 and f"--out {tmp_path / 'mine'} is a folder with other files (no manifest.json)" in err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    (tmp_path / "file").write_text("")
    code, _, err = run_in_process(save_bias.main, ["--embedded", "tiny", "--out", tmp_path / "file"], capsys)
    assert code == 2 and "is a file, not a folder" in err


# ----------------------------------------------------------------------------------------------
# decompose_bias.py
# ----------------------------------------------------------------------------------------------
def test_decompose_outputs_and_report(work, pipeline):
    fac = work["tmp"] / "fac_energy"
    assert (fac / "spectra.png").stat().st_size > 10_000
    report = (fac / "report.md").read_text()
    assert "uncentered: rank (same rule)" in report and report.count("layers.") >= 8
    assert "the FlashBias paper's" in report and "nan" not in report
    assert "[8/8]" in pipeline["energy_stdout"]
    meta = factor_meta(fac)
    assert meta["centered"] and meta["rule"] == "energy:0.995" and all(r for r in meta["ranks"])
    # the default rule bounds the logit error; the published naming: one pair per layer, (H, N, R)
    logit_meta = factor_meta(work["tmp"] / "fac_logit")
    assert logit_meta["rule"] == "logit:0.05" and max(logit_meta["max_logit_error"]) <= 0.05
    for i, rank in enumerate(logit_meta["ranks"]):
        q = np.load(work["tmp"] / "fac_logit" / f"swin_v2_B_q_bias_{i}.npy", allow_pickle=False)
        assert q.shape[2] == rank
    assert factor_meta(work["tmp"] / "fac_rank2")["ranks"] == [2] * 8
    assert "not measured (--no-compare)" in (work["tmp"] / "fac_rank2" / "report.md").read_text()
    # the deprecated option name still works, and says so
    assert "--seed-format is deprecated; it is --published-format" in pipeline["rank_stdout"]
    assert (work["tmp"] / "fac_rank2" / "swin_v2_X_q_bias_7.npy").is_file()


def test_large_error_warnings(work, pipeline):
    """Rank 2 leaves logit errors far above LARGE_LOGIT_ERROR: stdout and the report say so per layer."""
    stdout = pipeline["rank_stdout"]
    report = (work["tmp"] / "fac_rank2" / "report.md").read_text()
    for i in range(8):
        pattern = rf"layer {i} \(layers\.\d\.blocks\.\d\.attn\): worst logit error [\d.]+ is above 0\.1"
        assert re.search("warning: " + pattern, stdout) and re.search("- " + pattern, report)


def test_factor_size_warnings(work, pipeline, tmp_path, capsys):
    code, out, _ = run_in_process(decompose_bias.main, ["--bias-dir", work["tmp"] / "bias", "--rank", 40,
                                                        "--no-figure", "--no-compare", "--out", tmp_path / "f"], capsys)
    assert code == 0
    assert ("warning: layer 0 (layers.0.blocks.0.attn): its rank-40 factors (20.0 KiB) are larger than its dense "
            "bias (16.0 KiB): 2 R > N = 64") in out
    assert "warning: layer 7 (layers.3.blocks.1.attn): its rank-16 factors" in out   # capped at N = 16
    assert re.search(r"warning: in total the factors and exact biases \(.*\) are larger than the dense biases", out)
    assert "## Warnings" in (tmp_path / "f" / "report.md").read_text()


def test_exact_layers_in_the_report(tmp_path, capsys):
    """N = 144 > MAX_RANK and a tight bound: every layer keeps its exact bias. The report says so,
    with no rank-cap error and no NaN."""
    code, out, _ = run_in_process(decompose_bias.main, WINDOW_12 + ["--max-logit-error", "1e-4", "--out",
                                                                    tmp_path / "f"], capsys)
    assert code == 0 and "0 of 4 layers low-rank" in out
    report = (tmp_path / "f" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "layers." in line]
    assert len(rows) == 4 and all("| 144 | exact | — | — | — | — |" in row for row in rows)
    assert "nan" not in report.lower()
    assert "no layer is factored" in report
    assert factor_meta(tmp_path / "f")["max_logit_error"] == [None] * 4
    assert (tmp_path / "f" / "spectra.png").is_file()


def test_figure_error_is_the_table_error(work, pipeline):
    """The figure's curve uses logit_error: at the chosen rank it is the report's number."""
    _, layers = save_bias.read_bias_dir(str(work["tmp"] / "bias"))
    bias = layers[2][1]
    _, errors = decompose_bias.spectrum_curves(bias, center=True)
    assert len(errors) == 64
    for rank in (1, 7, 30):
        info = fbf.low_rank_bias_factors(bias, rank=rank)[2]
        assert errors[rank - 1] == pytest.approx(info["max_logit_error"], rel=1e-6)


def test_decompose_without_input_reads_the_save_bias_folder(work, pipeline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(decompose_bias.main, [], capsys)
    assert code == 2 and "give --bias-dir FOLDER" in err and "there is no ./swin_v2_bias_save here" in err
    shutil.copytree(work["tmp"] / "bias", tmp_path / "swin_v2_bias_save")
    code, out, _ = run_in_process(decompose_bias.main, ["--rank", 2, "--no-figure", "--no-compare"], capsys)
    assert code == 0 and "no input given: reading ./swin_v2_bias_save" in out
    assert factor_meta(tmp_path / "decomposed_bias")["ranks"] == [2] * 8
    # again: the folder is replaced, and what it held is said first
    code, out, _ = run_in_process(decompose_bias.main, ["--rank", 3, "--no-figure", "--no-compare"], capsys)
    assert code == 0 and "--out decomposed_bias exists (rule rank:2, 8 of 8 layers factored" in out
    assert factor_meta(tmp_path / "decomposed_bias")["ranks"] == [3] * 8
    assert factor_meta(tmp_path / "decomposed_bias.previous")["ranks"] == [2] * 8
    code, _, err = run_in_process(decompose_bias.main, ["--out", "swin_v2_bias_save"], capsys)
    assert code == 2 and "--out swin_v2_bias_save is the input folder" in err


def test_factors_load_and_error_matches_report(work, pipeline):
    """Per layer, the loaded factors' logit error is the reported one, and attention outputs move by
    no more than that error allows: |softmax change|_1 <= exp(2 * max error) - 1."""
    model = load_model(work)
    layers = runtime.window_attention_layers(model)
    for folder in ("fac_logit", "fac_rank2"):
        meta = factor_meta(work["tmp"] / folder)
        loaded = runtime.load_bias_factors(model, str(work["tmp"] / folder))
        assert sorted(loaded) == [i for i, r in enumerate(meta["ranks"]) if r]
        gen = torch.Generator().manual_seed(0)
        for i, (q_bias, k_bias) in loaded.items():
            attn = layers[i][1]
            bias = attn.derive_bias()
            max_err, _ = fbf.logit_error(bias, q_bias @ k_bias.transpose(1, 2))
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
            runtime.load_bias_factors(model, str(work["tmp"] / folder))
            diffs[folder] = swin_config.rel_l2(model(x), exact)
    assert diffs["fac_rank2"] > 1e-3                      # rank 2 is clearly not exact
    assert diffs["fac_logit"] < diffs["fac_rank2"] / 3   # a 0.05-logit bound is much closer
    assert diffs["fac_logit"] < 0.05


def test_factors_of_another_checkpoint_rejected(work, pipeline, tmp_path):
    model = load_model(work, work["ckpt_other_weights"])
    with pytest.raises(ValueError, match=r"layer 0|layers\.0\.blocks\.0\.attn"):
        runtime.load_bias_factors(model, str(work["tmp"] / "fac_energy"))
    # a bias folder of checkpoint 0 against checkpoint 1
    with pytest.raises(swin_config.UserError, match=r"layer 0 \(layers\.0\.blocks\.0\.attn\).*another checkpoint"):
        decompose_bias.main(["--bias-dir", str(work["tmp"] / "bias"), "--cfg", str(work["cfg"]),
                             "--resume", str(work["ckpt_other_weights"]), "--out", str(tmp_path / "x")])


def test_bias_files_checked_against_the_manifest(work, pipeline, tmp_path, capsys):
    bias = tmp_path / "bias"
    shutil.copytree(work["tmp"] / "bias", bias)
    out = str(tmp_path / "out")
    # a layer file of another run (same shape, other weights): its sha256 is not the manifest's
    assert run_in_process(save_bias.main, ["--embedded", "tiny", "--seed", 5, "--out", tmp_path / "other"],
                          capsys)[0] == 0
    shutil.copy(tmp_path / "other" / "swin_v2_bias_3.npy", bias / "swin_v2_bias_3.npy")
    with pytest.raises(swin_config.UserError, match=r"layer 3 \(layers\.1\.blocks\.1\.attn\): bias file .*"
                                                    r"swin_v2_bias_3\.npy is not the one manifest\.json recorded "
                                                    r"\(sha256 differs\): it was changed or comes from another run"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    (bias / "swin_v2_bias_3.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*sha256 differs"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    (bias / "swin_v2_bias_3.npy").unlink()
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*missing"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    # a manifest edited to match a file of the wrong shape: the shape check still names the layer
    np.save(bias / "swin_v2_bias_3.npy", np.zeros((2, 64, 63), np.float32))
    manifest = json.loads((bias / "manifest.json").read_text())
    manifest["layers"][3]["sha256"] = save_bias.file_sha256(str(bias / "swin_v2_bias_3.npy"))
    (bias / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(swin_config.UserError, match=r"layer 3 .*shape"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    manifest["format"] = "flashbias-swinv2-bias-v1"
    (bias / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(swin_config.UserError, match="older save_bias.py, without file hashes"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    (bias / "manifest.json").write_text("{not json")
    with pytest.raises(swin_config.UserError, match="corrupt"):
        decompose_bias.main(["--bias-dir", str(bias), "--out", out])
    with pytest.raises(swin_config.UserError, match="no manifest.json"):
        decompose_bias.main(["--bias-dir", str(tmp_path), "--out", out])
    assert not os.path.exists(out)


def test_checkpoint_and_factor_file_errors(work, pipeline, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(swin_config.UserError, match="not found"):
        save_bias.main(["--cfg", str(work["cfg"]), "--resume", str(tmp_path / "nope.pth"), "--out", out])
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(swin_config.UserError, match="cannot read checkpoint"):
        save_bias.main(["--cfg", str(work["cfg"]), "--resume", str(tmp_path / "corrupt.pth"), "--out", out])
    (tmp_path / "fac").mkdir()
    (tmp_path / "fac" / "bias_factors.npz").write_bytes(b"garbage")
    with pytest.raises(swin_config.UserError, match=r"--factors .*fac: .*corrupt"):
        demo.main(["--cfg", str(work["cfg"]), "--resume", str(work["ckpt"]), "--factors", str(tmp_path / "fac")])
    with pytest.raises(swin_config.UserError, match=r"--factors .*none: .*(no factor files|does not exist)"):
        demo.main(["--cfg", str(work["cfg"]), "--resume", str(work["ckpt"]), "--factors", str(tmp_path / "none")])


def test_cli_user_errors_exit_2(work, pipeline, tmp_path, capsys):
    # one real process: the exit status and stderr a shell sees
    _, err = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", work["ckpt_other_model"],
                        "--out", tmp_path / "b", expect=2)
    assert err.startswith("error: ") and "checkpoint of another model" in err and "layers." in err
    code, _, err = run_in_process(decompose_bias.main, ["--bias-dir", tmp_path / "missing"], capsys)
    assert code == 2 and err.startswith("error: bias folder not found")
    code, _, err = run_in_process(decompose_bias.main, ["--bias-dir", work["tmp"] / "bias", "--opts",
                                                        "DATA.IMG_SIZE", 64], capsys)
    assert code == 2 and "--opts changes a model's config: give it with --cfg or --embedded" in err
    # demo: factors of another checkpoint, caught before anything runs
    code, out, err = run_in_process(demo.main, ["--cfg", work["cfg"], "--resume", work["ckpt_other_weights"],
                                                "--factors", work["tmp"] / "fac_energy"], capsys)
    assert code == 2 and "layers.0.blocks.0.attn" in err and "running" not in out


# ----------------------------------------------------------------------------------------------
# demo.py
# ----------------------------------------------------------------------------------------------
def test_demo_tiny_cpu(capsys):
    code, out, _ = run_in_process(demo.main, ["--tiny", "--batch", 1, "--iters", 1, "--device", "cpu"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert any(l.startswith("mode") and "ms/batch" in l and "logit rel-L2" in l for l in lines)
    rows = [l for l in lines if l.startswith(("official math", "FlashBias,"))]
    assert [r.split("  ")[0] for r in rows] == ["official math (fused_attn off)", "FlashBias, exact bias",
                                               "FlashBias, low-rank logit:0.05"]
    assert "0.00e+00" in rows[0] and "100.0%" in rows[0]
    assert re.search(r"low-rank factors in \d+ of 8 layers, ranks \d+-\d+, worst max logit error 0\.0[0-5]", out)


@pytest.mark.parametrize("argv,wording", [
    (["--tiny", "--embedded", "small"], "--tiny means --embedded tiny: give one model"),
    (["--tiny", "--rank-rule", "energy:2"], "--rank-rule energy:2: "),
    (["--resume", "x.pth"], "--resume x.pth needs --cfg CONFIG.yaml"),
])
def test_demo_argument_errors(argv, wording, capsys):
    code, _, err = run_in_process(demo.main, argv + ["--device", "cpu"], capsys)
    assert code == 2 and wording in err


def test_demo_real_weights_and_images(work, pipeline, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in ("class_a", "class_b"):
        (tmp_path / "data" / "val" / c).mkdir(parents=True)
        for k in range(2):
            PIL.fromarray(rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "val" / c / f"{k}.jpg")
    out, _ = run_script("demo.py", "--cfg", work["cfg"], "--resume", work["ckpt"], "--data-path",
                        tmp_path / "data", "--batch", 2, "--batches", 2, "--factors", work["tmp"] / "fac_logit",
                        "--rank-rule", "energy:0.995", "--rank-rule", "rank:4")
    assert "4 images of 2 classes" in out and "top-1 acc" in out and "(resize to 128)" in out
    for row in ("FlashBias, low-rank energy:0.995", "FlashBias, low-rank rank:4", "FlashBias, low-rank factor file"):
        assert any(line.startswith(row) for line in out.splitlines()), row


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_official_trainer_checkpoint_loads_and_a_payload_is_refused(work, tmp_path):
    """Checkpoints of the official trainer hold its yacs config: the scripts read them through the one safe
    loader (scripts/safe_checkpoint.py), and a checkpoint that names any other global is refused."""
    from yacs.config import CfgNode
    model = load_model(work)
    trainer = tmp_path / "ckpt_epoch_0.pth"
    torch.save({"model": model.state_dict(), "config": CfgNode({"MODEL": CfgNode({"NAME": "x"})}), "epoch": 0,
                "max_accuracy": 1.0}, trainer)
    out, _ = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", trainer, "--out", tmp_path / "bias")
    assert "[8/8]" in out
    evil = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "payload": _Payload()}, evil)
    _, err = run_script("save_bias.py", "--cfg", work["cfg"], "--resume", evil, "--out", tmp_path / "b2", expect=2)
    assert "cannot read checkpoint" in err and "evil.pth" in err and "system" in err


# ----------------------------------------------------------------------------------------------
# Swin V1 (MODEL.TYPE: swin): the bias is relative_position_bias_table[relative_position_index]
# ----------------------------------------------------------------------------------------------
V1_YAML = """\
MODEL:
  TYPE: swin
  NAME: test_v1
  NUM_CLASSES: 10
  SWIN:
    EMBED_DIM: 32
    DEPTHS: [ 2, 2, 2 ]
    NUM_HEADS: [ 1, 2, 4 ]
    WINDOW_SIZE: 7
DATA:
  IMG_SIZE: 112
"""
OFFICIAL_V1_YAML = os.path.join(ROOT, "third_party", "Swin-Transformer", "configs", "swin",
                                "swin_tiny_patch4_window7_224.yaml")


@pytest.fixture(scope="module")
def v1_work(tmp_path_factory):
    """A Swin V1 yaml, checkpoints of trained-like weights (seeds 0 and 1), and the pipeline run on the first as a
    user runs it: save_bias.py, then decompose_bias.py with its default rule (max logit error 0.05)."""
    tmp = tmp_path_factory.mktemp("v1")
    (tmp / "v1.yaml").write_text(V1_YAML)
    cfg = swin_config.load_config(str(tmp / "v1.yaml"))
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_checkpoint(swin_config.trained_like_(swin_config.build_model(cfg), seed), tmp / f"v1_seed{seed}.pth")
    run_script("save_bias.py", "--cfg", tmp / "v1.yaml", "--resume", tmp / "v1_seed0.pth", "--out", tmp / "bias")
    stdout, _ = run_script("decompose_bias.py", "--bias-dir", tmp / "bias", "--no-figure", "--out", tmp / "fac")
    return {"tmp": tmp, "cfg": tmp / "v1.yaml", "ckpt": tmp / "v1_seed0.pth",
            "ckpt_other_weights": tmp / "v1_seed1.pth", "decompose_stdout": stdout}


def v1_model(v1_work, ckpt=None, **settings):
    """The V1 drop-in model from the yaml and a checkpoint, exact and without factor files unless ``settings``
    (set_flash_bias arguments) say otherwise."""
    _, model = swin_config.build_from_args(str(v1_work["cfg"]), str(ckpt or v1_work["ckpt"]), verbose=False)
    model.set_flash_bias(**dict(dict(rank_rule="exact", factors_path=False), **settings))
    return model


def test_v1_save_bias_is_the_table_gather(v1_work):
    folder = v1_work["tmp"] / "bias"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_type"] == "swin" and manifest["num_layers"] == 6
    state = torch.load(v1_work["ckpt"], weights_only=True)["model"]
    for entry, (name, attn) in zip(manifest["layers"], runtime.window_attention_layers(v1_model(v1_work))):
        assert entry["name"] == name and entry["checksum"] == runtime.bias_checksum(attn)
        assert entry["bias_weights"] == ["relative_position_bias_table", "relative_position_index"]
        table, index = state[f"{name}.relative_position_bias_table"], attn.relative_position_index  # from the file
        expected = table[index.reshape(-1)].reshape(entry["N"], entry["N"], -1).permute(2, 0, 1)  # no MLP, no sigmoid
        assert np.array_equal(np.load(folder / entry["file"], allow_pickle=False), expected.numpy())
    assert [e["N"] for e in manifest["layers"]] == [49] * 6 and manifest["layers"][-1]["heads"] == 4


def test_v1_low_rank_end_to_end(v1_work, capsys):
    """Factor folders in the V1 model: each layer's loaded factors have the logit error the decomposition reported,
    each attention moves by no more than that error allows, and the logits move with it: the default bound (0.05)
    keeps them close to the exact model's, rank 24 (of N = 49) less so, rank 1 least."""
    tmp = v1_work["tmp"]
    assert "6 of 6 layers low-rank" in v1_work["decompose_stdout"]
    code, _, _ = run_in_process(decompose_bias.main, ["--bias-dir", tmp / "bias", "--rank", 24, "--no-figure",
                                                      "--no-compare", "--out", tmp / "fac_rank24"], capsys)
    assert code == 0
    x = swin_config.smooth_images(4, 112, seed=3)
    gen = torch.Generator().manual_seed(0)
    errors = {}
    with torch.no_grad():
        exact = v1_model(v1_work)(x)
        for folder in ("fac", "fac_rank24"):
            meta = factor_meta(tmp / folder)
            assert meta["rule"] == {"fac": "logit:0.05", "fac_rank24": "rank:24"}[folder]
            model = v1_model(v1_work, factors_path=tmp / folder)
            errors[folder] = swin_config.rel_l2(model(x), exact)
            for i, ((_, attn), summary) in enumerate(zip(runtime.window_attention_layers(model),
                                                         runtime.flash_bias_summary(model))):
                assert summary["mode"] == "low-rank" and summary["rank"] == meta["ranks"][i]
                assert summary["max_logit_error"] == pytest.approx(meta["max_logit_error"][i], rel=1e-3, abs=1e-5)
                q_bias, k_bias = attn.flash_bias.factors
                H, N = q_bias.shape[:2]
                qkv = torch.randn(3, N, 3 * 16 * H, generator=gen)
                dense = flash_bias_attention(qkv, H, bias=attn.derive_bias(), backend="torch")
                factored = flash_bias_attention(qkv, H, bias_factors=(q_bias, k_bias), backend="torch")
                v_max = qkv[..., 2 * 16 * H:].abs().max()
                assert (dense - factored).abs().max() <= (np.exp(2 * summary["max_logit_error"]) - 1) * v_max + 1e-5
        errors["rank:1"] = swin_config.rel_l2(v1_model(v1_work, rank_rule="rank:1")(x), exact)
    assert max(factor_meta(tmp / "fac")["max_logit_error"]) <= 0.05
    assert errors["fac"] < 0.01 and errors["fac"] < errors["fac_rank24"] < errors["rank:1"], errors


def test_v1_factors_of_other_weights_are_refused(v1_work, tmp_path, capsys):
    model = v1_model(v1_work, ckpt=v1_work["ckpt_other_weights"], factors_path=v1_work["tmp"] / "fac")
    with pytest.raises(ValueError, match=r"layer layers\.0\.blocks\.0\.attn: the bias factors from .*fac.* were "
                                         r"computed for other weights"), torch.no_grad():
        model(swin_config.smooth_images(1, 112))
    code, _, err = run_in_process(decompose_bias.main, ["--bias-dir", v1_work["tmp"] / "bias", "--cfg", v1_work["cfg"],
                                                        "--resume", v1_work["ckpt_other_weights"], "--out",
                                                        tmp_path / "x"], capsys)
    assert code == 2 and ("layer 0 (layers.0.blocks.0.attn): the bias in" in err and "saved from another checkpoint "
                          "(checksum of relative_position_bias_table, relative_position_index differs)" in err)
    code, _, err = run_in_process(decompose_bias.main, ["--bias-dir", v1_work["tmp"] / "bias", "--published-format",
                                                        "--out", tmp_path / "y"], capsys)
    assert code == 2 and ("--published-format: the published FlashBias code's naming (swin_v2_*) holds SwinV2 "
                          "factors; this model's bias is a Swin V1 bias" in err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_v1_registered_and_official_configs(tmp_path, capsys):
    """--embedded names a registered V1 config; the official configs/swin yaml builds the official Swin-T."""
    code, out, _ = run_in_process(save_bias.main, ["--embedded", "test_v1_mini", "--out", tmp_path / "b"], capsys)
    assert code == 0 and "Swin V1, img 32" in out
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["model_type"] == "swin"
    if not os.path.isfile(OFFICIAL_V1_YAML):
        pytest.skip(f"no official checkout ({OFFICIAL_V1_YAML})")
    cfg = swin_config.load_config(OFFICIAL_V1_YAML)
    assert swin_config.model_kwargs(cfg) == dict(
        img_size=224, num_classes=1000, drop_rate=0.0, drop_path_rate=0.2, patch_size=4, in_chans=3, embed_dim=96,
        depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True, ape=False,
        patch_norm=True, qk_scale=None)
    torch.manual_seed(0)
    save_checkpoint(swin_config.trained_like_(swin_config.build_model(cfg), 0), tmp_path / "swin_t.pth")
    code, out, _ = run_in_process(decompose_bias.main, ["--cfg", OFFICIAL_V1_YAML, "--resume", tmp_path / "swin_t.pth",
                                                        "--no-figure", "--no-compare", "--out", tmp_path / "f"], capsys)
    assert code == 0 and "of 12 layers low-rank (rule logit:0.05)" in out
    assert factor_meta(tmp_path / "f")["source"].startswith(f"config {OFFICIAL_V1_YAML}, checkpoint")
