"""The parts of the 3D Slicer module that need no Slicer, kept here so that they are tested.

KANTumorSeg.py (the module) runs ``kantumorseg segment`` in a background process (a
long-lived ``kantumorseg worker``, see Worker, started and warmed up off Slicer's main thread by
BackgroundStart, or a process of its own); this file builds that command line and its
environment, matches loaded volume names to the four modalities, reads the process's
``--progress jsonl`` output line by line, reads the run's warnings and volume ranges, compares
installed package versions with the module's requirements list, and turns segment masks into
the rows of the volume table. At module level it imports only the standard library, so that
the module imports cheaply; numpy-based helpers import inside.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MODALITY_TITLES: dict[str, str] = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}

TABLE_COLUMNS: tuple[str, ...] = ("Region", "Description", "Volume", "Voxels", "Range")
"""Columns of the module's volume table (Volume in mL; Range, the model's low-high mL, only
after a run with --confidence)."""

LIBRARY_PACKAGE = "KANTumorSegLib"

# Where a share of the progress bar goes: stages of pipeline.segment_case and inference.
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "read": (0.0, 0.05),
    "preprocess": (0.05, 0.20),
    "segment": (0.20, 0.90),
    "write": (0.90, 1.0),
}

ERROR_PREFIX = "kantumorseg: error: "
INTERNAL_ERROR_PREFIX = "kantumorseg: internal error: "
WARNING_PREFIX = "kantumorseg: warning: "

REGION_SEGMENTS: tuple[tuple[str, str, tuple[float, float, float]], ...] = (
    ("WT", "Whole tumour", (0.35, 0.55, 0.95)),
    ("TC", "Tumour core", (0.85, 0.45, 0.9)),
)
"""The composite regions the module can add as extra segments: id, name, colour."""


# ----------------------------------------------------------------------------- volumes by name


def _name_tokens() -> dict[str, str]:
    """Modality word -> modality, from the BraTS file-name endings the command knows."""
    from .case_files import NAME_PATTERNS

    return {pattern.replace("[_-]", ""): modality
            for modality, patterns in NAME_PATTERNS.items() for pattern in patterns}


def modality_of_name(name: str) -> str | None:
    """The modality a volume name denotes (``BraTS20_Training_001_t1ce`` -> ``t1ce``), else None.

    The name is split into words at any non-alphanumeric character and compared without
    case, so ``T1c``, ``case-t2f`` and ``flair`` match; a name whose words denote two
    different modalities (``t1_t2_diff``) is ambiguous and matches none.
    """
    tokens = _name_tokens()
    found = {tokens[word] for word in re.split(r"[^0-9a-z]+", name.lower()) if word in tokens}
    return found.pop() if len(found) == 1 else None


@dataclass
class VolumeMatch:
    """Which loaded volume goes to which modality, by index into the list of names."""

    assigned: dict[str, int] = field(default_factory=dict)
    ambiguous: dict[str, list[int]] = field(default_factory=dict)


def match_volume_names(names: Sequence[str]) -> VolumeMatch:
    """Assign volumes to modalities by name; a modality that several names claim is left
    unassigned (listed in ``ambiguous``) rather than guessed."""
    from .preprocessing import MODALITIES

    candidates: dict[str, list[int]] = {m: [] for m in MODALITIES}
    for index, name in enumerate(names):
        modality = modality_of_name(name)
        if modality is not None:
            candidates[modality].append(index)
    match = VolumeMatch()
    for modality, indices in candidates.items():
        if len(indices) == 1:
            match.assigned[modality] = indices[0]
        elif len(indices) > 1:
            match.ambiguous[modality] = indices
    return match


def input_problems(selected: Mapping[str, tuple[str, str] | None]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Why the inputs cannot run yet: (modalities with no volume, (modality, modality, volume
    name) pairs that share one volume). ``selected`` maps modality -> (node id, name) or None."""
    from .preprocessing import MODALITIES

    missing = [m for m in MODALITIES if not selected.get(m)]
    duplicates = []
    seen: dict[str, str] = {}
    for modality in MODALITIES:
        choice = selected.get(modality)
        if not choice:
            continue
        node_id, name = choice
        if node_id in seen:
            duplicates.append((seen[node_id], modality, name))
        else:
            seen[node_id] = modality
    return missing, duplicates


