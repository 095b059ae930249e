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

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types
import unittest
from pathlib import Path

import numpy as np
import processes
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
        self.removed = False

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id

    def IsA(self, class_name):
        return False


class _Volume(_Node):
    """Stands in for vtkMRMLScalarVolumeNode: holds the SimpleITK image it shows."""

    def __init__(self, name: str, image) -> None:
        super().__init__(name)
        self.image = image

    def GetSpacing(self):
        return self.image.GetSpacing()

    def GetImageData(self):
        return types.SimpleNamespace(GetDimensions=lambda: self.image.GetSize())

    def IsA(self, class_name):
        return class_name == "vtkMRMLScalarVolumeNode"

    def GetStorageNode(self):
        return None

    def GetDisplayNode(self):
        if not hasattr(self, "display"):
            self.display = _VolumeDisplay()
        return self.display


class _VolumeDisplay:
    """Stands in for vtkMRMLScalarVolumeDisplayNode: records the display settings."""

    def __init__(self):
        self.settings = {}

    def __getattr__(self, method):
        return lambda *args: self.settings.__setitem__(method, args)


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
    """Stands in for vtkSegmentation: ordered segments with a mask (k, j, i) each, and observers."""

    def __init__(self) -> None:
        self.segments: dict[str, _Segment] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.observers: dict[int, tuple[str, object]] = {}

    def DeepCopy(self, other):
        self.segments = dict(other.segments)
        self.masks = {k: v.copy() for k, v in other.masks.items()}

    def AddObserver(self, event, callback):
        tag = len(self.observers) + 1
        self.observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag):
        self.observers.pop(tag)

    def InvokeEvent(self, event):
        for observed, callback in list(self.observers.values()):
            if observed == event:
                callback(self, event)

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

    def GetNthSegment(self, index):
        return list(self.segments.values())[index]


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
    """Stands in for vtkMRMLScene: the nodes the Logic adds; test volumes count as present until removed."""

    StartCloseEvent, EndCloseEvent, NodeAddedEvent = "StartCloseEvent", "EndCloseEvent", "NodeAddedEvent"

    def __init__(self):
        self.nodes = []

    def AddNewNodeByClass(self, class_name, name=""):
        node = {"vtkMRMLSegmentationStorageNode": _SegmentationStorageNode, "vtkMRMLTableNode": _Table,
                "vtkMRMLSegmentationNode": _SegmentationNode}[class_name](name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node):
        node.removed = True
        if node in self.nodes:
            self.nodes.remove(node)

    def IsNodePresent(self, node):
        return not node.removed

    def GetNodeByID(self, node_id):
        return next(n for n in self.nodes if n.GetID() == node_id)

    def Clear(self, *external):
        """As closing the scene: every node goes, the test's volumes (``external``) too."""
        for node in [*self.nodes, *external]:
            self.RemoveNode(node)

    def of_class(self, node_class):
        return [n for n in self.nodes if isinstance(n, node_class)]


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


class _ScriptedLoadableModuleTest(unittest.TestCase):
    """Stands in for ScriptedLoadableModuleTest (a unittest.TestCase in Slicer too): delayDisplay logs."""

    def __init__(self, *args):
        super().__init__("runTest")

    def delayDisplay(self, message, msec=None):
        self.displayed = [*getattr(self, "displayed", []), message]


class _SampleData(types.ModuleType):
    """Stands in for Slicer's SampleData module: records the registered sources."""

    def __init__(self):
        super().__init__("SampleData")
        self.sources = []
        self.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: self.sources.append(kwargs))


