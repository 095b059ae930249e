"""The ``kantumorseg`` command: ``segment`` a case (or a cohort in one process), print ``info``, or serve as a ``worker``.

Every user error (and running out of memory) ends in one sentence on stderr and exit
code 2; an interrupt ends in exit code 130 (SIGINT) or 143 (SIGTERM) with no partial
output (in a cohort, the cases finished before it stay complete, and the message says
so); a bug ends in exit code 1 with a one-line summary; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import KANTumorSegError, is_out_of_memory
from .exit_codes import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USER_ERROR, run_to_exit_code

if TYPE_CHECKING:
    from .pipeline import SegmentResult


class Interrupted(BaseException):
    """Raised from a SIGTERM handler so that cleanup (``finally``, ``with``) runs.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way
    swallows it.
    """


def _on_sigterm(signum, frame) -> None:
    _ignore_interrupts()
    raise Interrupted()


def _on_sigint(signum, frame) -> None:
    _ignore_interrupts()
    raise KeyboardInterrupt()


def _ignore_interrupts() -> None:
    # A second Ctrl-C or SIGTERM during cleanup must not cut the staging folder's removal short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def describe_failure(error: Exception, args: argparse.Namespace) -> tuple[str, int]:
    """The one line and the exit code for a failure that is not a KANTumorSegError."""
    if is_out_of_memory(error):
        batch = getattr(args, "batch_size", None)
        hint = f"lower --batch-size (it was {batch}), " if batch and batch > 1 else ""
        return (f"kantumorseg: error: out of memory; {hint}close other programs or use a machine with more memory; "
                f"{written_so_far(args)}.", EXIT_USER_ERROR)
    if isinstance(error, OSError):
        # Disk full, permissions changed mid-run: the file and the reason, not a traceback.
        where = f" {error.filename}" if error.filename else ""
        return (f"kantumorseg: error: could not read or write{where} ({error.strerror or error}); {written_so_far(args)}.",
                EXIT_USER_ERROR)
    return (f"kantumorseg: internal error: {type(error).__name__}: {error}; {written_so_far(args)}. "
            "This is a bug: please report it with the output of the same command run with --debug.", EXIT_BUG)


def build_parser() -> argparse.ArgumentParser:
    from .inference import DEVICES, PRECISIONS
    from .labels import LABEL_CONVENTIONS
    from .preprocessing import MODALITIES
    from .weights import default_model_path
    from .worker import IDLE_TIMEOUT_S

    parser = argparse.ArgumentParser(prog="kantumorseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kantumorseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser("segment", help="segment the brain tumour of one case, or of several in one process")
    segment.add_argument("case_dir", nargs="*", type=Path,
                         help="folder with the four modalities named as in BraTS (_t1, _t1ce, _t2, _flair or -t1n, -t1c, -t2w, -t2f), "
                              "or a DICOM folder whose four MR series are told apart by Series Description, contrast agent and "
                              "inversion time; several folders (given together, before or after the options) are segmented one after the "
                              "other into the same -o folder")
    segment.add_argument("-o", "--output", type=Path, required=True, help="output folder (created if missing)")
    for modality in MODALITIES:
        segment.add_argument(f"--{modality}", type=Path,
                             help=f"the {modality.upper()} image, or the folder of its DICOM series (overrides the case folder)")
    segment.add_argument("--case-name", help="name used for the output files (default: from the T1ce file name)")
    segment.add_argument("--model", type=Path, default=default_model_path(), help="weights file (.safetensors, with its .json card)")
    segment.add_argument("--device", choices=DEVICES, default="auto", help="auto picks CUDA, then MPS, then the CPU")
    segment.add_argument("--labels", choices=sorted(LABEL_CONVENTIONS), default="brats2020",
                         help="brats2020: 0/1/2/4 (default); brats2023: 0/1/2/3")
    segment.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="auto: bfloat16 on a CPU with native bf16 for a model whose card records a passed bf16 "
                              "accuracy check, float32 otherwise")
    segment.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (halved automatically on GPU out-of-memory)")
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs of this case")
    segment.add_argument("--confidence", action="store_true",
                         help="also write <case>_confidence.nii.gz (percent that each voxel's label is right) and a range "
                              "around every volume, from 8 test-time flips and rotations (about 8x the model's time)")
    segment.add_argument("--dicom-seg", action="store_true",
                         help="also write <case>_seg.dcm, a DICOM Segmentation referencing the T1ce series (DICOM input only; "
                              "needs highdicom: pip install 'kantumorseg[dicom]')")
    segment.add_argument("--prepare", action="store_true",
                         help="raw scanner series: register T1, T2 and FLAIR onto the T1ce, skull-strip, segment on a 1 mm grid "
                              "and write everything on the T1ce's own grid, with <case>_brain_mask.nii.gz (needs "
                              "pip install 'kantumorseg[prepare]')")
    segment.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar",
                         help="bar on stderr, or one JSON line per step on stdout (for Slicer)")
    segment.add_argument("--debug", action="store_true", help="show tracebacks")

    worker = commands.add_parser("worker", help="run segment requests read from stdin, one JSON line each, in one "
                                                "process (for the Slicer module; see KANTumorSegLib/worker.py)")
    worker.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S,
                        help="exit after this many seconds without a request, releasing its memory (0: never)")
    worker.add_argument("--debug", action="store_true", help="show tracebacks")

    info = commands.add_parser("info", help="version, devices and the model card")
    info.add_argument("--model", type=Path, default=default_model_path())
    info.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def plan_cases(args: argparse.Namespace) -> list[tuple[dict[str, Path], str]]:
    """(modality files, case name) of every case to segment, all checked first.

    A cohort is checked as a whole before any case runs, so that a missing file, two folders
    with one case name or an existing output in case 40 does not show after 39 cases.
    """
    from .case_files import case_name
    from .dicom import find_sources
    from .outputs import output_names, refuse_existing
    from .preprocessing import MODALITIES

    explicit = {m: getattr(args, m) for m in MODALITIES}
    folders: list[Path | None] = list(args.case_dir)
    if not folders and not all(explicit.values()):
        raise KANTumorSegError("Give a case folder, or all four of --t1 --t1ce --t2 --flair.")
    if len(folders) > 1 and (args.case_name is not None or any(explicit.values())):
        raise KANTumorSegError(f"--case-name and --t1/--t1ce/--t2/--flair name the files of one case; "
                               f"give one case folder with them, not {len(folders)}.")
    if args.batch_size < 1:
        raise KANTumorSegError("--batch-size must be at least 1.")
    if args.prepare:
        from .brain_extraction import require_prepare

        require_prepare()
    cases: list[tuple[dict[str, Path], str]] = []
    folder_of: dict[str, Path | None] = {}
    for folder in folders or [None]:
        paths = find_sources(folder, explicit)
        case = args.case_name or case_name(paths)
        # The case name becomes file names inside -o: a path in it would write elsewhere.
        if args.case_name is not None and (Path(case).name != case or case in ("", ".", "..")):
            raise KANTumorSegError(f"--case-name {case!r} must be a plain file name prefix, without folders.")
        if case in folder_of:
            # Both would write the same files in -o: the second would stop on, or replace, the first.
            if folder_of[case] == folder:
                raise KANTumorSegError(f"Case folder {folder} is given twice.")
            raise KANTumorSegError(f"Case folders {folder_of[case]} and {folder} both hold case {case}; "
                                   "segment them into different -o folders.")
        folder_of[case] = folder
        cases.append((paths, case))
    if args.dicom_seg:
        check_dicom_seg(cases)
    if not args.overwrite:
        # segment_case refuses existing outputs too, but only when its case comes up.
        for _, case in cases:
            refuse_existing(args.output, output_names(case, args.confidence, args.dicom_seg, args.prepare))
    return cases


def check_dicom_seg(cases: list[tuple[dict, str]]) -> None:
    """--dicom-seg: highdicom is installed, and every case's T1ce is a DICOM series (the
    Segmentation references its images)."""
    import importlib.util

    from .dicom import DicomSeries

    for paths, case in cases:
        if not isinstance(paths["t1ce"], DicomSeries):
            raise KANTumorSegError(f"--dicom-seg writes a DICOM Segmentation that references the T1ce's DICOM images; "
                                   f"the T1ce of case {case} is {paths['t1ce']}, not a DICOM series.")
    if importlib.util.find_spec("highdicom") is None:
        raise KANTumorSegError("--dicom-seg needs the highdicom package: pip install 'kantumorseg[dicom]'.")


def complete_cases(args: argparse.Namespace) -> str:
    """The cases on disk (``args.cases_complete``, counted by run_segment), for a message."""
    done = getattr(args, "cases_complete", 0)
    if done == 0:
        return "no case was written"
    return f"{done} case{'s' if done > 1 else ''} {'are' if done > 1 else 'is'} complete in {args.output}"


def written_so_far(args: argparse.Namespace) -> str:
    """What a failed or interrupted run leaves on disk, for the end of its one-line message.

    ``args.cohort_position`` (case k, of N, its name) is set by run_segment when case k
    starts. A case stopped inside segment_case leaves nothing (its files are staged); one
    stopped after it (printing its summary) is complete.
    """
    position = getattr(args, "cohort_position", None)
    if position is None:
        return "no output was written"
    index, total, case = position
    if getattr(args, "cases_complete", 0) == index:
        return f"its outputs are complete in {args.output}" if total == 1 else complete_cases(args)
    if total == 1:
        return "no output was written"
    return f"case {index} of {total} ({case}) left nothing, {complete_cases(args)}"


def cohort_failure(error: KANTumorSegError, args: argparse.Namespace) -> KANTumorSegError:
    """The error of one case of a cohort, saying which case it was and which are complete."""
    index, total, case = args.cohort_position
    return KANTumorSegError(f"{str(error).rstrip('.')} (case {index} of {total}, {case}; {complete_cases(args)}).")


def run_segment(args: argparse.Namespace) -> int:
    """Segment each case in the given order in this process: one import and start-up for all."""
    from .pipeline import segment_case
    from .progress import BarProgress, make_progress

    cases = plan_cases(args)
    progress = make_progress(args.progress)
    for index, (paths, case) in enumerate(cases, start=1):
        args.cohort_position = (index, len(cases), case)
        if len(cases) > 1 and isinstance(progress, BarProgress):
            print(f"Case {index}/{len(cases)}: {case}", file=sys.stderr, flush=True)
        try:
            result = segment_case(paths, args.output, case, args.model, args.device, args.labels,
                                  args.overwrite, args.batch_size, progress, args.precision, args.confidence, args.dicom_seg,
                                  args.prepare)
        except KANTumorSegError as error:
            if len(cases) == 1:
                raise
            # The earlier cases are whole on disk and this one left nothing (segment_case
            # stages its files): the user must know where the cohort stopped.
            raise cohort_failure(error, args) from error
        finally:
            if isinstance(progress, BarProgress):
                progress.end_line()
        args.cases_complete = index
        print_result(result, args.progress)
    return 0


def print_result(result: SegmentResult, progress: str) -> None:
    """One case's summary: the final JSON line for Slicer, or the volumes and files for people."""
    from .measurements import parts_sentence, volume_with_range

    if progress == "jsonl":
        print(json.dumps({"stage": "done", "case": result.case, "device": result.device, "precision": result.precision,
                          "files": {k: str(v) for k, v in result.files.items()}, "warnings": result.warnings}), flush=True)
    else:
        print(f"Segmented {result.case} on {result.device} ({result.precision}). Volumes (mL):")
        for row in result.volumes["regions"]:
            if "range_ml" in row:  # --confidence: "WT 171.7 mL (165.2-180.1)"
                print(f"  {volume_with_range(row):<30}  {row['description']}")
            else:
                print(f"  {row['name']:<4} {row['volume_ml']:10.2f}  {row['description']}")
        note = parts_sentence(result.volumes["whole_tumour_parts"])
        if note:
            print(f"  {note}")
        print("Files:")
        for path in result.files.values():
            print(f"  {path}")
        # Flushed per case: in a cohort each summary shows when its case is done.
        sys.stdout.flush()


