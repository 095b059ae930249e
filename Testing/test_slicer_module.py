"""The 3D Slicer module and its packaging, tested without Slicer.

Slicer cannot run here, so the module file is checked statically (it parses, imports only
Slicer/Qt/VTK and the standard library at file scope, uses only widgets its .ui defines),
the CMake lists are checked against the files they must ship, and the pure parts in
the KANTumorSegLib.slicer_* modules are run for real: the exact command line the Logic builds is
launched with this machine's Python (standing in for PythonSlicer) on a real BraTS case,
and cancelling stops a real process tree. The Slicer side (the Logic and KANTumorSegTest)
runs on Slicer's own scene and logic in Testing/test_slicer_logic.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import processes
import pytest

from KANTumorSegLib import slicer_command, slicer_inputs, slicer_process, slicer_requirements, slicer_results, slicer_segments
from KANTumorSegLib.labels import SEGMENTS, region_mask
from KANTumorSegLib.measurements import VOLUME_ROWS, tumour_volumes

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "KANTumorSeg" / "KANTumorSeg.py"
UI = REPO / "KANTumorSeg" / "Resources" / "UI" / "KANTumorSeg.ui"
ICON = REPO / "KANTumorSeg" / "Resources" / "Icons" / "KANTumorSeg.png"
MODULE_CMAKE = REPO / "KANTumorSeg" / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
SLICER_FILE_SCOPE = {"slicer", "qt", "ctk", "vtk"}


# ----------------------------------------------------------------------------- the module file


def _module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(), filename=str(MODULE))


def test_module_imports_only_slicer_and_stdlib_at_file_scope():
    tree = _module_tree()
    roots = []
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            roots += [alias.name.split(".")[0] for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            assert statement.level == 0, "relative imports do not work in a scripted module"
            roots.append(statement.module.split(".")[0])
    foreign = sorted(r for r in set(roots) if r not in SLICER_FILE_SCOPE and r not in sys.stdlib_module_names)
    assert not foreign, f"file-scope imports other than Slicer/Qt/VTK/stdlib: {foreign}"
    assert {"slicer", "qt", "vtk"} <= set(roots)


def test_module_runs_no_code_at_import():
    """Only the docstring, imports, constants, decorated classes and functions at file scope."""
    allowed = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)
    for statement in _module_tree().body:
        if isinstance(statement, ast.Expr):
            assert isinstance(statement.value, ast.Constant), f"line {statement.lineno}: a call at import"
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            for node in ast.walk(statement.value):
                assert not isinstance(node, ast.Call), f"line {statement.lineno}: a call at import"
        else:
            assert isinstance(statement, allowed), f"line {statement.lineno}: {type(statement).__name__} at file scope"


def test_module_classes_follow_the_scripted_module_template():
    classes = {node.name: node for node in _module_tree().body if isinstance(node, ast.ClassDef)}
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in classes.items()}
    assert bases["KANTumorSeg"] == ["ScriptedLoadableModule"]
    assert bases["KANTumorSegWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["KANTumorSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["KANTumorSegTest"] == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in classes["KANTumorSegParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    process = next(f for f in classes["KANTumorSegLogic"].body if isinstance(f, ast.FunctionDef) and f.name == "process")
    arguments = [a.arg for a in process.args.args]
    assert arguments[:9] == ["self", "t1", "t1ce", "t2", "flair", "outputSegmentation", "device", "waitForCompletion",
                             "progressCallback"]
    defaults = [ast.literal_eval(d) for d in process.args.defaults[:3]]
    assert defaults == ["auto", False, None]


def test_module_never_pip_installs_torch_and_keeps_settings_under_its_prefix():
    text = MODULE.read_text()
    for call in re.findall(r"pip_install\(([^)]*)\)", text):
        assert "torch" not in call
    assert "installTorch(askConfirmation=True" in text
    assert re.search(r'SETTINGS_PREFIX = "KANTumorSeg/"', text)
    keys = re.findall(r"(?:settings|QSettings\(\))\.(?:value|setValue)\(([^,]+),", text)
    assert keys and all(key.startswith("SETTINGS_PREFIX + ") for key in keys), keys
    ui_keys = [p.find("string").text for w in _ui_widgets().values() for p in w.findall("property")
               if p.get("name") == "settingKey"]
    assert ui_keys and all(key.startswith("KANTumorSeg/") for key in ui_keys), ui_keys


def _ui_widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_every_ui_name_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    defined = set(_ui_widgets())
    assert used, "the module uses no widget of its .ui?"
    assert used <= defined, f"used but not in {UI.name}: {sorted(used - defined)}"


def _parameter_fields() -> dict[str, str]:
    node = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "KANTumorSegParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}


def test_ui_parameter_bindings_name_parameters_of_a_type_their_widget_can_show():
    """connectGui binds widgets by their SlicerParameterName; the connector depends on the
    widget class (parameterNodeWrapper/guiConnectors.py): node combo box <-> MRML node,
    QComboBox <-> Choice-annotated str, QCheckBox <-> bool."""
    fields = _parameter_fields()
    compatible = {"qMRMLNodeComboBox": r"^vtkMRML\w+Node$", "QComboBox": r"^Annotated\[str, Choice\(", "QCheckBox": r"^bool$"}
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = (widget.get("class"), prop.find("string").text)
    assert {p for _, p in bound.values()} == {"t1Volume", "t1ceVolume", "t2Volume", "flairVolume", "outputSegmentation",
                                              "addRegions", "confidence", "showConfidence", "prepareRaw"}
    for name, (widget_class, parameter) in bound.items():
        assert parameter in fields, f"{name} is bound to unknown parameter {parameter}"
        assert re.search(compatible[widget_class], fields[parameter]), f"{name} ({widget_class}) cannot show {fields[parameter]}"


def test_combo_boxes_bound_by_hand_show_readable_titles_for_every_choice():
    """connectGui would show a Choice's raw values (brats2020); the widget binds device and label
    convention itself, with a title per value, and must offer exactly the parameter's choices."""
    module = MODULE.read_text()
    widget = next(n for n in _module_tree().body if isinstance(n, ast.ClassDef) and n.name == "KANTumorSegWidget")
    choices_node = next(s for s in widget.body if isinstance(s, ast.Assign) and s.targets[0].id == "CHOICES")
    # The titles are _("...") calls: read the values and the literal titles from the source.
    choices = {ast.literal_eval(k): [(ast.literal_eval(pair.elts[0]), ast.literal_eval(pair.elts[1].args[0])) for pair in v.elts]
               for k, v in zip(choices_node.value.keys, choices_node.value.values)}
    for parameter, pairs in choices.items():
        declared = re.search(rf"{parameter}: Annotated\[str, Choice\((\[[^]]*\])\)\]", module).group(1)
        assert [value for value, _ in pairs] == ast.literal_eval(declared)
        assert all(title != value for value, title in pairs), pairs
        assert "SlicerParameterName" not in ElementTree.tostring(_ui_widgets()[f"{parameter}ComboBox"]).decode()
    assert choices["labelConvention"] == [("brats2020", "BraTS 2017-2021: NCR 1, ED 2, ET 4"),
                                          ("brats2023", "BraTS 2023: NCR 1, ED 2, ET 3")]


