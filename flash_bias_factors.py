"""FlashBias bias factors: rank rules, the SVD, and the factor-file format. Model-free.

A Swin layer's relative-position bias B (H, N, N) (SwinV2's or Swin V1's) can be given to the kernel as
low-rank factors ``q_bias @ k_bias^T ~ B``, each (H, N, R), the decomposition of the FlashBias paper. This
module is the one home of that idea:

* rank rules (:func:`parse_rank_rule`): ``exact`` | ``rank:R`` | ``energy:E`` | ``logit:L``;
* the SVD (:func:`low_rank_bias_factors`) and the error that matters, in logits (:func:`logit_error`);
* the factor file, ``bias_factors.npz`` (:func:`write_factor_file` / :func:`read_factor_file`), and
  the naming of the published FlashBias code, ``swin_v2_{TAG}_{q,k}_bias_{i}.npy``
  (:func:`write_published_factors` / read by :func:`read_factor_file` given the folder).

Factor file format ``flashbias-swinv2-factors-v1`` (numpy .npz, no pickles):

    format        str   "flashbias-swinv2-factors-v1"
    num_layers    int   attention layers of the model, in construction order
    meta          str   JSON: how the factors were made
    layer{i}_name       str   the layer's qualified name, e.g. "layers.2.blocks.3.attn"
    layer{i}_checksum   str   sha256 of the weights the bias is derived from (:func:`weights_checksum`)
    layer{i}_bias_weights str  their names, comma-separated (the layer's ``bias_weights()``): which model
                              family the bias is of (:data:`BIAS_WEIGHTS`). Absent in files written before it
                              was recorded, which came from SwinV2 models only: read as SwinV2's
    layer{i}_q_bias     float32 (H, N, R)   absent together with k_bias: that layer stays exact
    layer{i}_k_bias     float32 (H, N, R)

Which model layer a record belongs to, and whether its checksum and weight names match that layer's, is
the model's business (``flash_bias_runtime.load_bias_factors``); this module checks the file itself:
format, names, shapes, ranks, finite values, and readable bytes. Every problem raises
:class:`FactorFileError` (a ValueError) naming the file and the layer.
"""
import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:  # inside the official `models` package, or as a top-level module
    from .flash_bias_triton import MAX_RANK
except ImportError:
    from flash_bias_triton import MAX_RANK

__all__ = ["FACTORS_FORMAT", "FACTORS_FILE", "MAX_RANK", "PUBLISHED_MAX_LOGIT_ERROR", "LARGE_LOGIT_ERROR",
           "BIAS_WEIGHTS", "describe_bias_weights",
           "FactorFileError", "LayerFactors", "FactorFile", "parse_rank_rule", "logit_error",
           "low_rank_bias_factors", "weights_checksum", "find_factor_files", "read_factor_file",
           "write_factor_file", "write_published_factors", "published_file_name"]

FACTORS_FORMAT = "flashbias-swinv2-factors-v1"
FACTORS_FILE = "bias_factors.npz"
# Factors in the published code's naming carry no checksum: they are accepted for a layer when their
# worst logit error against the bias of the current weights is at most this (a file of other weights
# is off by several logits).
PUBLISHED_MAX_LOGIT_ERROR = 2.0
# A worst logit error above this moves a softmax weight by more than ~20% (e^0.2 - 1): worth a warning.
LARGE_LOGIT_ERROR = 0.1
_PUBLISHED_NAME = re.compile(r"^swin_v2_(\w+?)_q_bias_(\d+)\.npy$")
# What each model family's bias is derived from: the names of a drop-in WindowAttention's bias_weights(), in the
# order the checksum covers them. Factor files record them, so one family's factors never load into the other's
# layers (their checksums differ too, but half-precision weights and the published naming are judged by the
# logit error, which a bias of similar range can pass).
BIAS_WEIGHTS = {
    "SwinV2": ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight", "relative_coords_table",
               "relative_position_index"),
    "Swin V1": ("relative_position_bias_table", "relative_position_index"),
}


class FactorFileError(ValueError):
    """A factor file that cannot be used: unreadable, of another format, or with invalid factors."""


