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
REQUIREMENTS_FILE = "KANTumorSegRequirements.txt"
PREPARE_REQUIREMENT = "deepbet>=1.0.2"
"""The brain-extraction package of "Prepare raw scans" (pyproject.toml's [prepare]), installed on its first use only."""
"""In Resources/: the packages (with minimum versions) the library needs beyond Slicer's own numpy and SimpleITK."""


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
        self.parent.contributors = ["KANTumorSeg developers (names and organizations to be filled in by the maintainers)"]
        self.parent.helpText = _("""
Segments a brain tumour (necrotic/non-enhancing core, edema, enhancing tumour) in four MRI volumes
(T1, T1ce, T2, FLAIR) with a Kolmogorov-Arnold U-Net (KANU-Net 2D), and measures its volumes.
<p><b>Inputs</b>: the four volumes must be skull-stripped (as BraTS scans are: use SwissSkullStripper or HD-BET)
and co-registered to each other (use General Registration (BRAINS)); the model was made for such inputs only.
For raw scanner series (skull on, each on its own grid) tick <b>Prepare raw scans</b>: the module registers them onto
the T1ce and skull-strips them itself, and writes the result on the T1ce's grid.</p>
<p>The result is an ordinary segmentation: review and correct it in Segment Editor; the volume table follows the edits.
Research software, not a medical device.</p>
""")
        self.parent.acknowledgementText = _("""
The model follows the KANU-Net 2D study (Sovremennye Tehnologii v Medicine, 2026; authors, volume, pages and DOI
to be completed: see the README's How to cite) and is trained on the BraTS data (Menze et al. 2015,
Bakas et al. 2017, Baid et al. 2021).
""")
        _addLibraryToPath()
        slicer.app.connect("startupCompleted()", registerSampleData)


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


SAMPLE_DATA_URL = "https://github.com/KANTumorSeg/SlicerKANTumorSeg/releases/download/SampleData/"
SAMPLE_DATA = (
    ("BraTS20_Training_001_t1.nii.gz", "e63effbd25a803272c5d012012145c33db8d27bff6013ca3bbae1a33b3242df3"),
    ("BraTS20_Training_001_t1ce.nii.gz", "eec90b1fb334ceaae37cf9dd1d19f1ed541d150a28939c33475db9f973c4143d"),
    ("BraTS20_Training_001_t2.nii.gz", "3d4a60f1c1184ff71c71dd2d74e93f3150307cce4123e418326fc64b1da183a4"),
    ("BraTS20_Training_001_flair.nii.gz", "240ad023b630301db0b3e38a7a74defac3517a18339f111a1648087e869b5ffa"),
)
"""The sample case's files (BraTS 2020 training case 001, docs/slicer.md says where they are
hosted) and their SHA-256; the node names (file names without .nii.gz) are those the module's
automatic input assignment recognises."""


