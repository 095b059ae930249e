"""KANTumorSegLogic run outside Slicer, on Slicer's own scene and module logic (slicer-core).

``slicer_harness.SlicerHarness`` builds the real MRML scene with the Segmentations, Volumes,
Terminologies (Slicer's terminology files loaded), Colors, Subject Hierarchy and Tables logic
of the ``slicer-core`` package, and stands in only for what needs Qt or the Slicer application
(timers, settings, the module's .ui widgets, dialogs, the parameter node wrapper, the IO
manager's file dialogs and Segment Statistics, a scripted module): see that file. Everything
else is real: the Logic's own code, Slicer's nodes, storage nodes and logic, the command it
launches (this machine's Python standing in for PythonSlicer), the real BraTS case and a real
weights file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import processes
import pytest
from slicer_harness import SlicerHarness, Timers, vtk_messages

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def logic_module(tmp_path, monkeypatch, ends):
    """KANTumorSeg.py imported against Slicer's real scene and logic, with PythonSlicer = this Python;
    every process it launches (runs, workers) is killed with its group when the test ends."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e '.[dev]' installs it)")
    from KANTumorSegLib import slicer_process

    launch = slicer_process.launch
    monkeypatch.setattr(slicer_process, "launch", lambda *args, **kwargs: ends(launch(*args, **kwargs)))
    harness = SlicerHarness(tmp_path)
    harness.install(monkeypatch)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "PythonSlicer" else real_which(name))
    spec = importlib.util.spec_from_file_location("KANTumorSeg", REPO / "KANTumorSeg" / "KANTumorSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logic = module.KANTumorSegLogic()
    # Installing torch and packages happens through Slicer's extension manager and pip: not here.
    logic._requirementsChecked = True
    yield module, logic, harness, tmp_path
    # As the module's cleanup does when Slicer unloads it: no worker outlives the test.
    logic.stopWorker()


def _volumes(harness: SlicerHarness, case: Path) -> dict:
    """The four volumes of a crop_<modality> case, loaded into the scene by Slicer's Volumes logic."""
    return {m: harness.load_volume(case / f"crop_{m}.nii.gz", {"name": f"BraTS20_Training_001_{m}"})
            for m in ("t1", "t1ce", "t2", "flair")}


def _table(task) -> dict[str, float]:
    """Region -> volume in mL, read as numbers from the table's Volume column."""
    table = task.volumeTable
    volumes = table.GetTable().GetColumnByName("Volume")
    return {table.GetCellText(row, 0): volumes.GetValue(row) for row in range(table.GetNumberOfRows())}


def _columns(table) -> list[str]:
    return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]


def _ids_of(*nodes) -> set[str]:
    """The ids of these nodes and of their display nodes: what a run may add to the scene."""
    ids = set()
    for node in nodes:
        ids.add(node.GetID())
        display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
        if display is not None:
            ids.add(display.GetID())
    return ids


def _in_study(harness: SlicerHarness, volumes: dict) -> int:
    """Put the volumes in a patient's study of the subject hierarchy, as DICOM loading does; the study's item."""
    import slicer

    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(harness.scene)
    study = shNode.CreateStudyItem(shNode.CreateSubjectItem(shNode.GetSceneItemID(), "Patient"), "MR study")
    for volume in volumes.values():
        shNode.CreateItem(study, volume)
    return study


def test_process_waiting_imports_segments_table_and_removes_temporary_files(logic_module, cropped_case):
    # The shipped model: on this crop it leaves the whole tumour in several parts (5), so the
    # run's note on separate parts must be there.
    import slicer

    from KANTumorSegLib.labels import SEGMENTS
    from KANTumorSegLib.weights import default_model_path

    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, cropped_case)
    t1ce = volumes["t1ce"]
    study = _in_study(harness, volumes)
    output = harness.new_segmentation("out")
    progress = []
    task = logic.process(volumes["t1"], t1ce, volumes["t2"], volumes["flair"], output, device="cpu",
                         waitForCompletion=True, progressCallback=lambda *step: progress.append(step),
                         model=str(default_model_path()), addRegions=True)
    assert task.status == "completed", task.message
    assert harness.segment_names(output) == [s.name for s in SEGMENTS]
    assert output.GetNodeReferenceID(output.GetReferenceImageGeometryReferenceRole()) == t1ce.GetID()
    assert output.GetSegmentation().ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(harness.scene)
    assert shNode.GetItemParent(shNode.GetItemByDataNode(output)) == study
    masks = {s.id: harness.mask(output, s.id, t1ce) for s in SEGMENTS}
    assert masks["NCR"].shape == t1ce.GetImageData().GetDimensions()[::-1]
    regions = task.regionsSegmentation
    assert harness.segment_names(regions) == ["Whole tumour", "Tumour core"]
    np.testing.assert_array_equal(harness.mask(regions, "WT", t1ce), masks["NCR"] | masks["ED"] | masks["ET"])
    np.testing.assert_array_equal(harness.mask(regions, "TC", t1ce), masks["NCR"] | masks["ET"])
    # Overlapping regions: Slicer keeps them on two labelmap layers.
    assert regions.GetSegmentation().GetNumberOfLayers() == 2
    assert regions.GetSegmentation().GetSegment("WT").GetTerminology().count("~") == 6

    assert progress and all(0.0 <= step[3] <= 1.0 for step in progress)
    volumes_ml = _table(task)
    assert list(volumes_ml) == ["NCR", "ED", "ET", "WT", "TC"]
    assert task.volumeTable.GetColumnUnitLabel("Volume") == "mL"
    assert volumes_ml["WT"] == pytest.approx(volumes_ml["NCR"] + volumes_ml["ED"] + volumes_ml["ET"], abs=1e-3)
    assert volumes_ml["WT"] > 0
    assert not os.path.exists(task.tempDir)
    # The log's pointer to separate tumour parts: the command's sentence for the imported segments.
    from KANTumorSegLib.measurements import parts_sentence, whole_tumour_parts
    from KANTumorSegLib.slicer_segments import compose_labels

    voxel_ml = float(np.prod(t1ce.GetSpacing())) / 1000
    imported = compose_labels(masks)
    assert task.partsNote is not None and task.partsNote == parts_sentence(whole_tumour_parts(imported, voxel_ml))

    # "Update volumes" after an edit: erase the edema, as in Segment Editor.
    harness.erase(output, "ED")
    logic.updateVolumeTable(output, t1ce, task.volumeTable)
    edited = _table(task)
    assert edited["ED"] == 0 and edited["WT"] == pytest.approx(volumes_ml["WT"] - volumes_ml["ED"], abs=1e-3)

    csv_path = tmp / "volumes.csv"
    logic.exportCsv(task.volumeTable, str(csv_path))
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "region,description,voxels,volume_ml" and lines[2].startswith("ED,Edema,0,0.0")


