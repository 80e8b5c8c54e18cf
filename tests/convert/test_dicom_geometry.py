"""series_geometry: one store Geometry for a sorted DICOM series, with its per-slice
positions, plus the series facts (tilt, uneven steps) that are not geometry."""

from __future__ import annotations

import numpy as np
import pytest

from tcsmae.convert.dicom_scan import SliceHeader
from tcsmae.convert.dicom_volume import series_geometry
from tcsmae.store.geometry import Geometry


def _slices(positions, orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0)) -> list[SliceHeader]:
    return [SliceHeader(path=f"IM{k}.dcm", frame=None, sop_uid="", transfer_syntax="1.2.840.10008.1.2.1",
                        series_uid="1.2", study_uid="1.2", patient_id="", frame_of_reference_uid="",
                        series_number="1", acquisition_number="1", position=tuple(p),
                        orientation=orientation, rows=4, columns=5, pixel_spacing=(0.7, 0.8))
            for k, p in enumerate(positions)]


def test_even_series():
    geom, tilt, uneven = series_geometry(_slices([(-10.0, -20.0, 2.5 * k) for k in range(5)]))
    assert isinstance(geom, Geometry)
    assert (tilt, uneven, geom.warnings) == (0.0, False, ())
    assert geom.spacing_mm == (2.5, 0.7, 0.8)
    assert geom.origin_mm == (-10.0, -20.0, 0.0)
    assert geom.z_positions_mm == tuple(2.5 * k for k in range(5))
    np.testing.assert_array_equal(geom.slice_positions_mm()[:, 2], geom.z_positions_mm)
    np.testing.assert_allclose(geom.voxel_to_lps() @ [4, 3, 2, 1], [-10 + 4 * 0.8, -20 + 3 * 0.7, 5.0, 1])


def test_gap_is_uneven_and_keeps_true_positions():
    z = [0.0, 2.0, 4.0, 8.0, 10.0]
    geom, tilt, uneven = series_geometry(_slices([(0.0, 0.0, v) for v in z]))
    assert uneven and tilt == 0.0
    assert geom.z_positions_mm == tuple(z)
    assert geom.warnings[0].startswith("uneven slice spacing")


def test_tilt_is_a_fact_and_voxel_to_lps_follows_the_slices():
    positions = [(0.0, 0.4 * k, 2.0 * k) for k in range(4)]
    geom, tilt, uneven = series_geometry(_slices(positions))
    assert not uneven
    assert tilt == pytest.approx(np.degrees(np.arctan(0.2)))
    assert "gantry tilt" in geom.warnings[-1]
    np.testing.assert_allclose(geom.voxel_to_lps() @ [0, 0, 3, 1], [0.0, 1.2, 6.0, 1.0])
    np.testing.assert_allclose(np.asarray(geom.direction)[:, 2], [0.0, 0.0, 1.0])  # the slice normal