class _SegmentStatistics(types.ModuleType):
    """Stands in for Slicer's SegmentStatistics module: volume_cm3 of each segment as its
    LabelmapSegmentStatisticsPlugin computes it, voxel count times voxel volume (mm3) / 1000."""

    def __init__(self, scene):
        super().__init__("SegmentStatistics")
        standin = self

        class SegmentStatisticsLogic:
            def __init__(self):
                self.parameters = {}
                self.statistics = {}

            def getParameterNode(self):
                return types.SimpleNamespace(SetParameter=self.parameters.__setitem__)

            def computeStatistics(self):
                node = scene.GetNodeByID(self.parameters["Segmentation"])
                spacing = scene.GetNodeByID(self.parameters["ScalarVolume"]).GetSpacing()
                self.statistics = {"SegmentIDs": list(node.segmentation.segments)}
                for segment_id, mask in node.segmentation.masks.items():
                    self.statistics[segment_id, "LabelmapSegmentStatisticsPlugin.volume_cm3"] = \
                        int(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000

            def getStatistics(self):
                return self.statistics

        standin.SegmentStatisticsLogic = SegmentStatisticsLogic


class _Widget:
    """Stands in for a Qt widget of the module's .ui: the properties the module sets, a combo
    box's items, and its signal connections (``emit`` calls them as Qt would)."""

    def __init__(self, name: str, class_name: str) -> None:
        self.name, self.className = name, class_name
        self.text = self.toolTip = self.plainText = self.currentPath = self.format = ""
        self.enabled = self.visible = True
        self.checked = False
        self.currentIndex = -1
        self.value = 0
        self.items: list[tuple[str, object]] = []
        self.connections: dict[str, list] = {}
        self.tableNode = self.segmentationNode = None

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self.connections.get(signal, []):
            slot(*args)

    def hide(self):
        self.visible = False

    def show(self):
        self.visible = True

    def addItem(self, title, data=None):
        self.items.append((title, data))

    def findData(self, data):
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def itemData(self, index):
        return self.items[index][1]

    def setRange(self, low, high):
        pass

    def setFormat(self, text):
        self.format = text

    def appendPlainText(self, text):
        self.plainText += ("\n" if self.plainText else "") + text

    def setMRMLTableNode(self, node):
        self.tableNode = node

    def setSegmentationNode(self, node):
        self.segmentationNode = node

    def setMRMLScene(self, scene):
        pass


def _load_ui(path):
    """Stands in for slicer.util.loadUI: a root whose ``children`` are the .ui file's widgets."""
    import xml.etree.ElementTree as ElementTree

    root = _Widget("KANTumorSeg", "qMRMLWidget")
    root.children = {w.get("name"): _Widget(w.get("name"), w.get("class"))
                     for w in ElementTree.parse(path).getroot().iter("widget")}
    return root


class _ParameterNodeObservers:
    """Stands in for VTKObservationMixin: ModifiedEvent observers of a parameter node are called
    when one of its parameters is set, as the parameter node wrapper's Modified events do."""

    def __init__(self):
        self.observations = []

    def addObserver(self, subject, event, method):
        self.observations.append((subject, event, method))
        if event == "ModifiedEvent":
            subject._raw.observers.append(method)

    def removeObserver(self, subject, event, method):
        self.observations.remove((subject, event, method))
        if event == "ModifiedEvent":
            subject._raw.observers.remove(method)

    def removeObservers(self):
        self.observations = []


def _parameter_node_wrapper(cls):
    """Stands in for slicer.parameterNodeWrapper: the class's annotated parameters (defaults from
    the class, None for nodes) kept in the raw parameter node, so that every wrapper of one node
    shares them; setting one calls the node's ModifiedEvent observers."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, raw):
            object.__setattr__(self, "_raw", raw)
            if not hasattr(raw, "values"):
                raw.values, raw.observers = dict(defaults), []

        def __getattr__(self, name):
            if name not in defaults:
                raise AttributeError(name)
            return self._raw.values[name]

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{name} is not a parameter")
            self._raw.values[name] = value
            for observer in list(self._raw.observers):
                observer()

        def connectGui(self, ui):
            return object()

        def disconnectGui(self, tag):
            pass

    Wrapped.__name__ = cls.__name__
    return Wrapped


class _QSettings:
    """Stands in for qt.QSettings: one store for the test (as the user's settings file)."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


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
        slicer.vtkSegmentation = types.SimpleNamespace(SourceRepresentationModified="SourceRepresentationModified",
                                                       SegmentAdded="SegmentAdded", SegmentRemoved="SegmentRemoved")
        slicer.app = types.SimpleNamespace(processEvents=self.process_events, testingEnabled=lambda: True, layoutManager=lambda: None,
                                           connect=lambda signal, slot: self.connections.append((signal, slot)))
        self.connections = []
        self.layers = []
        self.installed = []

        util = types.ModuleType("slicer.util")
        util.exportNode = self.export_node
        util.tempDirectory = lambda key="__SlicerTemp__": tempfile.mkdtemp(prefix=key, dir=self.temp_root)
        util.startupEnvironment = lambda: dict(os.environ)
        util.arrayFromSegmentBinaryLabelmap = lambda node, segment_id, reference: node.segmentation.masks[segment_id].copy()
        util.updateSegmentBinaryLabelmapFromArray = self.update_segment
        util.setSliceViewerLayers = lambda **kwargs: self.layers.append(kwargs)
        util.loadVolume = self.load_volume
        util.pip_install = self.installed.append
        util.confirmOkCancelDisplay = lambda *args, **kwargs: True
        util.loadUI = _load_ui
        util.childWidgetVariables = lambda root: types.SimpleNamespace(**root.children)
        util.getNodesByClass = lambda class_name: [n for n in self.scene.nodes if n.IsA(class_name)]
        util.errorDisplay = lambda text, **kwargs: self.errors.append(text)
        util.tryWithErrorDisplay = self.try_with_error_display
        util.mainWindow = lambda: None
        self.errors = []
        slicer.util = util

        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = _parameter_node_wrapper
        wrapper.Choice = lambda choices: tuple(choices)
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {
            "__init__": lambda self, parent=None: setattr(self, "parent", parent)})
        scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {
            "__init__": lambda self, parent=None: setattr(self, "parent", parent),
            "setup": lambda self: setattr(self, "layout", types.SimpleNamespace(addWidget=lambda widget: None)),
            "resourcePath": lambda self, path: str(REPO / "KANTumorSeg" / "Resources" / path)})
        scripted.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
        raw_parameter_node = types.SimpleNamespace()
        scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {
            "__init__": lambda self: None, "getParameterNode": lambda self: raw_parameter_node})
        util.VTKObservationMixin = type("VTKObservationMixin", (_ParameterNodeObservers,), {})

        qt = types.ModuleType("qt")
        qt.QTimer = _Timer
        qt.QSettings = _QSettings
        vtk = types.ModuleType("vtk")
        vtk.calldata_type = lambda kind: (lambda function: function)
        vtk.VTK_OBJECT = "vtkObject"
        vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="ModifiedEvent")
        vtk.vtkStringArray = vtk.vtkDoubleArray = vtk.vtkIntArray = _Array
        self.sample_data = _SampleData()
        return {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                "slicer.ScriptedLoadableModule": scripted, "qt": qt, "vtk": vtk, "ctk": types.ModuleType("ctk"),
                "SampleData": self.sample_data, "SegmentStatistics": _SegmentStatistics(self.scene)}

    @contextlib.contextmanager
    def try_with_error_display(self, message, waitCursor=False):
        """As slicer.util.tryWithErrorDisplay: an exception is shown (recorded) and not raised."""
        try:
            yield
        except Exception as error:
            self.errors.append(f"{message} {error}")

    @staticmethod
    def export_node(node, path, properties, world=False):
        import SimpleITK as sitk

        assert world, "the Logic must export in world coordinates"
        sitk.WriteImage(node.image, path, useCompression=bool(properties.get("useCompression", 1)))
        return True

    @staticmethod
    def update_segment(array, node, segment_id, reference):
        node.segmentation.masks[segment_id] = np.asarray(array, dtype=np.uint8)
        node.segmentation.InvokeEvent("SourceRepresentationModified")

    def load_volume(self, path, properties=None):
        import SimpleITK as sitk

        name = (properties or {}).get("name", Path(path).name.removesuffix(".nii.gz"))
        volume = _Volume(name, sitk.ReadImage(str(path)))
        self.scene.nodes.append(volume)
        return volume

    @staticmethod
    def process_events():
        """As Qt's event loop: the single-shot timers due run (here: all pending, at once)."""
        pending, _Timer.pending = _Timer.pending, []
        for callback in pending:
            callback()


