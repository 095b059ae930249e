"""The preprocessing of the model's input slices, shared by training and inference.

Slices are arrays of shape (4, X, Y) in the model's channel order (T1, T1ce, T2, FLAIR)
and the model's in-plane layout (first axis towards the patient's left, second towards
posterior: the layout of BraTS NIfTI ``data[:, :, z]`` and of the Kaggle HDF5 slices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""The model's fixed input channel order."""


@dataclass(frozen=True)
class PreprocessingConfig:
    """Parameters of the preprocessing; stored in every model card.

    Each modality is scaled from its range [low, high] to u in [0, 1] (clipped), gamma-corrected
    as u ** gamma, then mapped to [-1, 1] as 2 * u ** gamma - 1. Gamma > 1 darkens the
    mid-range and stretches the bright end (tumour in T1ce, T2 and FLAIR).

    ``intensity_range`` says where the range comes from:
    - "slice" (the study): low and high are the slice's minimum and maximum. A slice holding
      little brain (cerebellum, skull base) is stretched over the whole range and looks bright
      everywhere, which is where the study's recipe marks false tumour on whole volumes.
    - "volume": low is the modality's minimum (the background) and high the
      ``upper_percentile`` of its brain voxels over the whole volume, so every slice of a case
      is scaled alike and a few saturated voxels do not set the scale. A lone slice (the HDF5
      training slices) takes the same statistics over itself: its tumour slices hold most of
      a brain, where the two agree (docs/RESULTS.md measures how closely).
    """

    gamma: tuple[float, ...] = (1.0, 1.5, 1.5, 1.2)
    crop_size: int = 224
    intensity_range: str = "slice"
    upper_percentile: float = 99.5

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gamma"] = list(self.gamma)
        data["channels"] = list(MODALITIES)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessingConfig:
        channels = data.get("channels", list(MODALITIES))
        if list(channels) != list(MODALITIES):
            raise ValueError(f"channel order {channels} is not {list(MODALITIES)}")
        gamma = tuple(float(g) for g in data["gamma"])
        # One positive gamma per channel: a short list would leave a channel unscaled.
        if len(gamma) != len(MODALITIES) or not all(g > 0 for g in gamma):
            raise ValueError(f"gamma {list(gamma)} needs {len(MODALITIES)} positive values, one per channel")
        crop_size = int(data["crop_size"])
        if crop_size < 16 or crop_size % 16:
            raise ValueError(f"crop_size {crop_size} must be a positive multiple of 16 (the network pools four times by 2)")
        # Cards written before "volume" scaling existed hold neither key: they are the study's.
        intensity_range = str(data.get("intensity_range", "slice"))
        if intensity_range not in INTENSITY_RANGES:
            raise ValueError(f"intensity_range {intensity_range!r} must be one of {', '.join(INTENSITY_RANGES)}")
        upper_percentile = float(data.get("upper_percentile", 99.5))
        if not 50.0 < upper_percentile <= 100.0:
            raise ValueError(f"upper_percentile {upper_percentile} must lie in (50, 100]")
        return cls(gamma=gamma, crop_size=crop_size, intensity_range=intensity_range, upper_percentile=upper_percentile)


INTENSITY_RANGES = ("slice", "volume")


def brain_mask(slice_: np.ndarray) -> np.ndarray:
    """(X, Y) mask of voxels above the slice minimum in any modality.

    On skull-stripped BraTS data the background is the slice minimum (0 in raw NIfTI,
    a negative constant in z-scored slices), so this is the brain.
    """
    flat = slice_.reshape(slice_.shape[0], -1)
    minimum = flat.min(axis=1).reshape(-1, 1, 1)
    return (slice_ > minimum).any(axis=0)


def intensity_ranges(image: np.ndarray, config: PreprocessingConfig) -> np.ndarray:
    """(C, 2) float32 [low, high] of each modality of a (C, ...) slice or volume, as
    ``config.intensity_range`` defines them (see PreprocessingConfig): the minimum, and the
    maximum ("slice") or the ``upper_percentile`` of the voxels above the minimum in any
    modality ("volume"). Invariant under any positive affine intensity change of a modality."""
    values = np.asarray(image, dtype=np.float32)
    flat = values.reshape(values.shape[0], -1)
    low = flat.min(axis=1)
    if config.intensity_range == "slice":
        return np.stack([low, flat.max(axis=1)], axis=1)
    brain = (flat > low[:, None]).any(axis=0)
    if not brain.any():
        return np.stack([low, low], axis=1)
    high = np.percentile(flat[:, brain], config.upper_percentile, axis=1).astype(np.float32)
    return np.stack([low, high], axis=1)


def volume_ranges(volume: np.ndarray, config: PreprocessingConfig) -> np.ndarray | None:
    """The ranges every slice of a (C, X, Y, Z) volume is scaled by: the whole volume's under
    "volume" scaling, None under "slice" (each slice then takes its own in ``preprocess_slice``)."""
    return intensity_ranges(volume, config) if config.intensity_range == "volume" else None


