"""3D Slicer's own scene and module logic for the module's tests, with stand-ins only for Qt.

The ``slicer-core`` package (Kitware) is Slicer's MRML and module logic built as a Python
package: the scene, volume, segmentation and table nodes with their storage nodes, the
Segmentations, Volumes, Terminologies, Colors and Subject Hierarchy logic, and ``slicer.util``.
It has no Qt, no application and no scripted modules. ``SlicerHarness`` builds that real scene
and logic (with Slicer's terminology files loaded from Testing/slicer_terminology, which the
wheel lacks) and stands in only for what needs Qt or the application:

- ``qt`` (QTimer.singleShot, whose callbacks wait until the test runs them, and QSettings),
  ``ctk``, ``slicer.app`` (events, testing mode, no layout manager), ``slicer.i18n``;
- ``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper`` (Python modules of the
  Slicer application that import Qt), the module's .ui widgets and the error dialogs;
- the IO manager behind ``slicer.util.loadVolume`` and ``exportNode`` (replaced by the real
  Volumes logic and the node's real storage node), and ``slicer.util.tempDirectory`` (Qt);
- Segment Statistics (a scripted module), whose volume is the segment's voxel count times the
  voxel volume, as its LabelmapSegmentStatisticsPlugin computes it;
- SampleData (a scripted module).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
import unittest
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TERMINOLOGY_EXCERPTS = REPO / "Testing" / "slicer_terminology"


class Timers:
    """Stands in for qt.QTimer.singleShot (Qt): callbacks wait in a list that the test runs."""

    pending: list = []

    @classmethod
    def singleShot(cls, msec, callback):
        cls.pending.append(callback)

    @classmethod
    def run_all(cls) -> None:
        """As Qt's event loop: the single-shot timers due run (here: all pending, at once)."""
        pending, cls.pending = cls.pending, []
        for callback in pending:
            callback()


class QSettings:
    """Stands in for qt.QSettings (Qt): one store for the test (as the user's settings file)."""

    store: dict = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Stands in for ScriptedLoadableModuleTest (a unittest.TestCase in Slicer too, with a Qt
    message box for delayDisplay): delayDisplay records the message."""

    def __init__(self, *args):
        super().__init__("runTest")

    def delayDisplay(self, message, msec=None):
        self.displayed = [*getattr(self, "displayed", []), message]


class Widget:
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


def load_ui(path):
    """Stands in for slicer.util.loadUI (Qt): a root whose ``children`` are the .ui file's widgets."""
    root = Widget("KANTumorSeg", "qMRMLWidget")
    root.children = {w.get("name"): Widget(w.get("name"), w.get("class"))
                     for w in ElementTree.parse(path).getroot().iter("widget")}
    return root


def parameter_node_wrapper(cls):
    """Stands in for slicer.parameterNodeWrapper (it binds Qt widgets): the class's annotated
    parameters (defaults from the class, None for nodes) kept in the raw parameter node, so that
    every wrapper of one node shares them; setting one invokes the node's ModifiedEvent
    observers, which VTKObservationMixin (Slicer's own) adds through AddObserver."""
    import vtk

    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, raw):
            object.__setattr__(self, "_raw", raw)
            if not hasattr(raw, "values"):
                raw.values, raw.observers = dict(defaults), {}

        def __getattr__(self, name):
            if name not in defaults:
                raise AttributeError(name)
            return self._raw.values[name]

        def __setattr__(self, name, value):
            if name not in defaults:
                raise AttributeError(f"{name} is not a parameter")
            self._raw.values[name] = value
            for event, observer in list(self._raw.observers.values()):
                if event == vtk.vtkCommand.ModifiedEvent:
                    observer(self, event)

        def AddObserver(self, event, observer, priority=0.0):
            tag = max(self._raw.observers, default=0) + 1
            self._raw.observers[tag] = (event, observer)
            return tag

        def RemoveObserver(self, tag):
            self._raw.observers.pop(tag)

        def connectGui(self, ui):
            return object()

        def disconnectGui(self, tag):
            pass

    Wrapped.__name__ = cls.__name__
    return Wrapped