def case_name_for(t1ce_name: str) -> str:
    """A file-safe case name from the T1ce volume's name, without its modality ending."""
    from .case_files import case_name

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", t1ce_name).strip("._")
    return case_name({"t1ce": Path(f"{safe}.nrrd")}).strip("._") if safe else "case"


# ----------------------------------------------------------------------------- the process


def build_command(
    python: str,
    inputs: Mapping[str, str | Path],
    output_dir: str | Path,
    case_name: str,
    device: str,
    model: str | Path,
    labels: str,
    confidence: bool = False,
    prepare: bool = False,
) -> list[str]:
    """The exact ``python -m KANTumorSegLib segment ...`` command the module launches;
    ``confidence`` adds ``--confidence`` (a confidence map and volume ranges, issue 14), ``prepare``
    adds ``--prepare`` (raw scanner series registered and skull-stripped first, issue 18)."""
    from .preprocessing import MODALITIES

    command = [str(python), "-m", LIBRARY_PACKAGE, "segment"]
    for modality in MODALITIES:
        command += [f"--{modality}", str(inputs[modality])]
    command += ["-o", str(output_dir), "--case-name", case_name, "--device", device,
                "--model", str(model), "--labels", labels, "--progress", "jsonl", "--overwrite"]
    return command + (["--confidence"] if confidence else []) + (["--prepare"] if prepare else [])


def worker_arguments(command: Sequence[str]) -> list[str]:
    """The arguments of a ``build_command`` line after its ``python -m KANTumorSegLib`` head:
    the ``segment ...`` request a Worker takes."""
    if list(command[1:3]) != ["-m", LIBRARY_PACKAGE]:
        raise ValueError(f"not a '<python> -m {LIBRARY_PACKAGE} ...' command: {list(command[:3])}")
    return list(command[3:])


def library_parent() -> Path:
    """The folder holding the KANTumorSegLib package (in Slicer: the scripted-modules folder)."""
    return Path(__file__).resolve().parent.parent


def child_environment(environ: Mapping[str, str], parent: Path | None = None) -> dict[str, str]:
    """Variables to add to the child's environment so that ``-m KANTumorSegLib`` finds this
    copy of the package, and its output arrives line by line (not in 8 kB blocks)."""
    parent = parent or library_parent()
    existing = environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": str(parent) + (os.pathsep + existing if existing else ""),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass(frozen=True)
class OutputLine:
    """One line the process printed, classified: progress, done, error, warning or text."""

    kind: str
    text: str
    stage: str = ""
    done: int = 0
    total: int = 0
    files: dict = field(default_factory=dict)


def parse_output_line(line: str) -> OutputLine:
    """Classify one line of the command's merged stdout and stderr."""
    from .progress import parse_progress_line

    text = line.rstrip("\r\n")
    progress = parse_progress_line(text)
    if progress is not None:
        stage, done, total = progress
        return OutputLine("progress", text, stage, done, total)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("stage") == "done":
            return OutputLine("done", text, "done", files=dict(data.get("files", {})))
    if text.startswith(ERROR_PREFIX):
        return OutputLine("error", text[len(ERROR_PREFIX):])
    if text.startswith(INTERNAL_ERROR_PREFIX):
        return OutputLine("error", "Internal error: " + text[len(INTERNAL_ERROR_PREFIX):])
    if text.startswith(WARNING_PREFIX):
        return OutputLine("warning", text[len(WARNING_PREFIX):])
    return OutputLine("text", text)


def overall_fraction(stage: str, done: int, total: int) -> float | None:
    """How far the whole run is (0 to 1) at a progress step, None for an unknown stage."""
    if stage not in STAGE_SPANS:
        return None
    start, end = STAGE_SPANS[stage]
    share = min(max(done / total, 0.0), 1.0) if total > 0 else 1.0
    return start + (end - start) * share


