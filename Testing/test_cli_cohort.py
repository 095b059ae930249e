"""``kantumorseg segment`` with several case folders: one process segments a cohort.

Real subprocesses on two real 8-slice cuts of BraTS20_Training_001 (cases "a" and "b", made by
naming the files a_<modality> and b_<modality>: the case name comes from the T1ce file name)
with a random-weights model of base width 4, so each run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import processes
import pytest
import SimpleITK as sitk

MODALITIES = ("t1", "t1ce", "t2", "flair")


def outputs(case: str) -> list[str]:
    return sorted([f"{case}_seg.nii.gz", f"{case}.seg.nrrd", f"{case}_volumes.json", f"{case}_volumes.csv",
                   f"{case}_overview.png"])


def segment(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "KANTumorSegLib", "segment", *map(str, args)]
    return processes.run(command, capture_output=True, text=True, timeout=240)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The run's stderr lines but its warnings: the input checks warn about these 8-slice cases."""
    return [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("kantumorseg: warning:")]


@pytest.fixture(scope="module")
def cohort(small_case: Path, cropped_case: Path, tmp_path_factory) -> dict[str, Path]:
    """Case "a": the small case; case "b": 8 other slices of the cropped case, so that the two
    cases differ and a state carried from one case to the next would show."""
    root = tmp_path_factory.mktemp("cohort")
    folders = {"a": root / "a", "b": root / "b"}
    for folder in folders.values():
        folder.mkdir()
    for modality in MODALITIES:
        (folders["a"] / f"a_{modality}.nii.gz").symlink_to(small_case / f"crop_{modality}.nii.gz")
        image = sitk.ReadImage(str(cropped_case / f"crop_{modality}.nii.gz"))
        sitk.WriteImage(image[:, :, 3:11], str(folders["b"] / f"b_{modality}.nii.gz"))
    return folders