@dataclass
class LayerFactors:
    """One attention layer's record in a factor file.

    q_bias, k_bias: (H, N, R) float32 tensors, or both None (the layer stays exact).
    checksum: sha256 of the weights they were computed from; None in the published naming.
    bias_weights: the names of those weights, in checksum order (:data:`BIAS_WEIGHTS`)."""
    index: int
    name: Optional[str]
    checksum: Optional[str]
    q_bias: Optional[torch.Tensor] = None
    k_bias: Optional[torch.Tensor] = None
    bias_weights: Optional[Tuple[str, ...]] = None

    @property
    def rank(self) -> Optional[int]:
        return None if self.q_bias is None else int(self.q_bias.shape[-1])


@dataclass
class FactorFile:
    """What :func:`read_factor_file` found: ``layers`` maps a layer index to its record."""
    path: str
    published_naming: bool
    num_layers: Optional[int]          # None in the published naming (it does not record it)
    layers: Dict[int, LayerFactors] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Rank rules
# ----------------------------------------------------------------------------------------------
def parse_rank_rule(rule: str) -> Optional[dict]:
    """``"exact"`` -> None; ``"rank:16"`` / ``"energy:0.995"`` / ``"logit:0.05"`` -> the keyword
    arguments of :func:`low_rank_bias_factors`. Anything else raises ValueError."""
    text = str(rule).strip().lower()
    if text == "exact":
        return None
    kind, _, value = text.partition(":")
    try:
        if kind == "rank" and int(value) >= 1:
            return {"rank": int(value)}
        if kind == "energy" and 0 < float(value) <= 1:
            return {"energy": float(value)}
        if kind == "logit" and float(value) > 0:
            return {"max_logit_error": float(value)}
    except ValueError:
        pass
    raise ValueError(f"FlashBias: bad rank rule {rule!r}; use 'exact', 'rank:R' (R >= 1), 'energy:E' "
                     f"(0 < E <= 1) or 'logit:L' (L > 0), e.g. FLASHBIAS_RANK=logit:0.05")


# ----------------------------------------------------------------------------------------------
# The SVD and its error
# ----------------------------------------------------------------------------------------------
def logit_error(bias: torch.Tensor, approx: torch.Tensor) -> Tuple[float, float]:
    """(max, mean) error of ``approx`` as attention logits, over (..., N, N).

    Softmax ignores a constant added to a row, so a row's error is measured after the best constant
    shift: max = max over rows of (max_j e - min_j e) / 2, mean = mean |e - row mean(e)|."""
    e = bias.double() - approx.double()
    max_err = ((e.amax(-1) - e.amin(-1)) / 2).max().item()
    mean_err = (e - e.mean(-1, keepdim=True)).abs().mean().item()
    return max_err, mean_err


