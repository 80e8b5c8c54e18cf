"""Label maps: stored label ids -> training classes -> report groups (`--labels-map`).

A map is JSON: `classes` (name -> stored ids; class i is output channel i, channel 0 the
background), optional `groups` (name -> member classes, scored on the union of their
masks), optional `name` and `note`. Shipped maps in tcsmae/data/ are named instead of a
path: `chest11`, `phantom`, `phantom-lesion`. The file format and the shipped maps:
docs/finetune.md, "Label maps".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tcsmae.errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data"
SHIPPED = {"chest11": "chest11.json", "phantom": "phantom.json", "phantom-lesion": "phantom-lesion.json"}


@dataclass(frozen=True)
class LabelMap:
    """Which stored ids form which class, and which classes form which report group."""

    classes: dict[str, tuple[int, ...]]
    """Class name -> stored label ids (positive ints, each in one class only); order = channel."""
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Group name -> member class names (scored on the union of their masks)."""
    name: str = ""
    """Short name of the map (e.g. 'chest11'), shown in reports."""
    note: str = ""
    """Free text shown beside results (e.g. how the map differs from the paper's)."""
    source: str = "<memory>"
    """Where the map came from (a path, or 'default'), for error messages and results."""
    all_nonzero: bool = False
    """The default map: one class made of every non-zero stored id (its id list is empty)."""

    def __post_init__(self):
        where = self.source
        if self.all_nonzero:
            assert len(self.classes) == 1 and not self.groups
            return
        if not self.classes:
            raise UserError(f"label map {where}: 'classes' is empty; list at least one class, "
                            'e.g. {"classes": {"liver": [5]}}')
        seen: dict[int, str] = {}
        for cname, ids in self.classes.items():
            if not isinstance(cname, str) or not cname or cname == "background":
                raise UserError(f"label map {where}: class name {cname!r} is not allowed; use a "
                                "non-empty name other than 'background' (channel 0 is background)")
            if not ids:
                raise UserError(f"label map {where}: class {cname!r} lists no label ids; give at "
                                "least one stored id, e.g. [5]")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or i < 1:
                    raise UserError(f"label map {where}: class {cname!r} has id {i!r}; ids must be "
                                    "positive integers (0 is background)")
                if i in seen:
                    raise UserError(f"label map {where}: id {i} is in both {seen[i]!r} and "
                                    f"{cname!r}; every id may belong to one class only")
                seen[i] = cname
        for gname, members in self.groups.items():
            if not isinstance(gname, str) or not gname:
                raise UserError(f"label map {where}: group name {gname!r} must be a non-empty string")
            if not members:
                raise UserError(f"label map {where}: group {gname!r} has no member classes")
            for m in members:
                if m not in self.classes:
                    raise UserError(f"label map {where}: group {gname!r} names class {m!r}, which "
                                    f"is not in 'classes' (known: {sorted(self.classes)})")

    @property
    def class_names(self) -> list[str]:
        """Class names in channel order (channel i+1 = class_names[i])."""
        return list(self.classes)

    @property
    def binary(self) -> bool:
        """True for one class: a 1-channel sigmoid head; else a softmax head."""
        return len(self.classes) == 1

    @property
    def out_channels(self) -> int:
        """Output channels of the segmentation head: 1 (binary) or classes + background."""
        return 1 if self.binary else len(self.classes) + 1

    def lookup(self, max_id: int) -> np.ndarray:
        """(max_id + 1,) int64 table: stored id -> class index (0 = background)."""
        if self.all_nonzero:
            table = np.ones(max_id + 1, np.int64)
            table[0] = 0
            return table
        table = np.zeros(max(max_id, max(i for ids in self.classes.values() for i in ids)) + 1,
                         np.int64)
        for c, ids in enumerate(self.classes.values(), start=1):
            table[list(ids)] = c
        return table

    def to_classes(self, labels: np.ndarray) -> np.ndarray:
        """Stored labels -> class indices.

        labels: (...) integer stored ids (>= 0) -> (...) int64 class index, 0 = background.
        """
        labels = np.asarray(labels)
        if labels.size == 0:
            return labels.astype(np.int64)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise UserError(f"label map {self.source}: stored labels contain negative id {lo}; "
                            "label maps must hold ids >= 0 (0 = background)")
        return self.lookup(hi)[labels]

    def to_json(self) -> dict:
        """Plain dict in the file format (goes into results.json)."""
        return {"name": self.name, "note": self.note, "source": self.source,
                "classes": {k: list(v) for k, v in self.classes.items()},
                "groups": {k: list(v) for k, v in self.groups.items()},
                "all_nonzero": self.all_nonzero}