def run_info(args: argparse.Namespace) -> int:
    import torch

    from .inference import choose_device
    from .weights import read_card

    print(f"kantumorseg {__version__}, torch {torch.__version__}")
    print(f"device (auto): {choose_device('auto')}")
    print(f"model: {args.model}")
    card = read_card(args.model)
    print(json.dumps({k: v for k, v in card.items() if k != "sha256"}, indent=2))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kantumorseg: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, _on_sigterm), (signal.SIGINT, _on_sigint))}
    try:
        if args.command == "worker":
            from .worker import serve

            return serve(main, args.idle_timeout)
        return run_segment(args) if args.command == "segment" else run_info(args)
    except KANTumorSegError as error:
        if args.debug:
            raise
        print(f"kantumorseg: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, BrokenPipeError):
            # The reader of stdout went away (``| head``): point stdout at /dev/null so that
            # Python's final flush does not fail again and replace the exit code (Python docs,
            # "Note on SIGPIPE").
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        message, code = describe_failure(error, args)
        print(message, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"kantumorseg: interrupted; {written_so_far(args)}.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Interrupted:
        print(f"kantumorseg: terminated; {written_so_far(args)}.", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def leave_now(code: int) -> NoReturn:
    """End this process with ``code`` at once: stdout and stderr flushed, no exit handlers run.

    Issue 20: an interrupted run did all its cleanup (staging folder removed, its message
    printed, signal handlers restored), called ``exit(143)`` and never ended: its main thread
    spun in ``__run_exit_handlers(status=143)`` inside ``SimpleITK/_SimpleITK.abi3.so``
    (a native exit handler, most likely the teardown of ITK's global thread pool, though no ITK
    worker thread was alive), burning a core until it was killed. Rare, and nothing of ours to
    fix in ITK, so the process leaves through ``os._exit``, which runs neither Python's
    ``atexit`` handlers nor the C library's (native libraries' destructors). Nothing is lost:
    by the time ``main`` returns, its ``with`` blocks and ``finally`` clauses have closed every
    file it opened and removed the staging folder; only the standard streams, which Python
    would flush at exit, are left, and they are flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            # The reader went away (a broken pipe) or the stream is closed: nothing more can be shown.
            pass
    os._exit(code)


def command() -> int:
    """The ``kantumorseg`` console script and ``python -m KANTumorSegLib``: ``main`` as a process.

    A failed or interrupted run (any code but 0, a ``--debug`` traceback included, which
    ``run_to_exit_code`` prints as Python would) ends through ``leave_now``, so that it ends for
    certain once its cleanup is done. A successful run returns its code to the normal exit, as
    before: the hang was only ever seen after an interrupt, and a normal exit keeps whatever a
    library in the process still does at exit.
    """
    code = run_to_exit_code(main, sys.argv[1:])
    if code != EXIT_OK:
        leave_now(code)
    return code
