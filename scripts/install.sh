#!/usr/bin/env bash
# Install the FlashBias drop-in into a checkout of microsoft/Swin-Transformer, and (opt-in) make the
# official main.py run on timm 1.x and PyTorch >= 2.6. Run with --help for the details.
set -euo pipefail

# the drop-in: these files of this repository's root go into the checkout's models/
DROPIN_FILES=(swin_transformer_v2.py swin_transformer.py flash_bias_triton.py flash_bias_runtime.py flash_bias_factors.py)
# the drop-ins that replace an official model file (kept once as NAME.orig)
OFFICIAL_FILES=" swin_transformer_v2.py swin_transformer.py "

usage() {
    cat <<'EOF'
usage: scripts/install.sh [--fix-official [--undo]] PATH_TO_SWIN_TRANSFORMER_CHECKOUT

Default mode: install the FlashBias drop-in.
  Copies swin_transformer_v2.py (SwinV2), swin_transformer.py (Swin V1), flash_bias_triton.py,
  flash_bias_runtime.py and flash_bias_factors.py into the checkout's models/, after checking that PATH is a checkout
  (models/swin_transformer_v2.py, main.py, config.py). Never loses a file:
  - the official models/swin_transformer_v2.py and models/swin_transformer.py are kept once as
    NAME.orig (a later install never overwrites that backup);
  - a file already identical to ours is left alone;
  - any other file in the way (an edited copy, an older FlashBias version) is first renamed to
    NAME.bak-YYYYmmdd-HHMMSS (never over an existing backup).

--fix-official: fix the official code instead (does not install the drop-in; run both for both).
  The official main.py fails on today's stack: timm >= 0.5 renamed an LR-scheduler keyword
  (TypeError: ... 't_mul'; main.py builds the scheduler even for --eval), and PyTorch >= 2.6 refuses
  to torch.load the trainer's own checkpoints (they hold the yacs config: --resume fails).
  This patches lr_scheduler.py (its timm imports -> flashbias_timm_compat.py, which takes the
  timm 0.4.12 keywords on any timm) and every torch.load of a checkpoint in utils.py,
  utils_simmim.py and utils_moe.py (-> safe_checkpoint.load_checkpoint: tensors, containers and yacs
  configs only, nothing from the file is run), and copies those two helper files into the checkout.
  Only files that are exactly the official version (or already our patched version) are touched;
  otherwise it stops, naming the file, before changing anything. Each patched file is kept once as
  FILE.flashbias-orig. Running it again changes nothing.
  --undo: restore the official files from those backups and remove the two helper files.

Environment: PYTHON (default python3) runs the --fix-official patcher (standard library only).
Exit status 2 with "error: ..." for a usage error or a file it will not touch.
EOF
}

fail() {
    echo "error: $*" >&2
    exit 2
}

fix_official=0
undo=0
target=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        --fix-official) fix_official=1 ;;
        --undo) undo=1 ;;
        -*) fail "unknown option $arg (see scripts/install.sh --help)" ;;
        *) [ -z "$target" ] || fail "give one checkout, not '$target' and '$arg' (see --help)"; target="$arg" ;;
    esac
done
[ -n "$target" ] || fail "no checkout given (usage: scripts/install.sh [--fix-official [--undo]] PATH; see --help)"
[ "$undo" = 0 ] || [ "$fix_official" = 1 ] || fail "--undo undoes --fix-official: give both"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -d "$target" ] || fail "$target is not a directory; give the root of a microsoft/Swin-Transformer checkout"
target="$(cd "$target" && pwd)"
missing=()
for f in models/swin_transformer_v2.py main.py config.py; do
    [ -f "$target/$f" ] || missing+=("$f")
done
if [ "${#missing[@]}" -ne 0 ]; then
    fail "$target is not a microsoft/Swin-Transformer checkout: missing ${missing[*]}
       (clone https://github.com/microsoft/Swin-Transformer and give its root folder)"
fi

if [ "$fix_official" = 1 ]; then
    python="${PYTHON:-python3}"
    command -v "$python" >/dev/null || fail "$python not found: set PYTHON to a Python 3 interpreter"
    fix_args=("$target")
    [ "$undo" = 0 ] || fix_args=(--undo "$target")
    exec "$python" "$here/scripts/official_fix/fix_official.py" "${fix_args[@]}"
fi

models="$target/models"
for f in "${DROPIN_FILES[@]}"; do
    [ -f "$here/$f" ] || fail "$here/$f is missing: run this script from a complete FlashBias checkout"
done
if [ "$(cd "$here" && pwd -P)" = "$(cd "$models" && pwd -P)" ]; then
    fail "$models is this repository itself"
fi
# Check every target before changing anything: a folder (or anything but a file or a link) in the
# way is the user's to sort out.
for f in "${DROPIN_FILES[@]}"; do
    if [ -e "$models/$f" ] && [ ! -f "$models/$f" ]; then
        fail "$models/$f exists and is not a file; move it away and run this again"
    fi
done

# A name for a backup of $1 that is not taken yet: $1.bak-YYYYmmdd-HHMMSS[-N].
free_backup_name() {
    local base name k=0
    base="$1.bak-$(date +%Y%m%d-%H%M%S)"
    name="$base"
    while [ -e "$name" ] || [ -L "$name" ]; do
        k=$((k + 1))
        name="$base-$k"
    done
    echo "$name"
}

changed=0
for f in "${DROPIN_FILES[@]}"; do
    dst="$models/$f"
    orig="$models/$f.orig"
    if [ -f "$dst" ] && cmp -s "$here/$f" "$dst"; then
        echo "models/$f is already this FlashBias version; nothing to do"
        continue
    fi
    # Backups are renames (mv): the old file keeps its contents and metadata, and a symbolic link is
    # kept as the link instead of being written through.
    # The official file never mentions FlashBias: one that does is an older or edited copy of ours
    # (copied by hand), not the official file to keep as .orig.
    official=0
    [[ "$OFFICIAL_FILES" == *" $f "* ]] && official=1
    if [ "$official" = 1 ] && [ -f "$dst" ] && [ ! -e "$orig" ] && [ ! -L "$orig" ] && ! grep -q FlashBias "$dst"; then
        mv "$dst" "$orig"
        echo "backed up the official models/$f -> models/$f.orig"
    elif [ "$official" = 1 ] && [ -f "$dst" ] && cmp -s "$dst" "$orig"; then
        echo "models/$f is the official file, already backed up as models/$f.orig"
    elif [ -e "$dst" ] || [ -L "$dst" ]; then
        backup="$(free_backup_name "$dst")"
        mv "$dst" "$backup"
        echo "models/$f differs from this FlashBias version (edited, or an older copy):" \
             "backed up -> models/$(basename "$backup")"
    fi
    # copy next to it, then rename: the target is never half-written
    cp "$here/$f" "$dst.flashbias-tmp"
    mv -f "$dst.flashbias-tmp" "$dst"
    echo "installed $f -> models/$f"
    changed=1
done

if [ "$changed" = 0 ]; then
    echo "nothing to do: $models already has this FlashBias version"
    exit 0
fi
echo "done. Evaluate as usual, e.g.:"
echo "  cd $target && python -m torch.distributed.launch --nproc_per_node 1 main.py --eval \\"
echo "      --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \\"
echo "      --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --data-path IMAGENET"
echo "  (factors: put bias_factors.npz in ./decomposed_bias there, or set FLASHBIAS_FACTORS_DIR / FLASHBIAS_RANK)"
echo "  On timm 1.x or PyTorch >= 2.6 the official main.py also needs: scripts/install.sh --fix-official $target"