class _Spectrum:
    """The SVD of one layer's (optionally row-centred) bias, and the error of each truncation."""

    def __init__(self, bias: torch.Tensor, center_rows: bool):
        self.bias = bias.detach().double().cpu()
        target = self.bias - self.bias.mean(-1, keepdim=True) if center_rows else self.bias
        self.U, self.S, self.Vh = torch.linalg.svd(target)
        power = self.S ** 2
        self.energy_kept = power.cumsum(-1) / power.sum(-1, keepdim=True).clamp_min(1e-300)   # (H, N)

    def errors(self, rank: int) -> Tuple[float, float]:
        approx = (self.U[:, :, :rank] * self.S[:, None, :rank]) @ self.Vh[:, :rank, :]
        return logit_error(self.bias, approx)

    def factors(self, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        root = self.S[:, :rank].sqrt()
        q_bias = self.U[:, :, :rank] * root[:, None, :]
        k_bias = self.Vh[:, :rank, :].transpose(1, 2) * root[:, None, :]
        return q_bias.float(), k_bias.float()

    def rank_for_energy(self, energy: float) -> int:
        return int((self.energy_kept < energy - 1e-12).sum(-1).max().item()) + 1

    def rank_for_error(self, max_logit_error: float, max_rank: int) -> Optional[int]:
        """The smallest rank <= max_rank whose max error is within the bound (None: none is). The error
        falls with the rank, not always monotonically: doubling, then bisecting."""
        lo, r = 0, 1
        while r < max_rank and self.errors(r)[0] > max_logit_error:
            lo, r = r, r * 2
        r = min(r, max_rank)
        if self.errors(r)[0] > max_logit_error:
            return None
        hi = r
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.errors(mid)[0] <= max_logit_error else (mid, hi)
        return hi


def low_rank_bias_factors(bias: torch.Tensor, rank: Optional[int] = None, energy: Optional[float] = None,
                          max_logit_error: Optional[float] = None, center_rows: bool = True,
                          max_rank: int = MAX_RANK):
    """SVD factors of a per-head bias: q_bias @ k_bias^T ~ bias (up to a constant per row).

    Exactly one rule chooses the rank R (shared by all heads, so the kernel sees one R):
      * ``rank``: that rank (capped at N and ``max_rank``);
      * ``energy``: the FlashBias paper's rule, the smallest R keeping this fraction of sum(sigma^2) in
        every head. It bounds lost energy, not the error in logits;
      * ``max_logit_error``: the smallest R whose :func:`logit_error` max is at most this.

    ``center_rows`` removes each row's mean before the SVD: softmax ignores it, and the rest is
    usually of lower rank.

    Args:
        bias: (H, N, N).
    Returns:
        (q_bias, k_bias, info): factors (H, N, R) float32 on bias's device, or (None, None, info) when
        no rank up to ``max_rank`` meets ``max_logit_error`` (use the dense bias). info: rank (or None),
        energy kept (worst head), max and mean logit error.
    """
    if sum(x is not None for x in (rank, energy, max_logit_error)) != 1:
        raise ValueError("give exactly one of rank, energy, max_logit_error")
    if bias.dim() != 3 or bias.shape[1] != bias.shape[2]:
        raise ValueError(f"bias must be (H, N, N); got {tuple(bias.shape)}")
    max_rank = min(max_rank, bias.shape[1], MAX_RANK)
    spectrum = _Spectrum(bias, center_rows)
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1; got {rank}")
        chosen = min(int(rank), max_rank)
    elif energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1]; got {energy}")
        chosen = min(spectrum.rank_for_energy(energy), max_rank)
    else:
        chosen = spectrum.rank_for_error(max_logit_error, max_rank)
    measured = chosen if chosen is not None else max_rank
    max_e, mean_e = spectrum.errors(measured)
    info = {"rank": chosen, "energy": float(spectrum.energy_kept[:, measured - 1].min()),
            "max_logit_error": max_e, "mean_logit_error": mean_e}
    if chosen is None:
        return None, None, info
    q_bias, k_bias = spectrum.factors(chosen)
    return q_bias.to(bias.device), k_bias.to(bias.device), info


# ----------------------------------------------------------------------------------------------
# The weights a bias comes from: their names and checksum
# ----------------------------------------------------------------------------------------------
def describe_bias_weights(names: Sequence[str]) -> str:
    """``"Swin V1 bias (from relative_position_bias_table, relative_position_index)"``, for messages."""
    family = next((f for f, known in BIAS_WEIGHTS.items() if tuple(names) == known), "bias of an unknown model")
    return f"{family}{' bias' if family in BIAS_WEIGHTS else ''} (from {', '.join(names)})"


def weights_checksum(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 hex of the tensors' values as float32 bytes, in order (dtype and device do not matter,
    so a .half() copy differs only by its rounding)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def find_factor_files(path: str) -> Optional[Tuple[str, bool]]:
    """(file or folder, published_naming) of the factor files at ``path``: a .npz file, a folder with
    bias_factors.npz, or a folder with the published code's ``swin_v2_*_q_bias_<i>.npy``. None when the
    folder holds none. A path that does not exist, or a file that is not .npz, raises FactorFileError."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise FactorFileError(f"FlashBias: {path} is a file but not a factor file (.npz): give a "
                                  f"{FACTORS_FILE} file or the folder that holds it")
        return path, False
    if not os.path.isdir(path):
        raise FactorFileError(f"FlashBias: factor folder {path} does not exist")
    if os.path.isfile(os.path.join(path, FACTORS_FILE)):
        return os.path.join(path, FACTORS_FILE), False
    if any(_PUBLISHED_NAME.match(f) for f in os.listdir(path)):
        return path, True
    return None


def _checked_factors(where: str, q_bias, k_bias) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pair as float32 tensors after checking shapes, rank and values; FactorFileError naming ``where``."""
    for what, f in (("q_bias", q_bias), ("k_bias", k_bias)):
        if f.ndim != 3 or f.dtype.kind != "f":
            raise FactorFileError(f"FlashBias: {where}: {what} must be a float array (H, N, R); got "
                                  f"{f.dtype} {tuple(f.shape)}")
        if not np.isfinite(f).all():
            raise FactorFileError(f"FlashBias: {where}: {what} holds NaN or infinite values")
    if q_bias.shape != k_bias.shape:
        raise FactorFileError(f"FlashBias: {where}: q_bias {tuple(q_bias.shape)} and k_bias "
                              f"{tuple(k_bias.shape)} differ")
    if not 1 <= q_bias.shape[2] <= MAX_RANK:
        raise FactorFileError(f"FlashBias: {where}: rank {q_bias.shape[2]} is outside 1..{MAX_RANK}")
    return (torch.from_numpy(np.ascontiguousarray(q_bias, np.float32)),
            torch.from_numpy(np.ascontiguousarray(k_bias, np.float32)))


