"""KANTumorSeg: brain tumour segmentation of BraTS-style MRI in 3D Slicer.

A thin front end over KANTumorSegLib: the four volumes are exported to a temporary folder,
``PythonSlicer -m KANTumorSegLib segment ... --progress jsonl`` runs in a background
process, and its .seg.nrrd becomes an editable segmentation with a volume table. Nothing
but Slicer, Qt, VTK and the standard library is imported at file scope: torch and the
library's numerical modules are loaded by the child process or inside functions.
"""

import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_PREFIX = "KANTumorSeg/"
MINIMUM_TORCH_VERSION = (2, 1)
OTHER_REQUIREMENTS = (("safetensors", "safetensors>=0.4"), ("slicerio", "slicerio>=1.1"))
"""(import name, pip requirement) of what the library needs beyond torch and Slicer's own numpy and SimpleITK."""


#
# KANTumorSeg
#


class KANTumorSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("KANTumorSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["KANTumorSeg developers"]
        self.parent.helpText = _("""
Segments a brain tumour (necrotic/non-enhancing core, edema, enhancing tumour) in four MRI volumes
(T1, T1ce, T2, FLAIR) with a Kolmogorov-Arnold U-Net (KANU-Net 2D), and measures its volumes.
The result is an ordinary segmentation: review and correct it in Segment Editor, then press Update volumes.
Research software, not a medical device.
""")
        self.parent.acknowledgementText = _("""
The model follows the KANU-Net 2D study (Sovremennye Tehnologii v Medicine, 2026) and is trained on the
BraTS data (Menze et al. 2015, Bakas et al. 2017, Baid et al. 2021).
""")
        _addLibraryToPath()


def _addLibraryToPath() -> None:
    """Make KANTumorSegLib importable. Installed, it sits beside this file (in the scripted
    modules folder, already on sys.path); run from a source checkout (Additional module
    paths = <repository>/KANTumorSeg), it is in the folder above."""
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for folder in (moduleDir, os.path.dirname(moduleDir)):
        if os.path.isfile(os.path.join(folder, "KANTumorSegLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.append(folder)
            return


#
# Parameter node
#


@parameterNodeWrapper
class KANTumorSegParameterNode:
    """The module's state, saved with the scene.

    t1Volume, t1ceVolume, t2Volume, flairVolume - the four inputs (the result lies on the T1ce grid).
    outputSegmentation - receives the segments; None means a new one is created on Apply.
    volumeTable - the table of tumour volumes shown in the module.
    device - --device of the command: auto, cuda, mps or cpu.
    modelPath - weights file; empty means the model shipped with the extension.
    labelConvention - --labels of the command (labels of the written labelmap).
    addRegions - also add WT and TC as segments.
    """

    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    flairVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    volumeTable: vtkMRMLTableNode
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    modelPath: str = ""
    labelConvention: Annotated[str, Choice(["brats2020", "brats2023"])] = "brats2020"
    addRegions: bool = False


INPUT_PARAMETERS = {"t1": "t1Volume", "t1ce": "t1ceVolume", "t2": "t2Volume", "flair": "flairVolume"}
"""Modality -> parameter node attribute."""


#
# KANTumorSegWidget
#


class KANTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, output, advanced options, Apply/Cancel, progress and results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._shownModelPath = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KANTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KANTumorSegLogic()

        deviceTitles = {
            "auto": _("Automatic (GPU when available)"),
            "cuda": _("GPU (NVIDIA CUDA)"),
            "mps": _("GPU (Apple MPS)"),
            "cpu": _("CPU"),
        }
        for device, title in deviceTitles.items():
            self.ui.deviceComboBox.addItem(title, device)
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCaseFolder)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.updateVolumesButton.connect("clicked(bool)", self.onUpdateVolumes)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._task is not None:
            self.logic.cancel(self._task)
        if self.logic is not None:
            # The worker would also exit at the end of its input when Slicer exits; this ends it at once.
            self.logic.stopWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, calldata) -> None:
        # The name of a volume being loaded may be set after it is added: assign on the next event loop pass.
        if calldata.IsA("vtkMRMLScalarVolumeNode") and self._parameterNode is not None:
            qt.QTimer.singleShot(0, self.autoAssignInputs)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        settings = qt.QSettings()
        if not self._parameterNode.modelPath:
            self._parameterNode.modelPath = settings.value(SETTINGS_PREFIX + "ModelPath", "") or ""
        savedDevice = settings.value(SETTINGS_PREFIX + "Device", "auto")
        if self._parameterNode.device == "auto" and savedDevice in ("auto", "cuda", "mps", "cpu"):
            self._parameterNode.device = savedDevice
        self.autoAssignInputs()

    def setParameterNode(self, inputParameterNode: Optional[KANTumorSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound here; device and
            # model path are bound by hand (their shown text differs from the stored value).
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
            self._updateGUIFromParameterNode()

    def autoAssignInputs(self) -> None:
        """Fill empty input selectors with loaded volumes whose names denote a modality."""
        from KANTumorSegLib.slicer_support import match_volume_names

        if self._parameterNode is None:
            return
        volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        match = match_volume_names([node.GetName() for node in volumes])
        used = {getattr(self._parameterNode, name) for name in INPUT_PARAMETERS.values()} - {None}
        for modality, index in match.assigned.items():
            attribute = INPUT_PARAMETERS[modality]
            if getattr(self._parameterNode, attribute) is None and volumes[index] not in used:
                setattr(self._parameterNode, attribute, volumes[index])
                used.add(volumes[index])

    def _updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Apply button state and tooltip, device and model widgets, model card, table view."""
        if self._parameterNode is None:
            return
        deviceIndex = self.ui.deviceComboBox.findData(self._parameterNode.device)
        if deviceIndex >= 0 and deviceIndex != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.currentIndex = deviceIndex
        if self.ui.modelPathLineEdit.currentPath != self._parameterNode.modelPath:
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
        if self._shownModelPath != self._parameterNode.modelPath:
            # Reading a card checks the weights' sha256: only when the choice changes.
            self._shownModelPath = self._parameterNode.modelPath
            self.ui.modelCardTextEdit.plainText = self.logic.modelCardText(self._parameterNode.modelPath)
        self.ui.volumeTableView.setMRMLTableNode(self._parameterNode.volumeTable)
        hasResult = self._parameterNode.outputSegmentation is not None and self._parameterNode.t1ceVolume is not None
        self.ui.updateVolumesButton.enabled = hasResult and self._task is None
        self.ui.editInSegmentEditorButton.enabled = hasResult and self._task is None
        self.ui.exportCsvButton.enabled = self._parameterNode.volumeTable is not None
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        from KANTumorSegLib.slicer_support import MODALITY_TITLES, input_problems

        if self._task is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running segmentation; nothing is written.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        selected = {}
        for modality, attribute in INPUT_PARAMETERS.items():
            node = getattr(self._parameterNode, attribute)
            selected[modality] = (node.GetID(), node.GetName()) if node else None
        missing, duplicates = input_problems(selected)
        reasons = [_("Select the {modality} volume.").format(modality=MODALITY_TITLES[m]) for m in missing]
        reasons += [_("{first} and {second} are the same volume ({name}); choose four different volumes.").format(
            first=MODALITY_TITLES[a], second=MODALITY_TITLES[b], name=name) for a, b, name in duplicates]
        self.ui.applyButton.enabled = not reasons
        self.ui.applyButton.toolTip = "\n".join(reasons) if reasons else _("Segment the tumour in the four volumes.")

    def onDeviceChanged(self, index: int) -> None:
        device = self.ui.deviceComboBox.itemData(index)
        if self._parameterNode is not None and device and device != self._parameterNode.device:
            self._parameterNode.device = device
            qt.QSettings().setValue(SETTINGS_PREFIX + "Device", device)

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and path != self._parameterNode.modelPath:
            self._parameterNode.modelPath = path
            qt.QSettings().setValue(SETTINGS_PREFIX + "ModelPath", path)

    def onLoadCaseFolder(self) -> None:
        settings = qt.QSettings()
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Choose a BraTS case folder"), settings.value(SETTINGS_PREFIX + "LastCaseFolder", ""))
        if not folder:
            return
        settings.setValue(SETTINGS_PREFIX + "LastCaseFolder", folder)
        with slicer.util.tryWithErrorDisplay(_("Could not load the case folder."), waitCursor=True):
            nodes = self.logic.loadCase(folder)
            for modality, node in nodes.items():
                setattr(self._parameterNode, INPUT_PARAMETERS[modality], node)
            slicer.util.setSliceViewerLayers(background=nodes["t1ce"], fit=True)

    def addLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onApplyButton(self) -> None:
        if self._task is not None:
            self.logic.cancel(self._task)
            self.addLog(_("Cancelling..."))
            return
        self.ui.logTextEdit.plainText = ""
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            if self.logic.setupPythonRequirements():
                # confirmOkCancelDisplay(text, windowTitle): the whole message goes in the text.
                if slicer.util.confirmOkCancelDisplay(
                        _("PyTorch was updated while an older copy was loaded; 3D Slicer must restart. Press OK to restart now."),
                        _("KANTumorSeg")):
                    slicer.util.restart()
                return
            if self._parameterNode.outputSegmentation is None:
                self._parameterNode.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", _("{name} tumour").format(name=self._parameterNode.t1ceVolume.GetName()))
            p = self._parameterNode
            self._task = self.logic.process(
                p.t1Volume, p.t1ceVolume, p.t2Volume, p.flairVolume, p.outputSegmentation, device=p.device,
                waitForCompletion=False, progressCallback=self.onProgress, model=p.modelPath or None,
                labels=p.labelConvention, addRegions=p.addRegions, tableNode=p.volumeTable,
                logCallback=self.addLog, completedCallback=self.onProcessCompleted)
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = 0
            self.ui.progressBar.setFormat(_("Starting"))
            self.ui.progressBar.show()
        self._updateGUIFromParameterNode()

    def onProgress(self, stage: str, done: int, total: int, fraction: Optional[float]) -> None:
        stageTitles = {
            "read": _("Reading images"),
            "preprocess": _("Preparing slices"),
            "segment": _("Segmenting slices"),
            "write": _("Writing results"),
        }
        if fraction is not None:
            self.ui.progressBar.value = int(1000 * fraction)
        self.ui.progressBar.setFormat(_("{stage}: {done}/{total}").format(stage=stageTitles.get(stage, stage), done=done, total=total))

    def onProcessCompleted(self, task) -> None:
        self._task = None
        if task.status == "completed":
            self._parameterNode.volumeTable = task.volumeTable
            self.ui.progressBar.value = 1000
            self.ui.progressBar.setFormat(_("Done in {seconds:.0f} s").format(seconds=task.elapsed))
            self.addLog(_("Segmentation finished in {seconds:.1f} s.").format(seconds=task.elapsed))
            if task.partsNote:
                self.addLog(task.partsNote)
        elif task.status == "cancelled":
            self.ui.progressBar.hide()
            self.addLog(_("Segmentation cancelled; nothing was written."))
        else:
            self.ui.progressBar.hide()
            self.addLog(task.message)
            slicer.util.errorDisplay(task.message, windowTitle=_("Segmentation failed"))
        self._updateGUIFromParameterNode()

    def onUpdateVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the volumes."), waitCursor=True):
            p = self._parameterNode
            p.volumeTable = self.logic.updateVolumeTable(p.outputSegmentation, p.t1ceVolume, p.volumeTable)

    def onExportCsv(self) -> None:
        settings = qt.QSettings()
        folder = settings.value(SETTINGS_PREFIX + "LastCsvFolder", "")
        defaultPath = os.path.join(folder, self._parameterNode.volumeTable.GetName() + ".csv")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export volumes"), defaultPath, _("CSV files (*.csv)"))
        if not path:
            return
        settings.setValue(SETTINGS_PREFIX + "LastCsvFolder", os.path.dirname(path))
        with slicer.util.tryWithErrorDisplay(_("Could not write the CSV file."), waitCursor=True):
            self.logic.exportCsv(self._parameterNode.volumeTable, path)
            self.addLog(_("Volumes written to {path}").format(path=path))

    def onEditInSegmentEditor(self) -> None:
        self.logic.openInSegmentEditor(self._parameterNode.outputSegmentation, self._parameterNode.t1ceVolume)


#
# KANTumorSegLogic
#


class SegmentationTask:
    """One run of the command: its process, temporary folder, the lines it printed and its outcome.

    status: "running", then "completed", "failed" or "cancelled"; message: the user-facing
    reason of a failure (the command's own ``kantumorseg: error:`` sentence when it gave one);
    partsNote: the command's sentence on a whole tumour in several parts (None for one part).
    """

    def __init__(self, inputs, outputSegmentation, tempDir, addRegions, tableNode, progressCallback, logCallback, completedCallback):
        self.inputs = inputs
        self.outputSegmentation = outputSegmentation
        self.tempDir = tempDir
        self.addRegions = addRegions
        self.volumeTable = tableNode
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.completedCallback = completedCallback
        self.process = None
        self.worker = None
        self.lines = queue.Queue()
        self.reader = None
        self.errorLines = []
        self.files = {}
        self.cancelRequested = False
        self.status = "running"
        self.message = ""
        self.partsNote = None
        self.startTime = time.time()
        self.elapsed = 0.0


class KANTumorSegLogic(ScriptedLoadableModuleLogic):
    """Runs the segmentation and turns its output into scene nodes; usable without the widget.

    The computation runs in a child PythonSlicer process (``-m KANTumorSegLib segment``) so
    that torch never loads into Slicer and the user interface stays responsive; its output
    is read line by line by a thread and handled on the main thread by a qt.QTimer, as
    SlicerMONAIAuto3DSeg does. The same command line goes to one long-lived
    ``-m KANTumorSegLib worker`` process, started on the first run, so that later runs skip
    the Python, torch and GPU start-up; a run gets a process of its own only when the worker
    cannot start (or is busy with another run). The worker exits after 10 idle minutes, when
    a run is cancelled, and when the module is unloaded; the next run starts a new one.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._requirementsChecked = False
        self._worker = None
        self._workerFailedFor = None

    def getParameterNode(self):
        return KANTumorSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies

    def setupPythonRequirements(self) -> bool:
        """Make torch (through the PyTorch extension) and the other packages available to
        the child process, asking the user first. Returns True when Slicer must restart."""
        if self._requirementsChecked:
            return False
        import importlib.metadata
        import importlib.util

        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError(
                _("KANTumorSeg needs the PyTorch extension: install it from the Extensions Manager and restart 3D Slicer.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        restartNeeded = False
        minimum = ".".join(str(v) for v in MINIMUM_TORCH_VERSION)
        if not torchLogic.torchInstalled():
            # A torch that failed to load earlier stays in memory: a fresh install then needs a restart.
            torchWasLoaded = "torch" in sys.modules
            torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=f">={minimum}")
            if torch is None:
                raise RuntimeError(_("PyTorch is required: install it with the PyTorch Utils module or allow the installation."))
            restartNeeded = torchWasLoaded
        else:
            version = importlib.metadata.version("torch")
            numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
            if numbers < MINIMUM_TORCH_VERSION:
                raise RuntimeError(
                    _("PyTorch {version} is too old; use the PyTorch Utils module to install version {minimum} or newer.").format(
                        version=version, minimum=minimum))

        missing = [requirement for name, requirement in OTHER_REQUIREMENTS if importlib.util.find_spec(name) is None]
        if missing:
            if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
                    _("KANTumorSeg needs the Python packages {packages}. Install them now?").format(packages=", ".join(missing))):
                raise RuntimeError(_("The packages {packages} are required.").format(packages=", ".join(missing)))
            for requirement in missing:
                slicer.util.pip_install(requirement)
        self._requirementsChecked = True
        return restartNeeded

    # ------------------------------------------------------------------ inputs and model

    def loadCase(self, folder: str) -> dict:
        """Load the four modalities of a BraTS case folder; returns modality -> volume node."""
        from pathlib import Path

        from KANTumorSegLib.case_files import find_modalities
        from KANTumorSegLib.errors import KANTumorSegError

        try:
            paths = find_modalities(Path(folder), {})
        except KANTumorSegError as error:
            raise ValueError(str(error)) from None
        return {modality: slicer.util.loadVolume(str(path)) for modality, path in paths.items()}

    @staticmethod
    def modelPath(model: Optional[str] = None) -> str:
        from KANTumorSegLib.weights import default_model_path

        return str(model) if model else str(default_model_path())

    def modelCardText(self, model: Optional[str] = None) -> str:
        """The model card as text for the Advanced section, or why it cannot be read."""
        import json
        from pathlib import Path

        from KANTumorSegLib.errors import KANTumorSegError
        from KANTumorSegLib.weights import read_card

        path = Path(self.modelPath(model))
        try:
            card = read_card(path)
        except KANTumorSegError as error:
            return str(error)
        shown = {key: value for key, value in card.items() if key != "sha256"}
        return _("Model: {path}").format(path=path) + "\n" + json.dumps(shown, indent=1)

    # ------------------------------------------------------------------ running

    def process(self, t1, t1ce, t2, flair, outputSegmentation, device="auto", waitForCompletion=False, progressCallback=None,
                model=None, labels="brats2020", addRegions=False, tableNode=None, logCallback=None, completedCallback=None):
        """Segment the tumour in four volumes into ``outputSegmentation``.

        :param device: auto, cuda, mps or cpu (``--device`` of the command).
        :param waitForCompletion: block until done (for scripts and tests); otherwise return at
            once and report through the callbacks while the user interface stays live.
        :param progressCallback: called with (stage, done, total, fraction of the whole run).
        :param model: weights file; None for the shipped model.
        :param labels: label convention of the written labelmap (brats2020 or brats2023).
        :param addRegions: also add WT and TC as segments.
        :param tableNode: table to fill with the volumes; a new one when None.
        :param logCallback: called with each line the process prints.
        :param completedCallback: called with the task when it has completed, failed or been cancelled.
        :return: the SegmentationTask; with waitForCompletion a failure raises RuntimeError with its message.
        """
        from KANTumorSegLib import slicer_support

        inputs = {"t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair}
        missing, duplicates = slicer_support.input_problems(
            {modality: (node.GetID(), node.GetName()) if node else None for modality, node in inputs.items()})
        if missing:
            raise ValueError(_("The {modality} volume is not set.").format(modality=slicer_support.MODALITY_TITLES[missing[0]]))
        if duplicates:
            raise ValueError(_("The four inputs must be four different volumes."))
        if outputSegmentation is None:
            raise ValueError(_("The output segmentation is not set."))
        self.setupPythonRequirements()
        pythonSlicer = shutil.which("PythonSlicer")
        if not pythonSlicer:
            raise RuntimeError(_("PythonSlicer was not found next to 3D Slicer; reinstall 3D Slicer."))

        tempDir = slicer.util.tempDirectory("KANTumorSeg")
        task = SegmentationTask(inputs, outputSegmentation, tempDir, addRegions, tableNode,
                                progressCallback, logCallback, completedCallback)
        try:
            files = {}
            for modality, node in inputs.items():
                files[modality] = os.path.join(tempDir, f"{modality}.nrrd")
                # exportNode leaves the node's own storage node (and the scene's file names) untouched;
                # world=True applies a parent transform as the user sees the volume.
                slicer.util.exportNode(node, files[modality], {"useCompression": 0}, world=True)
            command = slicer_support.build_command(
                pythonSlicer, files, os.path.join(tempDir, "output"), slicer_support.case_name_for(t1ce.GetName()),
                device, self.modelPath(model), labels)
            environment = slicer.util.startupEnvironment()
            environment.update(slicer_support.child_environment(environment))
            logging.info(f"KANTumorSeg command: {command}")
            self._start(task, command, pythonSlicer, environment)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise

        if waitForCompletion:
            for line in task.process.stdout:
                self._handleLine(task, line)
                slicer.app.processEvents()
            task.process.wait()
            self._finish(task)
            if task.status != "completed":
                raise RuntimeError(task.message)
        else:
            task.reader = threading.Thread(target=self._readLines, args=(task,), daemon=True)
            task.reader.start()
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._poll(task))
        return task

    def _start(self, task, command, pythonSlicer: str, environment: dict) -> None:
        """Run the command in the worker (started or replaced as needed), else in its own process."""
        from KANTumorSegLib import slicer_support

        worker = self._workerFor(pythonSlicer, environment, task)
        if worker is not None:
            try:
                task.process = worker.submit(slicer_support.worker_arguments(command))
                task.worker = worker
                return
            except slicer_support.WorkerError as error:
                self._log(task, _("The background worker could not take this run: {error}. "
                                  "It runs in a process of its own.").format(error=error))
        task.process = slicer_support.launch(command, environment, slicer_support.library_parent())

    def _workerFor(self, pythonSlicer: str, environment: dict, task):
        """The running worker for this PythonSlicer and environment, started when there is
        none (or it has ended, or they changed); None when the run must get its own process."""
        from KANTumorSegLib.slicer_support import Worker, WorkerError, library_parent

        if self._worker is not None and self._worker.busy:
            self._log(task, _("The background worker is busy with another run; this run gets a process of its own."))
            return None
        if self._worker is not None and self._worker.serves(pythonSlicer, environment) and self._worker.alive():
            return self._worker
        self.stopWorker()
        if self._workerFailedFor == pythonSlicer:
            return None
        worker = Worker(pythonSlicer, environment, library_parent())
        try:
            worker.start()
        except (OSError, WorkerError) as error:
            # Remembered: a PythonSlicer that does not pass its input on would fail every time.
            self._workerFailedFor = pythonSlicer
            self._log(task, _("The background worker could not start: {error}. Each run gets a process of its own, "
                              "with the start-up time that takes.").format(error=error))
            return None
        self._worker = worker
        return worker

    def stopWorker(self) -> None:
        """End the background worker (a running segmentation with it); the next run starts a new one."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    @staticmethod
    def _log(task, text: str) -> None:
        logging.warning(f"KANTumorSeg: {text}")
        if task.logCallback:
            task.logCallback(text)

    @staticmethod
    def _readLines(task) -> None:
        """Reader thread: forwards every output line, then None once the process has ended."""
        for line in task.process.stdout:
            task.lines.put(line)
        task.process.wait()
        task.lines.put(None)

    def _poll(self, task) -> None:
        """Main thread: handle the lines read so far; finish when the process has ended."""
        while True:
            try:
                line = task.lines.get_nowait()
            except queue.Empty:
                qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._poll(task))
                return
            if line is None:
                task.reader.join()
                self._finish(task)
                return
            self._handleLine(task, line)

    def _handleLine(self, task, line: str) -> None:
        from KANTumorSegLib.slicer_support import overall_fraction, parse_output_line

        parsed = parse_output_line(line)
        if parsed.kind == "progress":
            if task.progressCallback:
                task.progressCallback(parsed.stage, parsed.done, parsed.total, overall_fraction(parsed.stage, parsed.done, parsed.total))
            return
        if parsed.kind == "done":
            task.files = parsed.files
        elif parsed.kind == "error":
            task.errorLines.append(parsed.text)
        logging.info(parsed.text)
        if task.logCallback and parsed.kind != "done":
            task.logCallback(parsed.text)

    def cancel(self, task) -> None:
        """Stop a running task and every process it started; its partial output is discarded."""
        from KANTumorSegLib.slicer_support import terminate_tree

        if task.process is not None and task.status == "running":
            task.cancelRequested = True
            if task.worker is not None:
                # The worker stops with the run (exit 143, its outputs removed); the next run starts a new one.
                task.worker.stop()
            else:
                terminate_tree(task.process)

    def _finish(self, task) -> None:
        """Import the result (or record why there is none), remove the temporary files, report."""
        from KANTumorSegLib.slicer_support import failure_message

        task.elapsed = time.time() - task.startTime
        try:
            if task.cancelRequested:
                task.status = "cancelled"
            elif task.process.returncode == 0 and task.files.get("segmentation"):
                self._importResult(task)
                task.status = "completed"
            else:
                task.status = "failed"
                task.message = failure_message(task.errorLines, task.process.returncode)
        except Exception as error:
            logging.exception("KANTumorSeg: importing the result failed")
            task.status = "failed"
            task.message = _("The result could not be loaded: {error}").format(error=error)
        finally:
            shutil.rmtree(task.tempDir, ignore_errors=True)
        if task.completedCallback:
            task.completedCallback(task)

    def _importResult(self, task) -> None:
        segmentationNode = task.outputSegmentation
        reference = task.inputs["t1ce"]
        # Read the .seg.nrrd into the chosen node with a temporary storage node (as
        # SlicerMONAIAuto3DSeg's readSegmentation does): loadSegmentation would make a new node.
        # Names, colours and terminology come from the file.
        segmentationNode.GetSegmentation().RemoveAllSegments()
        storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            storageNode.SetFileName(task.files["segmentation"])
            if not storageNode.ReadData(segmentationNode):
                raise RuntimeError(_("{path} could not be read.").format(path=task.files["segmentation"]))
        finally:
            slicer.mrmlScene.RemoveNode(storageNode)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(), reference.GetID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)

        # Place the segmentation in the study of its input volume.
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(reference))
        shNode.SetItemParent(shNode.GetItemByDataNode(segmentationNode), studyItem)

        from KANTumorSegLib.measurements import parts_sentence

        with open(task.files["volumes_json"], encoding="utf-8") as stream:
            task.partsNote = parts_sentence(json.load(stream)["whole_tumour_parts"])
        if task.addRegions:
            self.addRegionSegments(segmentationNode, reference)
        segmentationNode.CreateClosedSurfaceRepresentation()
        task.volumeTable = self.updateVolumeTable(segmentationNode, reference, task.volumeTable)
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=reference, fit=True)

    # ------------------------------------------------------------------ results

    @staticmethod
    def _segmentId(segmentationNode, segmentId: str, name: str) -> Optional[str]:
        """The segment's id, found by id, else by its name (a segment re-created by the user)."""
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetSegment(segmentId):
            return segmentId
        found = segmentation.GetSegmentIdBySegmentName(name)
        return found or None

    def classMasks(self, segmentationNode, referenceVolume) -> dict:
        """NCR, ED and ET as numpy masks on the reference volume's grid (None when absent)."""
        from KANTumorSegLib.labels import SEGMENTS

        masks = {}
        for segment in SEGMENTS:
            segmentId = self._segmentId(segmentationNode, segment.id, segment.name)
            masks[segment.id] = (slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolume)
                                 if segmentId else None)
        if all(mask is None for mask in masks.values()):
            raise ValueError(_("The segmentation has none of the segments NCR, ED and ET."))
        return masks

    def addRegionSegments(self, segmentationNode, referenceVolume) -> None:
        """Add WT and TC, computed from the current NCR, ED and ET, as extra segments."""
        from KANTumorSegLib.slicer_support import REGION_SEGMENTS, compose_labels, region_masks, region_terminology_entry

        masks = region_masks(compose_labels(self.classMasks(segmentationNode, referenceVolume)))
        segmentation = segmentationNode.GetSegmentation()
        for segmentId, name, color in REGION_SEGMENTS:
            if segmentation.GetSegment(segmentId):
                segmentation.RemoveSegment(segmentId)
            segmentation.AddEmptySegment(segmentId, name, color)
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(segment.GetTerminologyEntryTagName(), region_terminology_entry())
            slicer.util.updateSegmentBinaryLabelmapFromArray(masks[segmentId], segmentationNode, segmentId, referenceVolume)

    def updateVolumeTable(self, segmentationNode, referenceVolume, tableNode=None):
        """Fill (or create) a table of NCR, ED, ET, WT and TC volumes in mL from the current
        segments, measured by KANTumorSegLib on the reference volume's grid."""
        from KANTumorSegLib.slicer_support import TABLE_COLUMNS, volume_rows

        if segmentationNode is None or referenceVolume is None:
            raise ValueError(_("Select the output segmentation and the T1ce volume first."))
        volumes = volume_rows(self.classMasks(segmentationNode, referenceVolume), referenceVolume.GetSpacing())
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("{name} volumes").format(name=segmentationNode.GetName()))
        region, description, volume, voxels = vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray()
        for array, name in zip((region, description, volume, voxels), TABLE_COLUMNS):
            array.SetName(name)
        for row in volumes["regions"]:
            region.InsertNextValue(row["name"])
            description.InsertNextValue(row["description"])
            volume.InsertNextValue(row["volume_ml"])
            voxels.InsertNextValue(row["voxels"])
        # Filled as SegmentStatistics' exportToTable fills its table.
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        for array in (region, description, volume, voxels):
            tableNode.AddColumn(array)
        tableNode.SetColumnUnitLabel("Volume", "mL")
        tableNode.EndModify(wasModifying)
        return tableNode

    @staticmethod
    def exportCsv(tableNode, path: str) -> None:
        """Write the volume table as CSV (region, description, voxels, volume_ml), as the command does."""
        from KANTumorSegLib.measurements import volumes_csv

        rows = []
        for index in range(tableNode.GetNumberOfRows()):
            rows.append({"name": tableNode.GetCellText(index, 0), "description": tableNode.GetCellText(index, 1),
                         "volume_ml": float(tableNode.GetCellText(index, 2)), "voxels": int(tableNode.GetCellText(index, 3))})
        with open(path, "w", encoding="utf-8") as stream:
            stream.write(volumes_csv({"regions": rows}))

    @staticmethod
    def openInSegmentEditor(segmentationNode, sourceVolume) -> None:
        """Switch to Segment Editor with this segmentation and the T1ce volume as source."""
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        editor.setSourceVolumeNode(sourceVolume)


#
# KANTumorSegTest
#


class KANTumorSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer only: segments the case in the folder named by $KANTUMORSEG_TEST_CASE
    (skipped when unset), then edits a segment and checks that Update volumes follows."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        if not os.environ.get("KANTUMORSEG_TEST_CASE"):
            self.delayDisplay("KANTUMORSEG_TEST_CASE is not set: KANTumorSegTest skipped")
            return
        self.test_SegmentEditMeasure()

    def test_SegmentEditMeasure(self) -> None:
        import unittest

        from KANTumorSegLib.labels import SEGMENTS

        caseFolder = os.environ.get("KANTUMORSEG_TEST_CASE")
        if not caseFolder:
            raise unittest.SkipTest("KANTUMORSEG_TEST_CASE is not set")
        logic = KANTumorSegLogic()
        nodes = logic.loadCase(caseFolder)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        task = logic.process(nodes["t1"], nodes["t1ce"], nodes["t2"], nodes["flair"], segmentationNode, waitForCompletion=True)
        self.assertEqual(task.status, "completed")

        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(3)], [s.name for s in SEGMENTS])
        table = task.volumeTable
        before = {table.GetCellText(row, 0): float(table.GetCellText(row, 2)) for row in range(table.GetNumberOfRows())}
        for segment in SEGMENTS:
            self.assertGreater(before[segment.id], 0.0)

        # Erase the enhancing tumour, as a user would in Segment Editor, then update the table.
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, "ET", nodes["t1ce"])
        mask[:] = 0
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentationNode, "ET", nodes["t1ce"])
        logic.updateVolumeTable(segmentationNode, nodes["t1ce"], table)
        after = {table.GetCellText(row, 0): float(table.GetCellText(row, 2)) for row in range(table.GetNumberOfRows())}
        self.assertEqual(after["ET"], 0.0)
        self.assertAlmostEqual(after["WT"], before["WT"] - before["ET"], places=2)
        self.delayDisplay("KANTumorSegTest passed")