class SlicerHarness:
    """The real slicer-core scene and module logic, and the stand-ins (see the module docstring)
    installed over ``slicer``, ``qt`` and ``ctk`` for one test."""

    LOGICS = ("Colors", "SubjectHierarchy", "Terminologies", "Segmentations", "Volumes", "Tables")
    """Created in this order: the Volumes logic gives new volumes the Colors logic's colour
    tables, and the Segmentations logic resolves terminology through the Terminologies logic."""

    def __init__(self, temp_root: Path):
        import slicer

        self.slicer = slicer
        self.temp_root = temp_root
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        home = temp_root / "slicer-home"
        # The Colors logic looks for Slicer's colour files in <home>/<share>/ColorFiles (the wheel has none).
        (home / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.app_logic.SetHomeDirectory(str(home))
        self.app_logic.SetShareDirectory("share")
        self.app_logic.SetTemporaryPath(str(temp_root))
        classes = {"Colors": slicer.vtkSlicerColorLogic, "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic,
                   "Terminologies": slicer.vtkSlicerTerminologiesModuleLogic, "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic,
                   "Volumes": slicer.vtkSlicerVolumesLogic, "Tables": slicer.vtkSlicerTablesLogic}
        self.logics = {}
        for name in self.LOGICS:
            logic = classes[name]()
            logic.SetMRMLApplicationLogic(self.app_logic)
            if name == "Terminologies":
                # Read when the logic gets its scene, from <share>/<name>.term.json as Slicer installs them.
                logic.SetModuleShareDirectory(str(self._terminology_share(temp_root / "Terminologies")))
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        self.modules = types.SimpleNamespace(**{name.lower(): types.SimpleNamespace(logic=lambda logic=logic: logic)
                                                for name, logic in self.logics.items()})
        self.connections: list = []
        self.layers: list = []
        self.installed: list = []
        self.errors: list = []
        self.sample_sources: list = []

    @staticmethod
    def _terminology_share(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        for path in TERMINOLOGY_EXCERPTS.glob("*.json"):
            shutil.copy(path, folder / path.name.replace(".json", ".term.json"))
        return folder

    def install(self, monkeypatch) -> None:
        """Put the real scene and logic and the stand-ins in place of Slicer's application."""
        import sys

        slicer = self.slicer
        monkeypatch.setattr(slicer, "mrmlScene", self.scene, raising=False)
        monkeypatch.setattr(slicer, "modules", self.modules, raising=False)
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
            processEvents=Timers.run_all, testingEnabled=lambda: True, layoutManager=lambda: None,
            connect=lambda signal, slot: self.connections.append((signal, slot))), raising=False)
        util = slicer.util
        stand_ins = {
            "tempDirectory": lambda key="__SlicerTemp__": tempfile.mkdtemp(prefix=key, dir=self.temp_root),
            "startupEnvironment": lambda: dict(os.environ),
            "exportNode": self.export_node,
            "loadVolume": self.load_volume,
            "setSliceViewerLayers": lambda **kwargs: self.layers.append(kwargs),
            "pip_install": self.installed.append,
            "confirmOkCancelDisplay": lambda *args, **kwargs: True,
            "loadUI": load_ui,
            "childWidgetVariables": lambda root: types.SimpleNamespace(**root.children),
            "errorDisplay": lambda text, **kwargs: self.errors.append(text),
            "tryWithErrorDisplay": self.try_with_error_display,
            "mainWindow": lambda: None,
        }
        for name, function in stand_ins.items():
            monkeypatch.setattr(util, name, function)

        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = parameter_node_wrapper
        wrapper.Choice = lambda choices: tuple(choices)
        scripted = types.ModuleType("slicer.ScriptedLoadableModule")
        scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {
            "__init__": lambda self, parent=None: setattr(self, "parent", parent)})
        scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {
            "__init__": lambda self, parent=None: setattr(self, "parent", parent),
            "setup": lambda self: setattr(self, "layout", types.SimpleNamespace(addWidget=lambda widget: None)),
            "resourcePath": lambda self, path: str(REPO / "KANTumorSeg" / "Resources" / path)})
        scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        raw_parameter_node = types.SimpleNamespace()
        scripted.ScriptedLoadableModuleLogic = type("ScriptedLoadableModuleLogic", (), {
            "__init__": lambda self: None, "getParameterNode": lambda self: raw_parameter_node})
        qt = types.ModuleType("qt")
        qt.QTimer = Timers
        qt.QSettings = QSettings
        sample_data = types.ModuleType("SampleData")
        sample_data.SampleDataLogic = types.SimpleNamespace(
            registerCustomSampleDataSource=lambda **kwargs: self.sample_sources.append(kwargs))
        modules = {"slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted,
                   "qt": qt, "ctk": types.ModuleType("ctk"), "SampleData": sample_data,
                   "SegmentStatistics": self.segment_statistics_module()}
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        Timers.pending = []
        QSettings.store = {}

    @contextlib.contextmanager
    def try_with_error_display(self, message, waitCursor=False):
        """As slicer.util.tryWithErrorDisplay (a Qt dialog): an exception is shown (recorded), not raised."""
        try:
            yield
        except Exception as error:
            self.errors.append(f"{message} {error}")

    @staticmethod
    def export_node(node, path, properties, world=False):
        """As slicer.util.exportNode (the application's IO manager): the node's data written by a
        storage node of its own, leaving the node's storage node alone; False when it cannot write."""
        assert world, "the Logic must export in world coordinates"
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(int(properties.get("useCompression", 1)))
        return bool(storage.WriteData(node))

    def load_volume(self, path, properties=None):
        """As slicer.util.loadVolume (the application's IO manager): Slicer's Volumes logic reads it."""
        name = (properties or {}).get("name", Path(path).name.removesuffix(".nii.gz").removesuffix(".nrrd"))
        node = self.logics["Volumes"].AddArchetypeVolume(str(path), name)
        if node is None:
            raise RuntimeError(f"Failed to load volume: {path}")
        return node

    def segment_statistics_module(self) -> types.ModuleType:
        """Stands in for Segment Statistics (a scripted module): volume_cm3 of each segment as its
        LabelmapSegmentStatisticsPlugin computes it, voxel count times voxel volume (mm3) / 1000,
        counted in the segment's own binary labelmap (read by the real Segmentations logic)."""
        from vtk.util import numpy_support

        scene, slicer = self.scene, self.slicer
        module = types.ModuleType("SegmentStatistics")

        class SegmentStatisticsLogic:
            def __init__(self):
                self.parameters, self.statistics = {}, {}

            def getParameterNode(self):
                return types.SimpleNamespace(SetParameter=self.parameters.__setitem__)

            def computeStatistics(self):
                node = scene.GetNodeByID(self.parameters["Segmentation"])
                spacing = scene.GetNodeByID(self.parameters["ScalarVolume"]).GetSpacing()
                segmentation = node.GetSegmentation()
                ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
                self.statistics = {"SegmentIDs": ids}
                for segment_id in ids:
                    labelmap = slicer.vtkOrientedImageData()
                    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(node, segment_id, labelmap)
                    voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
                    count = int(np.count_nonzero(voxels == segmentation.GetSegment(segment_id).GetLabelValue()))
                    self.statistics[segment_id, "LabelmapSegmentStatisticsPlugin.volume_cm3"] = count * float(np.prod(spacing)) / 1000

            def getStatistics(self):
                return self.statistics

        module.SegmentStatisticsLogic = SegmentStatisticsLogic
        return module

    # ------------------------------------------------------------------ for the tests' checks

    def node_ids(self) -> set[str]:
        """The ids of the nodes in the scene now."""
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def new_segmentation(self, name: str = "out"):
        return self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)

    def mask(self, segmentation_node, segment_id: str, reference) -> np.ndarray:
        """A segment's voxels (k, j, i) on the reference volume's grid, through the real
        segmentation (shared labelmap layers included), with no node added to the scene."""
        import vtk
        from vtk.util import numpy_support

        slicer = self.slicer
        geometry = slicer.vtkOrientedImageData()
        matrix = vtk.vtkMatrix4x4()
        reference.GetIJKToRASMatrix(matrix)
        geometry.SetImageToWorldMatrix(matrix)
        geometry.SetExtent(reference.GetImageData().GetExtent())
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        merged = slicer.vtkOrientedImageData()
        assert segmentation_node.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                                                                      geometry, ids)
        voxels = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars())
        return (voxels.reshape(merged.GetDimensions()[::-1]) > 0).astype(np.uint8)

    def erase(self, segmentation_node, segment_id: str) -> None:
        """Empty a segment as Segment Editor's Clear does (the real Segmentations logic)."""
        assert self.slicer.vtkSlicerSegmentationsModuleLogic.ClearSegment(segmentation_node, segment_id)

    def segment_names(self, segmentation_node) -> list[str]:
        segmentation = segmentation_node.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    def segment_ids(self, segmentation_node) -> list[str]:
        segmentation = segmentation_node.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


@contextlib.contextmanager
def vtk_messages():
    """The warnings and errors VTK objects print while the block runs (a list of strings, filled
    at its end): Slicer's logic reports misuse (an invalid subject hierarchy item, say) there."""
    import vtk

    previous = vtk.vtkOutputWindow.GetInstance()
    window = vtk.vtkStringOutputWindow()
    vtk.vtkOutputWindow.SetInstance(window)
    messages: list[str] = []
    try:
        yield messages
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
        messages += [m.strip() for m in window.GetOutput().split("\n\n") if m.strip()]