def _run_timers(task, limit_s: float = 300.0, on_line=None):
    """Run the pending single-shot callbacks, as Qt's event loop would, until the task ends."""
    import time

    deadline = time.monotonic() + limit_s
    while task.status == "running" and time.monotonic() < deadline:
        if Timers.pending:
            Timers.pending.pop(0)()
            if on_line:
                on_line()
        time.sleep(0.02)


def test_process_in_background_reports_then_completes(logic_module, cropped_case, mixed_model):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, cropped_case)
    output = harness.new_segmentation("out")
    finished, logged = [], []
    task = logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output, device="cpu",
                         model=str(mixed_model), logCallback=logged.append, completedCallback=finished.append)
    # Returned at once: the worker starts in the background and a timer submits the run.
    assert task.status == "running" and task.process is None and Timers.pending
    _run_timers(task)
    assert finished == [task] and task.status == "completed", task.message
    assert output.GetSegmentation().GetNumberOfSegments() == 3
    assert not os.path.exists(task.tempDir)


def test_cancel_leaves_the_segmentation_untouched(logic_module, cropped_case, mixed_model):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, cropped_case)
    output = harness.new_segmentation("out")
    finished = []
    progress = []
    task = logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output, device="cpu",
                         model=str(mixed_model), progressCallback=lambda *step: progress.append(step),
                         completedCallback=finished.append)
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    assert finished == [task] and task.status == "cancelled"
    # The status alone would read "cancelled" even if the command ran to its end.
    assert task.process.returncode != 0, "cancel did not stop the command"
    assert output.GetSegmentation().GetNumberOfSegments() == 0
    assert not os.path.exists(task.tempDir)


def test_a_failure_shows_the_commands_sentence(logic_module, cropped_case, tmp_path):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, cropped_case)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError) as raised:
        logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], harness.new_segmentation("out"), device="cpu",
                      waitForCompletion=True, model=str(broken))
    assert str(broken.with_suffix(".json")) in str(raised.value)
    assert not any(tmp.glob("KANTumorSeg*/*"))


def test_process_refuses_the_same_volume_twice(logic_module, cropped_case):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, cropped_case)
    with pytest.raises(ValueError, match="four different volumes"):
        logic.process(volumes["t1"], volumes["t1"], volumes["t2"], volumes["flair"], harness.new_segmentation("out"))
    with pytest.raises(ValueError, match="The T2 volume is not set"):
        logic.process(volumes["t1"], volumes["t1ce"], None, volumes["flair"], harness.new_segmentation("out"))


def test_load_case_and_model_card_use_the_library(logic_module, brats_case_001, mixed_model):
    module, logic, harness, tmp = logic_module
    nodes = logic.loadCase(str(brats_case_001))
    assert sorted(nodes) == ["flair", "t1", "t1ce", "t2"]
    assert sorted(node.GetStorageNode().GetFileName() for node in nodes.values()) == \
        sorted(str(brats_case_001 / f"BraTS20_Training_001_{m}.nii.gz") for m in nodes)
    assert nodes["t1ce"].GetImageData().GetDimensions() == (240, 240, 155)
    with pytest.raises(ValueError, match="No T1"):
        logic.loadCase(str(tmp))
    card = logic.modelCardText(str(mixed_model))
    assert "mixed-random" in card and "sha256" not in card
    assert "not found" in logic.modelCardText(str(tmp / "none.safetensors"))

# ----------------------------------------------------------------------------- the worker


@pytest.mark.skipif(importlib.util.find_spec("deepbet") is None, reason=(
    "the optional brain-extraction package deepbet is not installed (pip install 'kantumorseg[prepare]')"))
