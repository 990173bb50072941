"""Shared helpers for the scripts: official SwinV2 yaml configs -> the drop-in model, checkpoints.

* :func:`load_config` reads an official ``configs/swinv2/*.yaml`` (yacs, with ``BASE: [...]`` /
  ``_BASE_`` files resolved relative to the yaml file) over the official defaults that building a
  SwinV2 needs.
* :func:`build_model` builds the drop-in ``swin_transformer_v2.SwinTransformerV2`` (from this repo's
  root) with the official ``models/build.py`` arguments.
* :func:`load_checkpoint` loads ``ckpt["model"]`` (or a bare state dict) with
  ``torch.load(weights_only=True)`` and refuses a checkpoint of another model, naming keys.
* :func:`trained_like_` gives a randomly initialised model the weight statistics of a trained one
  (SwinV2 zero-initialises the post-norm scales, which would hide attention entirely).
* :data:`EMBEDDED_CONFIGS`: ``swinv2_b_384`` (the FlashBias paper's SwinV2-B/384, for a GPU),
  ``small`` (CPU) and ``tiny`` (tests).

User errors raise :class:`UserError`; scripts print its message and exit with status 2
(:func:`run_main`).
"""
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import yaml
from yacs.config import CfgNode

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """A mistake in the user's input (file, option, checkpoint): reported without a traceback."""


