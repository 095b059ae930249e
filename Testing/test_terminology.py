"""Every segment KANTumorSeg writes names a terminology entry that 3D Slicer's own terminology
files hold, with the colour those files recommend.

Slicer shows a segment whose context, category or type is missing from its terminology files as
an unknown terminology. The files are read from Testing/slicer_terminology (excerpts of Slicer's
Modules/Loadable/Terminologies/Resources, see its README) or, when SLICER_TERMINOLOGIES_DIR is
set, from that folder of a Slicer checkout or installation. No Slicer runs here: the segments are
those the command writes into its .seg.nrrd (read back with slicerio, as Slicer reads them) and
the terminology strings the module gives the WT and TC segments it adds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from KANTumorSegLib import slicer_segments
from KANTumorSegLib.labels import SEGMENTS

EXCERPTS = Path(__file__).resolve().parent / "slicer_terminology"


def _terminology_folder() -> Path:
    return Path(os.environ.get("SLICER_TERMINOLOGIES_DIR", EXCERPTS))


def _contexts() -> tuple[dict, dict]:
    """(segmentation context name -> its categories, anatomic context name -> its regions)."""
    categories, anatomic = {}, {}
    for path in sorted(_terminology_folder().glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if "SegmentationCategoryTypeContextName" in data:
            categories[data["SegmentationCategoryTypeContextName"]] = data["SegmentationCodes"]["Category"]
        elif "AnatomicContextName" in data:
            anatomic[data["AnatomicContextName"]] = data["AnatomicCodes"]["AnatomicRegion"]
    return categories, anatomic


def _find(entries: list[dict], code: list[str]) -> dict | None:
    scheme, value = code[0], code[1]
    return next((e for e in entries if e["CodingSchemeDesignator"] == scheme and e["CodeValue"] == value), None)


def _check(context: str, category: list[str], type_code: list[str], anatomic_context: str, region: list[str]) -> dict:
    """The type entry of Slicer's file for this terminology; fails naming what Slicer would not find."""
    categories, anatomic = _contexts()
    assert context in categories, f"Slicer has no segmentation context {context!r}"
    found_category = _find(categories[context], category)
    assert found_category is not None, f"{context!r} has no category {category}"
    found_type = _find(found_category["Type"], type_code)
    assert found_type is not None, f"category {category[2]} of {context!r} has no type {type_code}"
    assert found_type["CodeMeaning"] == type_code[2]
    assert anatomic_context in anatomic, f"Slicer has no anatomic context {anatomic_context!r}"
    assert _find(anatomic[anatomic_context], region) is not None, f"{anatomic_context!r} has no region {region}"
    return found_type


def test_the_excerpts_say_why_the_general_anatomy_list_cannot_be_used():
    """The defect of issue 13: SCT 86049000 is not a type of the General Anatomy list."""
    if "SLICER_TERMINOLOGIES_DIR" in os.environ:
        pytest.skip("checks the bundled excerpts")
    with pytest.raises(AssertionError, match="has no type"):
        _check("Segmentation category and type - 3D Slicer General Anatomy list", ["SCT", "49755003", "Morphologically Altered Structure"],
               ["SCT", "86049000", "Neoplasm, Primary"], "Anatomic codes - DICOM master list", ["SCT", "12738006", "Brain"])


def test_every_segment_of_the_written_seg_nrrd_is_in_slicers_terminology(tmp_path):
    import SimpleITK as sitk
    import slicerio

    from KANTumorSegLib.outputs import write_segmentation

    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :3] = [1, 2, 4]
    path = tmp_path / "case.seg.nrrd"
    write_segmentation(path, sitk.GetImageFromArray(labels))
    segments = slicerio.read_segmentation(str(path))["segments"]
    assert [s["id"] for s in segments] == [s.id for s in SEGMENTS]
    for segment in segments:
        term = segment["terminology"]
        found = _check(term["contextName"], term["category"], term["type"], term["anatomicContextName"], term["anatomicRegion"])
        if "recommendedDisplayRGBValue" in found:
            expected = [v / 255 for v in found["recommendedDisplayRGBValue"]]
            np.testing.assert_allclose(segment["color"], expected, atol=1 / 255, err_msg=segment["name"])