def failure_message(error_lines: Sequence[str], return_code: int | None) -> str:
    """What to tell the user when the process failed: its own last error sentence if it
    printed one (``kantumorseg: error: ...``), else the exit code."""
    if error_lines:
        return error_lines[-1]
    if return_code in (130, 143) or (return_code is not None and return_code < 0):
        return "The segmentation was stopped before it finished; no output was written."
    return f"The segmentation process failed (exit code {return_code}); see the log for details."


# ----------------------------------------------------------------------------- the run's results


@dataclass
class ResultNotes:
    """What the module shows beside the segments, from the command's ``<case>_volumes.json``.

    warnings: the messages of its ``warnings`` list (inputs the model was not made for);
    ranges: region -> (low, high) mL, present when the run had ``--confidence``;
    voxels: region -> voxel count, to tell whether an edited region still has its range.
    Outputs without these fields (older commands) give empty ones.
    """

    warnings: list[str] = field(default_factory=list)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    voxels: dict[str, int] = field(default_factory=dict)


def result_notes(volumes: Mapping) -> ResultNotes:
    """The warnings, volume ranges and voxel counts of a parsed ``<case>_volumes.json``."""
    notes = ResultNotes()
    for warning in volumes.get("warnings") or []:
        if isinstance(warning, Mapping) and warning.get("message"):
            notes.warnings.append(str(warning["message"]))
    for region in volumes.get("regions") or []:
        notes.voxels[region["name"]] = int(region["voxels"])
        low_high = region.get("range_ml")
        if isinstance(low_high, Sequence) and len(low_high) == 2:
            notes.ranges[region["name"]] = (float(low_high[0]), float(low_high[1]))
    return notes


def current_ranges(notes: ResultNotes, regions: Sequence[Mapping]) -> dict[str, tuple[float, float]]:
    """The ranges that still describe the measured regions: those of regions whose voxel count
    is the command's (a region changed by an edit no longer has the model's range)."""
    return {r["name"]: notes.ranges[r["name"]] for r in regions
            if r["name"] in notes.ranges and notes.voxels.get(r["name"]) == int(r["voxels"])}


def range_text(low_high: tuple[float, float] | None) -> str:
    """A range as the command's summary prints it (``165.2-180.1``); empty when there is none."""
    return f"{low_high[0]:.1f}-{low_high[1]:.1f}" if low_high else ""


def confidence_file(files: Mapping[str, str]) -> Path | None:
    """The run's ``<case>_confidence.nii.gz`` (``--confidence``), from its done line or beside its
    volumes file; None when the run wrote none."""
    path = files.get("confidence")
    if not path and files.get("volumes_json"):
        volumes = str(files["volumes_json"])
        path = volumes[: -len("_volumes.json")] + "_confidence.nii.gz" if volumes.endswith("_volumes.json") else None
    return Path(path) if path and Path(path).is_file() else None


def confidence_by_default(device_choice: str, resolved_device: str | None) -> bool:
    """Whether the Confidence option starts on: on a CUDA GPU (chosen, or the one the automatic
    choice found) the extra passes cost well under the run's time; on a CPU it is the user's call."""
    return device_choice == "cuda" or (device_choice == "auto" and resolved_device == "cuda")


SHOW_3D_MAX_VOXELS = 20_000_000
"""Reference grids with more voxels than this (512 x 512 x 80 and up) start without closed
surfaces: building them takes seconds and slows every edit; Show 3D turns them on."""


def show_3d_by_default(grid_voxels: int) -> bool:
    """Whether the result's closed surfaces (3D view) are built at once."""
    return grid_voxels <= SHOW_3D_MAX_VOXELS


# ----------------------------------------------------------------------------- requirements


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version (``2.4.1+cu121`` -> (2, 4, 1))."""
    numbers = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def read_requirements(path: str | Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(distribution, minimum version, requirement line) of each ``name>=X.Y`` line of a
    requirements list (comments and blank lines skipped)."""
    requirements = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", line)
        if match is None:
            raise ValueError(f"{path}: expected 'name>=version', got {line!r}")
        requirements.append((match.group(1), version_tuple(match.group(2)), line))
    return requirements