def foreground_map() -> LabelMap:
    """The default without --labels-map: every non-zero stored id is one 'foreground' class."""
    return LabelMap(classes={"foreground": ()}, name="foreground", all_nonzero=True,
                    note="binary: every non-zero stored label id", source="default")


def label_map_from_json(data, source: str) -> LabelMap:
    """Validate a parsed label-map document and build the LabelMap."""
    if not isinstance(data, dict):
        raise UserError(f"label map {source}: expected a JSON object with key 'classes', got "
                        f"{type(data).__name__}")
    unknown = set(data) - {"classes", "groups", "name", "note"}
    if unknown:
        raise UserError(f"label map {source}: unknown keys {sorted(unknown)}; allowed: classes, "
                        "groups, name, note")
    classes = data.get("classes")
    if not isinstance(classes, dict):
        raise UserError(f"label map {source}: 'classes' must be an object of name -> list of ids, "
                        f'e.g. {{"liver": [5]}}, got {classes!r:.80}')
    groups = data.get("groups", {}) or {}
    if not isinstance(groups, dict):
        raise UserError(f"label map {source}: 'groups' must be an object of name -> list of "
                        f"class names, got {groups!r:.80}")
    for cname, ids in classes.items():
        if not isinstance(ids, list):
            raise UserError(f"label map {source}: class {cname!r} must map to a list of ids, "
                            f"got {ids!r}")
    for gname, members in groups.items():
        if not isinstance(members, list):
            raise UserError(f"label map {source}: group {gname!r} must map to a list of class "
                            f"names, got {members!r}")
    return LabelMap(classes={k: tuple(v) for k, v in classes.items()},
                    groups={k: tuple(v) for k, v in groups.items()},
                    name=str(data.get("name", "") or Path(source).stem),
                    note=str(data.get("note", "")), source=source)


def load_label_map(spec: str | Path | None) -> LabelMap:
    """A label map from a path, a shipped name ('chest11', 'phantom') or None (foreground)."""
    if spec is None:
        return foreground_map()
    spec = str(spec)
    path = SHIPPED_DIR / SHIPPED[spec] if spec in SHIPPED else Path(spec)
    if not path.is_file():
        raise UserError(f"label map {spec}: no such file; give a JSON file or one of the shipped "
                        f"maps {sorted(SHIPPED)}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"label map {path}: not valid JSON ({exc}); fix the file") from None
    return label_map_from_json(data, str(path))


def label_map_from_record(record: dict, source: str) -> LabelMap:
    """The LabelMap saved by `LabelMap.to_json` (results.json, finetuned.json)."""
    if record.get("all_nonzero"):
        return foreground_map()
    return label_map_from_json({k: record[k] for k in ("classes", "groups", "name", "note") if k in record}, source)


def check_against_ids(label_map: LabelMap, present: set[int], store: str) -> list[str]:
    """Compare a map with the label ids a store holds (background 0 excluded).

    Raises UserError when no class of the map occurs at all (wrong map for this store, e.g.
    `chest11` on phantom labels); returns warnings naming the classes that never occur.
    """
    present = {int(i) for i in present} - {0}
    if label_map.all_nonzero:
        if not present:
            raise UserError(f"{store}: every label map of the store is empty (only background 0)")
        return []
    absent = [name for name, ids in label_map.classes.items() if not present.intersection(ids)]
    if len(absent) == len(label_map.classes):
        raise UserError(
            f"{store}: none of the label ids of map {label_map.name or label_map.source} "
            f"({sorted(i for ids in label_map.classes.values() for i in ids)[:12]}) occur in the "
            f"store, which holds ids {sorted(present)[:20]}; choose the map that matches how the "
            "labels were made (--labels-map chest11 for TotalSegmentator, phantom for the phantom)")
    return [f"label map {label_map.name or label_map.source}: class(es) {absent} never occur in {store} "
            "(their scores will be undefined)"] if absent else []