@pytest.fixture
def logic_module(tmp_path, monkeypatch, ends):
    """KANTumorSeg.py imported against the stand-in, with PythonSlicer = this Python; every
    process it launches (runs, workers) is killed with its group when the test ends."""
    from KANTumorSegLib import slicer_support

    launch = slicer_support.launch
    monkeypatch.setattr(slicer_support, "launch", lambda *args, **kwargs: ends(launch(*args, **kwargs)))
    standin = SlicerStandIn(tmp_path)
    for name, module in standin.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: sys.executable if name == "PythonSlicer" else real_which(name))
    _Timer.pending = []
    _QSettings.store = {}
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
    assert [s.name for s in output.segmentation.segments.values()] == [s.name for s in SEGMENTS]
    assert output.reference_geometry_from is volumes["t1ce"] and output.surfaces
    assert output.references["referenceImageGeometryRef"] == volumes["t1ce"].GetID()
    assert _SubjectHierarchy.parents[output] == "study"
    masks = output.segmentation.masks
    assert masks["NCR"].shape == volumes["t1ce"].image.GetSize()[::-1]
    regions = task.regionsSegmentation.segmentation
    assert [s.name for s in regions.segments.values()] == ["Whole tumour", "Tumour core"]
    np.testing.assert_array_equal(regions.masks["WT"], (masks["NCR"] | masks["ED"] | masks["ET"]).astype(np.uint8))
    np.testing.assert_array_equal(regions.masks["TC"], (masks["NCR"] | masks["ET"]).astype(np.uint8))
    assert regions.segments["WT"].tags["TerminologyEntry"].count("~") == 6

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
    # Returned at once: the worker starts in the background and a timer submits the run.
    assert task.status == "running" and task.process is None and _Timer.pending
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
    return _run_node(logic, volumes, model, _SegmentationNode("out"), **kwargs)


