"""A finished run -> the library's weights file and model card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TERMS_OF_USE = (
    "Weights trained on BraTS 2018-2021 data (CC BY / TCIA terms): for research, not for clinical diagnosis or "
    "treatment decisions; a result must be checked by a qualified reader. Cite the BraTS papers (Menze 2015, Bakas "
    "2017, Baid 2021) and the KANU-Net 2D study when using it.")
"""Written into every exported card: BraTS data are released for research."""

MAX_BYTES = 20 * 1024 * 1024
"""The shipped model must stay under 20 MB; float16 halves the file when float32 does not fit."""


def export_run(run_dir: Path, output: Path, name: str = "") -> dict:
    import torch

    from KANTumorSegLib.postprocess import PostprocessConfig
    from KANTumorSegLib.preprocessing import PreprocessingConfig
    from KANTumorSegLib.weights import save_model

    from .models import build_model

    for needed in ("config.yaml", "best.pt"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run: {needed} is missing.")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if config["model"].get("arch", "kanunet") != "kanunet":
        raise ValueError(f"{run_dir} trained a {config['model']['arch']}; only KANU-Net runs can be exported.")
    model = build_model(config["model"])
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    split_file = run_dir / "split.json"
    split = json.loads(split_file.read_text()) if split_file.exists() else {}
    test = results.get("test", {})
    for case in test.get("cases", {}).values():
        case.pop("slice_dice_mean", None)
    fields = {
        "name": name or config["name"],
        "preprocessing": PreprocessingConfig.from_dict(config["preprocessing"]).to_dict(),
        "label_convention": "brats2020",
        "postprocessing": PostprocessConfig.from_dict(config.get("postprocessing")).to_dict(),
        "training_data": {
            "description": (
                ("Kaggle BraTS2020 HDF5 slices (mwarylak_BraTS_Thesis, 150 tumour slices of 125 patients) outside "
                 "the validation patients, plus " if config["data"].get("use_hdf5", True) else "")
                + "every brain slice (tumour and tumour-free) of the 3D cases "
                + ", ".join(c for c in config["data"]["train_cases"] if c not in config["data"]["val_cases"])
                + "; validation: " + (" and ".join(
                    (["whole HDF5 patients"] if config["data"]["n_val"] else [])
                    + (["the 3D cases " + ", ".join(config["data"]["val_cases"])] if config["data"]["val_cases"] else []))
                    or "none")
                + "; test cases never seen: " + ", ".join(config["data"]["test_cases"])),
            "n_train": split.get("n_train"),
            "n_val": split.get("n_val"),
            "validation_patients": sorted({k[1] for k in split.get("val", [])}),
        },
        "training_config": config,
        "terms_of_use": TERMS_OF_USE,
        "metrics": {"best_epoch": results.get("best_epoch"), "epochs_run": results.get("epochs_run"),
                    "epochs_planned": results.get("epochs_planned"), "parameters": results.get("parameters"),
                    # The test figures come from the float32 checkpoint on the training device (bf16
                    # autocast on CUDA when train.amp), before any float16 export.
                    "test_device": results.get("device"), "validation": results.get("validation"), "test": test},
    }
    n_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    card = save_model(model, output, fields, half=n_bytes > MAX_BYTES * 0.95)
    return card


def add_members(output: Path, members: list[Path]) -> dict:
    """Write each member (an exported weights file with its card) beside the exported ``output`` in
    float16, as ``<stem>_member<k>.safetensors`` with its own card (preprocessing and all), and
    name them in ``output``'s card (``confidence_members``, ``KANTumorSegLib/ensemble.py``).

    float16 halves a member so that the model and one member of its size stay under
    ``MAX_BYTES``; its bf16 accuracy check (``inference``), made on float32 weights, is not carried
    over. Refuses a total above ``MAX_BYTES``. Returns the main card."""
    from KANTumorSegLib.ensemble import CARD_KEY
    from KANTumorSegLib.weights import load_model, save_model, update_card

    names = []
    for k, member in enumerate(members, 1):
        model, card, _ = load_model(member)
        target = output.with_name(f"{output.stem}_member{k}.safetensors")
        fields = {key: value for key, value in card.items()
                  if key not in ("format", "model", "sha256", "weights_dtype", "inference", CARD_KEY)}
        save_model(model, target, {**fields, "member_of": output.name, "exported_from": str(member)}, half=True)
        names.append(target.name)
    files = [output] + [output.with_name(n) for n in names]
    total = sum(f.stat().st_size + f.with_suffix(".json").stat().st_size for f in files)
    if total > MAX_BYTES:
        # Sizes are known only once written: take the members back, leaving the export as it was.
        for member_file in files[1:]:
            member_file.unlink()
            member_file.with_suffix(".json").unlink()
        raise ValueError(f"the model and its members take {total / 2**20:.1f} MiB, above the {MAX_BYTES / 2**20:.0f} MiB shipped")
    return update_card(output, {CARD_KEY: names})