def test_prepare_raw_scans_moves_the_bar_through_every_step_and_lands_on_the_raw_t1ce(logic_module, brats_case_001,
                                                                                     tiny_model):
    """Issue 18: "Prepare raw scans" on four raw series (crafted from BraTS20_Training_001: moved,
    resliced into tilted 5.5 mm slabs) through the Logic and the command it launches: every
    registration, the resampling and the skull-stripping move the bar, which never goes back,
    and the segments lie on the raw T1ce node."""
    from crafted_raw import craft_raw_case

    from KANTumorSegLib import slicer_results
    from KANTumorSegLib.prepare import PREPARE_STAGES

    module, logic, harness, tmp = logic_module
    craft_raw_case(brats_case_001, tmp / "raw")
    volumes = {m: harness.load_volume(tmp / "raw" / f"raw_{m}.nii.gz", {"name": f"patient_{m}"})
               for m in ("t1", "t1ce", "t2", "flair")}
    progress = []
    task = _run_node(logic, volumes, tiny_model, None, waitForCompletion=True, prepare=True,
                     progressCallback=lambda *step: progress.append(step))
    assert task.status == "completed", task.message
    assert list(dict.fromkeys(step[0] for step in progress)) == list(slicer_results.PREPARE_STAGE_SPANS)
    fractions = [step[3] for step in progress]
    assert None not in fractions and fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    for stage in PREPARE_STAGES:
        assert len({step[3] for step in progress if step[0] == stage}) > 1, stage
    output = task.outputSegmentation
    assert output.GetNodeReferenceID(output.GetReferenceImageGeometryReferenceRole()) == volumes["t1ce"].GetID()
    assert harness.mask(output, "ED", volumes["t1ce"]).shape == volumes["t1ce"].GetImageData().GetDimensions()[::-1]


def _run(logic, volumes, model, **kwargs):
    output = volumes["t1ce"].GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    return _run_node(logic, volumes, model, output, **kwargs)


def _run_node(logic, volumes, model, output, **kwargs):
    return logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output,
                         device="cpu", model=str(model), **kwargs)


def test_consecutive_runs_reuse_one_worker(logic_module, small_case, mixed_model):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    logged = []
    first = _run(logic, volumes, mixed_model, waitForCompletion=True, logCallback=logged.append)
    second = _run(logic, volumes, mixed_model, waitForCompletion=True, logCallback=logged.append)
    assert first.status == second.status == "completed", (first.message, second.message)
    assert first.worker is not None and second.worker is first.worker is logic._worker
    assert first.worker.process.pid == second.worker.process.pid and logic._worker.alive()
    assert _table(first) == _table(second)
    assert not any("process of its own" in line for line in logged), logged
    assert not os.path.exists(first.tempDir) and not os.path.exists(second.tempDir)


def test_cancel_ends_the_worker_and_the_next_run_starts_a_new_one(logic_module, cropped_case, small_case, mixed_model):
    module, logic, harness, tmp = logic_module
    progress = []
    task = _run(logic, _volumes(harness, cropped_case), mixed_model, progressCallback=lambda *step: progress.append(step))
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    cancelled_pid = task.worker.process.pid
    assert task.status == "cancelled" and task.process.returncode == 143
    assert task.worker.process.poll() == 143 and not task.worker.alive()
    assert not os.path.exists(task.tempDir)

    after = _run(logic, _volumes(harness, small_case), mixed_model, waitForCompletion=True)
    assert after.status == "completed", after.message
    assert after.worker.process.pid != cancelled_pid and after.worker.alive()


def test_an_input_error_is_reported_as_before_and_the_worker_stays(logic_module, small_case, mixed_model, tmp_path):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError) as raised:
        _run(logic, volumes, broken, waitForCompletion=True)
    # The command's own sentence, naming the missing model card, as without a worker.
    assert str(broken.with_suffix(".json")) in str(raised.value)
    pid = logic._worker.process.pid
    after = _run(logic, volumes, mixed_model, waitForCompletion=True)
    assert after.status == "completed", after.message
    assert after.worker.process.pid == pid


@pytest.mark.skipif(os.name == "nt", reason="the stand-in launcher is a shell script")
def test_a_launcher_without_input_falls_back_to_a_process_per_run(logic_module, small_case, mixed_model, monkeypatch):
    # A PythonSlicer that does not pass its standard input on to Python: the worker never sees
    # a request, so the module must notice at start, say so, and run the command as before.
    module, logic, harness, tmp = logic_module
    launcher = tmp / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" < /dev/null\n')
    launcher.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(launcher))
    logged = []
    task = _run(logic, _volumes(harness, small_case), mixed_model, waitForCompletion=True, logCallback=logged.append)
    assert task.status == "completed", task.message
    assert task.worker is None and logic._worker is None
    assert any("could not start" in line and "process of its own" in line for line in logged), logged


# ----------------------------------------------------------------------------- issue 13: defects


def test_closing_the_scene_during_a_run_cancels_it_and_nothing_lands_in_the_next_scene(logic_module, small_case, mixed_model):
    """The widget's onSceneStartClose (called here with the few attributes it touches: the
    widget itself needs Slicer's Qt) cancels the run; the removed nodes are not imported into,
    and no table or segmentation is left in the scene."""
    module, logic, harness, tmp = logic_module
    empty = harness.node_ids()
    volumes = _volumes(harness, small_case)
    output = harness.new_segmentation("out")
    finished = []
    task = _run_node(logic, volumes, mixed_model, output, completedCallback=finished.append)
    widget = types.SimpleNamespace(_task=task, logic=logic, _notes=None, setParameterNode=lambda node: None)
    module.KANTumorSegWidget.onSceneStartClose(widget, None, None)
    harness.scene.Clear(0)
    _run_timers(task)
    assert finished == [task] and task.status == "cancelled"
    assert output.GetSegmentation().GetNumberOfSegments() == 0
    assert harness.node_ids() <= empty
    assert not os.path.exists(task.tempDir)


