"""Every bad input of issue 6 is refused with one sentence, a non-zero exit and nothing left behind.

Each row of the table runs the real command (``python -m KANTumorSegLib segment``) in a
subprocess on an 8-slice crop of BraTS20_Training_001 with a tiny random-weights model,
after spoiling one thing: a file, an option, the output folder or the weights. The
output folder must be exactly as it was before the run (absent, or byte for byte the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import processes
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
MODALITY_FILES = {m: f"crop_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}


@dataclass
class Setup:
    """A private copy of the cropped case and of the tiny model, and an output folder path."""

    tmp: Path
    case: Path
    model: Path
    out: Path

    def file(self, modality: str) -> Path:
        return self.case / MODALITY_FILES[modality]

    def args(self, *extra: str, case: Path | None = None) -> list[str]:
        return [str(case or self.case), "-o", str(self.out), "--model", str(self.model), "--device", "cpu",
                "--progress", "none", *extra]

    def card(self) -> Path:
        return self.model.with_suffix(".json")

    def edit_card(self, edit: Callable[[dict], None]) -> None:
        card = json.loads(self.card().read_text())
        edit(card)
        self.card().write_text(json.dumps(card))

    def reseal_card(self) -> None:
        """Make the card's checksum match the (spoiled) weights file, as if it came with them."""
        digest = hashlib.sha256(self.model.read_bytes()).hexdigest()
        self.edit_card(lambda card: card.update(sha256=digest))


@pytest.fixture
def setup(small_case: Path, tiny_model: Path, tmp_path: Path) -> Setup:
    case = tmp_path / "case"
    case.mkdir()
    for name in MODALITY_FILES.values():
        shutil.copy(small_case / name, case / name)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_model, model_dir / tiny_model.name)
    shutil.copy(tiny_model.with_suffix(".json"), model_dir / tiny_model.with_suffix(".json").name)
    return Setup(tmp_path, case, model_dir / tiny_model.name, tmp_path / "out")


def run_segment(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The real command in a child process, as a user would run it."""
    return processes.run([sys.executable, "-m", "KANTumorSegLib", "segment", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120, **kwargs)


def folder_state(folder: Path) -> dict[str, str] | None:
    """Every entry under a folder (hidden ones included) with its sha256; None if absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def write_like(reference: Path, array: np.ndarray, target: Path, spacing=None) -> None:
    """Write a (z, y, x) array as an image with the reference's geometry."""
    image = sitk.GetImageFromArray(array)
    if array.ndim == 3:
        image.CopyInformation(sitk.ReadImage(str(reference)))
    elif spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(target))


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


CODE_RAN_MARKER = "code_was_executed"