def test_the_help_and_a_note_say_what_the_inputs_must_be():
    """Issue 13: inputs skull-stripped and co-registered, with Slicer's tools for both, in the
    module's help and in a collapsible note on the panel."""
    help_text = re.search(r'helpText = _\("""(.*?)"""\)', MODULE.read_text(), re.S).group(1)
    note = _ui_widgets()["inputRequirementsLabel"].find("property/string").text
    assert _ui_widgets()["inputRequirementsCollapsibleButton"].get("class") == "ctkCollapsibleButton"
    for text in (help_text, note):
        for words in ("skull-stripped", "co-registered", "General Registration (BRAINS)", "SwissSkullStripper", "HD-BET"):
            assert words in text, (words, text)


def test_the_warnings_banner_is_a_styled_label_hidden_until_a_run_warns():
    banner = _ui_widgets()["warningsLabel"]
    props = {p.get("name"): p for p in banner.findall("property")}
    assert banner.get("class") == "QLabel" and props["wordWrap"].find("bool").text == "true"
    assert "background-color" in props["styleSheet"].find("string").text
    assert "self.ui.warningsLabel.hide()" in MODULE.read_text()


def test_ui_output_selector_offers_a_new_segmentation_by_default():
    selector = _ui_widgets()["outputSegmentationSelector"]
    props = {p.get("name"): p for p in selector.findall("property")}
    assert props["noneDisplay"].find("string").text == "Create new segmentation on Apply"
    assert props["nodeTypes"].find("stringlist/string").text == "vtkMRMLSegmentationNode"
    assert _ui_widgets()["segmentationShow3DButton"].get("class") == "qMRMLSegmentationShow3DButton"


# ----------------------------------------------------------------------------- packaging


def _cmake_text(path: Path) -> str:
    return re.sub(r"(^|\s)#[^\n]*", r"\1", path.read_text())