def _run_node(logic, volumes, model, output, **kwargs):
    return logic.process(volumes["t1"], volumes["t1ce"], volumes["t2"], volumes["flair"], output,
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
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    cancelled_pid = task.worker.process.pid
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


# ----------------------------------------------------------------------------- issue 13: defects


def test_closing_the_scene_during_a_run_cancels_it_and_nothing_lands_in_the_next_scene(logic_module, small_case, mixed_model):
    """The widget's onSceneStartClose (called here with the few attributes it touches: the
    widget itself needs Slicer's Qt) cancels the run; the removed nodes are not imported into,
    and no table or segmentation is left in the scene."""
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    output = _SegmentationNode("out")
    finished = []
    task = _run_node(logic, volumes, mixed_model, output, completedCallback=finished.append)
    widget = types.SimpleNamespace(_task=task, logic=logic, _notes=None, setParameterNode=lambda node: None)
    module.KANTumorSegWidget.onSceneStartClose(widget, None, None)
    standin.scene.Clear(output, *volumes.values())
    _run_timers(task)
    assert finished == [task] and task.status == "cancelled"
    assert output.segmentation.GetNumberOfSegments() == 0
    assert standin.scene.nodes == []
    assert not os.path.exists(task.tempDir)


def test_nodes_removed_during_a_run_are_not_imported_into(logic_module, small_case, mixed_model):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    output = _SegmentationNode("out")
    task = _run_node(logic, volumes, mixed_model, output)
    standin.scene.RemoveNode(output)
    _run_timers(task)
    assert task.status == "cancelled" and "removed" in task.message
    assert output.segmentation.GetNumberOfSegments() == 0 and standin.scene.nodes == []


def test_a_volume_that_cannot_be_exported_is_named(logic_module, small_case, mixed_model, monkeypatch):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    real_export = standin.export_node
    # slicer.util.exportNode returns False (and only logs) when it cannot write.
    monkeypatch.setattr(sys.modules["slicer"].util, "exportNode",
                        lambda node, *args, **kwargs: node is not volumes["t2"] and real_export(node, *args, **kwargs))
    with pytest.raises(RuntimeError, match=r"The T2 volume 'BraTS20_Training_001_t2' could not be written"):
        _run(logic, volumes, mixed_model, waitForCompletion=True)
    assert not any(tmp.glob("KANTumorSeg*/*"))


def test_a_result_that_does_not_read_leaves_the_users_segments(logic_module, small_case, mixed_model, monkeypatch):
    module, logic, standin, tmp = logic_module
    output = _SegmentationNode("out")
    output.segmentation.AddEmptySegment("mine", "My edit", (1, 0, 0))
    monkeypatch.setattr(_SegmentationStorageNode, "ReadData", lambda self, node: 0)
    with pytest.raises(RuntimeError, match="could not be read"):
        _run_node(logic, _volumes(small_case), mixed_model, output, waitForCompletion=True)
    assert list(output.segmentation.segments) == ["mine"]
    assert standin.scene.nodes == []


def test_a_run_without_an_output_node_creates_one_only_when_it_succeeds(logic_module, small_case, mixed_model, tmp_path):
    """The widget passes no node (None: 'Create new segmentation on Apply'); a failed or
    cancelled run must leave no empty '... tumour' segmentation behind."""
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    progress = []
    task = _run_node(logic, volumes, mixed_model, None, progressCallback=lambda *step: progress.append(step))
    _run_timers(task, on_line=lambda: progress and task.status == "running" and logic.cancel(task))
    assert task.status == "cancelled" and standin.scene.of_class(_SegmentationNode) == []
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    with pytest.raises(RuntimeError):
        _run_node(logic, volumes, broken, None, waitForCompletion=True)
    assert standin.scene.of_class(_SegmentationNode) == []
    done = _run_node(logic, volumes, mixed_model, None, waitForCompletion=True)
    assert standin.scene.of_class(_SegmentationNode) == [done.outputSegmentation]
    assert done.outputSegmentation.GetName() == "BraTS20_Training_001_t1ce tumour"
    assert done.outputSegmentation.segmentation.GetNumberOfSegments() == 3
    assert "AddNewNodeByClass" not in _source_of(module.KANTumorSegWidget.onApplyButton)


def _source_of(function) -> str:
    import inspect

    return inspect.getsource(function)


def test_editing_a_region_never_changes_the_classes(logic_module, small_case, mixed_model):
    """WT and TC live in a segmentation of their own, derived from NCR, ED and ET: an edit of WT
    (Segment Editor overwrites other segments of its node by default) cannot reach a class, and
    the regions follow the classes' edits."""
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    task = _run_node(logic, volumes, mixed_model, _SegmentationNode("out"), waitForCompletion=True, addRegions=True)
    classes = task.outputSegmentation.segmentation
    regions = task.regionsSegmentation
    assert list(classes.segments) == ["NCR", "ED", "ET"] and list(regions.segmentation.segments) == ["WT", "TC"]
    before = {k: v.copy() for k, v in classes.masks.items()}
    assert before["ED"].any()
    regions.segmentation.masks["WT"][:] = 0  # the user erases WT
    for segment_id, mask in before.items():
        np.testing.assert_array_equal(classes.masks[segment_id], mask)
    classes.masks["ED"][:] = 0  # the user erases the edema: WT follows on the next update
    assert logic.updateRegionSegments(task.outputSegmentation, volumes["t1ce"], regions) is regions
    np.testing.assert_array_equal(regions.segmentation.masks["WT"], (before["NCR"] | before["ET"]).astype(np.uint8))
    assert standin.scene.of_class(_SegmentationNode) == [regions]


def test_volumes_follow_edits_once_per_burst(logic_module):
    module, logic, standin, tmp = logic_module
    node = _SegmentationNode("out")
    updates = []
    logic.followEdits(node, lambda: updates.append(len(updates)))
    for _ in range(5):  # one paint stroke fires several events
        node.segmentation.InvokeEvent("SourceRepresentationModified")
    while _Timer.pending:
        _Timer.pending.pop(0)()
    assert updates == [0]
    node.segmentation.InvokeEvent("SegmentRemoved")
    _Timer.pending.pop(0)()
    assert updates == [0, 1]
    logic.stopFollowingEdits()
    assert node.segmentation.observers == {}


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
    from KANTumorSegLib import slicer_support

    module, logic, standin, tmp = logic_module
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=_PyTorchUtilsLogic))
    real = slicer_support.installed_version
    monkeypatch.setattr(slicer_support, "installed_version", lambda name: "1.0.2" if name == "slicerio" else real(name))
    logic._requirementsChecked = False
    assert logic.setupPythonRequirements() is None
    assert standin.installed == ["slicerio>=1.1"] and _PyTorchUtilsLogic.calls == []
    assert "restart" not in _source_of(module.KANTumorSegWidget.onApplyButton)

    monkeypatch.setattr(slicer_support, "installed_version", lambda name: None if name == "torch" else real(name))
    logic._requirementsChecked = False
    logic.setupPythonRequirements()
    assert _PyTorchUtilsLogic.calls == [{"askConfirmation": True, "torchVersionRequirement": ">=2.1"}]