class _PickleBomb:
    """Unpickling this creates a marker file: proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_payload(marker: Path) -> dict:
    import torch

    return {"down1.weight": torch.zeros(3), "payload": _PickleBomb(marker)}


# Spoilers: each changes the setup and returns the command's arguments.

def missing_modality(s: Setup) -> list[str]:
    s.file("t2").unlink()
    return s.args()


def missing_case_folder(s: Setup) -> list[str]:
    return s.args(case=s.tmp / "no_such_case")


def missing_file(s: Setup) -> list[str]:
    return s.args("--flair", str(s.tmp / "no_such_flair.nii.gz"))


def not_an_image(s: Setup) -> list[str]:
    s.file("t1").write_text("patient notes, not an image\n")
    return s.args()


def truncated_nii_gz(s: Setup) -> list[str]:
    data = s.file("t2").read_bytes()
    s.file("t2").write_bytes(data[: int(len(data) * 0.6)])
    return s.args()


def truncated_t2_and_flair(s: Setup) -> list[str]:
    # The four files are read in parallel: the error must still name the first file at fault
    # in the modality order (T1, T1ce, T2, FLAIR), whichever thread fails first.
    for modality in ("flair", "t2"):
        data = s.file(modality).read_bytes()
        s.file(modality).write_bytes(data[: int(len(data) * 0.6)])
    return s.args()


def truncated_nii(s: Setup) -> list[str]:
    plain = s.case / "crop_t2.nii"
    sitk.WriteImage(sitk.ReadImage(str(s.file("t2"))), str(plain))
    s.file("t2").unlink()
    data = plain.read_bytes()
    plain.write_bytes(data[: len(data) - 1000])
    return s.args()


def image_2d(s: Setup) -> list[str]:
    write_like(s.file("flair"), read_array(s.file("flair"))[4], s.file("flair"), spacing=(1.0, 1.0))
    return s.args()


def single_slice(s: Setup) -> list[str]:
    image = sitk.ReadImage(str(s.file("flair")))
    sitk.WriteImage(image[:, :, 4:5], str(s.file("flair")))
    return s.args()


def image_4d(s: Setup) -> list[str]:
    image = sitk.ReadImage(str(s.file("t1")))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(s.file("t1")))
    return s.args()


def vector_image(s: Setup) -> list[str]:
    image = sitk.ReadImage(str(s.file("t1")))
    sitk.WriteImage(sitk.Compose(image, image, image), str(s.file("t1")))
    return s.args()


def empty_volume(s: Setup) -> list[str]:
    write_like(s.file("t2"), np.zeros_like(read_array(s.file("t2"))), s.file("t2"))
    return s.args()


def constant_volume(s: Setup) -> list[str]:
    write_like(s.file("t2"), np.full_like(read_array(s.file("t2")), 117), s.file("t2"))
    return s.args()


def all_nan_volume(s: Setup) -> list[str]:
    # NRRD keeps NaN; ITK's NIfTI reader turns NaN and inf into 0 before we see them.
    nrrd = s.case / "crop_t2.nrrd"
    write_like(s.file("t2"), np.full(read_array(s.file("t2")).shape, np.nan, np.float32), nrrd)
    s.file("t2").unlink()
    return s.args()


def same_file_twice(s: Setup) -> list[str]:
    return s.args("--t2", str(s.file("t1")))


def exported_twice(s: Setup) -> list[str]:
    # The FLAIR series saved again under the T2 name: another file, the same voxels.
    shutil.copy(s.file("flair"), s.file("t2"))
    return s.args()


def hard_link_twice(s: Setup) -> list[str]:
    twin = s.tmp / "same_inode_t1ce.nii.gz"
    os.link(s.file("t1ce"), twin)
    return s.args("--t1", str(twin))


def grids_do_not_overlap(s: Setup) -> list[str]:
    image = sitk.ReadImage(str(s.file("flair")))
    image.SetOrigin(tuple(o + 500.0 for o in image.GetOrigin()))
    sitk.WriteImage(image, str(s.file("flair")))
    return s.args()


def output_under_a_file(s: Setup) -> list[str]:
    blocker = s.tmp / "a_file"
    blocker.write_text("a regular file where a folder is needed\n")
    s.out = blocker / "out"
    return s.args()


def output_read_only(s: Setup) -> list[str]:
    if os.geteuid() == 0:
        pytest.skip("running as root, where a read-only folder does not block writes (see output_under_a_file)")
    s.out.mkdir()
    s.out.chmod(0o500)
    return s.args()


def existing_output(s: Setup) -> list[str]:
    s.out.mkdir()
    (s.out / "crop_seg.nii.gz").write_bytes(os.urandom(2048))
    (s.out / "crop_volumes.json").write_text('{"from": "an earlier run"}\n')
    return s.args()


def cuda_without_gpu(s: Setup) -> list[str]:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present here")
    return s.args("--device", "cuda")


def missing_weights(s: Setup) -> list[str]:
    return s.args("--model", str(s.tmp / "model" / "absent.safetensors"))


def missing_card(s: Setup) -> list[str]:
    s.card().unlink()
    return s.args()


def card_not_json(s: Setup) -> list[str]:
    s.card().write_text('{"format": 1, "model": ')
    return s.args()


def corrupt_weights(s: Setup) -> list[str]:
    # A truncated download whose card was computed from it: only safetensors can tell.
    data = s.model.read_bytes()
    s.model.write_bytes(data[: len(data) // 3])
    s.reseal_card()
    return s.args()


def nan_weights(s: Setup) -> list[str]:
    # What a diverged training run exports: a valid file and card, NaN inside.
    from safetensors.torch import load_file, save_file

    state = load_file(str(s.model))
    state["down1.1.0.conv.weight"] = state["down1.1.0.conv.weight"] * float("nan")
    save_file(state, str(s.model))
    s.reseal_card()
    return s.args()


def checksum_mismatch(s: Setup) -> list[str]:
    data = bytearray(s.model.read_bytes())
    data[-100] ^= 0xFF
    s.model.write_bytes(bytes(data))
    return s.args()


def config_mismatch(s: Setup) -> list[str]:
    s.edit_card(lambda card: card["model"].update(base_width=8))
    return s.args()


def config_invalid(s: Setup) -> list[str]:
    s.edit_card(lambda card: card["model"].update(head="pixels"))
    return s.args()


def channel_order_mismatch(s: Setup) -> list[str]:
    s.edit_card(lambda card: card["preprocessing"].update(channels=["flair", "t1", "t1ce", "t2"]))
    return s.args()


def pickle_weights(s: Setup) -> list[str]:
    # A pickle-based torch file renamed .safetensors, with a matching card; unpickling it
    # would create the marker file (see test_the_pickle_payload_is_live).
    import torch

    torch.save(pickle_payload(s.tmp / CODE_RAN_MARKER), s.model)
    s.reseal_card()
    return s.args()


def gamma_list_too_short(s: Setup) -> list[str]:
    s.edit_card(lambda card: card["preprocessing"].update(gamma=[1.0, 1.5, 1.5]))
    return s.args()


def postprocessing_threshold_negative(s: Setup) -> list[str]:
    s.edit_card(lambda card: card.update(postprocessing={"min_component_ml": -1.0, "et_min_ml": 0.5}))
    return s.args()


def batch_size_zero(s: Setup) -> list[str]:
    return s.args("--batch-size", "0")


def no_case_and_not_all_files(s: Setup) -> list[str]:
    return ["-o", str(s.out), "--model", str(s.model), "--t1", str(s.file("t1"))]


def unknown_device(s: Setup) -> list[str]:
    return s.args("--device", "tpu")


@dataclass(frozen=True)
class Row:
    spoil: Callable[[Setup], list[str]]
    code: int
    message: str
    """A regex the stderr must contain."""


TABLE = [
    Row(missing_modality, 2, r"error: No T2 image found in \S+case; expected a name ending in t2 or t2w .*--t2\."),
    Row(missing_case_folder, 2, r"error: Case folder \S+no_such_case does not exist\."),
    Row(missing_file, 2, r"error: The FLAIR file \S+no_such_flair\.nii\.gz does not exist\."),
    Row(not_an_image, 2, r"error: The T1 file \S+crop_t1\.nii\.gz could not be read as an image"),
    Row(truncated_nii_gz, 2, r"error: The T2 file \S+crop_t2\.nii\.gz is truncated or corrupt"),
    Row(truncated_t2_and_flair, 2, r"error: The T2 file \S+crop_t2\.nii\.gz is truncated or corrupt"),
    Row(truncated_nii, 2, r"error: The T2 file \S+crop_t2\.nii is truncated: it holds \d+ bytes of the \d+"),
    Row(image_2d, 2, r"error: The FLAIR file \S+crop_flair\.nii\.gz is 2D \(240, 240\); a 3D volume is needed"),
    Row(single_slice, 2, r"error: The FLAIR file \S+crop_flair\.nii\.gz (is 2D|has size \(240, 240, 1\)).*3D volume is needed"),
    Row(image_4d, 2, r"error: The T1 file \S+crop_t1\.nii\.gz is 4D \(240, 240, 8, 2\); a 3D volume is needed"),
    Row(vector_image, 2, r"error: The T1 file \S+crop_t1\.nii\.gz has 3 components per voxel"),
    Row(empty_volume, 2, r"error: The T2 file \S+crop_t2\.nii\.gz is constant \(every voxel 0\)"),
    Row(constant_volume, 2, r"error: The T2 file \S+crop_t2\.nii\.gz is constant \(every voxel 117\)"),
    Row(all_nan_volume, 2, r"error: The T2 file \S+crop_t2\.nrrd holds no finite voxel values"),
    Row(same_file_twice, 2, r"error: T1 and T2 are the same file \S+crop_t1\.nii\.gz"),
    Row(exported_twice, 2, r"error: The T2 file \S+crop_t2\.nii\.gz and the FLAIR file \S+crop_flair\.nii\.gz hold the same image"),
    Row(hard_link_twice, 2, r"error: The T1 file \S+same_inode_t1ce\.nii\.gz and the T1CE file \S+crop_t1ce\.nii\.gz hold the same image"),
    Row(grids_do_not_overlap, 2, r"error: The FLAIR file \S+crop_flair\.nii\.gz does not overlap the T1ce image in space"),
    Row(output_under_a_file, 2, r"error: Output folder \S+a_file/out could not be created"),
    Row(output_read_only, 2, r"error: Output folder \S+out is not writable"),
    Row(existing_output, 2, r"error: \S+out/crop_seg\.nii\.gz already exists; use --overwrite"),
    Row(cuda_without_gpu, 2, r"error: --device cuda was asked for but no usable CUDA GPU was found"),
    Row(missing_weights, 2, r"error: Model weights \S+absent\.safetensors not found"),
    Row(missing_card, 2, r"error: Model card \S+tiny\.json is missing"),
    Row(card_not_json, 2, r"error: Model card \S+tiny\.json is not valid JSON"),
    Row(corrupt_weights, 2, r"error: Model weights \S+tiny\.safetensors could not be read as safetensors"),
    Row(nan_weights, 2, r"error: Model weights \S+tiny\.safetensors hold NaN or infinite values \(down1\.1\.0\.conv\.weight\)"),
    Row(checksum_mismatch, 2, r"error: Model weights \S+tiny\.safetensors do not match their card's checksum"),
    Row(config_mismatch, 2, r"error: Model weights \S+tiny\.safetensors do not fit the architecture in their card \(wrong shape"),
    Row(config_invalid, 2, r"error: Model card \S+tiny\.json has an invalid config: head must be one of"),
    Row(channel_order_mismatch, 2, r"error: Model card \S+tiny\.json has an invalid config: channel order"),
    Row(gamma_list_too_short, 2, r"error: Model card \S+tiny\.json has an invalid config: gamma \[1\.0, 1\.5, 1\.5\] needs 4"),
    Row(postprocessing_threshold_negative, 2,
        r"error: Model card \S+tiny\.json has an invalid config: post-processing thresholds must not be negative"),
    Row(pickle_weights, 2, r"error: Model weights \S+tiny\.safetensors could not be read as safetensors"),
    Row(batch_size_zero, 2, r"error: --batch-size must be at least 1\."),
    Row(no_case_and_not_all_files, 2, r"error: Give a case folder, or all four of --t1 --t1ce --t2 --flair\."),
    Row(unknown_device, 2, r"error: argument --device: invalid choice: 'tpu'"),
]


def assert_refused(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    """The exit code, the message (a regex) and exactly one error line, with no traceback."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert re.search(message, result.stderr), result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"expected one error line, got: {result.stderr}"