def scale_intensities(slice_: np.ndarray, config: PreprocessingConfig, ranges: np.ndarray | None = None) -> np.ndarray:
    """Scale each modality of a (C, X, Y) slice to [-1, 1] with the study's gamma, over
    ``ranges`` (C, 2), by default the slice's own (``intensity_ranges``). A constant modality
    (no brain in it) becomes -1."""
    values = np.asarray(slice_, dtype=np.float32)
    ranges = intensity_ranges(values, config) if ranges is None else ranges
    out = np.empty(slice_.shape, dtype=np.float32)
    for c, gamma in enumerate(config.gamma):
        out[c] = scale_channel(values[c], float(ranges[c, 0]), float(ranges[c, 1]), gamma)
    return out


def scale_channel(values: np.ndarray, low: float, high: float, gamma: float) -> np.ndarray:
    """float32 values of one modality -> 2 * clip((values - low) / (high - low), 0, 1) ** gamma - 1,
    all -1 when high == low.

    Element by element, so scaling part of a slice gives that part of the scaled slice
    bit for bit, and values equal to ``low`` give exactly -1 (0 ** gamma is 0). The clip only
    acts on a percentile range ("volume"): a slice's own min-max range holds every value.
    """
    if high > low:
        return 2.0 * np.clip((values - low) / (high - low), 0.0, 1.0) ** gamma - 1.0
    return np.full(values.shape, -1.0, dtype=np.float32)


@dataclass(frozen=True)
class CropBox:
    """Where a crop_size x crop_size window sits on a slice (may extend past its edges)."""

    x0: int
    y0: int
    size: int

    def source_and_target(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Matching index ranges on the slice and on the window (the overlap of both)."""
        sx0, sy0 = max(self.x0, 0), max(self.y0, 0)
        sx1, sy1 = min(self.x0 + self.size, shape[0]), min(self.y0 + self.size, shape[1])
        source = (slice(sx0, sx1), slice(sy0, sy1))
        target = (slice(sx0 - self.x0, sx1 - self.x0), slice(sy0 - self.y0, sy1 - self.y0))
        return source, target


def brain_bounds(mask: np.ndarray) -> tuple[slice, slice]:
    """The bounding box of a non-empty brain mask, as index ranges along X and Y."""
    xs, ys = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return slice(int(xs[0]), int(xs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1)


def brain_crop_box(mask: np.ndarray, size: int) -> CropBox:
    """A size x size window centred on the bounding box of the brain mask."""
    return _window_around(brain_bounds(mask), size)


def _window_around(bounds: tuple[slice, slice], size: int) -> CropBox:
    bx, by = bounds
    return CropBox((bx.start + bx.stop) // 2 - size // 2, (by.start + by.stop) // 2 - size // 2, size)


def crop(image: np.ndarray, box: CropBox, fill: float) -> np.ndarray:
    """Cut the window out of (..., X, Y), padding with ``fill`` outside the slice."""
    out = np.full((*image.shape[:-2], box.size, box.size), fill, dtype=image.dtype)
    source, target = box.source_and_target(image.shape[-2:])
    out[(..., *target)] = image[(..., *source)]
    return out


def paste(window: np.ndarray, box: CropBox, shape: tuple[int, int]) -> np.ndarray:
    """Put a (size, size) prediction back on a zero slice of ``shape``."""
    out = np.zeros(shape, dtype=window.dtype)
    source, target = box.source_and_target(shape)
    out[source] = window[target]
    return out


def preprocess_slice(slice_: np.ndarray, config: PreprocessingConfig,
                     ranges: np.ndarray | None = None) -> tuple[np.ndarray, CropBox] | None:
    """(4, X, Y) raw slice -> ((4, crop, crop) model input, its crop box), or None
    when the slice holds no brain. ``ranges``: the (4, 2) intensity ranges of its volume
    ("volume" scaling, ``intensity_ranges`` of the whole volume); by default the slice's own."""
    mask = brain_mask(slice_)
    if not mask.any():
        return None
    brain = brain_bounds(mask)
    box = _window_around(brain, config.crop_size)
    values = np.asarray(slice_, dtype=np.float32)
    ranges = intensity_ranges(values, config) if ranges is None else ranges
    # Bit for bit crop(scale_intensities(slice_, config, ranges), box, fill=-1), at a third of
    # the cost: only the brain's bounding box inside the window is scaled (the power is most of
    # the work). Outside it every modality is at its slice minimum, the background: the low end
    # of a slice range, and of a volume range on skull-stripped inputs, whose background is the
    # volume's minimum too (volumes.py raises registration undershoot to it and replaces
    # non-finite voxels). It scales to exactly -1, the fill.
    window = np.full((len(config.gamma), box.size, box.size), -1.0, dtype=np.float32)
    bounds = tuple(slice(max(b.start, lo), min(b.stop, lo + box.size)) for b, lo in zip(brain, (box.x0, box.y0)))
    target = tuple(slice(b.start - lo, b.stop - lo) for b, lo in zip(bounds, (box.x0, box.y0)))
    for c, gamma in enumerate(config.gamma):
        window[(c, *target)] = scale_channel(values[(c, *bounds)], float(ranges[c, 0]), float(ranges[c, 1]), gamma)
    return window, box
