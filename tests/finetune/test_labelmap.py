"""Label-map parsing, validation and the shipped chest11 map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tcsmae.errors import UserError
from tcsmae.finetune.labelmap import LabelMap, load_label_map


def _write(tmp_path, doc, name="map.json"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


def test_ids_to_classes_and_channels(tmp_path):
    m = load_label_map(_write(tmp_path, {"classes": {"liver": [5], "lung": [10, 11, 12, 13, 14]},
                                         "groups": {"organs": ["liver", "lung"]}}))
    assert m.class_names == ["liver", "lung"] and not m.binary and m.out_channels == 3
    labels = np.array([[0, 5, 10, 14], [3, 200, 11, 5]], np.uint8)
    np.testing.assert_array_equal(m.to_classes(labels), [[0, 1, 2, 2], [0, 0, 2, 1]])
    assert m.to_classes(labels).dtype == np.int64
    assert m.groups == {"organs": ("liver", "lung")}


def test_binary_and_default_maps(tmp_path):
    m = load_label_map(_write(tmp_path, {"classes": {"lesion": [1]}}))
    assert m.binary and m.out_channels == 1
    d = load_label_map(None)
    assert d.binary and d.class_names == ["foreground"]
    np.testing.assert_array_equal(d.to_classes(np.array([0, 1, 7, 300])), [0, 1, 1, 1])


@pytest.mark.parametrize("doc, words", [
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"groups": {}}, "'classes' must be"),
    ({"classes": {}}, "'classes' is empty"),
    ({"classes": {"liver": 5}}, "list of ids"),
    ({"classes": {"liver": []}}, "lists no label ids"),
    ({"classes": {"liver": [0]}}, "positive integers"),
    ({"classes": {"liver": [-3]}}, "positive integers"),
    ({"classes": {"liver": ["5"]}}, "positive integers"),
    ({"classes": {"liver": [5], "spleen": [1, 5]}}, "id 5 is in both 'liver' and 'spleen'"),
    ({"classes": {"background": [1]}}, "'background'"),
    ({"classes": {"liver": [5]}, "groups": {"g": ["lung"]}}, "names class 'lung'"),
    ({"classes": {"liver": [5]}, "groups": {"g": []}}, "no member classes"),
    ({"classes": {"liver": [5]}, "grups": {}}, "unknown keys ['grups']"),
])
def test_validation_names_file_and_problem(tmp_path, doc, words):
    p = _write(tmp_path, doc)
    with pytest.raises(UserError) as err:
        load_label_map(p)
    assert words in str(err.value) and str(p) in str(err.value)


def test_missing_file_and_negative_labels(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_label_map(tmp_path / "nope.json")
    m = LabelMap(classes={"a": (1,)})
    with pytest.raises(UserError, match="negative id"):
        m.to_classes(np.array([0, -1]))


def test_chest11_has_the_eleven_classes_with_right_ids(shared_data):
    names = {int(k): v for k, v in json.loads((shared_data / "totalsegmentator-labels.json").read_text()).items()}
    m = load_label_map("chest11")
    assert len(m.classes) == 11 and m.out_channels == 12
    by_name = {v: k for k, v in names.items()}
    expected = {
        "esophagus": [15], "trachea": [16], "heart": [51], "scapula": [71, 72],
        "lung_upper_lobe_left": [10], "lung_lower_lobe_left": [11],
        "lung_upper_lobe_right": [12], "lung_middle_lobe_right": [13], "lung_lower_lobe_right": [14],
        "vertebrae": sorted(k for k, v in names.items() if v.startswith("vertebrae_")),
        "ribs": sorted(k for k, v in names.items() if v.startswith("rib_")),
    }
    assert {k: sorted(v) for k, v in m.classes.items()} == expected
    assert len(expected["vertebrae"]) == 25 and len(expected["ribs"]) == 24
    for name in ("esophagus", "trachea", "heart", "scapula_left", "scapula_right"):
        assert by_name[name] in [i for ids in m.classes.values() for i in ids]
    assert set(m.groups) == {"tubular", "left lung", "right lung", "heart", "bones"}
    assert set(m.groups["tubular"]) == {"esophagus", "trachea"}
    assert set(m.groups["left lung"]) == {"lung_upper_lobe_left", "lung_lower_lobe_left"}
    assert len(m.groups["right lung"]) == 3
    assert set(m.groups["bones"]) == {"vertebrae", "ribs", "scapula"}
    assert "11 classes" in m.note and "16" in m.note


def test_phantom_maps_match_phantom_label_ids():
    from tcsmae.phantom.anatomy import LABEL_IDS

    m = load_label_map("phantom")
    for cname, ids in m.classes.items():
        assert ids == (LABEL_IDS[cname],), cname
    assert set(m.groups["lesions"]) == {"ground_glass_lesion", "mediastinal_mass"}
    lesion = load_label_map("phantom-lesion")
    assert lesion.binary and lesion.classes == {"ground_glass_lesion": (LABEL_IDS["ground_glass_lesion"],)}


def test_map_checked_against_the_ids_a_store_holds():
    from tcsmae.finetune.labelmap import check_against_ids, load_label_map

    chest = load_label_map("chest11")
    with pytest.raises(UserError, match="none of the label ids"):
        check_against_ids(chest, {0, 1, 4, 7}, "phantom.zarr")          # phantom ids, wrong map
    msgs = check_against_ids(chest, {0, 10, 11, 51}, "real.zarr")      # lobes and heart only
    assert len(msgs) == 1 and "trachea" in msgs[0] and "heart" not in msgs[0]
    assert check_against_ids(load_label_map("phantom"), set(range(11)), "ph.zarr") == []
