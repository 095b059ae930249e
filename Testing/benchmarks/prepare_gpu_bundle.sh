#!/usr/bin/env bash
# Times --prepare on the GPU machine (docs/PERFORMANCE.md, "Preparing raw scans"), which has torch
# but not SimpleITK, deepbet or their needs, and no internet; a device call carries at most 64 MiB
# with the checkout (about 18 MB). Here, from the repository root:
#   bash Testing/benchmarks/prepare_gpu_bundle.sh           # builds .device/prepare/ (minutes: xz)
#     sitk/sitk.tar.xz    SimpleITK's abi3 wheel unpacked, xz (28 MB of a 53 MB wheel)
#     rest/site.tar.xz    deepbet (its two networks inside), nibabel, cc3d, fill_voids, fastremap,
#                         slicerio, pynrrd, unpacked, xz; the image has torch, pandas, tqdm, requests
#     rest/case/          prepare_time.py --craft: the crafted raw case and BraTS20_Training_001
# and prints the sizes and the two device calls. Both parts together with the checkout exceed
# 64 MiB, so call 1 unpacks SimpleITK into .device/site, which stays on the warm machine, and
# call 2 unpacks the rest there and runs prepare_time.py (plain, --prepare and plain-raw commands).
# On the device (or here, to try it: PY=.venv/bin/python DEVICE=cpu, after a build with PYVER=3.11):
#   bash Testing/benchmarks/prepare_gpu_bundle.sh device
# .device/ is ignored through .gitignore: no wheel or case is ever committed.
set -euo pipefail
PY=${PY:-python3}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.device/prepare}
SITE=${SITE:-.device/site}
SITK=SimpleITK==2.5.7
REST=(deepbet==1.0.2 nibabel==5.4.2 connected-components-3d==4.1.1 fill_voids==2.1.2 fastremap==1.21.0 slicerio==1.4.0
      pynrrd==1.1.3)

unpacked_xz() {  # unpacked_xz OUT.tar.xz PACKAGE==VERSION...: the wheels unpacked (a wheel is a zip of site-packages) and xz'd
    local out=$1 work
    shift
    work=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$work/whl" "$@"
    mkdir "$work/site"
    for wheel in "$work"/whl/*.whl; do "$PY" -m zipfile -e "$wheel" "$work/site"; done
    ls -l "$work"/whl
    tar cf - -C "$work/site" . | xz -6 -T0 > "$out"
    rm -rf "$work"
}

if [ "${1:-build}" = build ]; then
    rm -rf "$DEST"
    mkdir -p "$DEST/sitk" "$DEST/rest"
    unpacked_xz "$DEST/sitk/sitk.tar.xz" "$SITK"
    unpacked_xz "$DEST/rest/site.tar.xz" "${REST[@]}"
    "$PY" Testing/benchmarks/prepare_time.py --craft "$DEST/rest/case"
    tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
    sitk=$(du -sb "$DEST/sitk" | cut -f1)
    rest=$(du -sb "$DEST/rest" | cut -f1)
    echo "checkout $((tree / 1000000)) MB, call 1 carries $((sitk / 1000000)) MB, call 2 $((rest / 1000000)) MB;" \
         "one call would be $(((tree + sitk + rest) / 1000000)) MB against 67 MB (64 MiB)"
    cat <<'EOF'
Device call 1, carry [".device/prepare/sitk"] (about a minute):
    bash Testing/benchmarks/prepare_gpu_bundle.sh device
Device call 2, at once (the machine must still be warm), carry [".device/prepare/rest"]:
    bash Testing/benchmarks/prepare_gpu_bundle.sh device
EOF
    exit 0
fi

[ "$1" = device ] || { echo "usage: $0 [build|device]" >&2; exit 2; }
OUT=${OUT:-/tmp/prepare-gpu-out}
mkdir -p "$SITE" "$OUT"
for part in "$DEST/sitk/sitk.tar.xz" "$DEST/rest/site.tar.xz"; do
    # Once per machine: call 2 finds call 1's SimpleITK already there.
    if [ -f "$part" ] && [ ! -f "$SITE/.$(basename "$part").done" ]; then
        tar xJf "$part" -C "$SITE" && touch "$SITE/.$(basename "$part").done"
    fi
done
export PYTHONPATH="$(cd "$SITE" && pwd):$PWD" PYTHONUNBUFFERED=1
"$PY" -c "import SimpleITK" 2>/dev/null || { echo "SimpleITK is not in $SITE: run call 1 first (the machine was given back?)"; exit 1; }
if [ ! -d "$DEST/rest/case" ]; then
    echo "SimpleITK unpacked into $SITE; call 2 brings the rest and the cases."
    exit 0
fi
{
    nvidia-smi -L 2>/dev/null || true
    nproc
    "$PY" -c "import sys, torch, SimpleITK, deepbet, nibabel, cc3d, fill_voids, slicerio
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'SimpleITK', SimpleITK.Version_VersionString(), 'nibabel', nibabel.__version__)
print('from', SimpleITK.__file__, deepbet.__file__, cc3d.__file__)"
    "$PY" Testing/benchmarks/prepare_time.py --device "${DEVICE:-cuda}" --cases "$DEST/rest/case"
} 2>&1 | tee "$OUT/prepare_gpu.log"