def run_main(main) -> None:
    """Run ``main()``; a :class:`UserError` prints ``error: message`` to stderr and exits 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def default_config() -> CfgNode:
    """The official defaults of the keys that building a SwinV2 reads. Other keys of a yaml file
    (TRAIN, AUG, ...) are accepted and ignored."""
    cfg = CfgNode()
    cfg.DATA = CfgNode()
    cfg.DATA.IMG_SIZE = 224
    cfg.DATA.DATASET = "imagenet"
    cfg.MODEL = CfgNode()
    cfg.MODEL.TYPE = "swinv2"
    cfg.MODEL.NAME = "swinv2"
    cfg.MODEL.NUM_CLASSES = 1000
    cfg.MODEL.DROP_RATE = 0.0
    cfg.MODEL.DROP_PATH_RATE = 0.1
    s = cfg.MODEL.SWINV2 = CfgNode()
    s.PATCH_SIZE = 4
    s.IN_CHANS = 3
    s.EMBED_DIM = 96
    s.DEPTHS = [2, 2, 6, 2]
    s.NUM_HEADS = [3, 6, 12, 24]
    s.WINDOW_SIZE = 7
    s.MLP_RATIO = 4.0
    s.QKV_BIAS = True
    s.APE = False
    s.PATCH_NORM = True
    s.PRETRAINED_WINDOW_SIZES = [0, 0, 0, 0]
    cfg.set_new_allowed(True)
    return cfg


EMBEDDED_CONFIGS: Dict[str, dict] = {
    # The FlashBias paper's model: configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml
    "swinv2_b_384": {"DATA": {"IMG_SIZE": 384},
                     "MODEL": {"NAME": "swinv2_base_patch4_window12to24_192to384_22kto1k_ft",
                               "SWINV2": {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2],
                                          "NUM_HEADS": [4, 8, 16, 32], "WINDOW_SIZE": 24,
                                          "PRETRAINED_WINDOW_SIZES": [12, 12, 12, 6]}}},
    # A CPU-sized SwinV2 (window 8, N = 64): seconds per batch on a laptop CPU.
    "small": {"DATA": {"IMG_SIZE": 256},
              "MODEL": {"NAME": "swinv2_small_cpu_demo",
                        "SWINV2": {"EMBED_DIM": 64, "DEPTHS": [2, 2, 4, 2], "NUM_HEADS": [2, 4, 8, 16],
                                   "WINDOW_SIZE": 8, "PRETRAINED_WINDOW_SIZES": [0, 0, 0, 0]}}},
    # For tests: 128 px, window 8 (the last stage's 4x4 map makes that layer's window 4).
    "tiny": {"DATA": {"IMG_SIZE": 128},
             "MODEL": {"NAME": "swinv2_tiny_test", "NUM_CLASSES": 10,
                       "SWINV2": {"EMBED_DIM": 24, "DEPTHS": [2, 2, 2, 2], "NUM_HEADS": [1, 2, 4, 8],
                                  "WINDOW_SIZE": 8, "PRETRAINED_WINDOW_SIZES": [0, 0, 0, 0]}}},
}


IMAGENET22K_CLASSES = 21841


def _read_yaml_with_bases(path: str, seen: Tuple[str, ...] = ()) -> List[dict]:
    """The dicts to merge for ``path``, base files first. Base files come from ``_BASE_`` (a path
    or a list) or the official ``BASE`` list, relative to the directory of the file naming them."""
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"config {path}: _BASE_ files include each other in a cycle")
    if not os.path.isfile(path):
        where = f" (a base of {seen[-1]})" if seen else ""
        raise UserError(f"config file not found: {path}{where}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid yaml: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a yaml mapping; got {type(data).__name__}")
    bases = []
    for key in ("_BASE_", "BASE"):
        value = data.pop(key, None)
        if value is None:
            continue
        bases += [value] if isinstance(value, str) else list(value)
    merged = []
    for base in bases:
        if base:
            merged += _read_yaml_with_bases(os.path.join(os.path.dirname(path), base), seen + (path,))
    merged.append(data)
    return merged


def load_config(cfg_path: Optional[str] = None, embedded: Optional[str] = None) -> CfgNode:
    """The config of an official yaml file, or of an embedded one (see :data:`EMBEDDED_CONFIGS`).

    Raises :class:`UserError` for a missing/invalid file, a value of the wrong type, or a model type
    other than swinv2."""
    cfg = default_config()
    if embedded is not None:
        if embedded not in EMBEDDED_CONFIGS:
            raise UserError(f"unknown embedded config {embedded!r}; have {sorted(EMBEDDED_CONFIGS)}")
        layers = [EMBEDDED_CONFIGS[embedded]]
        source = f"embedded:{embedded}"
    else:
        layers = _read_yaml_with_bases(cfg_path)
        source = cfg_path
    for data in layers:
        try:
            cfg.merge_from_other_cfg(CfgNode(data))
        except (ValueError, KeyError, AssertionError) as e:
            raise UserError(f"config {source}: {e}") from None
    if str(cfg.MODEL.TYPE).lower() != "swinv2":
        raise UserError(f"config {source} describes MODEL.TYPE={cfg.MODEL.TYPE!r}; these scripts handle "
                        f"SwinV2 (MODEL.TYPE: swinv2)")
    # the official data/build.py sets the class count from the dataset: a 22k config's head has 21841
    if str(cfg.DATA.DATASET) == "imagenet22K":
        cfg.MODEL.NUM_CLASSES = IMAGENET22K_CLASSES
    s = cfg.MODEL.SWINV2
    if not (len(s.DEPTHS) == len(s.NUM_HEADS) == len(s.PRETRAINED_WINDOW_SIZES)):
        raise UserError(f"config {source}: DEPTHS, NUM_HEADS and PRETRAINED_WINDOW_SIZES need one entry "
                        f"per stage; got {list(s.DEPTHS)}, {list(s.NUM_HEADS)}, {list(s.PRETRAINED_WINDOW_SIZES)}")
    cfg.SOURCE = source
    cfg.freeze()
    return cfg


def describe_config(cfg: CfgNode) -> str:
    """One line: name, image size, embed dim, depths, heads, window."""
    s = cfg.MODEL.SWINV2
    return (f"{cfg.MODEL.NAME} ({cfg.SOURCE}): img {cfg.DATA.IMG_SIZE}, embed {s.EMBED_DIM}, depths "
            f"{list(s.DEPTHS)}, heads {list(s.NUM_HEADS)}, window {s.WINDOW_SIZE}, pretrained windows "
            f"{list(s.PRETRAINED_WINDOW_SIZES)}")


# ----------------------------------------------------------------------------------------------
# The drop-in model
# ----------------------------------------------------------------------------------------------
def import_dropin():
    """The drop-in module ``swin_transformer_v2`` at this repository's root."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    try:
        import swin_transformer_v2
    except ImportError as e:
        raise UserError(f"cannot import the drop-in swin_transformer_v2.py from {REPO_ROOT}: {e}") from None
    return swin_transformer_v2


def build_model(cfg: CfgNode) -> torch.nn.Module:
    """The drop-in SwinTransformerV2 with the arguments the official models/build.py passes."""
    s = cfg.MODEL.SWINV2
    dropin = import_dropin()
    return dropin.SwinTransformerV2(
        img_size=cfg.DATA.IMG_SIZE, patch_size=s.PATCH_SIZE, in_chans=s.IN_CHANS,
        num_classes=cfg.MODEL.NUM_CLASSES, embed_dim=s.EMBED_DIM, depths=list(s.DEPTHS),
        num_heads=list(s.NUM_HEADS), window_size=s.WINDOW_SIZE, mlp_ratio=s.MLP_RATIO,
        qkv_bias=s.QKV_BIAS, drop_rate=cfg.MODEL.DROP_RATE, drop_path_rate=cfg.MODEL.DROP_PATH_RATE,
        ape=s.APE, patch_norm=s.PATCH_NORM, use_checkpoint=False,
        pretrained_window_sizes=list(s.PRETRAINED_WINDOW_SIZES))


