"""Slice-by-slice inference of a KANU-Net over a model-grid volume."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Callable

import numpy as np

from .errors import KANTumorSegError, is_out_of_memory
from .preprocessing import CropBox, PreprocessingConfig, paste, preprocess_slice, volume_ranges
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


PRECISIONS = ("auto", "float32", "bfloat16")


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it and bf16 runs slower than float32."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose_precision(requested: str, device, card: dict) -> str:
    """"float32" or "bfloat16" for ``--precision`` on this device with this model.

    auto is bf16 only on a CPU with native bf16 and only for a model whose card records that
    its bf16 labels passed the accuracy check against float32 (``inference.cpu_bfloat16_check``):
    how far bf16 moves the labels depends on the network (a calibrated random one lost half of
    its labels, the shipped one keeps Dice >= 0.9945 per region), so it is checked per model.
    float32 everywhere else, CUDA included: with the library's eager expansion, float32 with TF32
    convolutions ran faster than bf16 autocast on an H200 (G1/G2: 1,507 against 1,125 slices/s,
    docs/PERFORMANCE.md).
    """
    if requested not in PRECISIONS:
        raise KANTumorSegError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}.")
    if requested == "auto":
        checked = bool(card.get("inference", {}).get("cpu_bfloat16_check"))
        return "bfloat16" if device.type == "cpu" and checked and native_cpu_bf16() else "float32"
    if requested == "bfloat16" and device.type not in ("cpu", "cuda"):
        raise KANTumorSegError(f"--precision bfloat16 runs on the CPU or CUDA, not on {device.type}; use float32 or auto.")
    return requested


GPU_MEMORY_FRACTION = 0.7
"""Share of the free GPU memory a batch may use; the rest absorbs allocator fragmentation."""


class SlicePredictor:
    """Runs the model on batches of preprocessed slices, channels last (the layout oneDNN and
    cuDNN convolve fastest), in float32 or under bf16 autocast (``precision``, see
    :func:`choose_precision`).

    On CUDA the batch is capped by the free memory, measured on the first slice, so a
    4 GB laptop GPU works. On out-of-memory (GPU or CPU) the batch halves and the run goes
    on; only when one slice does not fit on the GPU does it fall back to the CPU.
    """

    def __init__(self, model, device, batch_size: int = 16, precision: str = "float32") -> None:
        import torch

        self.device = device
        self.model = model.to(device).eval().to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.head = model.config.head
        self.measured = device.type != "cuda"
        self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32

    @property
    def precision(self) -> str:
        """"float32" or "bfloat16": what the slices run in now (float32 after a fall back to the CPU)."""
        return str(self.dtype).removeprefix("torch.")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from .unet import decode_logits

        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype,
                                                    enabled=self.dtype != torch.float32):
            x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=torch.channels_last)
            return decode_logits(self.model(x).float(), self.head).cpu().numpy()

    def _run_measured(self, batch: np.ndarray) -> np.ndarray:
        """Run one slice and cap the batch size by what fits in the free GPU memory."""
        import torch

        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        labels = self._run(batch[:1])
        per_slice = max(torch.cuda.max_memory_allocated(self.device) - before, 1)
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(GPU_MEMORY_FRACTION * (free + torch.cuda.memory_reserved(self.device) - before) // per_slice)
        self.batch_size = max(1, min(self.batch_size, fits))
        self.measured = True
        return labels

    def _lower_batch(self, error: BaseException) -> None:
        """After an out-of-memory error: halve the batch, or leave the GPU at one slice."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            warnings.warn(f"{self.device.type.upper()} out of memory; batch size lowered to {self.batch_size}.", stacklevel=3)
        elif self.device.type != "cpu":
            warnings.warn(f"{self.device.type.upper()} out of memory even for one slice; continuing on the CPU.", stacklevel=3)
            self.device = torch.device("cpu")
            self.model = self.model.to(self.device)
            self.dtype = torch.float32
            self.measured = True
        else:
            raise KANTumorSegError(
                f"Not enough memory to segment even one slice on the CPU ({str(error).strip()[:80]}); close other programs and retry.")

    def predict(self, inputs: np.ndarray, progress: Callable[[int], None] = lambda done: None) -> np.ndarray:
        """(N, 4, H, W) inputs -> (N, H, W) uint8 labels."""
        out = np.zeros((inputs.shape[0], *inputs.shape[2:]), dtype=np.uint8)
        start = 0
        while start < inputs.shape[0]:
            stop = min(start + self.batch_size, inputs.shape[0])
            try:
                if self.measured:
                    out[start:stop] = self._run(inputs[start:stop])
                else:
                    stop = start + 1
                    out[start:stop] = self._run_measured(inputs[start:stop])
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                if not self.measured:  # one slice did not fit
                    self.batch_size = 1
                self._lower_batch(error)
                continue
            start = stop
            progress(start)
        return out


def _axial_slices(volume: np.ndarray) -> Iterator[np.ndarray]:
    """The (4, X, Y) axial slices of a (4, X, Y, Z) volume in z order, each a contiguous copy.

    ``load_case``'s volume is a view of (4, Z, Y, X) memory, so a slice's copy reads four
    contiguous planes (0.08 s for a BraTS case on 2 cores; preprocessing the strided views in
    place took 0.13 s, and copying blocks of 16 slices into a buffer 0.11 s).
    """
    for z in range(volume.shape[3]):
        yield np.ascontiguousarray(volume[..., z])


def segment_volume(volume: np.ndarray, predictor: SlicePredictor, config: PreprocessingConfig,
                   progress: Callable[[str, int, int], None] = no_progress,
                   maps: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(4, X, Y, Z) model-grid volume -> (X, Y, Z) internal labelmap (0/1/2/4).

    Slices without brain are skipped and stay 0; with "volume" scaling every slice is scaled by
    the whole volume's intensity ranges. Predictions are pasted back into their
    crop windows, zero outside. The windows of all brain slices are held (0.8 MB each,
    about 100 MB for a BraTS case) and stacked for the model one batch at a time.

    ``maps`` (optional, for ``--confidence``): (X, Y, Z) arrays, one per name in the
    predictor's ``maps`` (see ``confidence.ConfidencePredictor``), which holds (N, H, W)
    windows for the batch its ``predict`` last returned; each is pasted as the labels are,
    so the per-voxel maps come from exactly the preprocessing the labels come from.
    """
    shape_xy = volume.shape[1:3]
    depth = volume.shape[3]
    inputs: list[np.ndarray] = []
    boxes: list[tuple[int, CropBox]] = []
    ranges = volume_ranges(volume, config)
    for z, slice_ in enumerate(_axial_slices(volume)):
        prepared = preprocess_slice(slice_, config, ranges)
        if prepared is not None:
            inputs.append(prepared[0])
            boxes.append((z, prepared[1]))
        progress("preprocess", z + 1, depth)
    labels = np.zeros(volume.shape[1:], dtype=np.uint8)
    total = len(inputs)
    done = 0
    while done < total:
        group = np.stack(inputs[done:done + predictor.batch_size])
        predicted = predictor.predict(group, lambda n, first=done: progress("segment", first + n, total))
        for i, ((z, box), prediction) in enumerate(zip(boxes[done:done + len(group)], predicted)):
            labels[..., z] = paste(prediction, box, shape_xy)
            for name, target in (maps or {}).items():
                target[..., z] = paste(predictor.maps[name][i], box, shape_xy)
        done += len(group)
    return labels