def test_module_cmake_lists_every_library_file_and_resource():
    text = _cmake_text(MODULE_CMAKE)
    listed = set(re.findall(r"KANTumorSegLib/\w+\.py", text))
    shipped = {f"KANTumorSegLib/{p.name}" for p in (REPO / "KANTumorSegLib").glob("*.py")}
    assert listed == shipped, f"missing {sorted(shipped - listed)}, extra {sorted(listed - shipped)}"
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui",
                     "Resources/Models/kanunet2d_brats.safetensors", "Resources/Models/kanunet2d_brats.json"):
        assert resource in text
    for resource in sorted((REPO / "KANTumorSeg" / "Resources").rglob("*")):
        if resource.is_file():
            relative = resource.relative_to(REPO / "KANTumorSeg").as_posix().replace("KANTumorSeg.", "${MODULE_NAME}.")
            assert relative in text, f"{relative} is not listed in {MODULE_CMAKE}"
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_model_destination_is_where_the_library_looks():
    """The model goes to <scripted modules>/Resources/Models and the package to
    <scripted modules>/KANTumorSegLib; weights.default_model_path() looks at
    <KANTumorSegLib>/../Resources/Models."""
    from KANTumorSegLib.weights import DEFAULT_MODEL_NAME, default_model_path

    text = _cmake_text(MODULE_CMAKE)
    assert "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${model_file}" in text
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${model_dir}" in text
    assert f"Resources/Models/{DEFAULT_MODEL_NAME}" in text
    if "KANTUMORSEG_MODEL" not in os.environ:
        package = REPO / "KANTumorSegLib"
        assert default_model_path() == package.parent / "Resources" / "Models" / DEFAULT_MODEL_NAME


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_extension_builds_and_installs_the_library_beside_its_model(tiny_model, tmp_path):
    """Configure and install the extension's CMake project against a stand-in for Slicer's
    CMake package (Testing/slicer_cmake_standin, which places files as Slicer's macros do),
    with a tiny model standing in for the shipped one; then the installed KANTumorSegLib,
    imported from the scripted-modules folder, must find and verify that model by default."""

    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(TOP_CMAKE, source)
    for folder in ("KANTumorSeg", "KANTumorSegLib"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    models = source / "Resources" / "Models"
    models.mkdir(parents=True)
    shutil.copy(tiny_model, models / "kanunet2d_brats.safetensors")
    shutil.copy(tiny_model.with_suffix(".json"), models / "kanunet2d_brats.json")
    build, install = tmp_path / "build", tmp_path / "install"
    standin = REPO / "Testing" / "slicer_cmake_standin"
    for command in (["cmake", "-S", str(source), "-B", str(build), f"-DSlicer_DIR={standin}"],
                    ["cmake", "--install", str(build), "--prefix", str(install)]):
        result = processes.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert (build / "standin-modules.txt").read_text() == "KANTumorSeg generic_tests=TRUE\n"
    assert (build / "standin-tests.txt").read_text() == "KANTumorSeg.py\n"

    modules = install / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    expected = ["KANTumorSeg.py", "Resources/UI/KANTumorSeg.ui", "Resources/Icons/KANTumorSeg.png", "Resources/KANTumorSegRequirements.txt",
                "Resources/Models/kanunet2d_brats.safetensors", "Resources/Models/kanunet2d_brats.json"]
    expected += [f"KANTumorSegLib/{p.name}" for p in (REPO / "KANTumorSegLib").glob("*.py")]
    for tree in (modules, build / "lib" / "Slicer-5.8" / "qt-scripted-modules"):
        missing = [name for name in expected if not (tree / name).is_file()]
        assert not missing, f"missing from {tree}: {missing}"

    probe = ("import json, KANTumorSegLib; from KANTumorSegLib.weights import default_model_path, read_card; "
             "print(json.dumps([KANTumorSegLib.__file__, str(default_model_path()), read_card(default_model_path())['name']]))")
    environment = {k: v for k, v in os.environ.items() if k != "KANTUMORSEG_MODEL"}
    environment["PYTHONPATH"] = str(modules)
    result = processes.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stderr
    package_file, model_path, name = json.loads(result.stdout)
    assert Path(package_file) == modules / "KANTumorSegLib" / "__init__.py"
    assert Path(model_path) == modules / "Resources" / "Models" / "kanunet2d_brats.safetensors"
    assert name == "tiny-random"


def test_top_level_cmake_declares_the_extension():
    text = _cmake_text(TOP_CMAKE)
    assert re.search(r"^project\(KANTumorSeg\)", text, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(KANTumorSeg)",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)


def test_icon_is_a_128_pixel_png_and_license_is_apache():
    header = ICON.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(header[16:20], "big") == 128 and int.from_bytes(header[20:24], "big") == 128
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


def test_the_slicer_modules_import_no_numerical_package():
    modules = ", ".join(f"KANTumorSegLib.{p.stem}" for p in (REPO / "KANTumorSegLib").glob("slicer_*.py"))
    probe = f"import sys, {modules}; print(sorted(m for m in ('numpy', 'torch', 'SimpleITK') if m in sys.modules))"
    result = processes.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- volumes by name


@pytest.mark.parametrize(("name", "modality"), [
    ("BraTS20_Training_001_t1", "t1"),
    ("BraTS20_Training_001_t1ce", "t1ce"),
    ("BraTS20_Training_001_t2", "t2"),
    ("BraTS20_Training_001_flair", "flair"),
    ("BraTS-GLI-00001-000-t1n", "t1"),
    ("BraTS-GLI-00001-000-t1c", "t1ce"),
    ("BraTS-GLI-00001-000-t2w", "t2"),
    ("BraTS-GLI-00001-000-t2f", "flair"),
    ("T1CE", "t1ce"),
    ("Flair", "flair"),
    ("case 7 T2W", "t2"),
    ("BraTS20_Training_001_t1_1", "t1"),  # Slicer's name for a second copy of a volume
    ("BraTS20_Training_001_seg", None),
    ("t1_t2_difference", None),  # names two modalities: ambiguous
    ("MRHead", None),
])
def test_modality_of_name(name, modality):
    assert slicer_inputs.modality_of_name(name) == modality


def test_match_assigns_the_volumes_of_a_real_case_folder(brats_case_001):
    # Slicer names a loaded volume after its file without the image extension.
    names = sorted(p.name.removesuffix(".nii.gz") for p in brats_case_001.iterdir())
    match = slicer_inputs.match_volume_names(names)
    assert {m: names[i] for m, i in match.assigned.items()} == {
        m: f"BraTS20_Training_001_{m}" for m in ("t1", "t1ce", "t2", "flair")}
    assert match.ambiguous == {}


def test_match_leaves_ambiguous_modalities_unassigned():
    names = ["a_t1", "b_t1", "a_t1ce", "a_t2w", "a_FLAIR", "a_seg"]
    match = slicer_inputs.match_volume_names(names)
    assert match.assigned == {"t1ce": 2, "t2": 3, "flair": 4}
    assert match.ambiguous == {"t1": [0, 1]}


def test_input_problems_name_missing_and_shared_volumes():
    assert slicer_inputs.input_problems({"t1": ("n1", "a"), "t1ce": ("n2", "b"), "t2": ("n3", "c"), "flair": ("n4", "d")}) == ([], [])
    missing, duplicates = slicer_inputs.input_problems({"t1": ("n1", "a"), "t1ce": None, "t2": ("n1", "a"), "flair": ("n4", "d")})
    assert missing == ["t1ce"]
    assert duplicates == [("t1", "t2", "a")]


def test_case_name_drops_the_modality_ending_and_unsafe_characters():
    assert slicer_inputs.case_name_for("BraTS20_Training_001_t1ce") == "BraTS20_Training_001"
    assert slicer_inputs.case_name_for("BraTS-GLI-00001-000-t1c") == "BraTS-GLI-00001-000"
    assert slicer_inputs.case_name_for("patient 7/a: T1ce") == "patient_7_a"
    assert slicer_inputs.case_name_for("t1ce") == "t1ce"


# ----------------------------------------------------------------------------- the command


def _command(tmp: Path, inputs: dict[str, Path], model: Path, device: str = "cpu") -> list[str]:
    return slicer_command.build_command(sys.executable, inputs, tmp / "output", "BraTS20_Training_001", device, model, "brats2020")


def test_build_command_is_exactly_the_documented_line(tmp_path):
    inputs = {m: tmp_path / f"{m}.nrrd" for m in ("flair", "t2", "t1ce", "t1")}
    command = _command(tmp_path, inputs, tmp_path / "m.safetensors", "auto")
    assert command == [
        sys.executable, "-m", "KANTumorSegLib", "segment",
        "--t1", str(tmp_path / "t1.nrrd"), "--t1ce", str(tmp_path / "t1ce.nrrd"),
        "--t2", str(tmp_path / "t2.nrrd"), "--flair", str(tmp_path / "flair.nrrd"),
        "-o", str(tmp_path / "output"), "--case-name", "BraTS20_Training_001", "--device", "auto",
        "--model", str(tmp_path / "m.safetensors"), "--labels", "brats2020", "--progress", "jsonl", "--overwrite"]
    # What the module's worker receives: the same line after its "<python> -m KANTumorSegLib" head.
    assert slicer_command.worker_arguments(command) == command[3:] and command[3] == "segment"
    with pytest.raises(ValueError, match="not a"):
        slicer_command.worker_arguments(["python", "-m", "other", "segment"])


def test_the_command_parser_accepts_every_choice_the_module_offers(tmp_path):
    from KANTumorSegLib.cli import build_parser
    from KANTumorSegLib.inference import DEVICES
    from KANTumorSegLib.labels import LABEL_CONVENTIONS

    choices = re.search(r'device: Annotated\[str, Choice\((\[[^]]*\])\)\]', MODULE.read_text()).group(1)
    assert set(ast.literal_eval(choices)) == set(DEVICES)
    labels = re.search(r'labelConvention: Annotated\[str, Choice\((\[[^]]*\])\)\]', MODULE.read_text()).group(1)
    assert set(ast.literal_eval(labels)) == set(LABEL_CONVENTIONS)
    inputs = {m: tmp_path / f"{m}.nrrd" for m in ("t1", "t1ce", "t2", "flair")}
    for device in DEVICES:
        for convention in LABEL_CONVENTIONS:
            command = slicer_command.build_command("py", inputs, tmp_path, "c", device, tmp_path / "m.safetensors", convention)
            args = build_parser().parse_args(command[3:])
            assert (args.device, args.labels, args.progress, args.overwrite) == (device, convention, "jsonl", True)
            assert args.t1ce == inputs["t1ce"] and args.case_name == "c"


def test_child_environment_puts_this_package_first():
    parent = slicer_command.library_parent()
    assert (parent / "KANTumorSegLib" / "__main__.py").is_file()
    updates = slicer_command.child_environment({"PYTHONPATH": "/elsewhere"}, parent)
    assert updates["PYTHONPATH"] == f"{parent}{os.pathsep}/elsewhere"
    assert slicer_command.child_environment({}, parent)["PYTHONPATH"] == str(parent)
    assert updates["PYTHONUNBUFFERED"] == "1"


def _export_like_slicer(case_dir: Path, out: Path) -> dict[str, Path]:
    """What the Logic hands the command: each volume exported by Slicer as <modality>.nrrd."""
    import SimpleITK as sitk

    out.mkdir()
    files = {}
    for modality in ("t1", "t1ce", "t2", "flair"):
        files[modality] = out / f"{modality}.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(case_dir / f"crop_{modality}.nii.gz")), str(files[modality]))
    return files


def test_the_logic_command_runs_for_real_and_writes_an_editable_segmentation(cropped_case, mixed_model, tmp_path, ends):
    """The exact command the Logic launches, with this machine's Python for PythonSlicer,
    on a real BraTS case (30 axial slices of BraTS20_Training_001) and a random-weights
    base-width-4 model: its progress lines, final line and .seg.nrrd as Slicer reads them."""
    import SimpleITK as sitk
    import slicerio

    inputs = _export_like_slicer(cropped_case, tmp_path / "inputs")
    command = _command(tmp_path, inputs, mixed_model)
    environment = {**os.environ, **slicer_command.child_environment(os.environ)}
    process = ends(slicer_process.launch(command, environment, slicer_command.library_parent()))
    parsed = [slicer_results.parse_output_line(line) for line in process.stdout]
    assert process.wait(timeout=300) == 0, [p.text for p in parsed]

    progress = [p for p in parsed if p.kind == "progress"]
    assert [p.stage for p in progress][0] == "read"
    assert {p.stage for p in progress} == set(slicer_results.STAGE_SPANS)
    fractions = [slicer_results.overall_fraction(p.stage, p.done, p.total) for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert not [p for p in parsed if p.kind == "error"]
    assert parsed[-1].kind == "done"
    files = parsed[-1].files
    assert {Path(f).parent for f in files.values()} == {tmp_path / "output"}
    assert Path(files["segmentation"]).name == "BraTS20_Training_001.seg.nrrd"

    segmentation = slicerio.read_segmentation(files["segmentation"])
    assert [s["name"] for s in segmentation["segments"]] == [s.name for s in SEGMENTS]
    assert [s["id"] for s in segmentation["segments"]] == ["NCR", "ED", "ET"]
    reference = sitk.ReadImage(str(inputs["t1ce"]))
    assert segmentation["voxels"].shape == reference.GetSize()
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"])
    direction = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    np.testing.assert_allclose(ijk_to_lps[:3, :3], direction, atol=1e-4)
    np.testing.assert_allclose(ijk_to_lps[:3, 3], reference.GetOrigin(), atol=1e-3)

    # "Update volumes" measures the segment masks with the library: on the untouched result
    # it must give the command's own table.
    voxels = segmentation["voxels"]
    masks = {s["id"]: (voxels == s["labelValue"]) for s in segmentation["segments"]}
    assert sum(int(m.sum()) for m in masks.values()) > 0, "the model predicted no tumour at all"
    written = json.loads(Path(files["volumes_json"]).read_text())["regions"]
    measured = slicer_segments.volume_rows(masks, reference.GetSpacing())["regions"]
    assert [(r["name"], r["voxels"]) for r in measured] == [(r["name"], r["voxels"]) for r in written]


def test_an_error_reaches_the_module_as_the_commands_own_sentence(cropped_case, tiny_model, tmp_path, ends):
    inputs = _export_like_slicer(cropped_case, tmp_path / "inputs")
    inputs["t2"] = tmp_path / "inputs" / "missing_t2.nrrd"
    process = ends(slicer_process.launch(_command(tmp_path, inputs, tiny_model), os.environ, slicer_command.library_parent()))
    parsed = [slicer_results.parse_output_line(line) for line in process.stdout]
    code = process.wait(timeout=120)
    errors = [p.text for p in parsed if p.kind == "error"]
    assert code == 2
    message = slicer_results.failure_message(errors, code)
    assert message == errors[-1] and "missing_t2.nrrd" in message
    assert not (tmp_path / "output").exists() or not any((tmp_path / "output").iterdir())


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX; Windows uses taskkill /T")
def test_cancel_stops_the_launcher_and_the_python_it_started(cropped_case, tiny_model, tmp_path, ends):
    """PythonSlicer is a launcher that starts the real Python: a stand-in launcher starts the
    command as its child and prints the child's pid; cancelling must stop both and leave
    no output."""
    inputs = _export_like_slicer(cropped_case, tmp_path / "inputs")
    launcher = "import subprocess, sys; p = subprocess.Popen(sys.argv[1:]); print(p.pid, flush=True); sys.exit(p.wait())"
    command = [sys.executable, "-c", launcher, *_command(tmp_path, inputs, tiny_model)]
    process = ends(slicer_process.launch(command, os.environ, slicer_command.library_parent()))
    child = int(process.stdout.readline())
    for line in process.stdout:
        if slicer_results.parse_output_line(line).kind == "progress":
            break
    slicer_process.terminate_tree(process)
    assert process.returncode != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the command kept running after cancel"
    # No partial output: nothing, or (on a loaded machine the tiny model can finish before its
    # first progress line is read here) the whole set the command commits at once; never a
    # staging folder.
    outputs = tmp_path / "output"
    written = sorted(p.name for p in outputs.iterdir()) if outputs.exists() else []
    assert written in ([], sorted(f"BraTS20_Training_001{s}" for s in (".seg.nrrd", "_overview.png", "_seg.nii.gz",
                                                                       "_volumes.csv", "_volumes.json"))), written


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# ----------------------------------------------------------------------------- output lines


def test_parse_output_line_reads_what_the_command_prints(capsys):
    from KANTumorSegLib.progress import jsonl_progress

    jsonl_progress("segment", 12, 90)
    line = capsys.readouterr().out
    parsed = slicer_results.parse_output_line(line)
    assert (parsed.kind, parsed.stage, parsed.done, parsed.total) == ("progress", "segment", 12, 90)
    done = slicer_results.parse_output_line('{"stage": "done", "case": "c", "device": "cpu", "files": {"segmentation": "/o/c.seg.nrrd"}}\n')
    assert done.kind == "done" and done.files == {"segmentation": "/o/c.seg.nrrd"}
    error = slicer_results.parse_output_line("kantumorseg: error: The T2 file /x does not exist.\n")
    assert (error.kind, error.text) == ("error", "The T2 file /x does not exist.")
    internal = slicer_results.parse_output_line("kantumorseg: internal error: ValueError: bad; no output was written.")
    assert internal.kind == "error" and internal.text.startswith("Internal error: ValueError")
    warning = slicer_results.parse_output_line("kantumorseg: warning: T2 resampled onto the T1ce grid\n")
    assert (warning.kind, warning.text) == ("warning", "T2 resampled onto the T1ce grid")
    assert slicer_results.parse_output_line("{not json").kind == "text"
    assert slicer_results.parse_output_line('{"stage": "segment"}').kind == "text"


def test_overall_fraction_spans_the_run_in_order():
    assert slicer_results.overall_fraction("read", 0, 4) == 0.0
    assert slicer_results.overall_fraction("write", 4, 4) == 1.0
    assert slicer_results.overall_fraction("unknown", 1, 2) is None
    steps = [("read", 4, 4), ("preprocess", 1, 10), ("preprocess", 10, 10), ("segment", 5, 50), ("segment", 50, 50), ("write", 2, 4)]
    values = [slicer_results.overall_fraction(*s) for s in steps]
    assert values == sorted(values) and all(0 <= v <= 1 for v in values)


def test_a_prepared_run_spans_the_bar_in_its_stages_order_and_each_stage_has_a_title():
    """Issue 18: with --prepare the command's stages (prepare.PREPARE_STAGES, then the plain run's
    last three) share the bar end to end, one after the other; without it, as before."""
    from KANTumorSegLib.prepare import PREPARE_STAGES

    for spans in (slicer_results.STAGE_SPANS, slicer_results.PREPARE_STAGE_SPANS):
        bounds = list(spans.values())
        assert bounds[0][0] == 0.0 and bounds[-1][1] == 1.0
        assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))
        assert all(start < end for start, end in bounds)
    assert list(slicer_results.PREPARE_STAGE_SPANS) == [*PREPARE_STAGES, "preprocess", "segment", "write"]
    assert slicer_results.overall_fraction("register T2", 2, 4, prepare=True) == pytest.approx(0.23)
    assert slicer_results.overall_fraction("register T2", 2, 4) is None
    assert slicer_results.overall_fraction("segment", 0, 9, prepare=True) == slicer_results.PREPARE_STAGE_SPANS["segment"][0]
    # The panel names every stage in its bar.
    source = MODULE.read_text()
    assert all(f'"{stage}": _(' in source for stage in {*slicer_results.STAGE_SPANS, *slicer_results.PREPARE_STAGE_SPANS})


def test_failure_message_without_an_error_line():
    assert "exit code 1" in slicer_results.failure_message([], 1)
    assert "stopped" in slicer_results.failure_message([], 143)
    assert slicer_results.failure_message(["first.", "last."], 2) == "last."


# ----------------------------------------------------------------------------- volume table


def test_volume_rows_of_the_expert_segmentation_equal_the_library_measure(brats_case_001):
    import SimpleITK as sitk

    seg = sitk.ReadImage(str(brats_case_001 / "BraTS20_Training_001_seg.nii.gz"))
    labels = sitk.GetArrayFromImage(seg)
    masks = {s.id: labels == s.label for s in SEGMENTS}
    rows = slicer_segments.volume_rows(masks, seg.GetSpacing())
    assert rows == tumour_volumes(labels, seg.GetSpacing())
    assert [r["name"] for r in rows["regions"]] == [name for name, _ in VOLUME_ROWS]
    assert all(r["volume_ml"] > 0 for r in rows["regions"])
    regions = slicer_segments.region_masks(labels)
    for segment_id in ("WT", "TC"):
        np.testing.assert_array_equal(regions[segment_id], region_mask(labels, segment_id))


def test_compose_labels_lets_inner_classes_win_where_edits_overlap():
    ed = np.zeros((4, 4), bool)
    ncr = np.zeros((4, 4), bool)
    et = np.zeros((4, 4), bool)
    ed[:, :3] = True
    ncr[:, 1:] = True
    et[0, :] = True
    labels = slicer_segments.compose_labels({"NCR": ncr, "ED": ed, "ET": et})
    assert labels[1].tolist() == [2, 1, 1, 1]
    assert labels[0].tolist() == [4, 4, 4, 4]
    only_ed = slicer_segments.compose_labels({"NCR": None, "ED": ed, "ET": None})
    assert set(np.unique(only_ed)) == {0, 2}


def test_terminology_entry_has_the_seven_fields_slicer_expects():
    entry = slicer_segments.terminology_entry(SEGMENTS[2].type_code)
    fields = entry.split("~")
    assert len(fields) == 7
    assert fields[2] == "SCT^86049000^Neoplasm, Primary"
    assert fields[5] == "SCT^12738006^Brain"


# ----------------------------------------------------------------------------- issue 13 and 14: the pure parts


def test_closed_surfaces_start_off_only_on_large_grids():
    assert slicer_results.show_3d_by_default(240 * 240 * 155)
    assert not slicer_results.show_3d_by_default(512 * 512 * 160)
    text = MODULE.read_text()
    assert "if slicer_results.show_3d_by_default(" in text and "segmentationShow3DButton" in text


def test_confidence_starts_on_only_on_a_cuda_gpu():
    assert slicer_results.confidence_by_default("cuda", None)
    assert slicer_results.confidence_by_default("auto", "cuda")
    assert not slicer_results.confidence_by_default("auto", "cpu")
    assert not slicer_results.confidence_by_default("auto", None)
    assert not slicer_results.confidence_by_default("cpu", "cuda")
    assert not slicer_results.confidence_by_default("mps", "mps")


def test_requirements_compare_versions_without_importing(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\ntorch>=2.1\n\nslicerio >= 1.1  # why\n")
    requirements = slicer_requirements.read_requirements(path)
    assert requirements == [("torch", (2, 1), "torch>=2.1"), ("slicerio", (1, 1), "slicerio >= 1.1")]
    installed = {"torch": "2.4.1+cu121", "slicerio": "1.0.9"}
    assert slicer_requirements.unmet_requirements(requirements, installed.get) == ["slicerio >= 1.1"]
    assert slicer_requirements.unmet_requirements(requirements, {}.get) == ["torch>=2.1", "slicerio >= 1.1"]
    assert slicer_requirements.version_tuple("2.10.0rc1") == (2, 10, 0)
    assert slicer_requirements.installed_version("no-such-distribution-kantumorseg") is None
    path.write_text("torch\n")
    with pytest.raises(ValueError, match="name>=version"):
        slicer_requirements.read_requirements(path)


def test_result_notes_read_warnings_and_ranges_and_tolerate_their_absence(tmp_path):
    written = {"regions": [{"name": "ED", "voxels": 10, "volume_ml": 0.01, "range_ml": [0.008, 0.012]},
                           {"name": "ET", "voxels": 5, "volume_ml": 0.005}],
               "warnings": [{"code": "misaligned", "message": "FLAIR is not aligned with T1ce."}]}
    notes = slicer_results.result_notes(written)
    assert notes.warnings == ["FLAIR is not aligned with T1ce."] and notes.ranges == {"ED": (0.008, 0.012)}
    assert slicer_results.current_ranges(notes, [{"name": "ED", "voxels": 10}, {"name": "ET", "voxels": 5}]) == {"ED": (0.008, 0.012)}
    assert slicer_results.current_ranges(notes, [{"name": "ED", "voxels": 9}]) == {}
    assert slicer_results.range_text((165.21, 180.08)) == "165.2-180.1" and slicer_results.range_text(None) == ""
    empty = slicer_results.result_notes({"regions": [{"name": "ED", "voxels": 10, "volume_ml": 0.01}]})
    assert empty.warnings == [] and empty.ranges == {}
    volumes = tmp_path / "c_volumes.json"
    assert slicer_results.confidence_file({"volumes_json": str(volumes)}) is None
    (tmp_path / "c_confidence.nii.gz").write_bytes(b"")
    assert slicer_results.confidence_file({"volumes_json": str(volumes)}) == tmp_path / "c_confidence.nii.gz"
    assert slicer_results.confidence_file({"confidence": str(volumes)}) is None


def test_build_command_adds_confidence_only_when_asked(tmp_path):
    from KANTumorSegLib.cli import build_parser

    inputs = {m: tmp_path / f"{m}.nrrd" for m in ("t1", "t1ce", "t2", "flair")}
    plain = slicer_command.build_command("py", inputs, tmp_path, "c", "cuda", tmp_path / "m.safetensors", "brats2020")
    with_confidence = slicer_command.build_command("py", inputs, tmp_path, "c", "cuda", tmp_path / "m.safetensors", "brats2020", True)
    assert with_confidence == plain + ["--confidence"]
    try:
        args = build_parser().parse_args(with_confidence[3:])
    except SystemExit:
        pytest.skip("the command has no --confidence yet (issue 14's command side, another engineer's)")
    assert args.confidence is True


def test_the_extensions_index_entry_follows_slicers_catalog_schema():
    """docs/ExtensionsIndex/KANTumorSeg.json against Slicer's catalog-entry schema v1.0.1
    (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required fields, no others,
    their types and enums), and consistent with the top-level CMakeLists."""
    entry = json.loads((REPO / "docs" / "ExtensionsIndex" / "KANTumorSeg.json").read_text())
    properties = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                  "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= set(properties)
    for key, value in entry.items():
        assert isinstance(value, properties[key]), key
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    assert entry["build_dependencies"] == ["PyTorch"]
    cmake = _cmake_text(TOP_CMAKE)
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert f'set(EXTENSION_DEPENDS "{" ".join(entry["build_dependencies"])}")' in cmake
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"#]+)', cmake).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage.rstrip("/")
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]+)"\)', cmake).group(1)
    assert re.search(r"\w \(.+\)", contributors), "contributors as 'Name (Organization)', or say who fills them in"
    readme = (REPO / "README.md").read_text()
    assert "Apache-2.0" in readme