# Buffers the official model stores in its checkpoints and rebuilds from the config; a drop-in may
# name or shape them differently, so they never decide whether a checkpoint fits.
_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of a checkpoint file: ``ckpt["model"]`` if present, else the file itself."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint {path} holds no model state dict (expected a dict of tensors or "
                        f"{{'model': state_dict}})")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def checkpoint_mismatches(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """Human-readable reasons why ``state`` is not a checkpoint of ``model`` (empty: it fits)."""
    own = model.state_dict()
    rebuilt = lambda k: k.rsplit(".", 1)[-1] in _REBUILT_BUFFERS
    problems = []
    for k, v in own.items():
        if k not in state:
            if not rebuilt(k):
                problems.append(f"{k}: missing from the checkpoint (model has {tuple(v.shape)})")
        elif tuple(state[k].shape) != tuple(v.shape) and not rebuilt(k):
            problems.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}")
    for k, v in state.items():
        if k not in own and not rebuilt(k):
            problems.append(f"{k}: in the checkpoint {tuple(v.shape)}, not in the model")
    return problems


def load_checkpoint(model: torch.nn.Module, path: str, cfg_name: str = "the config") -> None:
    """Load a checkpoint into ``model``; :class:`UserError` naming mismatched keys if it is a
    checkpoint of another model. Rebuilt buffers (relative_coords_table, ...) are taken from the
    checkpoint only where their shapes agree."""
    state = read_checkpoint(path)
    problems = checkpoint_mismatches(model, state)
    if problems:
        shown = "\n  ".join(problems[:6])
        more = f"\n  ... and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise UserError(f"{path} is a checkpoint of another model: {len(problems)} keys do not fit "
                        f"{cfg_name}:\n  {shown}{more}")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)


def build_from_args(cfg_path: Optional[str], resume: Optional[str], embedded: Optional[str] = None,
                    seed: int = 0, verbose: bool = True):
    """(cfg, model in eval mode): from ``--cfg/--resume``, or an embedded config with seeded
    trained-like weights when ``resume`` is None."""
    cfg = load_config(cfg_path, embedded=None if cfg_path else embedded)
    torch.manual_seed(seed)
    model = build_model(cfg)
    if resume:
        load_checkpoint(model, resume, cfg_name=cfg.SOURCE)
        weights = f"checkpoint {resume}"
    else:
        trained_like_(model, seed)
        weights = f"trained-like random weights (seed {seed})"
    if verbose:
        print(f"model: {describe_config(cfg)}; {weights}", flush=True)
    return cfg, model.eval()


# ----------------------------------------------------------------------------------------------
# Trained-like random weights
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def trained_like_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give ``model`` (in place) weight statistics like a trained SwinV2, seeded:

    * every attention's continuous-position-bias MLP: cpb_mlp[0].weight ~ N(0, 1),
      cpb_mlp[0].bias ~ 0.5 N(0, 1), cpb_mlp[2].weight ~ 0.05 N(0, 1) (a bias of several logits,
      smooth over relative positions, of some but not full rank);
    * logit_scale ~ U(ln 5, ln 40) per head;
    * res-post-norm norm1/norm2 of every block: weight ~ 0.5 + 0.1 N(0, 1), bias ~ 0.02 N(0, 1)
      (SwinV2 zero-initialises them, which hides attention from the output).

    Other parameters keep their initialisation (seed the global RNG before building for those).
    """
    gen = torch.Generator().manual_seed(seed)
    normal = lambda t: torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t)
    for module in model.modules():
        cpb = getattr(module, "cpb_mlp", None)
        if cpb is not None:
            cpb[0].weight.copy_(normal(cpb[0].weight))
            if cpb[0].bias is not None:
                cpb[0].bias.copy_(0.5 * normal(cpb[0].bias))
            cpb[2].weight.copy_(0.05 * normal(cpb[2].weight))
        scale = getattr(module, "logit_scale", None)
        if isinstance(scale, torch.Tensor):
            u = torch.rand(scale.shape, generator=gen, dtype=torch.float64)
            lo, hi = torch.log(torch.tensor(5.0, dtype=torch.float64)), torch.log(torch.tensor(40.0, dtype=torch.float64))
            scale.copy_((lo + (hi - lo) * u).to(scale))
        for norm_name in ("norm1", "norm2"):
            norm = getattr(module, norm_name, None)
            if isinstance(norm, torch.nn.LayerNorm) and hasattr(module, "attn"):
                norm.weight.copy_(0.5 + 0.1 * normal(norm.weight))
                norm.bias.copy_(0.02 * normal(norm.bias))
    return model


def smooth_images(batch: int, img_size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """(batch, channels, img_size, img_size) float32 seeded smooth random images, roughly ImageNet-
    normalised: bilinear upsampling of an 8x8 noise grid plus a little fine noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 8, 8, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=(img_size, img_size), mode="bicubic", align_corners=False)
    return x + 0.1 * torch.randn(x.shape, generator=gen)
