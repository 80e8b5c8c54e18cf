"""Validation of one fine-tuning fold: whole validation volumes segmented by the model.

The predictions go back to the stored grid (tcsmae.finetune.inference) and are compared
with the stored labels mapped to classes: `online_dsc` after every epoch (mean DSC over the
classes present, then over cases), `scores` once at the end of a fold (DSC and HD95 in mm
per class and per group, tcsmae.finetune.metrics). Inputs and references are cached up to a
memory budget, so the epochs do not read and preprocess the same volumes again.
"""

from __future__ import annotations

import numpy as np

from tcsmae.errors import UserError
from tcsmae.finetune.config import FinetuneConfig
from tcsmae.finetune.inference import segment_inputs, volume_input
from tcsmae.finetune.metrics import case_record, dice, score_label_maps


def _case_dsc(pred, ref, n_classes: int) -> float | None:
    """Mean DSC over the classes present in the reference (online validation figure)."""

    values = [d for c in range(1, n_classes + 1) if (d := dice(pred == c, ref == c)) is not None]
    return sum(values) / len(values) if values else None


class Validator:
    """Segments a fold's validation volumes; caches inputs and references up to a memory budget."""

    def __init__(self, store, case_ids, cfg: FinetuneConfig, label_map, device, cache_bytes=1 << 30):
        if len(label_map.classes) > 254:
            raise UserError(f"label map {label_map.source}: {len(label_map.classes)} classes; at most 254 are supported")
        self.store, self.case_ids, self.cfg = store, list(case_ids), cfg
        self.label_map, self.device = label_map, device
        self.cache_bytes = cache_bytes
        self._refs: dict = {}
        self._inputs: dict = {}
        self._cached_bytes = 0

    def reference(self, case_id):
        """(Z, Y, X) uint8 class map of the stored labels (cached while under the budget)."""
        if case_id in self._refs:
            return self._refs[case_id]
        ref = self.label_map.to_classes(self.store.read_volume(case_id, labels=True)).astype(np.uint8)
        if self._cached_bytes + ref.nbytes <= self.cache_bytes:
            self._refs[case_id] = ref
            self._cached_bytes += ref.nbytes
        return ref

    def inputs(self, case_id):
        """(Z, 3, S, S) float32 model inputs of a case, cached while under the memory budget."""

        if case_id in self._inputs:
            return self._inputs[case_id]
        images = volume_input(self.store.read_volume(case_id), self.cfg.input_pipeline())
        if self._cached_bytes + images.nbytes <= self.cache_bytes:
            self._inputs[case_id] = images
            self._cached_bytes += images.nbytes
        return images

    def predict(self, model, case_id):
        """(Z, Y, X) uint8 predicted class map on the stored grid."""

        model.eval()
        shape = tuple(self.store.image(case_id).shape[1:])
        return segment_inputs(model, self.inputs(case_id), shape, self.device,
                              batch_size=self.cfg.batch_size, threshold=self.cfg.threshold)

    def online_dsc(self, model) -> tuple[float | None, dict[str, float | None]]:
        """Mean over cases of the mean DSC over present classes, and the per-case values."""
        per_case = {c: _case_dsc(self.predict(model, c), self.reference(c), len(self.label_map.classes))
                    for c in self.case_ids}
        defined = [v for v in per_case.values() if v is not None]
        return (sum(defined) / len(defined) if defined else None), per_case

    def scores(self, model) -> dict:
        """case id -> case_record of DSC and HD95 per class and group (tcsmae.finetune.metrics)."""
        from tqdm import tqdm

        out = {}
        for case_id in tqdm(self.case_ids, desc="scoring", unit="case", leave=False):
            spacing = self.store.case_attrs(case_id)["spacing_mm"]
            scores = score_label_maps(self.predict(model, case_id), self.reference(case_id), spacing,
                                      self.label_map.class_names,
                                      {k: list(v) for k, v in self.label_map.groups.items()})
            out[case_id] = case_record(scores)
        return out