def test_the_requirements_list_matches_the_package_dependencies():
    import tomllib

    from KANTumorSegLib.slicer_support import read_requirements

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

    module, logic, standin, tmp = logic_module
    slow = tmp / "slow" / "PythonSlicer"
    slow.parent.mkdir()
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec "{sys.executable}" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name: str(slow))
    started = time.monotonic()
    task = _run(logic, _volumes(small_case), mixed_model)
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
    first = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True, logCallback=logged.append)
    assert first.status == "completed" and first.worker is None
    assert any("next run tries the worker again" in line for line in logged), logged
    second = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True)
    assert second.status == "completed" and second.worker is logic._worker is not None


def test_the_warm_up_runs_a_phantom_and_the_first_run_uses_the_warmed_worker(logic_module, small_case, mixed_model):
    module, logic, standin, tmp = logic_module
    ready = []
    logic.warmUp("cpu", str(mixed_model), ready.append)
    start = logic._workerStart
    assert start is not None and not start.done()  # returned at once
    assert start.wait(300) and start.error is None and start.warmup_code == 0, start.error
    while _Timer.pending:
        _Timer.pending.pop(0)()
    assert ready == ["cpu"]
    pid = logic._worker.process.pid
    logic.warmUp("cpu", str(mixed_model))  # entering the module again: nothing new
    assert logic._worker.process.pid == pid
    task = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True)
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