def copy_case(source: Path, folder: Path, case: str, skip: str | None = None) -> Path:
    """A copy of a cohort case folder whose files are named for ``case`` (without ``skip``)."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        modality = path.name.split("_", 1)[1].removesuffix(".nii.gz")
        if modality != skip:
            (folder / f"{case}_{modality}.nii.gz").write_bytes(path.read_bytes())
    return folder


def labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_two_cases_in_one_call_match_each_case_alone(cohort: dict[str, Path], mixed_model: Path, tmp_path: Path):
    # The model whose outputs hold every label: a labelmap of one class would hide differences.
    out = tmp_path / "out"
    done = segment(cohort["a"], cohort["b"], "-o", out, "--model", mixed_model, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs("a") + outputs("b"))
    assert "Case 1/2: a" in done.stderr and "Case 2/2: b" in done.stderr
    assert done.stdout.index("Segmented a on cpu") < done.stdout.index("Segmented b on cpu")
    for case, folder in cohort.items():
        alone = tmp_path / f"alone_{case}"
        single = segment(folder, "-o", alone, "--model", mixed_model, "--device", "cpu", "--progress", "none")
        assert single.returncode == 0, single.stderr
        # One case alone gives no "Case k/N" line: a single folder behaves as before.
        assert "Case " not in single.stderr
        in_cohort, by_itself = labels(out / f"{case}_seg.nii.gz"), labels(alone / f"{case}_seg.nii.gz")
        assert in_cohort.dtype == by_itself.dtype and in_cohort.tobytes() == by_itself.tobytes()
        assert len(np.unique(in_cohort)) > 2
        # The summary names the separate parts of the whole tumour exactly when there are several.
        parts = json.loads((out / f"{case}_volumes.json").read_text())["whole_tumour_parts"]
        line = (f"  WT is in {parts['count']} separate parts: the largest {parts['largest_ml']:.2f} mL, the other "
                f"{parts['count'] - 1} together {parts['others_ml']:.2f} mL")
        assert (line in done.stdout) == (parts["count"] > 1)
    # The two cases hold different slices, so equal labelmaps would mean one case's result reused.
    assert labels(out / "a_seg.nii.gz").tobytes() != labels(out / "b_seg.nii.gz").tobytes()


def test_a_missing_file_in_the_second_case_stops_before_anything_runs(cohort: dict[str, Path], tiny_model: Path,
                                                                      tmp_path: Path):
    second = copy_case(cohort["b"], tmp_path / "b", "b", skip="flair")
    out = tmp_path / "out"
    done = segment(cohort["a"], second, "-o", out, "--model", tiny_model, "--device", "cpu")
    assert done.returncode == 2
    assert error_lines(done) == [error_lines(done)[0]] and f"No FLAIR image found in {second}" in done.stderr
    assert not out.exists()


def test_two_folders_with_one_case_name_are_refused(cohort: dict[str, Path], tiny_model: Path, tmp_path: Path):
    twin = copy_case(cohort["b"], tmp_path / "other", "a")
    out = tmp_path / "out"
    done = segment(cohort["a"], twin, "-o", out, "--model", tiny_model, "--device", "cpu")
    assert done.returncode == 2
    assert len(error_lines(done)) == 1
    assert f"{cohort['a']} and {twin} both hold case a" in done.stderr
    assert not out.exists()


def test_one_folder_given_twice_is_refused(cohort: dict[str, Path], tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    done = segment(cohort["a"], cohort["a"], "-o", out, "--model", tiny_model, "--device", "cpu")
    assert done.returncode == 2
    assert error_lines(done) == [f"kantumorseg: error: Case folder {cohort['a']} is given twice."]
    assert not out.exists()


def test_existing_output_of_the_second_case_is_refused_before_the_first_runs(cohort: dict[str, Path],
                                                                            tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_volumes.csv").write_text("kept\n")
    done = segment(cohort["a"], cohort["b"], "-o", out, "--model", tiny_model, "--device", "cpu")
    assert done.returncode == 2
    assert error_lines(done) == [f"kantumorseg: error: {out / 'b_volumes.csv'} already exists; use --overwrite to "
                                 "replace it or choose another -o folder."]
    assert [p.name for p in out.iterdir()] == ["b_volumes.csv"] and (out / "b_volumes.csv").read_text() == "kept\n"


def test_a_corrupt_second_case_keeps_the_first_and_says_where_it_stopped(cohort: dict[str, Path], tiny_model: Path,
                                                                         tmp_path: Path):
    second = copy_case(cohort["b"], tmp_path / "b", "b")
    t2 = second / "b_t2.nii.gz"
    t2.write_bytes(t2.read_bytes()[: t2.stat().st_size // 2])
    out = tmp_path / "out"
    done = segment(cohort["a"], second, "-o", out, "--model", tiny_model, "--device", "cpu", "--progress", "jsonl")
    assert done.returncode == 2
    assert len(error_lines(done)) == 1, done.stderr
    message = error_lines(done)[0]
    assert message.startswith(f"kantumorseg: error: The T2 file {t2} is truncated or corrupt")
    assert message.endswith(f"(case 2 of 2, b; 1 case is complete in {out}).")
    # The first case is whole (its "done" line lists its five files), the second left nothing.
    finals = [json.loads(line) for line in done.stdout.splitlines() if '"done"' in line and '"case"' in line]
    assert [final["case"] for final in finals] == ["a"]
    assert sorted(Path(p).name for p in finals[0]["files"].values()) == outputs("a")
    assert sorted(p.name for p in out.iterdir()) == outputs("a")
    assert labels(out / "a_seg.nii.gz").shape == labels(cohort["a"] / "a_t1ce.nii.gz").shape


@pytest.mark.parametrize("option", [["--case-name", "x"], ["--t1", "t1.nii.gz"]])
def test_options_of_one_case_are_refused_with_several_folders(cohort: dict[str, Path], tiny_model: Path,
                                                             tmp_path: Path, option: list[str]):
    out = tmp_path / "out"
    done = segment(cohort["a"], cohort["b"], "-o", out, "--model", tiny_model, *option)
    assert done.returncode == 2
    assert error_lines(done) == ["kantumorseg: error: --case-name and --t1/--t1ce/--t2/--flair name the files of one "
                                 "case; give one case folder with them, not 2."]
    assert not out.exists()


def test_sigterm_in_the_second_case_keeps_the_first_and_says_so(cohort: dict[str, Path], cropped_case: Path,
                                                                tiny_model: Path, tmp_path: Path, ends):
    # The second case is the 30-slice crop at 2 slices a batch: many progress steps, so the
    # signal lands while it is segmenting (as in test_interrupt.py).
    second = tmp_path / "c"
    second.mkdir()
    for modality in MODALITIES:
        (second / f"c_{modality}.nii.gz").symlink_to(cropped_case / f"crop_{modality}.nii.gz")
    out = tmp_path / "out"
    process = ends(processes.start(
        [sys.executable, "-m", "KANTumorSegLib", "segment", str(cohort["a"]), str(second), "-o", str(out),
         "--model", str(tiny_model), "--device", "cpu", "--batch-size", "2", "--progress", "jsonl"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    cases_done = 0
    for line in process.stdout:
        message = json.loads(line)
        cases_done += message["stage"] == "done"
        if cases_done == 1 and message["stage"] == "segment" and message["done"] < message["total"]:
            break
    else:
        pytest.fail(f"the second case never reached its segment stage; stderr: {process.stderr.read()}")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, stderr
    assert f"kantumorseg: terminated; case 2 of 2 (c) left nothing, 1 case is complete in {out}." in stderr
    assert sorted(p.name for p in out.iterdir()) == outputs("a")


def test_a_closed_stdout_is_reported_with_the_cases_really_complete(cohort: dict[str, Path], tiny_model: Path,
                                                                     tmp_path: Path):
    # `| head -1` closes the pipe after the first summary line, so a later summary fails to
    # print after its case's files were written (in case a or b, depending on stdout's
    # buffering): the message must count exactly the cases on disk, never "left nothing".
    out, errors = tmp_path / "out", tmp_path / "stderr.txt"
    command = (f"{sys.executable} -m KANTumorSegLib segment {cohort['a']} {cohort['b']} -o {out} --model {tiny_model} "
               f"--device cpu --progress none 2> {errors} | head -1; exit ${{PIPESTATUS[0]}}")
    done = processes.run(["bash", "-c", command], capture_output=True, text=True, timeout=240)
    assert done.stdout.startswith("Segmented a on cpu")
    assert done.returncode == 2, errors.read_text()
    on_disk = [case for case in ("a", "b") if all((out / name).exists() for name in outputs(case))]
    assert sorted(p.name for p in out.iterdir()) == sorted(sum((outputs(case) for case in on_disk), []))
    complete = "1 case is complete" if len(on_disk) == 1 else "2 cases are complete"
    assert errors.read_text().splitlines() == [
        f"kantumorseg: error: could not read or write (Broken pipe); {complete} in {out}."]


def test_failure_messages_outside_segment_case_errors_count_the_complete_cases(tmp_path: Path) -> None:
    # Out of memory, a disk error or a bug in case 3 of 4, after 2 complete cases: the messages
    # describe_failure builds (real code; the errors are constructed, as a real OOM cannot be
    # provoked here on demand).
    from argparse import Namespace

    from KANTumorSegLib.cli import describe_failure

    args = Namespace(batch_size=16, output=tmp_path, cohort_position=(3, 4, "c"), cases_complete=2)
    tail = f"case 3 of 4 (c) left nothing, 2 cases are complete in {tmp_path}."
    oom, code = describe_failure(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), args)
    assert code == 2 and oom.endswith(tail) and "lower --batch-size (it was 16)" in oom
    disk, code = describe_failure(OSError(28, "No space left on device", str(tmp_path / "c_seg.nii.gz")), args)
    assert code == 2 and disk == (f"kantumorseg: error: could not read or write {tmp_path / 'c_seg.nii.gz'} "
                                  f"(No space left on device); {tail}")
    bug, code = describe_failure(ValueError("bad"), args)
    assert code == 1 and bug.startswith(f"kantumorseg: internal error: ValueError: bad; {tail[:-1]}. This is a bug")
    single = Namespace(batch_size=16, output=tmp_path, cohort_position=(1, 1, "a"), cases_complete=0)
    assert describe_failure(ValueError("bad"), single)[0].startswith("kantumorseg: internal error: ValueError: bad; "
                                                                     "no output was written.")