def test_nodes_removed_during_a_run_are_not_imported_into(logic_module, small_case, mixed_model):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    output = harness.new_segmentation("out")
    before = harness.node_ids() - {output.GetID()}
    task = _run_node(logic, volumes, mixed_model, output)
    harness.scene.RemoveNode(output)
    _run_timers(task)
    assert task.status == "cancelled" and "removed" in task.message
    assert output.GetSegmentation().GetNumberOfSegments() == 0 and harness.node_ids() == before


def test_a_volume_that_cannot_be_exported_is_named(logic_module, small_case, mixed_model, monkeypatch):
    import slicer

    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    # slicer.util.exportNode (the application's IO manager, a stand-in here) returns False, and only logs, when it cannot write.
    monkeypatch.setattr(slicer.util, "exportNode",
                        lambda node, *args, **kwargs: node is not volumes["t2"] and harness.export_node(node, *args, **kwargs))
    with pytest.raises(RuntimeError, match=r"The T2 volume 'BraTS20_Training_001_t2' could not be written"):
        _run(logic, volumes, mixed_model, waitForCompletion=True)
    assert not any(tmp.glob("KANTumorSeg*/*"))


def test_a_run_without_an_output_node_creates_one_only_when_it_succeeds(logic_module, small_case, mixed_model, tmp_path):
    """The widget passes no node (None: 'Create new segmentation on Apply'); a failed or
    cancelled run must leave no empty '... tumour' segmentation behind: the scene's node ids are
    those it had, and a success adds exactly the segmentation, its display node and the table."""
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    before = harness.node_ids()
    progress = []
    task = _run_node(logic, volumes, mixed_model, None, progressCallback=lambda *step: progress.append(step))
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    assert task.status == "cancelled" and harness.node_ids() == before
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError):
        _run_node(logic, volumes, broken, None, waitForCompletion=True)
    assert harness.node_ids() == before
    done = _run_node(logic, volumes, mixed_model, None, waitForCompletion=True)
    assert harness.node_ids() - before == _ids_of(done.outputSegmentation, done.volumeTable)
    assert done.outputSegmentation.GetName() == "BraTS20_Training_001_t1ce tumour"
    assert done.outputSegmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert "AddNewNodeByClass" not in _source_of(module.KANTumorSegWidget.onApplyButton)


def _source_of(function) -> str:
    import inspect

    return inspect.getsource(function)


def test_editing_a_region_never_changes_the_classes(logic_module, small_case, mixed_model):
    """WT and TC live in a segmentation of their own, derived from NCR, ED and ET: an edit of WT
    (Segment Editor overwrites other segments of its node by default) cannot reach a class, and
    the regions follow the classes' edits."""
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    t1ce = volumes["t1ce"]
    task = _run_node(logic, volumes, mixed_model, harness.new_segmentation("out"), waitForCompletion=True, addRegions=True)
    classes, regions = task.outputSegmentation, task.regionsSegmentation
    assert harness.segment_ids(classes) == ["NCR", "ED", "ET"] and harness.segment_ids(regions) == ["WT", "TC"]
    before = {k: harness.mask(classes, k, t1ce) for k in ("NCR", "ED", "ET")}
    assert before["ED"].any()
    harness.erase(regions, "WT")  # the user erases WT
    for segment_id, mask in before.items():
        np.testing.assert_array_equal(harness.mask(classes, segment_id, t1ce), mask)
    harness.erase(classes, "ED")  # the user erases the edema: WT follows on the next update
    nodes = harness.node_ids()
    assert logic.updateRegionSegments(classes, t1ce, regions) is regions
    np.testing.assert_array_equal(harness.mask(regions, "WT", t1ce), before["NCR"] | before["ET"])
    assert harness.node_ids() == nodes


def test_volumes_follow_edits_once_per_burst(logic_module):
    import slicer

    module, logic, harness, tmp = logic_module
    node = harness.new_segmentation("out")
    segmentation = node.GetSegmentation()
    updates = []
    logic.followEdits(node, lambda: updates.append(len(updates)))
    for _ in range(5):  # one paint stroke fires several events
        segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified)
    while Timers.pending:
        Timers.pending.pop(0)()
    assert updates == [0]
    segmentation.AddEmptySegment("mine", "Mine", (1, 0, 0))
    segmentation.RemoveSegment("mine")  # added and removed: two events, one update
    while Timers.pending:
        Timers.pending.pop(0)()
    assert updates == [0, 1]
    logic.stopFollowingEdits()
    segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified)
    assert Timers.pending == [] and updates == [0, 1]


# ----------------------------------------------------------------------------- issue 21: defects that the stand-in hid


def test_reading_and_writing_segments_adds_no_node_to_the_scene(logic_module, small_case, command_outputs, tmp_path):
    """slicer.util's array helpers go through a temporary labelmap volume whose display node
    stays in the scene (and would be saved with it): a run with regions, then two volume updates
    after edits, must add only the result's own nodes."""
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    before = harness.node_ids()
    task = _import(module, logic, volumes, _files(command_outputs, False, tmp_path), tmp,
                   addRegions=True)
    assert task.status == "completed", task.message
    for segment_id in ("ED", "ET"):
        harness.erase(task.outputSegmentation, segment_id)
        logic.updateRegionSegments(task.outputSegmentation, volumes["t1ce"], task.regionsSegmentation)
        logic.updateVolumeTable(task.outputSegmentation, volumes["t1ce"], task.volumeTable, task.notes)
    assert harness.node_ids() - before == _ids_of(task.outputSegmentation, task.regionsSegmentation, task.volumeTable)


