"""Synthetic chest CT anatomy: the embedded default data (`tcsmae phantom`).

`make_case(cfg, i)` draws case i of a collection as HU and label volumes on an axial DICOM
grid, from a generator keyed by (seed, i) alone, so a case does not depend on how many are
asked for. Label ids, HU per structure, noise and grid: docs/store-format.md, "Embedded
synthetic data"; phantom/dicom.py writes the cases as DICOM series and NIfTI label maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tcsmae.settings import flag, invalid

PHANTOM_LABELS: dict[int, str] = {  # HU per structure: docs/store-format.md
    0: "background",
    1: "lung",
    2: "fat",
    3: "soft_tissue",
    4: "heart",
    5: "aorta",
    6: "trachea",
    7: "spine",
    8: "ribs",
    9: "ground_glass_lesion",
    10: "mediastinal_mass",
}
LABEL_IDS: dict[str, int] = {name: i for i, name in PHANTOM_LABELS.items()}

GENERATOR_VERSION = 1
"""Bumped whenever the drawn anatomy changes, so caches keyed on it (bench) are rebuilt."""
FOV_MM = 358.4  # 512 px * 0.7 mm


@dataclass(frozen=True)
class PhantomConfig:
    """Settings of one phantom collection."""

    cases: int = field(default=8, metadata=flag("--cases"))
    """Number of cases (series) to write."""
    seed: int = field(default=0, metadata=flag("--seed"))
    """Seed: case i is drawn from a NumPy Generator keyed by (seed, i)."""
    size: int = field(default=128, metadata=flag("--size", metavar="PX"))
    """Rows = columns of each slice in pixels; pixel spacing is 358.4 / size mm (512 = 0.7 mm)."""
    slices: int = field(default=24, metadata=flag("--slices"))
    """Slices per series."""
    slice_mm: float = field(default=5.0, metadata=flag("--slice-mm", metavar="MM"))
    """Distance between slice centres along the normal, mm."""
    noise_hu: float = field(default=15.0, metadata=flag("--noise-hu", metavar="HU"))
    """Standard deviation of the added image noise, HU."""

    def __post_init__(self):
        if self.cases < 1:
            raise invalid(PhantomConfig, "cases", self.cases, "need at least 1 case")
        if not 32 <= self.size <= 1024:
            raise invalid(PhantomConfig, "size", self.size, "choose 32..1024 pixels (128 default, 512 clinical)")
        if self.slices < 3:
            raise invalid(PhantomConfig, "slices", self.slices, "need at least 3 slices per series")
        if not 0.1 <= self.slice_mm <= 20:
            raise invalid(PhantomConfig, "slice_mm", self.slice_mm, "choose 0.1..20 mm")
        if not 0 <= self.noise_hu <= 200:
            raise invalid(PhantomConfig, "noise_hu", self.noise_hu, "choose 0..200 HU")

    @property
    def pixel_mm(self) -> float:
        return FOV_MM / self.size


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case on its DICOM grid.

    hu: (Z, Y, X) int16, Hounsfield units, Z ascending inferior -> superior (None in the
        summaries returned by write_phantom, which do not keep the arrays).
    labels: (Z, Y, X) uint8, ids of PHANTOM_LABELS (None likewise).
    origin_mm: LPS [x, y, z] of voxel [0, 0, 0]; spacing_mm [z, y, x].
    """

    case_id: str
    patient_id: str
    hu: np.ndarray | None
    labels: np.ndarray | None
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    contrast_hu: float
    n_lesions: int
    n_masses: int


# ----------------------------------------------------------------------------- anatomy


