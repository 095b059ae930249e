"""``python -m Training report`` on committed run files (Training/experiments/h200_round4/ship4; no data needed).

A report over other runs must not replace the committed figures: figures are written only into
the folder ``--figures`` names.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import processes

REPO = Path(__file__).resolve().parent.parent
SHIP4 = REPO / "Training" / "experiments" / "h200_round4" / "ship4"


def report(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    runs = tmp_path / "runs"
    if not runs.exists():
        runs.mkdir()
        (runs / "ship4").symlink_to(SHIP4)
    # Run from tmp_path: the old default (docs/figures, relative) would show up there.
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return processes.run([sys.executable, "-m", "Training", "report", str(runs), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)


def test_tables_only_write_no_figures(tmp_path: Path) -> None:
    done = report(tmp_path, "--tables", str(tmp_path / "t.md"))
    assert done.returncode == 0, done.stderr
    shipped = next(line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| ship4_w16_aug_g2 |"))
    assert "| 254 | 1 | 300 | 0.731 |" in shipped  # n, seeds, epochs, validation mean of the shipped model
    assert list(tmp_path.rglob("*.png")) == []


def test_figures_go_where_asked(tmp_path: Path) -> None:
    done = report(tmp_path, "--figures", str(tmp_path / "figs"))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in (tmp_path / "figs").glob("*.png")} >= {"fig4_mean_dice_per_epoch.png", "fig6_validation_vs_test.png"}


def test_overlay_without_a_figures_folder_is_refused(tmp_path: Path) -> None:
    done = report(tmp_path, "--overlay-model", "m.safetensors", "--overlay-case", "case")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --overlay-model and --overlay-case draw Fig. 3 into --figures; "
                                   "give that folder too.")
    assert list(tmp_path.rglob("*.png")) == []