def test_the_imported_segments_are_the_commands_labels_voxel_for_voxel(logic_module, small_case, command_outputs, tmp_path):
    """On Slicer's real segmentation (segments sharing one labelmap layer, int16 voxels), the
    classes read back on the T1ce's grid are the command's labelmap, and the volume table is
    the command's volumes file."""
    import SimpleITK as sitk

    from KANTumorSegLib.labels import SEGMENTS

    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    files = _files(command_outputs, False, tmp_path)
    task = _import(module, logic, volumes, files, tmp)
    assert task.status == "completed", task.message
    written = sitk.GetArrayFromImage(sitk.ReadImage(files["labelmap"]))
    masks = logic.classMasks(task.outputSegmentation, volumes["t1ce"])
    for segment in SEGMENTS:
        assert masks[segment.id].dtype == np.uint8
        np.testing.assert_array_equal(masks[segment.id], (written == segment.label).astype(np.uint8), err_msg=segment.id)
    expected = {r["name"]: r["volume_ml"] for r in json.loads(Path(files["volumes_json"]).read_text())["regions"]}
    assert _table(task) == pytest.approx(expected, abs=1e-9)


def test_exported_csv_keeps_the_volumes_precision_and_the_ranges(logic_module, small_case, command_outputs, tmp_path):
    """A real table node's cell text has 6 significant digits (141.7223 reads 141.722); the CSV
    has the command's numbers, and its range columns for the regions the edits left alone."""
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    files = _files(command_outputs, True, tmp_path)
    task = _import(module, logic, volumes, files, tmp)
    table = task.volumeTable
    column = table.GetTable().GetColumnByName("Volume")
    for row, value in enumerate((141.7223, 1234.5678)):
        column.SetValue(row, value)
    assert table.GetCellText(0, 2) == "141.722"  # what the previous export wrote
    path = tmp / "volumes.csv"
    logic.exportCsv(table, str(path), task.notes)
    lines = [line.split(",") for line in path.read_text().splitlines()]
    assert lines[0] == ["region", "description", "voxels", "volume_ml", "range_low_ml", "range_high_ml"]
    assert [line[3] for line in lines[1:3]] == ["141.7223", "1234.5678"]
    written = {r["name"]: r["range_ml"] for r in json.loads(Path(files["volumes_json"]).read_text())["regions"]}
    assert all([float(x) for x in line[4:]] == pytest.approx(written[line[0]]) for line in lines[1:])

    harness.erase(task.outputSegmentation, "ED")
    logic.updateVolumeTable(task.outputSegmentation, volumes["t1ce"], table, task.notes)
    logic.exportCsv(table, str(path), task.notes)
    ranges = {line[0]: line[4:] for line in (row.split(",") for row in path.read_text().splitlines()[1:])}
    assert ranges["ED"] == ranges["WT"] == ["", ""] and all(ranges["NCR"]) and all(ranges["TC"])


def test_a_t1ce_without_a_subject_hierarchy_item_is_no_error(logic_module, small_case, command_outputs, tmp_path):
    """Volumes not placed in the subject hierarchy (item ID 0, as slicer-core's volumes logic
    leaves them): the import must not ask the hierarchy about item 0."""
    import slicer

    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    files = _files(command_outputs, False, tmp_path)
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(harness.scene)
    assert shNode.GetItemByDataNode(volumes["t1ce"]) == slicer.vtkMRMLSubjectHierarchyNode.GetInvalidItemID()
    with vtk_messages() as messages:
        task = _import(module, logic, volumes, files, tmp)
    assert task.status == "completed", task.message
    assert not [m for m in messages if "SubjectHierarchy" in m], messages

# ----------------------------------------------------------------------------- issue 13: torch and the first run


class _PyTorchUtilsLogic:
    """Stands in for PyTorchUtils.PyTorchUtilsLogic: both calls import torch into Slicer's process."""

    calls: list = []

    def torchInstalled(self):
        raise AssertionError("torchInstalled() imports torch into Slicer's process")

    def installTorch(self, **kwargs):
        self.calls.append(kwargs)
        return object()


def test_requirements_are_read_from_metadata_and_an_older_copy_is_upgraded(logic_module, monkeypatch):
    """torch is installed here: its version is read from metadata, PyTorchUtils is not touched
    (nothing imports torch into Slicer), and nothing asks for a restart. An older slicerio
    (another extension's) is upgraded to the requirements list's minimum."""
    from KANTumorSegLib import slicer_requirements

    module, logic, harness, tmp = logic_module
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=_PyTorchUtilsLogic))
    real = slicer_requirements.installed_version
    monkeypatch.setattr(slicer_requirements, "installed_version", lambda name: "1.0.2" if name == "slicerio" else real(name))
    logic._requirementsChecked = False
    assert logic.setupPythonRequirements() is None
    assert harness.installed == ["slicerio>=1.1"] and _PyTorchUtilsLogic.calls == []
    assert "restart" not in _source_of(module.KANTumorSegWidget.onApplyButton)

    monkeypatch.setattr(slicer_requirements, "installed_version", lambda name: None if name == "torch" else real(name))
    logic._requirementsChecked = False
    logic.setupPythonRequirements()
    assert _PyTorchUtilsLogic.calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]