class _Grid:
    """Voxel-centre coordinates (mm, body-centred LPS) broadcastable to (Z, Y, X)."""

    def __init__(self, cfg: PhantomConfig, fov_centre_xy: tuple[float, float],
                 centre_xy: tuple[float, float], z0: float):
        n, ps = cfg.size, cfg.pixel_mm
        self.shape = (cfg.slices, n, n)
        self.ps, self.dz = ps, cfg.slice_mm
        # LPS of voxel [0, 0, 0] (patient right, anterior, inferior corner), rounded to what
        # the DICOM decimal strings hold so DICOM and NIfTI geometry agree exactly
        self.x0 = round(fov_centre_xy[0] - (n - 1) / 2 * ps, 3)
        self.y0 = round(fov_centre_xy[1] - (n - 1) / 2 * ps, 3)
        self.z0 = round(z0, 3)
        self.cx, self.cy = centre_xy  # body centre in LPS mm
        self.x = (self.x0 + np.arange(n) * ps - self.cx)[None, None, :]  # (1, 1, X)
        self.y = (self.y0 + np.arange(n) * ps - self.cy)[None, :, None]  # (1, Y, 1)
        self.zmm = (np.arange(cfg.slices) * cfg.slice_mm)[:, None, None]  # (Z, 1, 1) from bottom
        self.t = np.linspace(0.0, 1.0, cfg.slices)[:, None, None]  # relative height 0..1

    def ellipse(self, cx, cy, a, b):
        """(Z|1, Y, X) bool: inside an ellipse in-plane; cx, cy, a, b scalars or (Z,1,1)."""
        return ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 < 1.0

    def ellipsoid(self, c, r):
        """(Z, Y, X) bool: inside an axis-aligned ellipsoid, centre c (x, y, zmm), radii r mm."""
        return (((self.x - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2
                + ((self.zmm - c[2]) / r[2]) ** 2) < 1.0

    def _box(self, lo, hi):
        """Index slices of the voxels whose centres lie in the box [lo, hi] (x, y, zmm)."""
        def rng(lo_v, hi_v, first, step, n):
            a = int(np.floor((lo_v - first) / step))
            b = int(np.ceil((hi_v - first) / step)) + 1
            return slice(max(a, 0), min(max(b, 0), n))
        nz, ny, nx = self.shape
        return (rng(lo[2], hi[2], 0.0, self.dz, nz),
                rng(lo[1], hi[1], self.y0 - self.cy, self.ps, ny),
                rng(lo[0], hi[0], self.x0 - self.cx, self.ps, nx))

    def segment_distance(self, p0, p1, radius):
        """(box slices, distance mm) to the 3D segment p0-p1 (x, y, zmm) within its bounding box."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        box = self._box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        x = self.x[:, :, box[2]]
        y = self.y[:, box[1], :]
        z = self.zmm[box[0]]
        d = p1 - p0
        L2 = max(float(d @ d), 1e-9)
        s = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / L2, 0.0, 1.0)
        dist = np.sqrt((x - p0[0] - s * d[0]) ** 2 + (y - p0[1] - s * d[1]) ** 2 + (z - p0[2] - s * d[2]) ** 2)
        return box, dist


def _random_point_in(mask: np.ndarray, g: _Grid, rng: np.random.Generator):
    """(x, y, zmm) of a random voxel of `mask` (Z, Y, X) bool, body-centred mm."""
    idx = np.flatnonzero(mask)
    k, j, i = np.unravel_index(idx[rng.integers(len(idx))], mask.shape)
    return (float(g.x[0, 0, i]), float(g.y[0, j, 0]), float(g.zmm[k, 0, 0]))


class _Canvas:
    """The case being drawn: its grid, generator, and (Z, Y, X) label and HU volumes.

    lab: uint8 ids of PHANTOM_LABELS; hu: float32 HU before blur and noise. Every step
    below paints over what earlier steps drew, and draws from `rng` in a fixed order, so
    a case depends on (seed, index) alone.
    """

    def __init__(self, g: _Grid, rng: np.random.Generator):
        self.g, self.rng, self.u = g, rng, rng.uniform
        self.lab = np.zeros(g.shape, np.uint8)
        self.hu = np.full(g.shape, -1000.0, np.float32)

    def paint(self, mask: np.ndarray, label: int, value) -> None:
        self.lab[mask] = label
        self.hu[mask] = value


@dataclass(frozen=True)
class _Body:
    """In-plane half axes (mm, (Z, 1, 1), tapering upward) of the body outline (A, B), inside
    the fat layer (Ai, Bi) and of the thoracic cavity inside the muscle (Ac, Bc)."""

    A: np.ndarray
    B: np.ndarray
    Ai: np.ndarray
    Bi: np.ndarray
    Ac: np.ndarray
    Bc: np.ndarray


@dataclass(frozen=True)
class _Spine:
    """Vertebral body radius r_vb (mm) and centre y (mm, (Z, 1, 1), body-centred)."""

    r_vb: float
    y: np.ndarray


def make_case(cfg: PhantomConfig, index: int) -> PhantomCase:
    """Draw and render case `index` of the collection (deterministic in (cfg.seed, index))."""
    rng = np.random.default_rng([cfg.seed, index])
    c = _Canvas(_place_grid(cfg, rng.uniform), rng)
    body = _draw_body(c)
    _draw_lungs_and_mediastinum(c, body)
    r_vb = c.u(13, 17)
    spine = _Spine(r_vb, body.Bc - r_vb - c.u(2, 8))
    contrast = c.u(40, 200)  # HU of contrast-filled blood
    _draw_heart(c, body, contrast)
    _draw_aorta(c, body, spine, contrast)
    _draw_airways(c, spine)
    pitch = _draw_spine(c, body, spine)
    _draw_ribs(c, body, pitch)
    vessels = _draw_lung_trees(c, contrast)
    n_lesions = _draw_lesions(c, vessels)
    n_masses = _draw_masses(c, body)
    g = c.g
    return PhantomCase(
        case_id=f"phantom_{index:03d}",
        patient_id=f"PHANTOM{cfg.seed:04d}{index:03d}",
        hu=_blur_and_noise(c.hu, cfg.noise_hu, rng), labels=c.lab, origin_mm=(g.x0, g.y0, g.z0),
        spacing_mm=(cfg.slice_mm, cfg.pixel_mm, cfg.pixel_mm),
        contrast_hu=float(contrast), n_lesions=n_lesions, n_masses=n_masses,
    )


def _place_grid(cfg: PhantomConfig, u) -> _Grid:
    """The reconstruction centre, the body centre in it and the lowest slice (LPS mm)."""
    fov = (u(-15, 15), u(-25, 5))
    return _Grid(cfg, fov, centre_xy=(fov[0] + u(-8, 8), fov[1] + u(-6, 10)), z0=u(-180, -120))


def _draw_body(c: _Canvas) -> _Body:
    """Body outline, fat layer and muscle; slight taper toward the top."""
    u, g, t = c.u, c.g, c.g.t
    A = u(140, 165) * (1 - 0.06 * t)  # (Z,1,1) half width, mm
    B = u(100, 118) * (1 - 0.04 * t)  # half depth
    fat_t, muscle_t = u(6, 18), u(10, 18)
    Ai, Bi = A - fat_t, B - fat_t
    Ac, Bc = Ai - muscle_t, Bi - muscle_t  # thoracic cavity
    c.paint(g.ellipse(0, 0, A, B), 2, -100.0)
    c.paint(g.ellipse(0, 0, Ai, Bi), 3, 40.0)
    return _Body(A, B, Ai, Bi, Ac, Bc)


def _draw_lungs_and_mediastinum(c: _Canvas, body: _Body) -> None:
    """Lungs inside the cavity (apices narrow above t = 0.7), mediastinal fat between them."""
    u, g, t = c.u, c.g, c.g.t
    Ac, Bc = body.Ac, body.Bc
    apex = np.sqrt(np.clip(1 - ((t - 0.7) / 0.36) ** 2 * (t > 0.7), 0.05, 1))
    cavity = g.ellipse(0, 0, Ac, Bc)
    lung_l = g.ellipse(0.5 * Ac * u(0.95, 1.05), u(-4, 6), 0.42 * Ac * apex * u(0.9, 1.0), 0.82 * Bc * apex)
    lung_r = g.ellipse(-0.5 * Ac * u(0.95, 1.05), u(-4, 6), 0.44 * Ac * apex * u(0.9, 1.0), 0.82 * Bc * apex)
    lungs = (lung_l | lung_r) & cavity
    c.paint(lungs, 1, -850.0)
    c.paint(g.ellipse(0, -0.15 * Bc, 0.2 * Ac, 0.72 * Bc) & cavity, 2, -100.0)


def _draw_heart(c: _Canvas, body: _Body, contrast: float) -> None:
    """Heart: contrast blood inside a myocardial rim."""
    u, g = c.u, c.g
    Z = g.shape[0]
    hc = (u(12, 25), -0.18 * float(body.Bc.mean()), u(0.15, 0.3) * (Z - 1) * g.dz)
    hr = (u(45, 58), u(40, 52), u(0.25, 0.4) * (Z - 1) * g.dz + 20)
    c.paint(g.ellipsoid(hc, hr), 4, 40.0)
    inner = g.ellipsoid(hc, (hr[0] - 5, hr[1] - 5, hr[2] - 5))
    c.hu[inner] = contrast


def _draw_aorta(c: _Canvas, body: _Body, spine: _Spine, contrast: float) -> None:
    """Aorta: descending beside the spine, ascending in front, arch on top."""
    u, g, t = c.u, c.g, c.g.t
    Z = g.shape[0]
    r_ao = u(10, 14)
    desc = (u(14, 22), float(spine.y.mean()) - spine.r_vb - r_ao + 2)
    asc = (u(-12, 2), -0.3 * float(body.Bc.mean()))
    t_arch = u(0.82, 0.9)
    aorta = g.ellipse(desc[0], desc[1], r_ao, r_ao) & (t < t_arch)
    aorta |= g.ellipse(asc[0], asc[1], r_ao + 2, r_ao + 2) & (t > 0.3) & (t < t_arch)
    z_arch = t_arch * (Z - 1) * g.dz
    box, dist = g.segment_distance((asc[0], asc[1], z_arch), (desc[0], desc[1], z_arch), r_ao + 1)
    arch = np.zeros(g.shape, bool)
    arch[box] = dist < r_ao + 1
    c.paint(aorta | arch, 5, contrast)


def _draw_airways(c: _Canvas, spine: _Spine) -> None:
    """Trachea above the carina, main bronchi below it (label 6), esophagus behind (soft tissue)."""
    u, g, t = c.u, c.g, c.g.t
    Z = g.shape[0]
    r_tr = u(8, 10)
    tr_y = float(spine.y.mean()) - spine.r_vb - u(18, 24)
    t_car = u(0.5, 0.6)
    tube = g.ellipse(0, tr_y, r_tr, r_tr) & (t >= t_car)
    lumen = g.ellipse(0, tr_y, r_tr - 2, r_tr - 2) & (t >= t_car)
    spread = 10 + (t_car - t) * (Z - 1) * g.dz * 0.9  # bronchi diverge downward
    for side in (-1, 1):
        zone = (t < t_car) & (t > t_car - 0.18)
        tube |= g.ellipse(side * spread, tr_y + 4, 6.5, 6.5) & zone
        lumen |= g.ellipse(side * spread, tr_y + 4, 4.5, 4.5) & zone
    c.paint(tube, 6, 30.0)
    c.hu[lumen] = -1000.0
    esophagus = g.ellipse(u(2, 8), float(spine.y.mean()) - spine.r_vb - 6, 7, 6)
    c.paint(esophagus & (c.lab != 5), 3, 40.0)


def _draw_spine(c: _Canvas, body: _Body, spine: _Spine) -> float:
    """Vertebral body, posterior arch, spinous process, spinal canal and discs.

    Returns the vertebral pitch (mm), which the ribs follow."""
    u, g = c.u, c.g
    r_vb, spine_y = spine.r_vb, spine.y
    vb = g.ellipse(0, spine_y, r_vb, r_vb * 0.9)
    vb_core = g.ellipse(0, spine_y, r_vb - 2.2, r_vb * 0.9 - 2.2)
    canal_y = spine_y + r_vb * 0.9 + 8
    arch_ring = g.ellipse(0, canal_y, 13, 12) & ~g.ellipse(0, canal_y, 8, 7)
    spinous = ((np.abs(g.x) < 4) & (g.y > canal_y + 10) & (g.y < canal_y + 32)
               & g.ellipse(0, 0, body.Ai, body.Bi))
    bone_hu_core, bone_hu_cortex = u(380, 450), u(900, 1000)
    c.paint(vb | arch_ring | spinous, 7, bone_hu_cortex)
    c.hu[vb_core] = bone_hu_core
    c.paint(g.ellipse(0, canal_y, 8, 7), 3, 40.0)
    pitch, phase = u(24, 28), u(0, 24)
    disc = (((g.zmm + phase) % pitch) < 5.0) & vb
    c.paint(disc, 3, 80.0)
    return pitch


def _draw_ribs(c: _Canvas, body: _Body, pitch: float) -> None:
    """Ribs: small bony ovals around the cavity wall, in bands that shift with angle; sternum."""
    u, g, t = c.u, c.g, c.g.t
    Ac, Bc = body.Ac, body.Bc
    n_ribs = int(c.rng.integers(8, 11))
    angles = np.linspace(-0.75 * np.pi, 0.75 * np.pi, n_ribs) + u(-0.05, 0.05, n_ribs)
    rib_hu = u(420, 500)
    ribs = np.zeros(g.shape, bool)
    rib_core = np.zeros(g.shape, bool)
    for side in (-1, 1):
        for a in angles:
            px = side * (Ac + 5) * np.sin(a)
            py = (Bc + 5) * np.cos(a + np.pi)  # a = 0 -> posterior
            visible = ((g.zmm + pitch * (a / np.pi) + side * 7) % 30.0) < 11.0
            ribs |= g.ellipse(px, py, 5.5, 5.5) & visible
            rib_core |= g.ellipse(px, py, 3.0, 3.0) & visible
    sternum = (np.abs(g.x) < 12) & (g.y < -Bc + 2) & (g.y > -Bc - 8) & (t > 0.2)
    c.paint(ribs | sternum, 8, 900.0)
    c.hu[rib_core | (sternum & (np.abs(g.x) < 9) & (g.y < -Bc - 0) & (g.y > -Bc - 6))] = rib_hu


def _draw_lung_trees(c: _Canvas, contrast: float) -> np.ndarray:
    """Lung vessels (contrast-filled) and airways, as random trees from the hila.

    Returns the vessel mask (Z, Y, X) bool (lesions keep vessels visible)."""
    u, g, rng = c.u, c.g, c.rng
    Z = g.shape[0]
    lung_now = c.lab == 1
    vessels = np.zeros(g.shape, bool)
    airways = np.zeros(g.shape, bool)
    walls = np.zeros(g.shape, bool)
    vessel_hu = contrast * u(0.5, 0.8) + 30
    for side in (-1, 1):
        side_mask = lung_now & ((g.x * side) > 0)
        if not side_mask.any():
            continue
        hilum = np.array([side * u(20, 35), u(-10, 10), u(0.35, 0.55) * (Z - 1) * g.dz])
        for _ in range(6):
            end = np.array(_random_point_in(side_mask, g, rng))
            r = u(2.0, 3.5)
            box, dist = g.segment_distance(hilum, end, r)
            vessels[box] |= dist < r
            mid = hilum + (end - hilum) * u(0.4, 0.8)
            for _ in range(2):
                end2 = np.array(_random_point_in(side_mask, g, rng))
                box, dist = g.segment_distance(mid, end2, 1.6)
                vessels[box] |= dist < 1.6
        for _ in range(3):
            end = np.array(_random_point_in(side_mask, g, rng))
            r = u(2.5, 3.5)
            box, dist = g.segment_distance(hilum, end, r + 1.0)
            walls[box] |= dist < r + 1.0
            airways[box] |= dist < r
    c.hu[walls & lung_now] = 30.0
    c.hu[vessels & lung_now] = vessel_hu
    c.hu[airways & lung_now] = -1000.0
    return vessels


def _draw_lesions(c: _Canvas, vessels: np.ndarray) -> int:
    """Ground-glass lesions (label 9) in the lungs, vessels visible through them; returns their count."""
    u, g = c.u, c.g
    n_lesions = int(c.rng.integers(1, 4))
    for _ in range(n_lesions):
        centre = _random_point_in(c.lab == 1, g, c.rng)
        r = (u(8, 25), u(8, 25), u(8, 25))
        les = g.ellipsoid(centre, r) & (c.lab == 1)
        c.lab[les] = 9
        c.hu[les & ~vessels] = u(-600, -300)
    return n_lesions


def _draw_masses(c: _Canvas, body: _Body) -> int:
    """Mediastinal masses (label 10): centred in mediastinal fat, growing into fat, soft tissue
    and lung (not into the heart, vessels, airways or bone); returns their count."""
    u, g, t = c.u, c.g, c.g.t
    n_masses = int(c.rng.integers(1, 3))
    mediastinal_fat = (c.lab == 2) & g.ellipse(0, -0.15 * body.Bc, 0.2 * body.Ac, 0.72 * body.Bc) & (t > 0.25)
    if not mediastinal_fat.any():
        mediastinal_fat = np.isin(c.lab, (2, 3)) & (np.abs(g.x) < 30)
    for _ in range(n_masses):
        centre = _random_point_in(mediastinal_fat, g, c.rng)
        r = (u(10, 22), u(10, 20), u(10, 22))
        mass = g.ellipsoid(centre, r) & np.isin(c.lab, (1, 2, 3))
        c.lab[mass] = 10
        c.hu[mass] = u(20, 60)
    return n_masses


def _blur_and_noise(hu: np.ndarray, noise_hu: float, rng: np.random.Generator) -> np.ndarray:
    """Partial-volume blur, then smoothed Gaussian noise of `noise_hu` standard deviation.

    hu: (Z, Y, X) float32; returns (Z, Y, X) int16 HU clipped to [-1024, 3071]."""
    from scipy.ndimage import gaussian_filter

    hu = gaussian_filter(hu, sigma=(0, 0.6, 0.6), mode="nearest")
    if noise_hu > 0:
        noise = gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), sigma=(0, 0.8, 0.8))
        hu += noise * np.float32(noise_hu / max(float(noise.std()), 1e-6))
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
