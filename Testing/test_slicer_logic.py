"""KANTumorSegLogic run outside Slicer, with a stand-in for the few Slicer calls it makes.

Slicer cannot be installed here. ``SlicerStandIn`` below replaces the modules ``slicer``,
``qt``, ``vtk`` and ``ctk`` by the handful of functions and node methods the Logic calls
(exporting a volume, a temporary folder, reading a .seg.nrrd into a segmentation node,
segment masks as arrays, a table node, a single-shot timer), each doing the same job on
plain Python objects: volumes are SimpleITK images, segments are numpy masks read with
slicerio. Everything else is real: the Logic's own code, the command it launches (this
machine's Python standing in for PythonSlicer), the real BraTS case and a real weights file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


class _Node:
    """Stands in for a vtkMRMLNode: an id, a name and node references."""

    _count = 0

    def __init__(self, name: str = "") -> None:
        _Node._count += 1
        self._id = f"vtkMRMLNode{_Node._count}"
        self._name = name
        self.references: dict[str, str] = {}

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id


class _Volume(_Node):
    """Stands in for vtkMRMLScalarVolumeNode: holds the SimpleITK image it shows."""

    def __init__(self, name: str, image) -> None:
        super().__init__(name)
        self.image = image

    def GetSpacing(self):
        return self.image.GetSpacing()

    def IsA(self, class_name):
        return class_name == "vtkMRMLScalarVolumeNode"


class _Segment:
    def __init__(self, name, color):
        self.name, self.color, self.tags = name, tuple(color), {}

    def GetName(self):
        return self.name

    def SetTag(self, key, value):
        self.tags[key] = value

    @staticmethod
    def GetTerminologyEntryTagName():
        return "TerminologyEntry"


class _Segmentation:
    """Stands in for vtkSegmentation: ordered segments with a mask (k, j, i) each."""

    def __init__(self) -> None:
        self.segments: dict[str, _Segment] = {}
        self.masks: dict[str, np.ndarray] = {}

    def RemoveAllSegments(self):
        self.segments.clear()
        self.masks.clear()

    def RemoveSegment(self, segment_id):
        self.segments.pop(segment_id)
        self.masks.pop(segment_id, None)

    def AddEmptySegment(self, segment_id, name, color):
        self.segments[segment_id] = _Segment(name, color)

    def GetSegment(self, segment_id):
        return self.segments.get(segment_id)

    def GetSegmentIdBySegmentName(self, name):
        return next((i for i, s in self.segments.items() if s.name == name), "")

    def GetNumberOfSegments(self):
        return len(self.segments)


class _SegmentationNode(_Node):
    """Stands in for vtkMRMLSegmentationNode."""

    def __init__(self, name=""):
        super().__init__(name)
        self.segmentation = _Segmentation()
        self.reference_geometry_from = None
        self.surfaces = False

    def GetSegmentation(self):
        return self.segmentation

    def CreateDefaultDisplayNodes(self):
        pass

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference_geometry_from = volume

    def CreateClosedSurfaceRepresentation(self):
        self.surfaces = True


class _SegmentationStorageNode(_Node):
    """Stands in for vtkMRMLSegmentationStorageNode: ReadData fills a node from a .seg.nrrd."""

    def SetFileName(self, path):
        self.path = path

    def ReadData(self, node):
        import slicerio

        data = slicerio.read_segmentation(self.path)
        for segment in data["segments"]:
            node.segmentation.AddEmptySegment(segment["id"], segment["name"], segment["color"])
            node.segmentation.segments[segment["id"]].SetTag("TerminologyEntry", json.dumps(segment.get("terminology")))
            # slicerio voxels are (i, j, k); Slicer's arrays are (k, j, i).
            node.segmentation.masks[segment["id"]] = (data["voxels"] == segment["labelValue"]).transpose(2, 1, 0).astype(np.uint8)
        return 1


class _Array:
    """Stands in for vtkStringArray / vtkDoubleArray / vtkIntArray."""

    def __init__(self):
        self.name, self.values = "", []

    def SetName(self, name):
        self.name = name

    def InsertNextValue(self, value):
        self.values.append(value)


class _Table(_Node):
    """Stands in for vtkMRMLTableNode."""

    def __init__(self, name=""):
        super().__init__(name)
        self.columns: list[_Array] = []
        self.units: dict[str, str] = {}

    def StartModify(self):
        return 0

    def EndModify(self, was):
        pass

    def RemoveAllColumns(self):
        self.columns = []

    def AddColumn(self, array):
        self.columns.append(array)

    def SetColumnUnitLabel(self, column, unit):
        self.units[column] = unit

    def GetNumberOfRows(self):
        return len(self.columns[0].values)

    def GetCellText(self, row, column):
        return str(self.columns[column].values[row])


class _Scene:
    def __init__(self):
        self.nodes = []

    def AddNewNodeByClass(self, class_name, name=""):
        node = {"vtkMRMLSegmentationStorageNode": _SegmentationStorageNode, "vtkMRMLTableNode": _Table,
                "vtkMRMLSegmentationNode": _SegmentationNode}[class_name](name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node):
        self.nodes.remove(node)


class _SubjectHierarchy:
    """Stands in for vtkMRMLSubjectHierarchyNode: items are nodes, parents a dict."""

    parents: dict = {}

    @classmethod
    def GetSubjectHierarchyNode(cls, scene):
        return cls

    @staticmethod
    def GetItemByDataNode(node):
        return node

    @classmethod
    def GetItemParent(cls, item):
        return cls.parents.get(item, "study")

    @classmethod
    def SetItemParent(cls, item, parent):
        cls.parents[item] = parent


class _Timer:
    """Stands in for qt.QTimer.singleShot: callbacks wait in a list that the test runs."""

    pending: list = []

    @classmethod
    def singleShot(cls, msec, callback):
        cls.pending.append(callback)


class SlicerStandIn:
    """Builds stand-ins of the modules ``slicer``, ``qt``, ``vtk`` and ``ctk`` with the calls
    KANTumorSeg.py makes at import and in its Logic; the widget is not exercised."""

    def __init__(self, temp_root: Path):
        self.temp_root = temp_root
        self.scene = _Scene()

    def modules(self) -> dict[str, types.ModuleType]:
        slicer = types.ModuleType("slicer")
        for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
            setattr(slicer, name, type(name, (), {}))
        slicer.mrmlScene = self.scene
        slicer.vtkMRMLSubjectHierarchyNode = _SubjectHierarchy
        slicer.app = types.SimpleNamespace(processEvents=lambda: None, testingEnabled=lambda: True, layoutManager=lambda: None)

        util = types.ModuleType("slicer.util")
        util.VTKObservationMixin = type("VTKObservationMixin", (), {})
        util.exportNode = self.export_node
        util.tempDirectory = lambda key="__SlicerTemp__": tempfile.mkdtemp(prefix=key, dir=self.temp_root)
        util.startupEnvironment = lambda: dict(os.environ)
        util.arrayFromSegmentBinaryLabelmap = lambda node, segment_id, reference: node.segmentation.masks[segment_id].copy()
        util.updateSegmentBinaryLabelmapFromArray = self.update_segment
        util.setSliceViewerLayers = lambda **kwargs: None
        slicer.util = util

        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = lambda cls: cls
        wrapper.Choice = lambda choices: tuple(choices)
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
            setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
        scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {"__init__": lambda self: None})

        qt = types.ModuleType("qt")
        qt.QTimer = _Timer
        vtk = types.ModuleType("vtk")
        vtk.calldata_type = lambda kind: (lambda function: function)
        vtk.VTK_OBJECT = "vtkObject"
        vtk.vtkStringArray = vtk.vtkDoubleArray = vtk.vtkIntArray = _Array
        return {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                "slicer.ScriptedLoadableModule": scripted, "qt": qt, "vtk": vtk, "ctk": types.ModuleType("ctk")}

    @staticmethod
    def export_node(node, path, properties, world=False):
        import SimpleITK as sitk

        assert world, "the Logic must export in world coordinates"
        sitk.WriteImage(node.image, path, useCompression=bool(properties.get("useCompression", 1)))
        return True

    @staticmethod
    def update_segment(array, node, segment_id, reference):
        node.segmentation.masks[segment_id] = np.asarray(array, dtype=np.uint8)


@pytest.fixture
def logic_module(tmp_path, monkeypatch):
    """KANTumorSeg.py imported against the stand-in, with PythonSlicer = this Python."""
    standin = SlicerStandIn(tmp_path)
    for name, module in standin.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "PythonSlicer" else real_which(name))
    _Timer.pending = []
    spec = importlib.util.spec_from_file_location("KANTumorSeg", REPO / "KANTumorSeg" / "KANTumorSeg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logic = module.KANTumorSegLogic()
    # Installing torch and packages happens through Slicer's extension manager and pip: not here.
    logic._requirementsChecked = True
    yield module, logic, standin, tmp_path
    # As the module's cleanup does when Slicer unloads it: no worker outlives the test.
    logic.stopWorker()


def _volumes(cropped_case: Path) -> dict[str, _Volume]:
    import SimpleITK as sitk

    return {m: _Volume(f"BraTS20_Training_001_{m}", sitk.ReadImage(str(cropped_case / f"crop_{m}.nii.gz")))
            for m in ("t1", "t1ce", "t2", "flair")}


def _table(task) -> dict[str, float]:
    table = task.volumeTable
    return {table.GetCellText(row, 0): float(table.GetCellText(row, 2)) for row in range(table.GetNumberOfRows())}


def test_process_waiting_imports_segments_table_and_removes_temporary_files(logic_module, cropped_case):
    # The shipped model: on this crop it leaves the whole tumour in several parts (5), so the
    # run's note on separate parts must be there.
    from KANTumorSegLib.labels import SEGMENTS
    from KANTumorSegLib.weights import default_model_path

    module, logic, standin, tmp = logic_module
    volumes = _volumes(cropped_case)
    output = _SegmentationNode("out")
    progress = []
    task = logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output, device="cpu",
                         waitForCompletion=True, progressCallback=lambda *step: progress.append(step),
                         model=str(default_model_path()), addRegions=True)
    assert task.status == "completed", task.message
    assert [s.name for s in output.segmentation.segments.values()] == [s.name for s in SEGMENTS] + ["Whole tumour", "Tumour core"]
    assert output.reference_geometry_from is volumes["t1ce"] and output.surfaces
    assert output.references["referenceImageGeometryRef"] == volumes["t1ce"].GetID()
    assert _SubjectHierarchy.parents[output] == "study"
    masks = output.segmentation.masks
    assert masks["NCR"].shape == volumes["t1ce"].image.GetSize()[::-1]
    np.testing.assert_array_equal(masks["WT"], (masks["NCR"] | masks["ED"] | masks["ET"]).astype(np.uint8))
    np.testing.assert_array_equal(masks["TC"], (masks["NCR"] | masks["ET"]).astype(np.uint8))
    assert output.segmentation.segments["WT"].tags["TerminologyEntry"].count("~") == 6

    assert progress and all(0.0 <= step[3] <= 1.0 for step in progress)
    volumes_ml = _table(task)
    assert list(volumes_ml) == ["NCR", "ED", "ET", "WT", "TC"]
    assert task.volumeTable.units == {"Volume": "mL"}
    assert volumes_ml["WT"] == pytest.approx(volumes_ml["NCR"] + volumes_ml["ED"] + volumes_ml["ET"], abs=1e-3)
    assert volumes_ml["WT"] > 0
    assert not os.path.exists(task.tempDir)
    # The log's pointer to separate tumour parts: the command's sentence for the imported segments.
    from KANTumorSegLib.measurements import parts_sentence, whole_tumour_parts
    from KANTumorSegLib.slicer_support import compose_labels

    voxel_ml = float(np.prod(volumes["t1ce"].image.GetSpacing())) / 1000
    imported = compose_labels({k: masks[k] for k in ("NCR", "ED", "ET")})
    assert task.partsNote is not None and task.partsNote == parts_sentence(whole_tumour_parts(imported, voxel_ml))

    # "Update volumes" after an edit: erase the edema, as in Segment Editor.
    masks["ED"][:] = 0
    logic.updateVolumeTable(output, volumes["t1ce"], task.volumeTable)
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
        if _Timer.pending:
            _Timer.pending.pop(0)()
            if on_line:
                on_line()
        time.sleep(0.02)


def test_process_in_background_reports_then_completes(logic_module, cropped_case, mixed_model):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(cropped_case)
    output = _SegmentationNode("out")
    finished, logged = [], []
    task = logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output, device="cpu",
                         model=str(mixed_model), logCallback=logged.append, completedCallback=finished.append)
    assert task.status == "running" and task.reader.is_alive() or task.lines.qsize() > 0
    _run_timers(task)
    assert finished == [task] and task.status == "completed", task.message
    assert output.segmentation.GetNumberOfSegments() == 3
    assert not os.path.exists(task.tempDir)


def test_cancel_leaves_the_segmentation_untouched(logic_module, cropped_case, mixed_model):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(cropped_case)
    output = _SegmentationNode("out")
    finished = []
    progress = []
    task = logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output, device="cpu",
                         model=str(mixed_model), progressCallback=lambda *step: progress.append(step),
                         completedCallback=finished.append)
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    assert finished == [task] and task.status == "cancelled"
    # The status alone would read "cancelled" even if the command ran to its end.
    assert task.process.returncode != 0, "cancel did not stop the command"
    assert output.segmentation.GetNumberOfSegments() == 0
    assert not os.path.exists(task.tempDir)


def test_a_failure_shows_the_commands_sentence(logic_module, cropped_case, tmp_path):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(cropped_case)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError) as raised:
        logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], _SegmentationNode("out"), device="cpu",
                      waitForCompletion=True, model=str(broken))
    assert str(broken.with_suffix(".json")) in str(raised.value)
    assert not any(tmp.glob("KANTumorSeg*/*"))


def test_process_refuses_the_same_volume_twice(logic_module, cropped_case):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(cropped_case)
    with pytest.raises(ValueError, match="four different volumes"):
        logic.process(volumes["t1"], volumes["t1"], volumes["t2"], volumes["flair"], _SegmentationNode("out"))
    with pytest.raises(ValueError, match="The T2 volume is not set"):
        logic.process(volumes["t1"], volumes["t1ce"], None, volumes["flair"], _SegmentationNode("out"))


def test_load_case_and_model_card_use_the_library(logic_module, brats_case_001, mixed_model, monkeypatch):
    module, logic, standin, tmp = logic_module
    loaded = []
    monkeypatch.setattr(sys.modules["slicer"].util, "loadVolume", lambda path: loaded.append(Path(path).name) or path, raising=False)
    nodes = logic.loadCase(str(brats_case_001))
    assert sorted(nodes) == ["flair", "t1", "t1ce", "t2"]
    assert sorted(loaded) == sorted(f"BraTS20_Training_001_{m}.nii.gz" for m in nodes)
    with pytest.raises(ValueError, match="No T1"):
        logic.loadCase(str(tmp))
    card = logic.modelCardText(str(mixed_model))
    assert "mixed-random" in card and "sha256" not in card
    assert "not found" in logic.modelCardText(str(tmp / "none.safetensors"))


# ----------------------------------------------------------------------------- the worker


def _run(logic, volumes, model, **kwargs):
    return logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], _SegmentationNode("out"),
                         device="cpu", model=str(model), **kwargs)


def test_consecutive_runs_reuse_one_worker(logic_module, small_case, mixed_model):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
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
    module, logic, standin, tmp = logic_module
    progress = []
    task = _run(logic, _volumes(cropped_case), mixed_model, progressCallback=lambda *step: progress.append(step))
    cancelled_pid = task.worker.process.pid
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    assert task.status == "cancelled" and task.process.returncode == 143
    assert task.worker.process.poll() == 143 and not task.worker.alive()
    assert not os.path.exists(task.tempDir)

    after = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True)
    assert after.status == "completed", after.message
    assert after.worker.process.pid != cancelled_pid and after.worker.alive()


def test_an_input_error_is_reported_as_before_and_the_worker_stays(logic_module, small_case, mixed_model, tmp_path):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
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
    module, logic, standin, tmp = logic_module
    launcher = tmp / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@" < /dev/null\n')
    launcher.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(launcher))
    logged = []
    task = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True, logCallback=logged.append)
    assert task.status == "completed", task.message
    assert task.worker is None and logic._worker is None
    assert any("could not start" in line and "process of its own" in line for line in logged), logged