def test_the_requirements_list_matches_the_package_dependencies():
    import tomllib

    from KANTumorSegLib.slicer_requirements import read_requirements

    listed = {line for _, _, line in read_requirements(REPO / "KANTumorSeg" / "Resources" / "KANTumorSegRequirements.txt")}
    dependencies = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    # numpy and SimpleITK come with Slicer.
    assert listed == {d for d in dependencies if not d.startswith(("numpy", "SimpleITK"))}


@pytest.mark.skipif(os.name == "nt", reason="the stand-in launchers are shell scripts")
def test_a_slow_worker_start_keeps_the_main_thread_free_and_a_failed_start_is_retried(logic_module, small_case, mixed_model,
                                                                                      monkeypatch):
    """A PythonSlicer that takes 2 s to start (cold disk, antivirus): process() returns at once
    and the run goes to the worker when it answers. A start that fails (here the first one)
    sends that run to a process of its own, and the next run tries a worker again."""
    import time

    module, logic, harness, tmp = logic_module
    slow = tmp / "slow" / "PythonSlicer"
    slow.parent.mkdir()
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec "{sys.executable}" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(slow))
    started = time.monotonic()
    task = _run(logic, _volumes(harness, small_case), mixed_model)
    assert time.monotonic() - started < 1.5 and task.process is None
    _run_timers(task)
    assert task.status == "completed" and task.worker is logic._worker is not None

    logic.stopWorker()
    flaky = tmp / "flaky" / "PythonSlicer"
    flaky.parent.mkdir()
    marker = tmp / "flaky" / "failed-once"
    flaky.write_text(f'#!/bin/sh\nif [ "$3" = worker ] && [ ! -e "{marker}" ]; then touch "{marker}"; exit 1; fi\n'
                     f'exec "{sys.executable}" "$@"\n')
    flaky.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(flaky))
    logged = []
    first = _run(logic, _volumes(harness, small_case), mixed_model, waitForCompletion=True, logCallback=logged.append)
    assert first.status == "completed" and first.worker is None
    assert any("next run tries the worker again" in line for line in logged), logged
    second = _run(logic, _volumes(harness, small_case), mixed_model, waitForCompletion=True)
    assert second.status == "completed" and second.worker is logic._worker is not None


def test_the_warm_up_runs_a_phantom_and_the_first_run_uses_the_warmed_worker(logic_module, small_case, mixed_model):
    module, logic, harness, tmp = logic_module
    ready = []
    logic.warmUp("cpu", str(mixed_model), ready.append)
    start = logic._workerStart
    assert start is not None and not start.done()  # returned at once
    assert start.wait(300) and start.error is None and start.warmup_code == 0, start.error
    while Timers.pending:
        Timers.pending.pop(0)()
    assert ready == ["cpu"]
    pid = logic._worker.process.pid
    logic.warmUp("cpu", str(mixed_model))  # entering the module again: nothing new
    assert logic._worker.process.pid == pid
    task = _run(logic, _volumes(harness, small_case), mixed_model, waitForCompletion=True)
    assert task.status == "completed" and task.worker.process.pid == pid
    assert not any(tmp.glob("KANTumorSegWarmUp*/*")), "the warm-up's scratch files stay behind"


# ----------------------------------------------------------------------------- issue 14: the module side


def _completed_files(case: Path, model: Path, out: Path, confidence: bool) -> dict:
    """The files a run writes, from the real command; with ``confidence`` they are completed
    as issue 14's contract says the command writes them (its --confidence is another engineer's
    work): a confidence map, ranges in the regions and warnings."""

    import SimpleITK as sitk

    command = [sys.executable, "-m", "KANTumorSegLib", "segment", str(case), "-o", str(out), "--device", "cpu",
               "--model", str(model), "--progress", "jsonl"]
    done = processes.run(command, capture_output=True, text=True, cwd=REPO, check=True)
    files = json.loads(done.stdout.strip().splitlines()[-1])["files"]
    if confidence:
        volumes = json.loads(Path(files["volumes_json"]).read_text())
        for region in volumes["regions"]:
            region["range_ml"] = [region["volume_ml"] * 0.9, region["volume_ml"] * 1.1 + 0.1]
        volumes["warnings"] = [{"code": "not_skull_stripped", "message": "The T1 volume shows a skull: strip it first."}]
        Path(files["volumes_json"]).write_text(json.dumps(volumes))
        labels = sitk.ReadImage(files["labelmap"])
        confidence_map = sitk.Cast(labels * 0 + 95, sitk.sitkUInt8)
        sitk.WriteImage(confidence_map, files["volumes_json"].replace("_volumes.json", "_confidence.nii.gz"))
    return files


@pytest.fixture(scope="module")
def command_outputs(small_case, mixed_model, tmp_path_factory) -> dict[bool, dict]:
    """The files of the real command on the 8-slice case, without and with (completed)
    --confidence: one run each for all the tests that import them (``_files`` copies them)."""
    out = tmp_path_factory.mktemp("command_outputs")
    return {confidence: _completed_files(small_case, mixed_model, out / str(confidence), confidence) for confidence in (False, True)}


def _files(command_outputs: dict, confidence: bool, tmp: Path) -> dict:
    """A copy of the command's files in ``tmp`` (a test may change or break them)."""
    files = command_outputs[confidence]
    folder = tmp / f"outputs-{confidence}"
    shutil.copytree(Path(files["volumes_json"]).parent, folder)
    return {key: str(folder / Path(path).name) for key, path in files.items()}