def _read_npz_layer(z, keys, path: str, i: int) -> LayerFactors:
    name = str(z[f"layer{i}_name"]) if f"layer{i}_name" in keys else None
    where = f"{path}: layer {i} ({name})"
    if name is None:
        raise FactorFileError(f"FlashBias: {path}: layer {i} has no name")
    if f"layer{i}_checksum" not in keys:
        raise FactorFileError(f"FlashBias: {where} has no checksum")
    weights = (tuple(str(z[f"layer{i}_bias_weights"]).split(",")) if f"layer{i}_bias_weights" in keys
               else BIAS_WEIGHTS["SwinV2"])  # written before the names were recorded: by the SwinV2 drop-in
    record = LayerFactors(i, name, str(z[f"layer{i}_checksum"]), bias_weights=weights)
    has_q, has_k = f"layer{i}_q_bias" in keys, f"layer{i}_k_bias" in keys
    if has_q != has_k:
        raise FactorFileError(f"FlashBias: {where} has only one of q_bias / k_bias")
    if has_q:
        record.q_bias, record.k_bias = _checked_factors(where, z[f"layer{i}_q_bias"], z[f"layer{i}_k_bias"])
    return record


def _read_npz(path: str) -> FactorFile:
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        fmt = str(z["format"]) if "format" in keys else None
        if fmt != FACTORS_FORMAT:
            raise FactorFileError(f"FlashBias: {path}: format {fmt!r}, expected {FACTORS_FORMAT!r}")
        if "num_layers" not in keys:
            raise FactorFileError(f"FlashBias: {path}: no num_layers")
        num_layers = int(z["num_layers"])
        try:
            meta = json.loads(str(z["meta"])) if "meta" in keys else {}
        except json.JSONDecodeError:
            meta = {"text": str(z["meta"])}
        found = FactorFile(path, False, num_layers, meta=meta if isinstance(meta, dict) else {"value": meta})
        for i in range(num_layers):
            found.layers[i] = _read_npz_layer(z, keys, path, i)
    return found