def _import(module, logic, volumes, files, tmp, **options) -> object:
    """A task whose process wrote ``files`` (exit 0), finished as the Logic finishes a run."""
    scratch = tmp / "task"
    scratch.mkdir(exist_ok=True)
    settings = {"addRegions": False, "regionsSegmentation": None, "tableNode": None, **options}
    task = module.SegmentationTask(volumes, None, str(scratch), settings, None, None, None)
    task.files = files
    task.process = types.SimpleNamespace(returncode=0)
    logic._finish(task)
    return task


def test_confidence_map_ranges_and_warnings_are_shown(logic_module, small_case, mixed_model, tmp_path):
    module, logic, standin, tmp = logic_module
    volumes = _volumes(small_case)
    files = _completed_files(small_case, mixed_model, tmp_path / "out", confidence=True)
    task = _import(module, logic, volumes, files, tmp)
    assert task.status == "completed", task.message
    assert task.notes.warnings == ["The T1 volume shows a skull: strip it first."]
    table = task.volumeTable
    assert [c.name for c in table.columns] == ["Region", "Description", "Volume", "Voxels", "Range"]
    written = {r["name"]: r for r in json.loads(Path(files["volumes_json"]).read_text())["regions"]}
    for row in range(table.GetNumberOfRows()):
        low, high = written[table.GetCellText(row, 0)]["range_ml"]
        assert table.GetCellText(row, 4) == f"{low:.1f}-{high:.1f}"
    assert task.confidenceVolume is not None and task.confidenceVolume.GetName() == "BraTS20_Training_001_t1ce confidence"
    display = task.confidenceVolume.display.settings
    assert display["SetAndObserveColorNodeID"] == ("vtkMRMLColorTableNodeFileHotToColdRainbow.txt",)
    assert display["SetThreshold"] == (0, logic.LOW_CONFIDENCE_PERCENT - 1) and display["SetApplyThreshold"] == (1,)
    logic.showConfidence(task.confidenceVolume, False)
    assert standin.layers[-1]["foreground"] is None
    # An edit of the edema: its row (and WT's) lose the model's range, the others keep theirs.
    task.outputSegmentation.segmentation.masks["ED"][:] = 0
    logic.updateVolumeTable(task.outputSegmentation, volumes["t1ce"], table, task.notes)
    ranges = {table.GetCellText(row, 0): table.GetCellText(row, 4) for row in range(table.GetNumberOfRows())}
    assert ranges["ED"] == ranges["WT"] == "" and ranges["NCR"] and ranges["TC"]


