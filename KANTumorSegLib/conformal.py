"""Volume ranges with a stated coverage: split conformal prediction over patients.

Why not the model's own probabilities: on patients from other centres the model's volume errors
are systematic (a whole structure mislabelled), and a band of its probabilities (the ranges of
``confidence.range_bits``) held the expert's volume for only 11 of 35 (region, patient) cases of
the test patients. A conformal range instead asks how far the written volume has been from the
expert's on patients the model never trained on, and widens every new volume by that much.

For a region (WT, TC, ET) and a patient, the residual is the log ratio
``r = |log((V_written + eps) / (V_expert + eps))|``: relative, because a 10 mL miss means little on a
150 mL whole tumour and much on a 5 mL core. ``eps`` (``EPS_ML``, 0.5 mL) keeps it finite and
meaningful where a volume is zero or tiny (no enhancing tumour, or a 0.2 mL trace): 0.5 mL is the
smallest enhancing tumour the shipped post-processing writes (``et_min_ml``), so volumes below it
are below what the product resolves and a miss between them costs at most log 2. With n such
residuals from calibration patients, the band ``q`` is the ceil((n + 1)(1 - alpha))-th smallest,
and the range of a new volume V is ``[(V + eps) e^-q - eps, (V + eps) e^q - eps]``, clipped at 0.
If the new patient is exchangeable with the calibration patients, the expert's volume then lies
inside with probability at least 1 - alpha (Vovk et al. 2005; Lei et al. 2018), whatever the
model. With fewer than about 1/alpha - 1 patients no finite band has that guarantee.

The calibration residuals must come from patients the predicting model never trained on: with
cross-validation folds (each training patient predicted by the fold model that held it out), the
band applies to the final model trained on all of them (CV+, Barber et al. 2021), slightly
conservatively, as the final model saw more data than each fold model.

NCR and ED are differences of nested regions (NCR = TC - ET, ED = WT - TC): unless the card gives
them a band of their own, their range takes the low end of one region and the high end of the
other, which holds the expert's NCR (ED) whenever both regions' ranges hold theirs.

``Testing/benchmarks/volume_coverage.py`` fits the bands and writes them into the model card as
``"volume_ranges"`` (``ConformalRanges.to_card``); ``pipeline`` writes these ranges into
volumes.json and the CSV (``range_ml``) under ``--confidence`` for a model whose card has them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CARD_KEY = "volume_ranges"
"""The model card's key for the fitted bands (``ConformalRanges.to_card``)."""

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
"""The regions whose residuals are fitted; NCR and ED follow from them (module docstring)."""

NESTED: dict[str, tuple[str, str]] = {"NCR": ("TC", "ET"), "ED": ("WT", "TC")}
"""A class as (outer region, inner region): its voxels are the outer's less the inner's."""

ALPHA = 0.1
"""Miscoverage: the range misses the expert's volume for at most 1 patient in 10."""

EPS_ML = 0.5
"""mL added to both volumes before the log ratio (module docstring: the shipped ``et_min_ml``)."""

DECIMALS = 4
"""Ranges are written to 0.1 microlitre, as the volumes are (``measurements.tumour_volumes``)."""


def log_residual(predicted_ml: float, expert_ml: float, eps_ml: float = EPS_ML) -> float:
    """|log((predicted + eps) / (expert + eps))|: how far, in log scale, the written volume was off."""
    return abs(math.log((predicted_ml + eps_ml) / (expert_ml + eps_ml)))


def conformal_rank(n: int, alpha: float = ALPHA) -> int:
    """ceil((n + 1)(1 - alpha)): which order statistic of n residuals is the band (1-based).
    A hair is taken off before the ceiling, so that 10 x 0.9 gives 9 and not 10 in floating point."""
    return math.ceil((n + 1) * (1 - alpha) - 1e-9)


def conformal_quantile(residuals: Sequence[float], alpha: float = ALPHA) -> float:
    """The band q: the ``conformal_rank``-th smallest residual; infinite when there are too few
    residuals for a finite band to reach 1 - alpha (rank above n)."""
    ordered = sorted(float(r) for r in residuals)
    rank = conformal_rank(len(ordered), alpha)
    return ordered[rank - 1] if 1 <= rank <= len(ordered) else math.inf


