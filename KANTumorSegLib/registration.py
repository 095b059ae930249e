"""Rigid co-registration of one MRI series onto another (``--prepare``), with SimpleITK.

Series of one session share the scanner's frame, so the registration starts from the images
as they lie (no moment or centre matching, which a different field of view would mislead) and
corrects what the patient's movement between series left: Mattes mutual information, three
resolution levels (4, 2 and 1 mm), regular-step gradient descent. The fixed image is the T1ce
resampled to 1 mm isotropic voxels (``prepare.isotropic_grid``), so that the levels mean the
same in every direction even when the T1ce is a stack of 5 mm slabs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import KANTumorSegError

SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_MM = (2.0, 1.0, 0.0)
SAMPLING_FRACTION = 0.03
"""Share of the fixed image's voxels sampled per iteration (at 1 mm, a head holds millions)."""
HISTOGRAM_BINS = 50
RELAXATION = 0.7
MIN_STEP = 0.02
MAX_ITERATIONS = 150
"""Per level; gradient descent that reaches it has not settled (``converged`` is then False)."""
MIN_MUTUAL_INFORMATION = 0.3
"""Mattes mutual information (nats, the sign of SimpleITK's cost flipped) below which a registration
is taken as failed: 0.62-0.82 for the series of one head after registration (the crafted slab case,
BraTS20_Training_001, the skull-on head's PD onto its T1), 0.15 for another person's head, 0.00
for noise."""
MAX_ROTATION_DEG = 30.0
MAX_TRANSLATION_MM = 50.0
"""Movement between two series of one session beyond which a result is taken as a failure
rather than the patient's movement (heads move a few degrees and millimetres between series)."""
STEPS = len(SHRINK_FACTORS) + 1
"""The steps ``register_rigid`` reports: each resolution level, then the check of the result at
full resolution (about as long as the first level)."""


@dataclass
class Registration:
    """A rigid transform that maps points of the fixed (T1ce) space into a moving series, and
    how it was reached."""

    transform: sitk.Euler3DTransform
    mutual_information: float
    iterations: int
    stop: str

    @property
    def rotation_deg(self) -> float:
        """The rotation's angle (degrees) about its axis."""
        matrix = np.array(self.transform.GetMatrix()).reshape(3, 3)
        return float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0))))

    @property
    def translation_mm(self) -> float:
        """How far the transform moves the centre of rotation (the fixed image's centre)."""
        return float(np.linalg.norm(self.transform.GetTranslation()))

    def summary(self) -> dict:
        """What volumes.json records of it."""
        return {"mattes_mutual_information": round(self.mutual_information, 4), "rotation_deg": round(self.rotation_deg, 2),
                "translation_mm": round(self.translation_mm, 2), "iterations": self.iterations}


class Observer:
    """SimpleITK's commands during a registration: ``progress(done, STEPS)`` as each resolution level
    ends, and a chance at every iteration for a signal handler to run (the interrupt of a cancelled
    run lands within an iteration, not after the whole registration).

    An exception raised in a SimpleITK command reaches Python only as a RuntimeError ("error
    executing the Python Callable"), its traceback printed: an interrupt would read as a failed
    registration. So it is kept here, the registration stopped (each remaining level after one
    iteration), and ``register_rigid`` raises it once ``Execute`` has returned."""

    def __init__(self, method: sitk.ImageRegistrationMethod, progress: Callable[[int, int], None]) -> None:
        self.method = method
        self.progress = progress
        self.levels_done = -1
        self.raised: BaseException | None = None
        method.AddCommand(sitk.sitkMultiResolutionIterationEvent, self.level_started)
        method.AddCommand(sitk.sitkIterationEvent, self.iteration)
        method.AddCommand(sitk.sitkEndEvent, lambda: self.report(len(SHRINK_FACTORS)))

    def report(self, done: int) -> None:
        self.call(self.progress, done, STEPS)

    def level_started(self) -> None:
        # Each level's start ends the one before it; the first one's start is the registration's.
        self.levels_done += 1
        if self.levels_done > 0:
            self.report(self.levels_done)

    def iteration(self) -> None:
        self.call(lambda: None)

    def call(self, function: Callable, *args) -> None:
        if self.raised is None:
            try:
                function(*args)
                return
            except BaseException as error:  # noqa: BLE001 - raised again by register_rigid
                self.raised = error
        self.method.StopRegistration()

    def raise_kept(self) -> None:
        if self.raised is not None:
            raise self.raised


def register_rigid(fixed: sitk.Image, moving: sitk.Image, name: str, seed: int = 1,
                   progress: Callable[[int, int], None] | None = None) -> Registration:
    """Register ``moving`` onto ``fixed`` (both float32, physical space); a KANTumorSegError naming
    ``name`` when it did not converge to a plausible result. ``progress(done, STEPS)`` is called
    at its start, as each resolution level ends and once the result is checked."""
    report = progress or (lambda done, total: None)
    report(0, STEPS)
    center = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    initial = sitk.Euler3DTransform()
    initial.SetCenter(center)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    # A fixed seed: the same case gives the same transform (and labels) on every run.
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_FRACTION, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=MIN_STEP, numberOfIterations=MAX_ITERATIONS,
                                                   gradientMagnitudeTolerance=1e-6, relaxationFactor=RELAXATION)
    # Radians and millimetres on one scale: a step moves the head's edge about as far either way.
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    observer = Observer(method, report)
    try:
        result = method.Execute(fixed, moving)
    except RuntimeError as error:
        observer.raise_kept()
        # ITK stops when too few samples fall inside the moving image: the series do not overlap.
        reason = str(error).strip().splitlines()[-1].strip() if str(error).strip() else "no reason given"
        raise KANTumorSegError(f"Registering the {name} image onto the T1ce failed ({reason}); check that both show the same "
                               f"head, or segment without --prepare a case that is already co-registered.") from None
    observer.raise_kept()
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))
    # The cost at the full resolution with every voxel, not the last random sample's.
    mutual_information = -final_metric(fixed, moving, transform)
    registration = Registration(transform, mutual_information, method.GetOptimizerIteration(),
                                method.GetOptimizerStopConditionDescription())
    report(STEPS, STEPS)
    check_converged(registration, name)
    return registration


def final_metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """SimpleITK's Mattes cost (negative mutual information) of the transform, on a regular sample."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform)
    return float(method.MetricEvaluate(fixed, moving))


def check_converged(registration: Registration, name: str) -> None:
    """Refuse a registration that ran out of iterations, found too little shared information or
    moved the head further than a patient moves between two series."""
    problem = None
    if registration.iterations >= MAX_ITERATIONS:
        problem = f"it did not settle within {MAX_ITERATIONS} iterations"
    elif registration.mutual_information < MIN_MUTUAL_INFORMATION:
        problem = (f"the images share too little information after it (mutual information {registration.mutual_information:.2f}, "
                   f"at least {MIN_MUTUAL_INFORMATION} expected)")
    elif registration.rotation_deg > MAX_ROTATION_DEG or registration.translation_mm > MAX_TRANSLATION_MM:
        problem = (f"it turned the head by {registration.rotation_deg:.0f} degrees and moved it {registration.translation_mm:.0f} mm, "
                   "more than a patient moves between series")
    if problem:
        raise KANTumorSegError(f"Registering the {name} image onto the T1ce did not converge ({problem}); check that it is "
                               f"the same patient's {name} series of this session, or register it yourself and segment "
                               "without --prepare.")