def test_outputs_without_the_new_fields_import_as_before(logic_module, small_case, mixed_model, tmp_path):
    module, logic, standin, tmp = logic_module
    files = _completed_files(small_case, mixed_model, tmp_path / "out", confidence=False)
    volumes_json = json.loads(Path(files["volumes_json"]).read_text())
    volumes_json.pop("warnings", None)
    Path(files["volumes_json"]).write_text(json.dumps(volumes_json))
    task = _import(module, logic, _volumes(small_case), files, tmp)
    assert task.status == "completed", task.message
    assert task.notes.warnings == [] and task.confidenceVolume is None
    assert [c.name for c in task.volumeTable.columns] == ["Region", "Description", "Volume", "Voxels"]


# ----------------------------------------------------------------------------- issue 13: what users expect


def test_the_sample_case_is_registered_with_checksums_and_names_the_module_recognises(logic_module, brats_case_001):
    """Through the stand-in's SampleData (Slicer's registerCustomSampleDataSource keywords): the
    module registers at startup; the checksums are those of the real case's files, and the node
    names are assigned to the four inputs by the module's automatic assignment."""
    import hashlib

    from KANTumorSegLib.slicer_support import match_volume_names

    module, logic, standin, tmp = logic_module
    module.KANTumorSeg(types.SimpleNamespace())
    assert ("startupCompleted()", module.registerSampleData) in standin.connections
    module.registerSampleData()
    (source,) = standin.sample_data.sources
    assert source["category"] == "KANTumorSeg" and Path(source["thumbnailFileName"]).is_file()
    assert len(source["uris"]) == len(source["fileNames"]) == len(source["nodeNames"]) == len(source["checksums"]) == 4
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        assert uri.startswith("https://") and uri.endswith("/" + name)
        algorithm, digest = checksum.split(":")
        assert algorithm == "SHA256" and digest == hashlib.sha256((brats_case_001 / name).read_bytes()).hexdigest()
    assert sorted(match_volume_names(source["nodeNames"]).assigned) == ["flair", "t1", "t1ce", "t2"]