@pytest.mark.parametrize("row", TABLE, ids=[row.spoil.__name__ for row in TABLE])
def test_bad_input_is_refused_in_one_sentence_and_leaves_no_output(setup: Setup, row: Row):
    args = row.spoil(setup)
    before = folder_state(setup.out)
    result = run_segment(args)
    assert_refused(result, row.code, row.message)
    # Nothing written, no staging folder; an existing output is left byte for byte.
    assert folder_state(setup.out) == before
    assert not (setup.tmp / CODE_RAN_MARKER).exists()


def test_debug_shows_the_traceback(setup: Setup):
    result = run_segment(missing_weights(setup) + ["--debug"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "KANTumorSegError" in result.stderr


def test_nan_and_infinite_voxels_are_treated_with_a_warning(setup: Setup):
    t2 = read_array(setup.file("t2")).astype(np.float32)
    t2[2, 100:110, 100:110] = np.nan
    t2[4, 50, 60] = np.inf
    t2[6, 70, 80] = -np.inf
    # NRRD keeps NaN and inf; ITK's NIfTI reader turns them into 0 before we see them.
    write_like(setup.file("t2"), t2, setup.case / "crop_t2.nrrd")
    setup.file("t2").unlink()
    result = run_segment(setup.args())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"warning: The T2 file \S+crop_t2\.nrrd has 102 NaN or infinite voxels; they were set to the volume minimum",
                     result.stderr), result.stderr
    labels = read_array(setup.out / "crop_seg.nii.gz")
    assert labels.shape == t2.shape
    assert set(np.unique(labels)) <= {0, 1, 2, 4}


def test_the_pickle_payload_is_live(tmp_path: Path):
    """The pickle_weights row would see code run: unpickling its file does create the marker."""
    import io

    import torch

    marker = tmp_path / CODE_RAN_MARKER
    buffer = io.BytesIO()
    torch.save(pickle_payload(marker), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert marker.exists()


# Every socket call a network connection needs is audited and refused in the child; the log
# shows an attempt even if some library catches the error.
NO_NETWORK = """
import runpy, socket, sys
log = sys.argv.pop(1)
def audit(event, args):
    if event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.sendto",
                 "socket.sendmsg") or (event == "socket.__new__" and args[1] in (socket.AF_INET, socket.AF_INET6)):
        with open(log, "a") as stream:
            stream.write(f"{event} {args!r}\\n")
        raise OSError("network access blocked by the test")
sys.addaudithook(audit)
sys.argv[0] = "kantumorseg"
runpy.run_module("KANTumorSegLib", run_name="__main__")
"""


def test_segment_never_opens_a_network_connection(setup: Setup):
    log = setup.tmp / "network.log"
    result = processes.run([sys.executable, "-c", NO_NETWORK, str(log), "segment", *setup.args()], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), log.read_text()
    assert (setup.out / "crop_seg.nii.gz").is_file()


# The limit is set inside the child once the heavy libraries are loaded: torch alone maps
# about 1 GB of address space, so a limit set before it (preexec_fn) either breaks the import
# or leaves room for the whole run, depending on the machine. Thread stacks (8 MB each by
# default) also count against RLIMIT_AS, and a thread that cannot start is fatal in native
# code (glibc aborts, ITK's pool hangs in pthread_join): so the child's threads get 2 MB
# stacks (RLIMIT_STACK), and 48 MB above the loaded state the limit falls on data, in
# inference, every time (checked 3 x 4 limits here). The timeout catches a hang.
MEMORY_LIMITED = """
import resource, runpy, sys
headroom = int(sys.argv.pop(1)) << 20
import numpy, SimpleITK, slicerio, torch, safetensors.torch  # noqa: F401
torch.ones(64, 64) @ torch.ones(64, 64)  # starts torch's thread pool before the limit
size = next(int(line.split()[1]) << 10 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
sys.argv[0] = "kantumorseg"
runpy.run_module("KANTumorSegLib", run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/status and RLIMIT_AS (Linux)")
def test_cpu_run_under_a_memory_limit_fails_with_a_sentence_not_a_kill(setup: Setup):
    import resource

    def small_thread_stacks() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (2 << 20, 2 << 20))

    result = processes.run([sys.executable, "-c", MEMORY_LIMITED, "48", "segment", *setup.args()], cwd=REPO,
                           capture_output=True, text=True, timeout=60, preexec_fn=small_thread_stacks)
    assert_refused(result, 2, r"error: (out of memory|Not enough memory)")
    assert folder_state(setup.out) is None


def test_uncompressed_nifti_named_nii_gz_is_still_read(setup: Setup):
    # Some exporters name plain NIfTI files .nii.gz; ITK reads them, so must the length check.
    from KANTumorSegLib.volumes import read_image

    plain = setup.tmp / "plain.nii"
    sitk.WriteImage(sitk.ReadImage(str(setup.file("t2"))), str(plain))
    misnamed = setup.tmp / "misnamed_t2.nii.gz"
    plain.rename(misnamed)
    image = read_image(misnamed, "t2")
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), read_array(setup.file("t2")))