def test_the_region_segments_the_module_adds_are_in_slicers_terminology():
    for _, name, color in slicer_segments.REGION_SEGMENTS:
        fields = slicer_segments.region_terminology_entry().split("~")
        assert len(fields) == 7, name
        context, category, type_code, _, anatomic_context, region, _ = fields
        found = _check(context, category.split("^"), type_code.split("^"), anatomic_context, region.split("^"))
        assert "recommendedDisplayRGBValue" not in found or list(color) == [v / 255 for v in found["recommendedDisplayRGBValue"]]


# ----------------------------------------------------------------------------- Slicer's own terminology logic


def _slicer_type(terminologies, entry_string: str):
    """The type of a terminology entry string as Slicer's Terminologies logic finds it among its
    loaded files (in the entry's own context and category), with its region checked; None when
    Slicer would show the segment as an unknown terminology."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    assert terminologies.DeserializeTerminologyEntry(entry_string, entry), entry_string
    context, category, wanted = entry.GetTerminologyContextName(), entry.GetCategoryObject(), entry.GetTypeObject()
    region_context, region = entry.GetRegionContextName(), entry.GetRegionObject()
    regions = [slicer.vtkSlicerTerminologyType() for _ in range(terminologies.GetNumberOfRegionsInRegionContext(region_context))]
    for index, found in enumerate(regions):
        terminologies.GetNthRegionInRegionContext(region_context, index, found)
    if not any(found.GetCodeValue() == region.GetCodeValue() for found in regions):
        return None
    for index in range(terminologies.GetNumberOfTypesInTerminologyCategory(context, category)):
        found = slicer.vtkSlicerTerminologyType()
        terminologies.GetNthTypeInTerminologyCategory(context, category, index, found)
        if (found.GetCodingSchemeDesignator(), found.GetCodeValue()) == (wanted.GetCodingSchemeDesignator(), wanted.GetCodeValue()):
            return found
    return None


def test_slicers_terminology_logic_finds_every_segment_the_module_shows(tmp_path):
    """The .seg.nrrd read by Slicer's own segmentation storage node (slicer-core), its segments'
    terminology resolved by Slicer's Terminologies logic with the terminology files loaded, and
    the entry of the WT and TC segments: every type is found, with the recommended colour."""
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e '.[dev]' installs it)")
    import SimpleITK as sitk
    from slicer_harness import SlicerHarness

    from KANTumorSegLib.outputs import write_segmentation

    if "SLICER_TERMINOLOGIES_DIR" in os.environ:
        pytest.skip("the harness loads the bundled excerpts")
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :3] = [1, 2, 4]
    path = tmp_path / "case.seg.nrrd"
    write_segmentation(path, sitk.GetImageFromArray(labels))
    harness = SlicerHarness(tmp_path)
    terminologies = harness.logics["Terminologies"]
    node = harness.new_segmentation("case")
    storage = harness.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == [s.id for s in SEGMENTS]
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        found = _slicer_type(terminologies, segment.GetTerminology())
        assert found is not None, f"Slicer does not find the terminology of {segment.GetName()}: {segment.GetTerminology()}"
        expected = SEGMENTS[index]
        if expected.type_code[1] != "86049000":  # Neoplasm, Primary has no recommended colour
            np.testing.assert_allclose(segment.GetColor(), [v / 255 for v in found.GetRecommendedDisplayRGBValue()], atol=1 / 255)
    assert _slicer_type(terminologies, slicer_segments.region_terminology_entry()) is not None
    general = slicer_segments.region_terminology_entry().replace(
        "DICOM master list~", "3D Slicer General Anatomy list~", 1)
    assert _slicer_type(terminologies, general) is None, "the General Anatomy list has no neoplasm type (issue 13)"
