#!/usr/bin/env bash
# Install the FlashBias drop-in into a checkout of microsoft/Swin-Transformer.
#
#   scripts/install.sh PATH_TO_SWIN_TRANSFORMER_CHECKOUT
#
# Copies swin_transformer_v2.py and flash_bias_triton.py (this repository's root) into the
# checkout's models/, after checking that it is one (models/swin_transformer_v2.py, main.py and
# config.py exist). The official models/swin_transformer_v2.py is kept once as
# models/swin_transformer_v2.py.orig (a later install never overwrites that backup).
set -euo pipefail

usage="usage: scripts/install.sh PATH_TO_SWIN_TRANSFORMER_CHECKOUT"
if [ "$#" -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    echo "$usage" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="$1"

if [ ! -d "$target" ]; then
    echo "error: $target is not a directory; give the root of a microsoft/Swin-Transformer checkout" >&2
    exit 2
fi
target="$(cd "$target" && pwd)"
missing=()
for f in models/swin_transformer_v2.py main.py config.py; do
    [ -f "$target/$f" ] || missing+=("$f")
done
if [ "${#missing[@]}" -ne 0 ]; then
    echo "error: $target is not a microsoft/Swin-Transformer checkout: missing ${missing[*]}" >&2
    echo "       (clone https://github.com/microsoft/Swin-Transformer and give its root folder)" >&2
    exit 2
fi
for f in swin_transformer_v2.py flash_bias_triton.py; do
    if [ ! -f "$here/$f" ]; then
        echo "error: $here/$f is missing: run this script from a complete FlashBias checkout" >&2
        exit 2
    fi
done

models="$target/models"
if [ "$(cd "$here" && pwd -P)" = "$(cd "$models" && pwd -P)" ]; then
    echo "error: $models is this repository itself" >&2
    exit 2
fi

if [ -e "$models/swin_transformer_v2.py.orig" ]; then
    echo "kept the existing backup models/swin_transformer_v2.py.orig"
elif cmp -s "$models/swin_transformer_v2.py" "$here/swin_transformer_v2.py"; then
    echo "models/swin_transformer_v2.py is already the FlashBias drop-in; no backup made"
else
    cp -p "$models/swin_transformer_v2.py" "$models/swin_transformer_v2.py.orig"
    echo "backed up the official models/swin_transformer_v2.py -> models/swin_transformer_v2.py.orig"
fi
for f in swin_transformer_v2.py flash_bias_triton.py; do
    cp "$here/$f" "$models/$f"
    echo "copied $f -> $models/$f"
done
echo "done. Evaluate as usual, e.g.:"
echo "  cd $target && python -m torch.distributed.launch --nproc_per_node 1 main.py --eval \\"
echo "      --cfg configs/swinv2/swinv2_base_patch4_window12to24_192to384_22kto1k_ft.yaml \\"
echo "      --resume swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth --data-path IMAGENET"
echo "  (factors: put bias_factors.npz in ./decomposed_bias there, or set FLASHBIAS_FACTORS_DIR / FLASHBIAS_RANK)"
