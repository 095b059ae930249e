"""Model weights: safetensors plus a JSON model card, verified before use.

A weights file ``name.safetensors`` travels with ``name.json``: the architecture config,
preprocessing parameters, label convention, training data and metrics, and the sha256 of
the weights file. Nothing executes code on load (safetensors holds tensors only).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import KANTumorSegError
from .preprocessing import PreprocessingConfig

CARD_FORMAT = 1
DEFAULT_MODEL_NAME = "kanunet2d_brats.safetensors"


def default_model_path() -> Path:
    """The shipped model: $KANTUMORSEG_MODEL, else Resources/Models beside the package."""
    override = os.environ.get("KANTUMORSEG_MODEL")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / DEFAULT_MODEL_NAME


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(weights: Path) -> dict:
    """The model card of a weights file, checked for format and checksum."""
    if not weights.exists():
        raise KANTumorSegError(
            f"Model weights {weights} not found; train and export a model (see README, Training) "
            "or give one with --model.")
    card_file = card_path(weights)
    if not card_file.exists():
        raise KANTumorSegError(f"Model card {card_file} is missing; every weights file needs its .json card beside it.")
    try:
        card = json.loads(card_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KANTumorSegError(f"Model card {card_file} is not valid JSON ({error}).") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise KANTumorSegError(f"Model card {card_file} is not a KANTumorSeg model card of format {CARD_FORMAT}.")
    actual = sha256_of(weights)
    if card.get("sha256") != actual:
        raise KANTumorSegError(
            f"Model weights {weights} do not match their card's checksum (sha256 {actual[:12]}... against "
            f"{str(card.get('sha256'))[:12]}...); the file is corrupt or belongs to another card.")
    return card


def load_model(weights: Path, card: dict | None = None):
    """Build the network the card describes and fill it with the checked weights.

    ``card``: the card ``read_card`` already returned for these weights (saves hashing the
    file again). Returns (model in eval mode on the CPU, card, preprocessing config).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .conformal import ConformalRanges
    from .postprocess import PostprocessConfig
    from .unet import KANUNet2D, ModelConfig

    card = card if card is not None else read_card(weights)
    try:
        config = ModelConfig.from_dict(card["model"])
        preprocessing = PreprocessingConfig.from_dict(card["preprocessing"])
        # Checked here so that a bad threshold or range band stops the run before the slow part.
        PostprocessConfig.from_dict(card.get("postprocessing"))
        ConformalRanges.from_card(card)
    except (KeyError, TypeError, ValueError) as error:
        raise KANTumorSegError(f"Model card {card_path(weights)} has an invalid config: {error}.") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise KANTumorSegError(f"Model weights {weights} could not be read as safetensors ({error}).") from None
    model = KANUNet2D(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"wrong shape {', '.join(wrong[:3])}" if wrong else "") if part)
        raise KANTumorSegError(f"Model weights {weights} do not fit the architecture in their card ({detail}).")
    import torch

    # A diverged training run exports NaN weights with a valid card: the labelmap would be empty.
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if broken:
        raise KANTumorSegError(f"Model weights {weights} hold NaN or infinite values ({', '.join(broken[:3])}).")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()
    return model, card, preprocessing


def save_model(model, weights: Path, card_fields: dict, half: bool = False) -> dict:
    """Write weights (optionally float16, halving the file) and their card; returns the card."""
    from safetensors.torch import save_file

    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights))
    card = {"format": CARD_FORMAT, "model": model.config.to_dict(), **card_fields,
            "weights_dtype": "float16" if half else "float32", "sha256": sha256_of(weights)}
    card_path(weights).write_text(json.dumps(card, indent=2) + "\n")
    return card


def update_card(weights: Path, fields: dict) -> dict:
    """Add or replace top-level ``fields`` of a weights file's card (checked first, its checksum
    kept: the weights do not change), for what is measured after export: the conformal volume
    ranges, the Platt scaling, the confidence members. Returns the new card."""
    card = {**read_card(weights), **fields}
    card_path(weights).write_text(json.dumps(card, indent=2) + "\n")
    return card