def test_prepare_raw_scans_passes_prepare_and_the_note_points_at_it(tmp_path):
    """Issue 18: the checkbox's parameter reaches the command as --prepare, which the command accepts."""
    from KANTumorSegLib.cli import build_parser

    inputs = {m: tmp_path / f"{m}.nrrd" for m in ("t1", "t1ce", "t2", "flair")}
    plain = slicer_command.build_command("py", inputs, tmp_path, "c", "cpu", tmp_path / "m.safetensors", "brats2020")
    prepared = slicer_command.build_command("py", inputs, tmp_path, "c", "cpu", tmp_path / "m.safetensors", "brats2020",
                                            prepare=True)
    assert prepared == plain + ["--prepare"]
    assert build_parser().parse_args(prepared[3:]).prepare is True
    box = _ui_widgets()["prepareRawCheckBox"]
    assert box.find("property[@name='SlicerParameterName']/string").text == "prepareRaw"
    assert "prepareRaw: bool = False" in MODULE.read_text() and "prepare=p.prepareRaw" in MODULE.read_text()
    help_text = re.search(r'helpText = _\("""(.*?)"""\)', MODULE.read_text(), re.S).group(1)
    for text in (help_text, _ui_widgets()["inputRequirementsLabel"].find("property/string").text):
        assert "Prepare raw scans" in text