def unmet_requirements(requirements: Sequence[tuple[str, tuple[int, ...], str]], installed_version) -> list[str]:
    """The requirement lines that are missing or installed older (another extension's copy),
    given ``installed_version(name) -> version string or None``."""
    unmet = []
    for name, minimum, line in requirements:
        version = installed_version(name)
        if version is None or version_tuple(version) < minimum:
            unmet.append(line)
    return unmet


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, read from its metadata without importing it."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- volumes table


def compose_labels(masks: Mapping[str, object]):
    """An internal labelmap (0/1/2/4) from binary masks of the NCR, ED and ET segments.

    Where edited segments overlap, the inner class wins (ED, then NCR, then ET painted
    last), matching the nesting of the BraTS regions WT > TC > ET.
    """
    import numpy as np

    from .labels import ED, ET, NCR

    shape = next(np.shape(m) for m in masks.values() if m is not None)
    labels = np.zeros(shape, dtype=np.uint8)
    for segment_id, value in (("ED", ED), ("NCR", NCR), ("ET", ET)):
        mask = masks.get(segment_id)
        if mask is not None:
            labels[np.asarray(mask) > 0] = value
    return labels


def volume_rows(masks: Mapping[str, object], spacing_mm: Sequence[float]) -> dict:
    """The volume table (measurements.tumour_volumes: NCR, ED, ET, WT, TC in mL) of the
    segment masks; spacing in mm along the masks' axes, in any consistent order."""
    from .measurements import tumour_volumes

    return tumour_volumes(compose_labels(masks), tuple(float(s) for s in spacing_mm))


def region_masks(labels) -> dict:
    """Binary masks of the composite regions WT and TC of an internal labelmap."""
    import numpy as np

    from .labels import region_mask

    return {segment_id: region_mask(labels, segment_id).astype(np.uint8) for segment_id, _, _ in REGION_SEGMENTS}


def terminology_entry(type_code: tuple[str, str, str]) -> str:
    """A Slicer terminology entry string (``context~category~type~modifier~anatomic
    context~region~region modifier``) for a tumour segment in the brain."""
    from .labels import ANATOMIC_CONTEXT, BRAIN, MORPHOLOGICALLY_ALTERED, TERMINOLOGY_CONTEXT

    return "~".join([TERMINOLOGY_CONTEXT, "^".join(MORPHOLOGICALLY_ALTERED), "^".join(type_code), "^^",
                     ANATOMIC_CONTEXT, "^".join(BRAIN), "^^"])


def region_terminology_entry() -> str:
    """The terminology entry of the WT and TC segments: Neoplasm, Primary, as the ET segment's type."""
    from .labels import ET, SEGMENTS

    return terminology_entry(next(s.type_code for s in SEGMENTS if s.label == ET))


def launch(command: Sequence[str], environ: Mapping[str, str], cwd: str | Path, stdin=None):
    """Start the command as slicer.util.launchConsoleProcess does (stdout and stderr merged,
    text lines, no console window on Windows), but in its own process group: PythonSlicer is
    a launcher that starts the real Python as a child, so cancelling must reach both.
    ``stdin``: as subprocess.Popen's (``subprocess.PIPE`` for a worker)."""
    import subprocess

    kwargs: dict = {"env": dict(environ), "cwd": str(cwd), "stdin": stdin, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                    "universal_newlines": True, "encoding": "utf-8", "errors": "replace"}
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs["startupinfo"] = info
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(list(command), **kwargs)


def terminate_tree(process, grace_s: float = 3.0) -> None:
    """Stop a process started by ``launch`` and all it started. On POSIX, SIGTERM first so
    that the command removes its partial output, then SIGKILL after ``grace_s``."""
    import subprocess

    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
        process.wait()
        return
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ----------------------------------------------------------------------------- the worker


