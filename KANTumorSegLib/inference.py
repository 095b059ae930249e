"""Slice-by-slice inference of a KANU-Net over a model-grid volume."""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from .errors import KANTumorSegError
from .preprocessing import CropBox, PreprocessingConfig, paste, preprocess_slice
from .progress import no_progress

DEVICES = ("auto", "cpu", "cuda", "mps")


def choose_device(requested: str):
    """The torch device for ``--device``: auto picks CUDA, then MPS, then the CPU."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise KANTumorSegError("--device cuda was asked for but no usable CUDA GPU was found; use --device cpu or auto.")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise KANTumorSegError("--device mps was asked for but Apple's MPS backend is not available; use --device cpu or auto.")
    if requested not in DEVICES:
        raise KANTumorSegError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}.")
    return torch.device(requested)


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower()


class SlicePredictor:
    """Runs the model on batches of preprocessed slices; halves the batch on GPU
    out-of-memory, and falls back to the CPU only when one slice does not fit."""

    def __init__(self, model, device, batch_size: int = 16, half: bool = True) -> None:
        import torch

        self.device = device
        self.model = model.to(device).eval()
        self.batch_size = batch_size
        self.head = model.config.head
        # bf16 halves memory and time on CUDA; results stay within the accuracy check of
        # the benchmark. The CPU and MPS run float32.
        self.dtype = torch.bfloat16 if (half and device.type == "cuda") else torch.float32

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from .unet import decode_logits

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            x = torch.from_numpy(batch).to(self.device)
            return decode_logits(self.model(x).float(), self.head).cpu().numpy()

    def predict(self, inputs: np.ndarray, progress: Callable[[int], None]) -> np.ndarray:
        """(N, 4, S, S) inputs -> (N, S, S) uint8 labels."""
        import torch

        out = np.zeros((inputs.shape[0], *inputs.shape[2:]), dtype=np.uint8)
        start = 0
        while start < inputs.shape[0]:
            stop = min(start + self.batch_size, inputs.shape[0])
            try:
                out[start:stop] = self._run(inputs[start:stop])
            except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
                if not _is_out_of_memory(error) or self.device.type == "cpu":
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size //= 2
                    warnings.warn(f"GPU out of memory; batch size lowered to {self.batch_size}.", stacklevel=2)
                else:
                    warnings.warn("GPU out of memory even for one slice; continuing on the CPU.", stacklevel=2)
                    self.device = torch.device("cpu")
                    self.model = self.model.to(self.device)
                    self.dtype = torch.float32
                continue
            start = stop
            progress(start)
        return out


def segment_volume(volume: np.ndarray, predictor: SlicePredictor, config: PreprocessingConfig,
                   progress: Callable[[str, int, int], None] = no_progress) -> np.ndarray:
    """(4, X, Y, Z) model-grid volume -> (X, Y, Z) internal labelmap (0/1/2/4).

    Slices without brain are skipped and stay 0; predictions are pasted back into their
    crop windows, zero outside.
    """
    shape_xy = volume.shape[1:3]
    depth = volume.shape[3]
    inputs: list[np.ndarray] = []
    boxes: list[tuple[int, CropBox]] = []
    for z in range(depth):
        prepared = preprocess_slice(volume[..., z], config)
        if prepared is not None:
            inputs.append(prepared[0])
            boxes.append((z, prepared[1]))
        progress("preprocess", z + 1, depth)
    labels = np.zeros(volume.shape[1:], dtype=np.uint8)
    if not inputs:
        return labels
    total = len(inputs)
    predicted = predictor.predict(np.stack(inputs), lambda done: progress("segment", done, total))
    for (z, box), window in zip(boxes, predicted):
        labels[..., z] = paste(window, box, shape_xy)
    return labels