def test_the_self_test_runs_end_to_end_through_the_stand_in(logic_module):
    """KANTumorSegTest, as Slicer runs it (Reload and Test), with no environment variable: the
    phantom through the worker, the import, the region segments, the table against the command's
    volumes and against Segment Statistics (the stand-in's, see _SegmentStatistics), then an
    edit that the volumes follow."""
    module, logic, standin, tmp = logic_module
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
    module, logic, standin, tmp = logic_module
    task = _run(logic, _volumes(small_case), mixed_model, waitForCompletion=True, confidence=True)
    assert task.status == "completed", task.message
    assert task.confidenceVolume is not None
    assert task.confidenceVolume.image.GetSize() == _volumes(small_case)["t1ce"].image.GetSize()
    table = task.volumeTable
    assert [c.name for c in table.columns][-1] == "Range"
    assert all(table.GetCellText(row, 4) for row in range(table.GetNumberOfRows()))
    assert isinstance(task.notes.warnings, list)


# ----------------------------------------------------------------------------- the panel


def _run_events(until, limit_s: float = 300.0) -> None:
    """Run the pending single-shot timers, as Qt's event loop would, until ``until()``."""
    import time

    deadline = time.monotonic() + limit_s
    while not until() and time.monotonic() < deadline:
        if _Timer.pending:
            _Timer.pending.pop(0)()
        time.sleep(0.02)
    assert until(), "timed out"


def test_the_panel_warms_up_segments_follows_edits_and_lets_the_scene_close(logic_module, small_case, mixed_model):
    """KANTumorSegWidget on the stand-in's panel (widgets made from the .ui file, a parameter node
    wrapper, settings and observers standing in for Slicer's): entering warms the worker up and
    sets the Confidence default from its device; Apply makes the output only on success and shows
    the table, the warnings banner (when the run warns) and the regions; an edit updates the
    volumes; closing the scene drops the parameter node and cleanup ends the worker."""
    module, logic, standin, tmp = logic_module
    for modality in ("t1", "t1ce", "t2", "flair"):
        standin.load_volume(small_case / f"crop_{modality}.nii.gz")
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
    assert ui.applyButton.text == "Cancel" and p.outputSegmentation is None and standin.errors == []
    _run_events(lambda: widget._task is None)
    assert standin.errors == [], standin.errors
    assert p.outputSegmentation is not None and p.outputSegmentation.GetName() == "crop_t1ce tumour"
    assert p.regionsSegmentation is not None and ui.volumeTableView.tableNode is p.volumeTable
    assert ui.progressBar.format.startswith("Done in") and ui.applyButton.text == "Apply"
    # The banner shows the run's input warnings (this 8-slice crop may draw some), and only then.
    assert ui.warningsLabel.visible == bool(widget._notes.warnings)
    assert all(message in ui.warningsLabel.text for message in widget._notes.warnings)
    assert widget.logic._worker.process.pid == warmed

    p.outputSegmentation.segmentation.masks["ED"][:] = 0
    p.outputSegmentation.segmentation.InvokeEvent("SourceRepresentationModified")
    _run_events(lambda: ui.volumesStatusLabel.text.startswith("Volumes updated at"))
    table = {p.volumeTable.GetCellText(r, 0): float(p.volumeTable.GetCellText(r, 2)) for r in range(p.volumeTable.GetNumberOfRows())}
    classes = p.outputSegmentation.segmentation.masks
    assert table["ED"] == 0.0 and table["WT"] == pytest.approx(table["NCR"] + table["ET"], abs=1e-3)
    np.testing.assert_array_equal(p.regionsSegmentation.segmentation.masks["WT"], (classes["NCR"] | classes["ET"]).astype(np.uint8))

    widget.onSceneStartClose(None, None)
    assert widget._parameterNode is None and widget.logic._followed is None
    widget.cleanup()
    assert widget.logic._worker is None