def _import(module, logic, volumes, files, tmp, output=None, **options) -> object:
    """A task whose process wrote ``files`` (exit 0), finished as the Logic finishes a run."""
    scratch = tmp / "task"
    scratch.mkdir(exist_ok=True)
    settings = {"addRegions": False, "regionsSegmentation": None, "tableNode": None, **options}
    task = module.SegmentationTask(volumes, output, str(scratch), settings, None, None, None)
    task.files = files
    task.process = types.SimpleNamespace(returncode=0)
    logic._finish(task)
    return task


def test_a_result_that_does_not_read_leaves_the_users_segments(logic_module, small_case, command_outputs, tmp_path):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    output = harness.new_segmentation("out")
    output.GetSegmentation().AddEmptySegment("mine", "My edit", (1, 0, 0))
    before = harness.node_ids()
    files = _files(command_outputs, False, tmp_path)
    segmentation = Path(files["segmentation"])
    # Not a NRRD file: Slicer's storage node reports a failure (a NRRD file cut short would make
    # ITK abort the process, in Slicer as here).
    segmentation.write_text("not a segmentation")
    task = _import(module, logic, volumes, files, tmp, output)
    assert task.status == "failed" and "could not be read" in task.message
    assert harness.segment_ids(output) == ["mine"]
    assert harness.node_ids() == before


def test_confidence_map_ranges_and_warnings_are_shown(logic_module, small_case, command_outputs, tmp_path):
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    files = _files(command_outputs, True, tmp_path)
    task = _import(module, logic, volumes, files, tmp)
    assert task.status == "completed", task.message
    assert task.notes.warnings == ["The T1 volume shows a skull: strip it first."]
    table = task.volumeTable
    assert _columns(table) == ["Region", "Description", "Volume", "Voxels", "Range"]
    written = {r["name"]: r for r in json.loads(Path(files["volumes_json"]).read_text())["regions"]}
    for row in range(table.GetNumberOfRows()):
        low, high = written[table.GetCellText(row, 0)]["range_ml"]
        assert table.GetCellText(row, 4) == f"{low:.1f}-{high:.1f}"
    confidence = task.confidenceVolume
    assert confidence is not None and confidence.GetName() == "BraTS20_Training_001_t1ce confidence"
    # Its file goes with the run's temporary folder: no storage node points there.
    assert confidence.GetStorageNode() is None
    display = confidence.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileHotToColdRainbow.txt"
    assert (display.GetLowerThreshold(), display.GetUpperThreshold()) == (0, logic.LOW_CONFIDENCE_PERCENT - 1)
    assert display.GetApplyThreshold() == 1 and display.GetAutoWindowLevel() == 0
    logic.showConfidence(confidence, False)
    assert harness.layers[-1]["foreground"] is None
    # An edit of the edema: its row (and WT's) lose the model's range, the others keep theirs.
    harness.erase(task.outputSegmentation, "ED")
    logic.updateVolumeTable(task.outputSegmentation, volumes["t1ce"], table, task.notes)
    ranges = {table.GetCellText(row, 0): table.GetCellText(row, 4) for row in range(table.GetNumberOfRows())}
    assert ranges["ED"] == ranges["WT"] == "" and ranges["NCR"] and ranges["TC"]


def test_outputs_without_the_new_fields_import_as_before(logic_module, small_case, command_outputs, tmp_path):
    module, logic, harness, tmp = logic_module
    files = _files(command_outputs, False, tmp_path)
    volumes_json = json.loads(Path(files["volumes_json"]).read_text())
    volumes_json.pop("warnings", None)
    Path(files["volumes_json"]).write_text(json.dumps(volumes_json))
    task = _import(module, logic, _volumes(harness, small_case), files, tmp)
    assert task.status == "completed", task.message
    assert task.notes.warnings == [] and task.confidenceVolume is None
    assert _columns(task.volumeTable) == ["Region", "Description", "Volume", "Voxels"]


# ----------------------------------------------------------------------------- issue 13: what users expect


def test_the_sample_case_is_registered_with_checksums_and_names_the_module_recognises(logic_module, brats_case_001):
    """Through the stand-in's SampleData (Slicer's registerCustomSampleDataSource keywords): the
    module registers at startup; the checksums are those of the real case's files, and the node
    names are assigned to the four inputs by the module's automatic assignment."""
    import hashlib

    from KANTumorSegLib.slicer_inputs import match_volume_names

    module, logic, harness, tmp = logic_module
    module.KANTumorSeg(types.SimpleNamespace())
    assert ("startupCompleted()", module.registerSampleData) in harness.connections
    module.registerSampleData()
    (source,) = harness.sample_sources
    assert source["category"] == "KANTumorSeg" and Path(source["thumbnailFileName"]).is_file()
    assert len(source["uris"]) == len(source["fileNames"]) == len(source["nodeNames"]) == len(source["checksums"]) == 4
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        assert uri.startswith("https://") and uri.endswith("/" + name)
        algorithm, digest = checksum.split(":")
        assert algorithm == "SHA256" and digest == hashlib.sha256((brats_case_001 / name).read_bytes()).hexdigest()
    assert sorted(match_volume_names(source["nodeNames"]).assigned) == ["flair", "t1", "t1ce", "t2"]