class WorkerError(RuntimeError):
    """The worker cannot take a request (it did not start, does not answer, or is busy)."""


IDLE_MARGIN_S = 5.0
"""A worker this close to its idle timeout is replaced rather than sent a request that it
might not read before it exits."""


class Worker:
    """A long-lived ``kantumorseg worker`` process (KANTumorSegLib/worker.py) that runs the
    module's ``segment`` command lines one after another.

    A fresh process per run pays for Python, the torch import and the GPU start-up every
    time; the worker pays them once. Each run is the command line ``build_command`` makes,
    without its ``python -m KANTumorSegLib`` head, and prints the command's own lines; it is
    read through a WorkerRun until the worker's exit event. Started as ``launch`` starts the
    command (same environment, folder, process group and merged output); ``stop`` ends it,
    cancelling a run in progress.
    """

    def __init__(self, python: str | Path, environ: Mapping[str, str], cwd: str | Path | None = None,
                 idle_timeout_s: float | None = None) -> None:
        from .worker import IDLE_TIMEOUT_S

        self.python = str(python)
        self.environ = dict(environ)
        self.cwd = Path(cwd) if cwd is not None else library_parent()
        self.idle_timeout_s = IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s
        self.process = None
        self.busy = False
        self._last_used = 0.0

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", LIBRARY_PACKAGE, "worker", "--idle-timeout", str(self.idle_timeout_s)]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the process and check that it reads requests (a launcher that does not pass
        its stdin on would leave every run waiting): WorkerError when no answer comes."""
        import subprocess
        import time

        self.process = launch(self.command, self.environ, self.cwd, stdin=subprocess.PIPE)
        self._send({"ping": True})
        answer = _read_line_within(self.process.stdout, timeout_s)
        if answer is None or answer.strip() != json.dumps({"event": "pong"}):
            self.stop()
            if answer is None:
                raise WorkerError(f"the worker did not answer within {timeout_s:.0f} s")
            if not answer:
                raise WorkerError(f"the worker ended (exit code {self.process.returncode}) without answering")
            raise WorkerError(f"the worker answered {answer.strip()!r}")
        self._last_used = time.monotonic()

    def serves(self, python: str | Path, environ: Mapping[str, str]) -> bool:
        """Whether this worker was started with this Python and this environment."""
        return self.python == str(python) and self.environ == dict(environ)

    def alive(self) -> bool:
        """Whether the process runs and will take a request: not ended, and not so near its
        idle timeout that it could exit before reading one."""
        import time

        if self.process is None or self.process.poll() is not None:
            return False
        if self.busy or not self.idle_timeout_s or self.idle_timeout_s <= 0:
            return True
        limit = self.idle_timeout_s - min(IDLE_MARGIN_S, self.idle_timeout_s / 2)
        return time.monotonic() - self._last_used < limit

    def submit(self, argv: Sequence[str]) -> WorkerRun:
        """Send one ``segment ...`` argument list; its output is read through the WorkerRun."""
        if self.busy:
            raise WorkerError("the worker is busy with another run")
        if not self.alive():
            raise WorkerError("the worker is not running")
        self.busy = True
        try:
            self._send({"argv": [str(a) for a in argv]})
        except OSError as error:
            self.busy = False
            raise WorkerError(f"the worker did not take the request ({error})") from error
        return WorkerRun(self)

    def stop(self, grace_s: float = 3.0) -> None:
        """End the worker. During a run: SIGTERM at once (the run removes its partial output
        and ends with 143, as the command does); idle: close its stdin, so that it exits by
        itself, then SIGTERM after ``grace_s``."""
        import subprocess

        if self.process is None:
            return
        if self.process.poll() is None and not self.busy:
            try:
                self.process.stdin.close()
                self.process.wait(grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        terminate_tree(self.process, grace_s)
        if not self.busy:
            # Nobody reads it now; during a run, the run's reader sees its end and closes nothing.
            self.process.stdout.close()

    def _send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def _finished(self) -> None:
        import time

        self.busy = False
        self._last_used = time.monotonic()


class WorkerRun:
    """One request to a Worker, read like a process's output: iterate ``stdout`` for its lines
    (stdout and stderr merged, as ``launch`` gives them), then ``wait()`` gives its exit code.

    The code is the command's, from the worker's exit event; if the worker ended before
    that event (cancelled, killed), it is the worker's own exit status.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.returncode: int | None = None
        self.stdout = self._lines()

    def _lines(self):
        from .worker import split_exit_line

        try:
            for line in self.worker.process.stdout:
                text, code = split_exit_line(line)
                if code is None:
                    yield line
                    continue
                if text:
                    yield text + "\n"
                self.returncode = code
                return
            self.returncode = self.worker.process.wait()
        finally:
            self.worker._finished()

    def wait(self) -> int:
        for _ in self.stdout:
            pass
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode


START_TIMEOUT_S = 120.0
"""How long a worker may take to answer its first ping (a cold disk, an antivirus scan) before
the run waiting for it gets a process of its own; the next run tries a worker again."""

WARMUP_SHAPE = (240, 240, 16)
"""The warm-up phantom: BraTS's in-plane size and one batch of slices, so that the first real
case finds torch imported, the device started and the model's kernels loaded."""


def warmup_request(folder: str | Path, device: str, model: str | Path) -> list[str]:
    """Write a small synthetic phantom case into ``folder`` (in a process of its own, so that
    numpy and SimpleITK work never holds the caller's interpreter) and return the ``segment``
    request that warms a worker up on it."""
    import subprocess
    import sys

    folder = Path(folder)
    case = folder / "case"
    size = [str(n) for n in WARMUP_SHAPE]
    subprocess.run([sys.executable, "-m", f"{LIBRARY_PACKAGE}.phantom", str(case), "--size", *size],
                   check=True, capture_output=True, cwd=str(library_parent()))
    return ["segment", str(case), "-o", str(folder / "out"), "--device", device, "--model", str(model),
            "--progress", "jsonl", "--overwrite"]


class BackgroundStart:
    """Starts a Worker in a thread, then (optionally) warms it up with a phantom run, so that the
    thread that asks (Slicer's main thread) never waits: it polls ``done()``.

    error: why the worker did not start (None when it did); device: the device its warm-up ran
    on (from the done line), None before or without a warm-up; seconds: start plus warm-up.
    A failed warm-up (say, a model file that does not load) leaves a started worker: the real
    run then reports the command's own error.
    """

    def __init__(self, worker: Worker, warmup=None, timeout_s: float = START_TIMEOUT_S) -> None:
        """``warmup``: None, or a callable returning the warm-up's ``segment`` argument list (it
        runs in the thread, and may prepare files), and the scratch folder to delete afterwards."""
        import threading

        self.worker = worker
        self.error: Exception | None = None
        self.device: str | None = None
        self.warmup_code: int | None = None
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, args=(warmup, timeout_s), daemon=True)
        self._thread.start()

    def _run(self, warmup, timeout_s: float) -> None:
        import shutil
        import subprocess
        import time

        started = time.monotonic()
        try:
            self.worker.start(timeout_s)
            if warmup is not None:
                make_request, scratch = warmup
                try:
                    run = self.worker.submit(make_request())
                    for line in run.stdout:
                        parsed = parse_output_line(line)
                        if parsed.kind == "done":
                            self.device = json.loads(parsed.text).get("device")
                    self.warmup_code = run.wait()
                except (OSError, subprocess.CalledProcessError):
                    self.warmup_code = -1
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        except (OSError, WorkerError) as error:
            self.error = error
        self.seconds = time.monotonic() - started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait (scripts, tests, benchmarks; never Slicer's main thread) until done; whether it is."""
        self._thread.join(timeout_s)
        return self.done()


def _read_line_within(stream, timeout_s: float) -> str | None:
    """One line from a pipe, or None when none comes within ``timeout_s`` (a pipe has no
    read timeout on every platform: a helper thread reads it)."""
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return lines[0] if lines else None