def _read_published(folder: str) -> FactorFile:
    q_files: Dict[int, str] = {}
    for f in sorted(os.listdir(folder)):
        m = _PUBLISHED_NAME.match(f)
        if m:
            i = int(m.group(2))
            if i in q_files:
                raise FactorFileError(f"FlashBias: {folder}: several swin_v2_*_q_bias_{i}.npy files")
            q_files[i] = os.path.join(folder, f)
    found = FactorFile(folder, True, None)
    for i, q_file in sorted(q_files.items()):
        k_file = q_file[:-len(f"_q_bias_{i}.npy")] + f"_k_bias_{i}.npy"
        if not os.path.isfile(k_file):
            raise FactorFileError(f"FlashBias: layer {i}: {q_file} has no {os.path.basename(k_file)}")
        try:
            q_bias, k_bias = np.load(q_file, allow_pickle=False), np.load(k_file, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise FactorFileError(f"FlashBias: layer {i}: {q_file} or its k_bias file is corrupt ({e})") from None
        record = LayerFactors(i, None, None, bias_weights=BIAS_WEIGHTS["SwinV2"])  # the naming is SwinV2's
        record.q_bias, record.k_bias = _checked_factors(f"{q_file} (layer {i})", q_bias, k_bias)
        found.layers[i] = record
    return found


def read_factor_file(path: str) -> FactorFile:
    """Read and check the factor files at ``path`` (see :func:`find_factor_files`).

    Raises FactorFileError naming the file (and the layer) for a missing path, no factor files, another
    format, a missing or one-sided record, bad shapes or ranks, NaN/inf values, or corrupt bytes."""
    found = find_factor_files(path)
    if found is None:
        raise FactorFileError(f"FlashBias: no factor files ({FACTORS_FILE} or swin_v2_*_q_bias_<i>.npy) in {path}")
    source, published = found
    if published:
        return _read_published(source)
    try:
        return _read_npz(source)
    except FactorFileError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        # np.load raises these for truncated or foreign bytes; name the file, not the zip internals
        raise FactorFileError(f"FlashBias: factor file {source} is corrupt or truncated "
                              f"({type(e).__name__}: {e}); write it again with scripts/decompose_bias.py") from None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _replace_atomically(path: str, write) -> None:
    """Write through ``write(file_object)`` into a temporary file beside ``path``, then rename it over
    ``path``: an interrupted write never leaves a half-written file under the real name."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_factor_file(path: str, layers: Sequence[LayerFactors], meta=None) -> str:
    """Write ``bias_factors.npz`` (format above) atomically.

    path: a .npz file, or a folder (created) that gets bias_factors.npz. layers: one record per
    attention layer of the model, indices 0..L-1 in order, each with its name, checksum and bias_weights;
    records without factors stay exact. meta: a JSON-serialisable object or a string. Returns the file written."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, FACTORS_FILE)
    if [r.index for r in layers] != list(range(len(layers))):
        raise ValueError(f"FlashBias: factor records must be layers 0..{len(layers) - 1} in order; got "
                         f"{[r.index for r in layers]}")
    arrays = {"format": np.array(FACTORS_FORMAT), "num_layers": np.array(len(layers)),
              "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta))}
    for r in layers:
        if not r.name or not r.checksum or not r.bias_weights:
            raise ValueError(f"FlashBias: factor record {r.index} needs a name, a checksum and bias_weights")
        arrays[f"layer{r.index}_name"] = np.array(r.name)
        arrays[f"layer{r.index}_checksum"] = np.array(r.checksum)
        arrays[f"layer{r.index}_bias_weights"] = np.array(",".join(r.bias_weights))
        if r.q_bias is not None:
            q_bias, k_bias = (torch.as_tensor(f).detach().float().cpu().contiguous().numpy()
                              for f in (r.q_bias, r.k_bias))
            _checked_factors(f"{path}: layer {r.index} ({r.name})", q_bias, k_bias)
            arrays[f"layer{r.index}_q_bias"], arrays[f"layer{r.index}_k_bias"] = q_bias, k_bias
    _replace_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def published_file_name(tag: str, which: str, index: int) -> str:
    """The published FlashBias code's name of a factor file: swin_v2_{tag}_{q|k}_bias_{index}.npy."""
    return f"swin_v2_{tag}_{which}_bias_{index}.npy"


def write_published_factors(folder: str, tag: str, layers: Sequence[LayerFactors]) -> List[str]:
    """The published code's naming, one q/k pair per layer with factors (that naming cannot say
    "exact": layers without factors get no files), for SwinV2 factors only (ValueError otherwise: the
    naming says swin_v2 and records no model family). Returns the files written."""
    for r in layers:
        if r.bias_weights is not None and tuple(r.bias_weights) != BIAS_WEIGHTS["SwinV2"]:
            raise ValueError(f"FlashBias: the published FlashBias code's naming (swin_v2_*) holds SwinV2 factors; "
                             f"layer {r.index} ({r.name}) is a {describe_bias_weights(r.bias_weights)}")
    os.makedirs(folder, exist_ok=True)
    written = []
    for r in layers:
        if r.q_bias is None:
            continue
        for which, f in (("q", r.q_bias), ("k", r.k_bias)):
            target = os.path.join(folder, published_file_name(tag, which, r.index))
            array = torch.as_tensor(f).detach().float().cpu().numpy()
            _replace_atomically(target, lambda fo, a=array: np.save(fo, a))
            written.append(target)
    return written