def test_the_self_test_runs_end_to_end_on_slicers_own_scene(logic_module):
    """KANTumorSegTest, as Slicer runs it (Reload and Test), with no environment variable: the
    phantom through the worker, the import, the region segments, the table against the command's
    volumes and against Segment Statistics (the harness's, see slicer_harness), then an edit
    that the volumes follow."""
    module, logic, harness, tmp = logic_module
    test = module.KANTumorSegTest()
    test.runTest()
    assert test.displayed[-1] == "KANTumorSegTest passed"


def test_a_run_with_confidence_loads_the_map_and_the_ranges(logic_module, small_case, mixed_model):
    """End to end with the real command's --confidence (issue 14's command side), when it has it."""
    from KANTumorSegLib.cli import build_parser

    try:
        build_parser().parse_args(["segment", "case", "-o", "out", "--confidence"])
    except SystemExit:
        pytest.skip("the command has no --confidence yet")
    module, logic, harness, tmp = logic_module
    volumes = _volumes(harness, small_case)
    task = _run(logic, volumes, mixed_model, waitForCompletion=True, confidence=True)
    assert task.status == "completed", task.message
    assert task.confidenceVolume is not None
    assert task.confidenceVolume.GetImageData().GetDimensions() == volumes["t1ce"].GetImageData().GetDimensions()
    table = task.volumeTable
    assert _columns(table)[-1] == "Range"
    assert all(table.GetCellText(row, 4) for row in range(table.GetNumberOfRows()))
    assert isinstance(task.notes.warnings, list)


# ----------------------------------------------------------------------------- the panel


def _run_events(until, limit_s: float = 300.0) -> None:
    """Run the pending single-shot timers, as Qt's event loop would, until ``until()``."""
    import time

    deadline = time.monotonic() + limit_s
    while not until() and time.monotonic() < deadline:
        if Timers.pending:
            Timers.pending.pop(0)()
        time.sleep(0.02)
    assert until(), "timed out"


def test_the_panel_warms_up_segments_follows_edits_and_lets_the_scene_close(logic_module, small_case, mixed_model):
    """KANTumorSegWidget on the stand-in's panel (widgets made from the .ui file, a parameter node
    wrapper and settings standing in for Slicer's Qt ones) over Slicer's real scene: entering warms
    the worker up and sets the Confidence default from its device; Apply makes the output only on
    success and shows the table, the warnings banner (when the run warns) and the regions; an edit
    updates the volumes; closing the scene drops the parameter node and cleanup ends the worker."""
    module, logic, harness, tmp = logic_module
    for modality in ("t1", "t1ce", "t2", "flair"):
        harness.load_volume(small_case / f"crop_{modality}.nii.gz")
    widget = module.KANTumorSegWidget(types.SimpleNamespace(isEntered=True))
    widget.setup()
    widget.logic._requirementsChecked = True
    p = widget._parameterNode
    assert [p.t1Volume.GetName(), p.t1ceVolume.GetName(), p.t2Volume.GetName(), p.flairVolume.GetName()] == \
        ["crop_t1", "crop_t1ce", "crop_t2", "crop_flair"]
    ui = widget.ui
    assert ui.applyButton.enabled and not ui.warningsLabel.visible and not ui.progressBar.visible
    assert [title for title, _ in ui.labelConventionComboBox.items] == ["BraTS 2017-2021: NCR 1, ED 2, ET 4",
                                                                        "BraTS 2023: NCR 1, ED 2, ET 3"]

    widget.enter()
    _run_events(lambda: "Background worker ready" in ui.logTextEdit.plainText)
    assert "(cpu)" in ui.logTextEdit.plainText and p.confidence is False
    warmed = widget.logic._worker.process.pid

    p.device, p.modelPath, p.addRegions = "cpu", str(mixed_model), True
    ui.deviceComboBox.currentIndex = 3
    widget.onApplyButton()
    assert ui.applyButton.text == "Cancel" and p.outputSegmentation is None and harness.errors == []
    _run_events(lambda: widget._task is None)
    assert harness.errors == [], harness.errors
    assert p.outputSegmentation is not None and p.outputSegmentation.GetName() == "crop_t1ce tumour"
    assert p.regionsSegmentation is not None and ui.volumeTableView.tableNode is p.volumeTable
    assert ui.progressBar.format.startswith("Done in") and ui.applyButton.text == "Apply"
    # The banner shows the run's input warnings (this 8-slice crop may draw some), and only then.
    assert ui.warningsLabel.visible == bool(widget._notes.warnings)
    assert all(message in ui.warningsLabel.text for message in widget._notes.warnings)
    assert widget.logic._worker.process.pid == warmed

    harness.erase(p.outputSegmentation, "ED")  # fires the segmentation's real events
    _run_events(lambda: ui.volumesStatusLabel.text.startswith("Volumes updated at"), limit_s=30)
    table = {p.volumeTable.GetCellText(r, 0): p.volumeTable.GetTable().GetColumnByName("Volume").GetValue(r)
             for r in range(p.volumeTable.GetNumberOfRows())}
    assert table["ED"] == 0.0 and table["WT"] == pytest.approx(table["NCR"] + table["ET"], abs=1e-3)
    t1ce = p.t1ceVolume
    np.testing.assert_array_equal(harness.mask(p.regionsSegmentation, "WT", t1ce),
                                  harness.mask(p.outputSegmentation, "NCR", t1ce) | harness.mask(p.outputSegmentation, "ET", t1ce))

    widget.onSceneStartClose(None, None)
    assert widget._parameterNode is None and widget.logic._followed is None
    widget.cleanup()
    assert widget.logic._worker is None