def registerSampleData() -> None:
    """Add the BraTS sample case to the Sample Data module (called once Slicer has started)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="KANTumorSeg",
        sampleName="BraTS20_Training_001",
        thumbnailFileName=os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "KANTumorSeg.png"),
        uris=[SAMPLE_DATA_URL + fileName for fileName, _digest in SAMPLE_DATA],
        fileNames=[fileName for fileName, _digest in SAMPLE_DATA],
        nodeNames=[fileName.removesuffix(".nii.gz") for fileName, _digest in SAMPLE_DATA],
        checksums=[f"SHA256:{digest}" for _fileName, digest in SAMPLE_DATA],
    )


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
    addRegions - also make WT and TC segments, in regionsSegmentation (derived from the classes).
    confidence - --confidence of the command: a confidence map and volume ranges.
    prepareRaw - --prepare of the command: register and skull-strip raw scanner series first.
    confidenceVolume - the last run's confidence map; showConfidence - shown over the T1ce.
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
    regionsSegmentation: vtkMRMLSegmentationNode
    confidence: bool = False
    prepareRaw: bool = False
    confidenceVolume: vtkMRMLScalarVolumeNode
    showConfidence: bool = True


INPUT_PARAMETERS = {"t1": "t1Volume", "t1ce": "t1ceVolume", "t2": "t2Volume", "flair": "flairVolume"}
"""Modality -> parameter node attribute."""


#
# KANTumorSegWidget
#


class KANTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, output, advanced options, Apply/Cancel, progress and results."""

    CHOICES = {
        "device": (("auto", _("Automatic (GPU when available)")), ("cuda", _("GPU (NVIDIA CUDA)")),
                   ("mps", _("GPU (Apple MPS)")), ("cpu", _("CPU"))),
        "labelConvention": (("brats2020", _("BraTS 2017-2021: NCR 1, ED 2, ET 4")),
                            ("brats2023", _("BraTS 2023: NCR 1, ED 2, ET 3"))),
    }
    """Parameter -> (value, shown title) of the combo boxes bound by hand (Choice shows the raw value)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._notes = None
        self._shownModelPath = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KANTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KANTumorSegLogic()

        self._choiceBoxes = {"device": self.ui.deviceComboBox, "labelConvention": self.ui.labelConventionComboBox}
        for parameter, comboBox in self._choiceBoxes.items():
            for value, title in self.CHOICES[parameter]:
                comboBox.addItem(title, value)
            comboBox.connect("currentIndexChanged(int)", lambda index, parameter=parameter: self.onChoiceChanged(parameter, index))
        self.ui.progressBar.hide()
        self.ui.warningsLabel.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCaseFolder)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.updateVolumesButton.connect("clicked(bool)", self.onUpdateVolumes)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        # clicked: the user's own choice only, remembered; the default follows the device.
        self.ui.confidenceCheckBox.connect("clicked(bool)", lambda on: qt.QSettings().setValue(SETTINGS_PREFIX + "Confidence", on))
        self.ui.showConfidenceCheckBox.connect("toggled(bool)", self.onShowConfidence)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._task is not None:
            self.logic.cancel(self._task)
        if self.logic is not None:
            self.logic.stopFollowingEdits()
            # The worker would also exit at the end of its input when Slicer exits; this ends it at once.
            self.logic.stopWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        # Warm the worker up while the user loads and checks the inputs.
        try:
            self.logic.warmUp(self._parameterNode.device, self._parameterNode.modelPath or None, self.onWorkerReady)
        except (OSError, RuntimeError, ValueError) as error:
            logging.warning(f"KANTumorSeg: no warm-up ({error}); the first run starts the worker.")

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        # The run's nodes go with the scene: stop it, so that nothing lands in the next scene.
        if self._task is not None:
            self.logic.cancel(self._task)
        self.logic.stopFollowingEdits()
        self._notes = None
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
        savedConfidence = settings.value(SETTINGS_PREFIX + "Confidence")
        if savedConfidence is not None:  # the user's own choice (else onWorkerReady picks by device)
            self._parameterNode.confidence = str(savedConfidence).lower() == "true"
        self.autoAssignInputs()

    def setParameterNode(self, inputParameterNode: Optional[KANTumorSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound here; the combo
            # boxes in CHOICES and the model path are bound by hand (their shown text differs from the value).
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
            self._updateGUIFromParameterNode()

    def autoAssignInputs(self) -> None:
        """Fill empty input selectors with loaded volumes whose names denote a modality."""
        from KANTumorSegLib.slicer_inputs import match_volume_names

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
        """Apply button state and tooltip, choice and model widgets, model card, table view."""
        if self._parameterNode is None:
            return
        for parameter, comboBox in self._choiceBoxes.items():
            index = comboBox.findData(getattr(self._parameterNode, parameter))
            if index >= 0 and index != comboBox.currentIndex:
                comboBox.currentIndex = index
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
        self.ui.showConfidenceCheckBox.enabled = self._parameterNode.confidenceVolume is not None
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        from KANTumorSegLib.slicer_inputs import MODALITY_TITLES, input_problems

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

    def onChoiceChanged(self, parameter: str, index: int) -> None:
        value = self._choiceBoxes[parameter].itemData(index)
        if self._parameterNode is not None and value and value != getattr(self._parameterNode, parameter):
            setattr(self._parameterNode, parameter, value)
            if parameter == "device":
                qt.QSettings().setValue(SETTINGS_PREFIX + "Device", value)

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode is not None and path != self._parameterNode.modelPath:
            self._parameterNode.modelPath = path
            qt.QSettings().setValue(SETTINGS_PREFIX + "ModelPath", path)

    def onWorkerReady(self, device: Optional[str]) -> None:
        """The warm-up has finished on ``device``: the Confidence option starts on where it is
        cheap (a CUDA GPU), unless the user has chosen."""
        from KANTumorSegLib.slicer_results import confidence_by_default

        self.addLog(_("Background worker ready ({device}).").format(device=device) if device else
                    _("The background worker did not warm up; the first run will start it."))
        if self._parameterNode is not None and qt.QSettings().value(SETTINGS_PREFIX + "Confidence") is None:
            self._parameterNode.confidence = confidence_by_default(self._parameterNode.device, device)

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

    def showWarnings(self, messages: list) -> None:
        """The run's input warnings in the banner above the results (hidden when there are none)."""
        self.ui.warningsLabel.text = "\n".join("\u26a0 " + message for message in messages)
        self.ui.warningsLabel.visible = bool(messages)

    def onApplyButton(self) -> None:
        if self._task is not None:
            self.logic.cancel(self._task)
            self.addLog(_("Cancelling..."))
            return
        self.ui.logTextEdit.plainText = ""
        self.showWarnings([])
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            p = self._parameterNode
            self.logic.stopFollowingEdits()
            # No output node is made here: the Logic makes it when the run succeeds, so that a
            # failed or cancelled run leaves nothing behind.
            self._task = self.logic.process(
                p.t1Volume, p.t1ceVolume, p.t2Volume, p.flairVolume, p.outputSegmentation, device=p.device,
                waitForCompletion=False, progressCallback=self.onProgress, model=p.modelPath or None,
                labels=p.labelConvention, addRegions=p.addRegions, tableNode=p.volumeTable,
                logCallback=self.addLog, completedCallback=self.onProcessCompleted, confidence=p.confidence,
                regionsSegmentation=p.regionsSegmentation if p.addRegions else None, prepare=p.prepareRaw)
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = 0
            self.ui.progressBar.setFormat(_("Starting"))
            self.ui.progressBar.show()
        self._updateGUIFromParameterNode()

    def onProgress(self, stage: str, done: int, total: int, fraction: Optional[float]) -> None:
        stageTitles = {
            "read": _("Reading images"),
            # Prepare raw scans: each registration's resolution levels and check, the four series
            # onto the model's grid, the brain mask of the T1ce and the T1.
            "register T1": _("Registering the T1 onto the T1ce"),
            "register T2": _("Registering the T2 onto the T1ce"),
            "register FLAIR": _("Registering the FLAIR onto the T1ce"),
            "resample": _("Resampling onto the model's grid"),
            "skull-strip": _("Skull-stripping"),
            "preprocess": _("Preparing slices"),
            "segment": _("Segmenting slices"),
            "write": _("Writing results"),
        }
        if fraction is not None:
            self.ui.progressBar.value = int(1000 * fraction)
        self.ui.progressBar.setFormat(_("{stage}: {done}/{total}").format(stage=stageTitles.get(stage, stage), done=done, total=total))

    def onProcessCompleted(self, task) -> None:
        self._task = None
        p = self._parameterNode
        if task.status == "completed" and p is not None:
            p.outputSegmentation = task.outputSegmentation
            p.regionsSegmentation = task.regionsSegmentation
            p.volumeTable = task.volumeTable
            if task.confidenceVolume is not None:
                p.confidenceVolume = task.confidenceVolume
                self.logic.showConfidence(task.confidenceVolume, p.showConfidence)
            self._notes = task.notes
            self.showWarnings(task.notes.warnings)
            self.logic.followEdits(task.outputSegmentation, self.onSegmentsEdited)
            self.ui.volumesStatusLabel.text = _("Volumes of the result as segmented; they follow your edits.")
            self.ui.progressBar.value = 1000
            self.ui.progressBar.setFormat(_("Done in {seconds:.0f} s").format(seconds=task.elapsed))
            self.addLog(_("Segmentation finished in {seconds:.1f} s.").format(seconds=task.elapsed))
            if task.partsNote:
                self.addLog(task.partsNote)
        elif task.status in ("completed", "cancelled"):
            self.ui.progressBar.hide()
            self.addLog(task.message or _("Segmentation cancelled; nothing was written."))
        else:
            self.ui.progressBar.hide()
            self.addLog(task.message)
            slicer.util.errorDisplay(task.message, windowTitle=_("Segmentation failed"))
        self._updateGUIFromParameterNode()

    def _updateVolumes(self) -> None:
        p = self._parameterNode
        if p.regionsSegmentation is not None:
            self.logic.updateRegionSegments(p.outputSegmentation, p.t1ceVolume, p.regionsSegmentation)
        p.volumeTable = self.logic.updateVolumeTable(p.outputSegmentation, p.t1ceVolume, p.volumeTable, self._notes)
        self.ui.volumesStatusLabel.text = _("Volumes updated at {time}.").format(time=time.strftime("%H:%M:%S"))

    def onSegmentsEdited(self) -> None:
        """The segments were edited (debounced by the Logic): the regions and volumes follow."""
        if self._parameterNode is None or self._task is not None:
            return
        try:
            self._updateVolumes()
        except ValueError as error:
            self.ui.volumesStatusLabel.text = _("Volumes not updated: {error}").format(error=error)

    def onUpdateVolumes(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the volumes."), waitCursor=True):
            self._updateVolumes()

    def onShowConfidence(self, show: bool) -> None:
        if self._parameterNode is not None and self._parameterNode.confidenceVolume is not None:
            self.logic.showConfidence(self._parameterNode.confidenceVolume, show)

    def onExportCsv(self) -> None:
        settings = qt.QSettings()
        folder = settings.value(SETTINGS_PREFIX + "LastCsvFolder", "")
        defaultPath = os.path.join(folder, self._parameterNode.volumeTable.GetName() + ".csv")
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export volumes"), defaultPath, _("CSV files (*.csv)"))
        if not path:
            return
        settings.setValue(SETTINGS_PREFIX + "LastCsvFolder", os.path.dirname(path))
        with slicer.util.tryWithErrorDisplay(_("Could not write the CSV file."), waitCursor=True):
            self.logic.exportCsv(self._parameterNode.volumeTable, path, self._notes)
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
    partsNote: the command's sentence on a whole tumour in several parts (None for one part);
    notes: the warnings and volume ranges of its volumes file (slicer_results.ResultNotes);
    outputSegmentation, regionsSegmentation, volumeTable, confidenceVolume: the nodes it
    filled, created only when the run succeeds (None given: a new one).
    """

    def __init__(self, inputs, outputSegmentation, tempDir, options: dict, progressCallback, logCallback, completedCallback):
        self.inputs = inputs
        self.outputSegmentation = outputSegmentation
        self.tempDir = tempDir
        self.addRegions = options["addRegions"]
        self.regionsSegmentation = options["regionsSegmentation"]
        self.volumeTable = options["tableNode"]
        self.prepare = options.get("prepare", False)
        self.confidenceVolume = None
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
        self.notes = None
        self.startTime = time.time()
        self.elapsed = 0.0


class KANTumorSegLogic(ScriptedLoadableModuleLogic):
    """Runs the segmentation and turns its output into scene nodes; usable without the widget.

    The computation runs in a child PythonSlicer process (``-m KANTumorSegLib segment``) so
    that torch never loads into Slicer and the user interface stays responsive; its output
    is read line by line by a thread and handled on the main thread by a qt.QTimer, as
    SlicerMONAIAuto3DSeg does. The same command line goes to one long-lived
    ``-m KANTumorSegLib worker`` process, started (and warmed up on a small phantom) in the
    background when the module is entered or on the first run, so that no run pays for the
    Python, torch, GPU and model start-up; a run gets a process of its own only when the worker
    cannot start (the next run tries again) or is busy with another run. The worker exits after
    10 idle minutes, when a run is cancelled, and when the module is unloaded.
    """

    POLL_INTERVAL_MS = 200
    EDIT_DEBOUNCE_MS = 700
    """Volumes are recomputed this long after the last edit of a followed segmentation."""
    LOW_CONFIDENCE_PERCENT = 80
    """The confidence map shows voxels below this confidence (hot colours for the lowest)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._requirementsChecked = False
        self._worker = None
        self._workerStart = None
        self._followed = None

    def getParameterNode(self):
        return KANTumorSegParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ dependencies

    @staticmethod
    def requirements() -> list:
        """(distribution, minimum version, line) of the module's one requirements list."""
        from KANTumorSegLib.slicer_requirements import read_requirements

        return read_requirements(os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", REQUIREMENTS_FILE))

    def setupPythonRequirements(self) -> None:
        """Make torch (through the PyTorch extension) and the other packages of the requirements
        list available to the child process, asking the user first; an older copy (another
        extension's) is upgraded. Versions are read from package metadata: nothing is imported
        into Slicer's process when all is installed, and nothing needs a restart, because the
        segmentation runs in a child process."""
        if self._requirementsChecked:
            return
        from KANTumorSegLib.slicer_requirements import installed_version, unmet_requirements

        requirements = self.requirements()
        torchRequirement = next(r for r in requirements if r[0] == "torch")
        if unmet_requirements([torchRequirement], installed_version):
            if installed_version("torch") is not None:
                raise RuntimeError(_("PyTorch {version} is too old; use the PyTorch Utils module to install {requirement}.").format(
                    version=installed_version("torch"), requirement=torchRequirement[2]))
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    _("KANTumorSeg needs the PyTorch extension: install it from the Extensions Manager and restart 3D Slicer.")) from None
            # installTorch imports torch into Slicer's process once installed: only on this first install.
            minimum = ">=" + ".".join(str(number) for number in torchRequirement[1])
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=minimum) is None:
                raise RuntimeError(_("PyTorch is required: install it with the PyTorch Utils module or allow the installation."))

        unmet = unmet_requirements([r for r in requirements if r[0] != "torch"], installed_version)
        if unmet:
            self._installPackages(unmet)
        self._requirementsChecked = True

    @staticmethod
    def _installPackages(requirements: list) -> None:
        """Install or upgrade packages with the user's consent: slicer.packaging (Slicer 5.10 and
        later) asks itself and respects other extensions' constraints; older Slicer: pip_install."""
        refused = _("The packages {packages} are required.").format(packages=", ".join(requirements))
        try:
            from slicer import packaging
        except ImportError:
            packaging = None
        if hasattr(packaging, "pip_install") and hasattr(packaging, "InstallationAbortedError"):
            try:
                packaging.pip_install(list(requirements), interactive=not slicer.app.testingEnabled())
            except packaging.InstallationAbortedError:
                raise RuntimeError(refused) from None
            return
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
                _("KANTumorSeg needs the Python packages {packages}. Install them now?").format(packages=", ".join(requirements))):
            raise RuntimeError(refused)
        for requirement in requirements:
            slicer.util.pip_install(requirement)

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

    # ------------------------------------------------------------------ the worker

    @staticmethod
    def _childProcess() -> tuple:
        """(PythonSlicer, environment) of the command and the worker."""
        from KANTumorSegLib import slicer_command

        pythonSlicer = shutil.which("PythonSlicer")
        if not pythonSlicer:
            raise RuntimeError(_("PythonSlicer was not found next to 3D Slicer; reinstall 3D Slicer."))
        environment = slicer.util.startupEnvironment()
        environment.update(slicer_command.child_environment(environment))
        return pythonSlicer, environment

    def warmUp(self, device: str = "auto", model: Optional[str] = None, readyCallback=None) -> None:
        """Start the worker in the background and run a small phantom through it (torch import,
        device start, model load), so that the first Segment click costs what later ones do.
        Nothing happens when a worker already runs or starts, or torch is not installed yet.
        ``readyCallback(device)`` is called on the main thread when the warm-up has finished,
        with the device it ran on (None when the worker did not start)."""
        from KANTumorSegLib import slicer_command, slicer_process, slicer_requirements

        if self._workerStart is not None and (not self._workerStart.done() or self._workerUsable()):
            return
        if slicer_requirements.unmet_requirements(self.requirements(), slicer_requirements.installed_version):
            return
        pythonSlicer, environment = self._childProcess()
        self.stopWorker()
        scratch = slicer.util.tempDirectory("KANTumorSegWarmUp")
        warmup = (lambda: slicer_process.warmup_request(scratch, device, self.modelPath(model)), scratch)
        self._worker = slicer_process.Worker(pythonSlicer, environment, slicer_command.library_parent())
        self._workerStart = slicer_process.BackgroundStart(self._worker, warmup)
        if readyCallback:
            self._whenWorkerReady(self._workerStart, readyCallback)

    def _whenWorkerReady(self, start, callback) -> None:
        if not start.done():
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._whenWorkerReady(start, callback))
            return
        callback(start.device if start.error is None else None)

    def _workerUsable(self) -> bool:
        return self._workerStart is not None and self._workerStart.error is None and self._worker.alive()

    def _workerStartFor(self, pythonSlicer: str, environment: dict, task):
        """The worker's BackgroundStart this run should wait for (a worker started, starting or
        warming up for this PythonSlicer and environment; a new one when there is none), or None
        when the run must get its own process (the worker is busy with another run)."""
        from KANTumorSegLib.slicer_command import library_parent
        from KANTumorSegLib.slicer_process import BackgroundStart, Worker

        start = self._workerStart
        if start is not None and self._worker.serves(pythonSlicer, environment):
            if not start.done():
                return start
            if self._workerUsable():
                if self._worker.busy:
                    self._log(task, _("The background worker is busy with another run; this run gets a process of its own."))
                    return None
                return start
        self.stopWorker()
        self._worker = Worker(pythonSlicer, environment, library_parent())
        self._workerStart = BackgroundStart(self._worker)
        return self._workerStart

    def stopWorker(self) -> None:
        """End the background worker (a running segmentation with it); the next run starts a new one."""
        if self._worker is not None:
            self._worker.stop()
        self._worker = None
        self._workerStart = None

    # ------------------------------------------------------------------ running

    def process(self, t1, t1ce, t2, flair, outputSegmentation, device="auto", waitForCompletion=False, progressCallback=None,
                model=None, labels="brats2020", addRegions=False, tableNode=None, logCallback=None, completedCallback=None,
                confidence=False, regionsSegmentation=None, prepare=False):
        """Segment the tumour in four volumes into ``outputSegmentation``.

        :param outputSegmentation: receives the NCR, ED and ET segments when the run succeeds
            (its segments are replaced then, and only then); None: a new segmentation is created
            on success, so that a failed or cancelled run leaves nothing behind.
        :param device: auto, cuda, mps or cpu (``--device`` of the command).
        :param waitForCompletion: block until done (for scripts and tests); otherwise return at
            once and report through the callbacks while the user interface stays live.
        :param progressCallback: called with (stage, done, total, fraction of the whole run).
        :param model: weights file; None for the shipped model.
        :param labels: label convention of the written labelmap (brats2020 or brats2023).
        :param addRegions: also make WT and TC segments, in a separate segmentation derived from
            the classes (``regionsSegmentation``, or a new one), so that editing them never
            changes NCR, ED or ET.
        :param tableNode: table to fill with the volumes; a new one when None.
        :param logCallback: called with each line the process prints.
        :param completedCallback: called with the task when it has completed, failed or been cancelled.
        :param confidence: ``--confidence``: a confidence map (loaded as a volume) and volume ranges.
        :param prepare: ``--prepare``: raw scanner series are registered onto the T1ce and skull-stripped
            first (its packages are installed on first use, after asking).
        :return: the SegmentationTask; with waitForCompletion a failure raises RuntimeError with its message.
        """
        from KANTumorSegLib import slicer_command, slicer_inputs, slicer_requirements

        inputs = {"t1": t1, "t1ce": t1ce, "t2": t2, "flair": flair}
        missing, duplicates = slicer_inputs.input_problems(
            {modality: (node.GetID(), node.GetName()) if node else None for modality, node in inputs.items()})
        if missing:
            raise ValueError(_("The {modality} volume is not set.").format(modality=slicer_inputs.MODALITY_TITLES[missing[0]]))
        if duplicates:
            raise ValueError(_("The four inputs must be four different volumes."))
        self.setupPythonRequirements()
        if prepare and slicer_requirements.installed_version("deepbet") is None:
            self._installPackages([PREPARE_REQUIREMENT])
        pythonSlicer, environment = self._childProcess()

        tempDir = slicer.util.tempDirectory("KANTumorSeg")
        options = {"addRegions": addRegions, "regionsSegmentation": regionsSegmentation, "tableNode": tableNode, "prepare": prepare}
        task = SegmentationTask(inputs, outputSegmentation, tempDir, options, progressCallback, logCallback, completedCallback)
        try:
            files = {}
            for modality, node in inputs.items():
                files[modality] = os.path.join(tempDir, f"{modality}.nrrd")
                # exportNode leaves the node's own storage node (and the scene's file names) untouched;
                # world=True applies a parent transform as the user sees the volume. It returns False
                # (and only logs) when it cannot write.
                if not slicer.util.exportNode(node, files[modality], {"useCompression": 0}, world=True):
                    raise RuntimeError(_("The {modality} volume '{name}' could not be written to {path} for the segmentation.").format(
                        modality=slicer_inputs.MODALITY_TITLES[modality], name=node.GetName(), path=files[modality]))
            command = slicer_command.build_command(
                pythonSlicer, files, os.path.join(tempDir, "output"), slicer_inputs.case_name_for(t1ce.GetName()),
                device, self.modelPath(model), labels, confidence, prepare)
            logging.info(f"KANTumorSeg command: {command}")
            start = self._workerStartFor(pythonSlicer, environment, task)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise

        if waitForCompletion:
            if start is not None:
                start.wait()
            self._submit(task, command, environment, start)
            for line in task.process.stdout:
                self._handleLine(task, line)
                slicer.app.processEvents()
            task.process.wait()
            self._finish(task)
            if task.status != "completed":
                raise RuntimeError(task.message)
        else:
            self._submitWhenStarted(task, command, environment, start)
        return task

    def _submitWhenStarted(self, task, command, environment, start) -> None:
        """Main thread: submit the run once the worker has started (polled, so the user interface
        stays live during a slow start or the warm-up), then read its output in a thread."""
        if task.cancelRequested:
            self._finish(task)
            return
        if start is not None and not start.done():
            qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._submitWhenStarted(task, command, environment, start))
            return
        try:
            self._submit(task, command, environment, start)
        except OSError as error:
            task.status = "failed"
            task.message = _("The segmentation could not start: {error}").format(error=error)
            shutil.rmtree(task.tempDir, ignore_errors=True)
            if task.completedCallback:
                task.completedCallback(task)
            return
        task.reader = threading.Thread(target=self._readLines, args=(task,), daemon=True)
        task.reader.start()
        qt.QTimer.singleShot(self.POLL_INTERVAL_MS, lambda: self._poll(task))

    def _submit(self, task, command, environment, start) -> None:
        """Run the command in the started worker, else in a process of its own."""
        from KANTumorSegLib import slicer_command, slicer_process

        if start is not None and start.error is not None:
            self._log(task, _("The background worker could not start: {error}. This run gets a process of its own "
                              "(with the start-up time that takes); the next run tries the worker again.").format(error=start.error))
            if start is self._workerStart:
                self.stopWorker()
        elif start is not None and start is self._workerStart:
            try:
                task.process = self._worker.submit(slicer_command.worker_arguments(command))
                task.worker = self._worker
                return
            except slicer_process.WorkerError as error:
                self._log(task, _("The background worker could not take this run: {error}. "
                                  "It runs in a process of its own.").format(error=error))
        task.process = slicer_process.launch(command, environment, slicer_command.library_parent())

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
        from KANTumorSegLib.slicer_results import overall_fraction, parse_output_line

        parsed = parse_output_line(line)
        if parsed.kind == "progress":
            if task.progressCallback:
                task.progressCallback(parsed.stage, parsed.done, parsed.total,
                                      overall_fraction(parsed.stage, parsed.done, parsed.total, task.prepare))
            return
        if parsed.kind == "done":
            task.files = parsed.files
        elif parsed.kind == "error":
            task.errorLines.append(parsed.text)
        logging.info(parsed.text)
        if task.logCallback and parsed.kind != "done":
            task.logCallback(parsed.text)

    def cancel(self, task) -> None:
        """Stop a running task and every process it started; its partial output is discarded.
        A run still waiting for the worker to start ends without starting."""
        from KANTumorSegLib.slicer_process import terminate_tree

        if task.status != "running":
            return
        task.cancelRequested = True
        if task.process is None:
            return
        if task.worker is not None:
            # The worker stops with the run (exit 143, its outputs removed); the next run starts a new one.
            task.worker.stop()
        else:
            terminate_tree(task.process)

    @staticmethod
    def _inScene(node) -> bool:
        return node is None or slicer.mrmlScene.IsNodePresent(node)

    def _finish(self, task) -> None:
        """Import the result (or record why there is none), remove the temporary files, report."""
        from KANTumorSegLib.slicer_results import failure_message

        task.elapsed = time.time() - task.startTime
        try:
            if task.cancelRequested:
                task.status = "cancelled"
            elif not all(self._inScene(n) for n in (*task.inputs.values(), task.outputSegmentation, task.regionsSegmentation,
                                                      task.volumeTable)):
                # The scene was closed, or a node removed, during the run: nothing to import into.
                task.status = "cancelled"
                task.message = _("The input or output nodes were removed during the run; the result was not loaded.")
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
        """Read everything the run wrote first, into new nodes; only then replace the output's
        segments, so that a file that does not read leaves the user's segments as they were."""
        from KANTumorSegLib import slicer_results
        from KANTumorSegLib.measurements import parts_sentence

        reference = task.inputs["t1ce"]
        with open(task.files["volumes_json"], encoding="utf-8") as stream:
            written = json.load(stream)
        loaded = self._readSegmentation(task.files["segmentation"])
        try:
            segmentationNode = task.outputSegmentation
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", _("{name} tumour").format(name=reference.GetName()))
            segmentationNode.GetSegmentation().DeepCopy(loaded.GetSegmentation())
        finally:
            KANTumorSegLogic._removeWithDisplayNodes(loaded)
        task.outputSegmentation = segmentationNode
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(), reference.GetID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(reference)

        self._placeBeside(segmentationNode, reference)

        task.partsNote = parts_sentence(written["whole_tumour_parts"])
        task.notes = slicer_results.result_notes(written)
        if task.addRegions:
            task.regionsSegmentation = self.updateRegionSegments(segmentationNode, reference, task.regionsSegmentation)
        dimensions = reference.GetImageData().GetDimensions()
        if slicer_results.show_3d_by_default(dimensions[0] * dimensions[1] * dimensions[2]):
            segmentationNode.CreateClosedSurfaceRepresentation()
        task.volumeTable = self.updateVolumeTable(segmentationNode, reference, task.volumeTable, task.notes)
        confidencePath = slicer_results.confidence_file(task.files)
        if confidencePath is not None:
            task.confidenceVolume = self.loadConfidence(str(confidencePath), reference)
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=reference, fit=True)

    @staticmethod
    def _placeBeside(node, reference) -> None:
        """Put ``node`` under the subject hierarchy parent of ``reference`` (the T1ce's study, when it
        has one). A reference without an item (ID 0: no subject hierarchy plugin made one) has no
        parent to share; the subject hierarchy would reject the call with a warning."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        invalid = slicer.vtkMRMLSubjectHierarchyNode.GetInvalidItemID()
        referenceItem = shNode.GetItemByDataNode(reference)
        if referenceItem == invalid:
            return
        parentItem = shNode.GetItemParent(referenceItem)
        item = shNode.GetItemByDataNode(node)
        if item == invalid:
            shNode.CreateItem(parentItem, node)
        else:
            shNode.SetItemParent(item, parentItem)

    @staticmethod
    def _removeWithDisplayNodes(node) -> None:
        """Remove a temporary node and the display nodes reading it made: the scene keeps a removed
        node's display nodes, which would be saved with it."""
        displayNodes = [node.GetNthDisplayNode(index) for index in range(node.GetNumberOfDisplayNodes())]
        slicer.mrmlScene.RemoveNode(node)
        for displayNode in displayNodes:
            slicer.mrmlScene.RemoveNode(displayNode)

    @staticmethod
    def _readSegmentation(path: str):
        """A new segmentation node read from a .seg.nrrd (with a temporary storage node, as
        SlicerMONAIAuto3DSeg reads its result); names, colours and terminology come from the file."""
        loaded = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            storageNode.SetFileName(path)
            if not storageNode.ReadData(loaded):
                raise RuntimeError(_("{path} could not be read.").format(path=path))
        except Exception:
            KANTumorSegLogic._removeWithDisplayNodes(loaded)
            raise
        finally:
            slicer.mrmlScene.RemoveNode(storageNode)
        return loaded

    def loadConfidence(self, path: str, reference):
        """Load the confidence map (0-100 %) as a volume shown over the T1ce: voxels below
        LOW_CONFIDENCE_PERCENT in hot-to-cold colours (red where least sure), the rest transparent."""
        node = slicer.util.loadVolume(path, {"name": _("{name} confidence").format(name=reference.GetName()), "show": False})
        # Its file goes with the run's temporary folder: without a storage node, saving the scene writes it anew.
        storageNode = node.GetStorageNode()
        if storageNode is not None:
            slicer.mrmlScene.RemoveNode(storageNode)
        displayNode = node.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileHotToColdRainbow.txt")
        displayNode.SetAutoWindowLevel(0)
        displayNode.SetWindowLevelMinMax(0, self.LOW_CONFIDENCE_PERCENT)
        displayNode.SetAutoThreshold(0)
        displayNode.SetThreshold(0, self.LOW_CONFIDENCE_PERCENT - 1)
        displayNode.SetApplyThreshold(1)
        return node

    @staticmethod
    def showConfidence(confidenceVolume, show: bool) -> None:
        """Show the confidence map as the slice views' foreground (half transparent), or hide it."""
        slicer.util.setSliceViewerLayers(foreground=confidenceVolume if show else None, foregroundOpacity=0.5)

    # ------------------------------------------------------------------ results

    @staticmethod
    def _segmentId(segmentationNode, segmentId: str, name: str) -> Optional[str]:
        """The segment's id, found by id, else by its name (a segment re-created by the user)."""
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetSegment(segmentId):
            return segmentId
        found = segmentation.GetSegmentIdBySegmentName(name)
        return found or None

    @staticmethod
    def _referenceGeometry(referenceVolume):
        """An image without voxels on the reference volume's grid (origin, spacing, axes, extent)."""
        geometry = slicer.vtkOrientedImageData()
        ijkToRas = vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(ijkToRas)
        geometry.SetImageToWorldMatrix(ijkToRas)
        geometry.SetExtent(referenceVolume.GetImageData().GetExtent())
        return geometry

    @classmethod
    def segmentArray(cls, segmentationNode, segmentId: str, referenceVolume):
        """A segment as a uint8 numpy mask (k, j, i) on the reference volume's grid, a copy.

        Read from the segmentation's binary labelmaps (a layer may hold several segments, so the
        segment is picked by its own label) with no node added to the scene:
        slicer.util.arrayFromSegmentBinaryLabelmap goes through a temporary labelmap volume whose
        display node stays in the scene, one more at every volume update."""
        from vtk.util import numpy_support

        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        labelmap = slicer.vtkOrientedImageData()
        if not segmentationNode.GenerateMergedLabelmapForAllSegments(
                labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, cls._referenceGeometry(referenceVolume), segmentIds):
            raise RuntimeError(_("The segment {segment} could not be read.").format(segment=segmentId))
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        return (voxels.reshape(labelmap.GetDimensions()[::-1]) > 0).astype("uint8")

    @classmethod
    def setSegmentArray(cls, mask, segmentationNode, segmentId: str, referenceVolume) -> None:
        """Replace a segment's voxels by a numpy mask (k, j, i) on the reference volume's grid, as
        Segment Editor's effects write them (vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment:
        a segment that would overwrite another one of its layer moves to a layer of its own);
        no node is added to the scene, unlike slicer.util.updateSegmentBinaryLabelmapFromArray."""
        from vtk.util import numpy_support

        labelmap = cls._referenceGeometry(referenceVolume)
        voxels = (mask > 0).astype("uint8").ravel()
        labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentId, logic.MODE_REPLACE):
            raise RuntimeError(_("The segment {segment} could not be written.").format(segment=segmentId))

    def classMasks(self, segmentationNode, referenceVolume) -> dict:
        """NCR, ED and ET as numpy masks on the reference volume's grid (None when absent)."""
        from KANTumorSegLib.labels import SEGMENTS

        masks = {}
        for segment in SEGMENTS:
            segmentId = self._segmentId(segmentationNode, segment.id, segment.name)
            masks[segment.id] = self.segmentArray(segmentationNode, segmentId, referenceVolume) if segmentId else None
        if all(mask is None for mask in masks.values()):
            raise ValueError(_("The segmentation has none of the segments NCR, ED and ET."))
        return masks

    def updateRegionSegments(self, segmentationNode, referenceVolume, regionsNode=None):
        """WT and TC computed from the current NCR, ED and ET, in a segmentation of their own
        (``regionsNode``, or a new one): overlapping segments in one node would let an edit of
        WT overwrite the classes (Segment Editor's default), so the classes stay the editable
        truth and the regions are derived from them, again at every volume update."""
        from KANTumorSegLib.slicer_segments import REGION_SEGMENTS, compose_labels, region_masks, region_terminology_entry

        masks = region_masks(compose_labels(self.classMasks(segmentationNode, referenceVolume)))
        if regionsNode is None:
            regionsNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", _("{name} regions (derived)").format(name=segmentationNode.GetName()))
            regionsNode.CreateDefaultDisplayNodes()
            regionsNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segmentation = regionsNode.GetSegmentation()
        for segmentId, name, color in REGION_SEGMENTS:
            if not segmentation.GetSegment(segmentId):
                segmentation.AddEmptySegment(segmentId, name, color)
                segment = segmentation.GetSegment(segmentId)
                segment.SetTag(segment.GetTerminologyEntryTagName(), region_terminology_entry())
            self.setSegmentArray(masks[segmentId], regionsNode, segmentId, referenceVolume)
        return regionsNode

    def updateVolumeTable(self, segmentationNode, referenceVolume, tableNode=None, notes=None):
        """Fill (or create) a table of NCR, ED, ET, WT and TC volumes in mL from the current
        segments, measured by KANTumorSegLib on the reference volume's grid. ``notes`` (the run's
        ResultNotes) adds a Range column: the model's range for every region the edits left as
        the command measured it."""
        from KANTumorSegLib.slicer_results import current_ranges, range_text
        from KANTumorSegLib.slicer_segments import TABLE_COLUMNS, volume_rows

        if segmentationNode is None or referenceVolume is None:
            raise ValueError(_("Select the output segmentation and the T1ce volume first."))
        volumes = volume_rows(self.classMasks(segmentationNode, referenceVolume), referenceVolume.GetSpacing())
        ranges = current_ranges(notes, volumes["regions"]) if notes is not None else {}
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("{name} volumes").format(name=segmentationNode.GetName()))
        region, description, volume, voxels = vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkIntArray()
        columns = [region, description, volume, voxels]
        if notes is not None and notes.ranges:
            columns.append(vtk.vtkStringArray())
        for array, name in zip(columns, TABLE_COLUMNS):
            array.SetName(name)
        for row in volumes["regions"]:
            region.InsertNextValue(row["name"])
            description.InsertNextValue(row["description"])
            volume.InsertNextValue(row["volume_ml"])
            voxels.InsertNextValue(row["voxels"])
            if len(columns) > 4:
                columns[4].InsertNextValue(range_text(ranges.get(row["name"])))
        # Filled as SegmentStatistics' exportToTable fills its table.
        wasModifying = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        for array in columns:
            tableNode.AddColumn(array)
        tableNode.SetColumnUnitLabel("Volume", "mL")
        if len(columns) > 4:
            tableNode.SetColumnUnitLabel(TABLE_COLUMNS[4], "mL")
        tableNode.EndModify(wasModifying)
        return tableNode

    def followEdits(self, segmentationNode, callback) -> None:
        """Call ``callback()`` EDIT_DEBOUNCE_MS after the last edit of the segmentation's
        segments (a paint stroke fires many events; one update follows the burst). Following
        another segmentation, or None, stops following the previous one."""
        self.stopFollowingEdits()
        if segmentationNode is None:
            return
        segmentation = segmentationNode.GetSegmentation()
        state = {"segmentation": segmentation, "generation": 0, "tags": []}

        def onEdit(caller=None, event=None) -> None:
            state["generation"] += 1
            generation = state["generation"]
            qt.QTimer.singleShot(self.EDIT_DEBOUNCE_MS,
                                 lambda: self._followed is state and state["generation"] == generation and callback())

        # Painting fires SourceRepresentationModified; clearing a segment (Segment Editor's Clear,
        # vtkSlicerSegmentationsModuleLogic.ClearSegment) fires only SegmentModified.
        for event in (slicer.vtkSegmentation.SourceRepresentationModified, slicer.vtkSegmentation.SegmentModified,
                      slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved):
            state["tags"].append(segmentation.AddObserver(event, onEdit))
        self._followed = state

    def stopFollowingEdits(self) -> None:
        if self._followed is not None:
            for tag in self._followed["tags"]:
                self._followed["segmentation"].RemoveObserver(tag)
            self._followed = None

    @staticmethod
    def exportCsv(tableNode, path: str, notes=None) -> None:
        """Write the volume table as CSV, as the command writes its own: region, description, voxels,
        volume_ml, and the range_low_ml, range_high_ml columns when ``notes`` (the run's ResultNotes)
        has ranges, filled for the regions the edits left as the command measured them. Numbers are
        read as numbers: a table cell's text has 6 significant digits (141.7223 mL reads 141.722)."""
        from KANTumorSegLib.measurements import volumes_csv
        from KANTumorSegLib.slicer_results import current_ranges
        from KANTumorSegLib.slicer_segments import TABLE_COLUMNS

        table = tableNode.GetTable()
        names, descriptions, volumes, voxels = (table.GetColumnByName(column) for column in TABLE_COLUMNS[:4])
        rows = [{"name": names.GetValue(row), "description": descriptions.GetValue(row),
                 "volume_ml": float(volumes.GetValue(row)), "voxels": int(voxels.GetValue(row))}
                for row in range(tableNode.GetNumberOfRows())]
        if notes is not None and notes.ranges:
            ranges = current_ranges(notes, rows)
            for row in rows:
                row["range_ml"] = ranges.get(row["name"])
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
    """Runs in Slicer (Reload and Test, or ctest) with nothing to set up: segments the synthetic
    phantom KANTumorSegLib makes, through the worker, with the region segments; checks the
    volume table against the command's own volumes and against Segment Statistics; then clears
    a segment as a user would and checks that the regions and volumes follow the edit.
    Testing/test_slicer_logic.py runs it outside Slicer on Slicer's own scene and logic (slicer-core)."""

    PHANTOM_SHAPE = (160, 160, 32)
    """Voxels of the phantom: small enough for a CPU in seconds; the shipped model finds all three classes in it."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SegmentEditMeasure()

    def test_SegmentEditMeasure(self) -> None:
        from pathlib import Path

        from KANTumorSegLib.labels import SEGMENTS
        from KANTumorSegLib.phantom import write_phantom

        self.delayDisplay("Segmenting the synthetic phantom")
        folder = Path(slicer.util.tempDirectory("KANTumorSegTest"))
        paths = write_phantom(folder, "KANTumorSegTest", self.PHANTOM_SHAPE)
        logic = KANTumorSegLogic()
        nodes = logic.loadCase(str(folder))
        self.assertEqual(sorted(nodes), sorted(p for p in paths if p != "seg"))
        task = logic.process(nodes["t1"], nodes["t1ce"], nodes["t2"], nodes["flair"], None, waitForCompletion=True, addRegions=True)
        self.assertEqual(task.status, "completed")
        self.assertIsNotNone(task.worker, "the run did not go through the background worker")

        segmentationNode, regionsNode = task.outputSegmentation, task.regionsSegmentation
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                         [s.name for s in SEGMENTS])
        self.assertEqual(regionsNode.GetSegmentation().GetNumberOfSegments(), 2)
        before = self._table(task.volumeTable)
        self.assertEqual({name: row[1] for name, row in before.items()}, task.notes.voxels)  # the command's own count
        for name in ("NCR", "ED", "ET"):
            self.assertGreater(before[name][0], 0.0, name)
        self.delayDisplay("Comparing with Segment Statistics")
        for node in (segmentationNode, regionsNode):
            for segmentId, volumeMl in self._segmentStatisticsVolumes(node, nodes["t1ce"]).items():
                self.assertAlmostEqual(volumeMl, before[segmentId][0], places=3, msg=segmentId)

        self.delayDisplay("Clearing the enhancing tumour, as Segment Editor's Clear does")
        followed = []
        logic.followEdits(segmentationNode, lambda: followed.append(True))
        slicer.vtkSlicerSegmentationsModuleLogic.ClearSegment(segmentationNode, "ET")
        deadline = time.monotonic() + 10
        while not followed and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(followed, "no volume update followed the edit")
        logic.updateRegionSegments(segmentationNode, nodes["t1ce"], regionsNode)
        logic.updateVolumeTable(segmentationNode, nodes["t1ce"], task.volumeTable, task.notes)
        after = self._table(task.volumeTable)
        self.assertEqual(after["ET"][0], 0.0)
        self.assertAlmostEqual(after["WT"][0], before["WT"][0] - before["ET"][0], places=2)
        self.assertAlmostEqual(self._segmentStatisticsVolumes(regionsNode, nodes["t1ce"])["WT"], after["WT"][0], places=3)
        logic.stopFollowingEdits()
        logic.stopWorker()
        self.delayDisplay("KANTumorSegTest passed")

    @staticmethod
    def _table(tableNode) -> dict:
        """Region -> (volume in mL, voxels) from the volume table."""
        return {tableNode.GetCellText(row, 0): (float(tableNode.GetCellText(row, 2)), int(tableNode.GetCellText(row, 3)))
                for row in range(tableNode.GetNumberOfRows())}

    @staticmethod
    def _segmentStatisticsVolumes(segmentationNode, referenceVolume) -> dict:
        """Segment id -> volume in mL (cm3) as Slicer's Segment Statistics module measures it."""
        import SegmentStatistics

        statisticsLogic = SegmentStatistics.SegmentStatisticsLogic()
        statisticsLogic.getParameterNode().SetParameter("Segmentation", segmentationNode.GetID())
        statisticsLogic.getParameterNode().SetParameter("ScalarVolume", referenceVolume.GetID())
        statisticsLogic.computeStatistics()
        statistics = statisticsLogic.getStatistics()
        return {segmentId: statistics[segmentId, "LabelmapSegmentStatisticsPlugin.volume_cm3"] for segmentId in statistics["SegmentIDs"]}