def interval(volume_ml: float, log_halfwidth: float, eps_ml: float = EPS_ML) -> tuple[float, float]:
    """[(V + eps) e^-q - eps, (V + eps) e^q - eps], the low end clipped at 0: the range of one volume."""
    low = max(0.0, (volume_ml + eps_ml) * math.exp(-log_halfwidth) - eps_ml)
    return low, (volume_ml + eps_ml) * math.exp(log_halfwidth) - eps_ml


@dataclass(frozen=True)
class ConformalRanges:
    """Fitted bands of one model: ``log_halfwidth`` by region (WT, TC, ET; NCR, ED optional),
    with the miscoverage, eps and the number of calibration patients they came from."""

    log_halfwidth: Mapping[str, float]
    alpha: float = ALPHA
    eps_ml: float = EPS_ML
    n_patients: int = 0
    calibration: dict = field(default_factory=dict)
    """Free-form provenance written with the card (the patients, the models, the command)."""

    def __post_init__(self) -> None:
        missing = [r for r in REGIONS if r not in self.log_halfwidth]
        if missing:
            raise ValueError(f"volume_ranges needs a log_halfwidth for {', '.join(missing)}")
        bad = {r: q for r, q in self.log_halfwidth.items() if not (isinstance(q, (int, float)) and 0 <= q < math.inf)}
        if bad:
            raise ValueError(f"volume_ranges log_halfwidth must be finite and non-negative, not {bad}")
        if not 0 < self.alpha < 1 or not self.eps_ml > 0:
            raise ValueError(f"volume_ranges needs 0 < alpha < 1 and eps_ml > 0 (alpha {self.alpha}, eps_ml {self.eps_ml})")

    @classmethod
    def fit(cls, residuals: Mapping[str, Sequence[float]], alpha: float = ALPHA, eps_ml: float = EPS_ML,
            calibration: dict | None = None) -> ConformalRanges:
        """The bands from each region's calibration residuals (:func:`log_residual`, computed with
        the same ``eps_ml``); a ValueError when there are too few patients for a finite band."""
        bands = {region: conformal_quantile(values, alpha) for region, values in residuals.items()}
        counts = {len(values) for values in residuals.values()}
        if len(counts) != 1:
            raise ValueError(f"every region needs the same calibration patients, not counts {sorted(counts)}")
        n = counts.pop()
        if any(math.isinf(q) for q in bands.values()):
            raise ValueError(f"{n} calibration patients are too few for coverage {1 - alpha:.0%}: "
                             f"the band is the {conformal_rank(n, alpha)}-th smallest residual")
        return cls(bands, alpha, eps_ml, n, dict(calibration or {}))

    @classmethod
    def from_card(cls, card: Mapping) -> ConformalRanges | None:
        """The card's ``volume_ranges``, or None for a model without them (the probability band
        of ``confidence.py`` then gives its ranges)."""
        data = card.get(CARD_KEY)
        if data is None:
            return None
        return cls({str(k): float(v) for k, v in data["log_halfwidth"].items()}, float(data["alpha"]),
                   float(data["eps_ml"]), int(data.get("n_patients", 0)), dict(data.get("calibration", {})))

    def to_card(self) -> dict:
        """The card's ``volume_ranges`` (JSON)."""
        return {"method": "split conformal, log-ratio residuals of written against expert volume",
                "alpha": self.alpha, "eps_ml": self.eps_ml, "n_patients": self.n_patients,
                "log_halfwidth": {r: float(q) for r, q in self.log_halfwidth.items()},  # unrounded: rounding down loses coverage
                "calibration": self.calibration}

    def ranges(self, volumes_ml: Mapping[str, float]) -> dict[str, list[float]]:
        """[low, high] mL of WT, TC, ET and NCR, ED from the written volumes of those five; each
        holds its written volume."""
        out = {r: interval(volumes_ml[r], self.log_halfwidth[r], self.eps_ml) for r in REGIONS}
        for name, (outer, inner) in NESTED.items():
            if name in self.log_halfwidth:
                out[name] = interval(volumes_ml[name], self.log_halfwidth[name], self.eps_ml)
            else:
                out[name] = (max(0.0, out[outer][0] - out[inner][1]), out[outer][1] - out[inner][0])
        return {name: [round(low, DECIMALS), round(high, DECIMALS)] for name, (low, high) in out.items()}

    def statement(self) -> str:
        """What a range means, in one sentence (for volumes.json and the documents)."""
        return (f"the expert's volume is expected inside the range for {round(10 * (1 - self.alpha))} of 10 patients "
                f"(split conformal prediction on {self.n_patients} patients the model never trained on)")
