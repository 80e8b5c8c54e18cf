"""Synthetic chest CT: the embedded default data (`tcsmae phantom`).

Writes, per case, an axial CT series as DICOM files (pydicom; CT Image Storage, explicit VR
little endian, uncompressed), a NIfTI label map of the same grid, and one `manifest.csv`
for `tcsmae convert --manifest`:

    DIR/dicom/phantom_000/IM0001.dcm ...   one folder per case (InstanceNumber 1 = most
                                           superior slice, as scanners number head-first;
                                           the converter must sort by position)
    DIR/labels/phantom_000.nii.gz          uint8 label map, RAS+ layout (as dcm2niix-style
                                           tools write), affine built from the DICOM geometry
    DIR/manifest.csv                       columns source, labels, case_id, patient_id
                                           (paths relative to DIR)

Pixels: int16 stored values with RescaleSlope 1, RescaleIntercept -1024 (HU = stored - 1024),
HU clipped to [-1024, 3071]. Geometry: ImageOrientationPatient [1,0,0, 0,1,0] (rows run
anterior -> posterior, columns right -> left), square pixels of 358.4 / size mm (0.7 mm at
512 px, 2.8 mm at the default 128 px: the chest fits any size), slices `slice_mm` apart.

Label ids (PHANTOM_LABELS):

    id  structure               HU (before noise)
    0   background (outside air)  -1000
    1   lung (incl. vessels, airways)  -850 parenchyma; vessels ~ +60..+150; airways -1000
    2   fat (subcutaneous, mediastinal)  -100
    3   soft tissue / muscle (incl. esophagus, spinal canal, discs)  40 (discs 80)
    4   heart                   contrast blood, +40..+200 per case; myocardial rim 40
    5   aorta                   same contrast blood as the heart
    6   trachea and main bronchi  lumen -1000, wall 30
    7   spine (vertebrae)       cancellous ~400, cortex ~1000
    8   ribs and sternum        cancellous ~450, cortex ~900
    9   ground-glass lesion (in the lungs; pneumonia stand-in)  -600..-300 per lesion
    10  mediastinal mass (tumour stand-in)  20..60 per mass

Noise: white Gaussian noise, slightly smoothed in-plane (sigma 0.8 px) and scaled to
`noise_hu` standard deviation (default 15 HU), added after a partial-volume blur of the
clean image (sigma 0.6 px in-plane). Anatomy varies with the seed: body size and position,
fat and muscle thickness, organ sizes and positions, contrast level, vessel trees, and the
number, size and place of lesions (1-3) and masses (1-2). Case i of seed s is the same
whatever the number of cases asked for (generator keyed by (seed, i)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tcsmae.errors import UserError

PHANTOM_LABELS: dict[int, str] = {
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

    cases: int = 8
    """Number of cases (series) to write."""
    seed: int = 0
    """Seed: case i is drawn from numpy Generator keyed by (seed, i)."""
    size: int = 128
    """Rows = columns of each slice (pixels); pixel spacing is 358.4 / size mm."""
    slices: int = 24
    """Slices per series."""
    slice_mm: float = 5.0
    """Distance between slice centres along the normal, mm."""
    noise_hu: float = 15.0
    """Standard deviation of the added image noise, HU."""

    def __post_init__(self):
        if self.cases < 1:
            raise UserError(f"--cases {self.cases}: need at least 1 case")
        if not 32 <= self.size <= 1024:
            raise UserError(f"--size {self.size}: choose 32..1024 pixels (128 default, 512 clinical)")
        if self.slices < 3:
            raise UserError(f"--slices {self.slices}: need at least 3 slices per series")
        if not 0.1 <= self.slice_mm <= 20:
            raise UserError(f"--slice-mm {self.slice_mm}: choose 0.1..20 mm")
        if not 0 <= self.noise_hu <= 200:
            raise UserError(f"--noise-hu {self.noise_hu}: choose 0..200 HU")

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


def make_case(cfg: PhantomConfig, index: int) -> PhantomCase:
    """Draw and render case `index` of the collection (deterministic in (cfg.seed, index))."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([cfg.seed, index])
    u = rng.uniform
    fov = (u(-15, 15), u(-25, 5))  # reconstruction centre, LPS mm
    g = _Grid(cfg, fov, centre_xy=(fov[0] + u(-8, 8), fov[1] + u(-6, 10)), z0=u(-180, -120))
    Z, Y, X = g.shape
    t = g.t
    lab = np.zeros(g.shape, np.uint8)
    hu = np.full(g.shape, -1000.0, np.float32)

    def paint(mask, label, value):
        lab[mask] = label
        hu[mask] = value

    # body outline, fat layer, muscle; slight taper toward the top
    A = u(140, 165) * (1 - 0.06 * t)  # (Z,1,1) half width, mm
    B = u(100, 118) * (1 - 0.04 * t)  # half depth
    fat_t, muscle_t = u(6, 18), u(10, 18)
    Ai, Bi = A - fat_t, B - fat_t
    Ac, Bc = Ai - muscle_t, Bi - muscle_t  # thoracic cavity
    paint(g.ellipse(0, 0, A, B), 2, -100.0)
    paint(g.ellipse(0, 0, Ai, Bi), 3, 40.0)

    # lungs (apices narrow above t = 0.7), inside the cavity
    apex = np.sqrt(np.clip(1 - ((t - 0.7) / 0.36) ** 2 * (t > 0.7), 0.05, 1))
    cavity = g.ellipse(0, 0, Ac, Bc)
    lung_l = g.ellipse(0.5 * Ac * u(0.95, 1.05), u(-4, 6), 0.42 * Ac * apex * u(0.9, 1.0), 0.82 * Bc * apex)
    lung_r = g.ellipse(-0.5 * Ac * u(0.95, 1.05), u(-4, 6), 0.44 * Ac * apex * u(0.9, 1.0), 0.82 * Bc * apex)
    lungs = (lung_l | lung_r) & cavity
    paint(lungs, 1, -850.0)

    # mediastinum (fat) between the lungs
    paint(g.ellipse(0, -0.15 * Bc, 0.2 * Ac, 0.72 * Bc) & cavity, 2, -100.0)

    # spine: vertebral body, posterior arch, spinous process, discs
    r_vb = u(13, 17)
    spine_y = Bc - r_vb - u(2, 8)
    contrast = u(40, 200)

    # heart: contrast blood inside a myocardial rim
    hc = (u(12, 25), -0.18 * float(Bc.mean()), u(0.15, 0.3) * (Z - 1) * g.dz)
    hr = (u(45, 58), u(40, 52), u(0.25, 0.4) * (Z - 1) * g.dz + 20)
    heart = g.ellipsoid(hc, hr)
    paint(heart, 4, 40.0)
    inner = g.ellipsoid(hc, (hr[0] - 5, hr[1] - 5, hr[2] - 5))
    hu[inner] = contrast

    # aorta: descending beside the spine, ascending in front, arch on top
    r_ao = u(10, 14)
    desc = (u(14, 22), float(spine_y.mean()) - r_vb - r_ao + 2)
    asc = (u(-12, 2), -0.3 * float(Bc.mean()))
    t_arch = u(0.82, 0.9)
    aorta = g.ellipse(desc[0], desc[1], r_ao, r_ao) & (t < t_arch)
    aorta |= g.ellipse(asc[0], asc[1], r_ao + 2, r_ao + 2) & (t > 0.3) & (t < t_arch)
    z_arch = t_arch * (Z - 1) * g.dz
    box, dist = g.segment_distance((asc[0], asc[1], z_arch), (desc[0], desc[1], z_arch), r_ao + 1)
    arch = np.zeros(g.shape, bool)
    arch[box] = dist < r_ao + 1
    paint(aorta | arch, 5, contrast)

    # trachea above the carina, main bronchi below it (label 6), esophagus behind (soft tissue)
    r_tr = u(8, 10)
    tr_y = float(spine_y.mean()) - r_vb - u(18, 24)
    t_car = u(0.5, 0.6)
    tube = g.ellipse(0, tr_y, r_tr, r_tr) & (t >= t_car)
    lumen = g.ellipse(0, tr_y, r_tr - 2, r_tr - 2) & (t >= t_car)
    spread = 10 + (t_car - t) * (Z - 1) * g.dz * 0.9  # bronchi diverge downward
    for side in (-1, 1):
        zone = (t < t_car) & (t > t_car - 0.18)
        tube |= g.ellipse(side * spread, tr_y + 4, 6.5, 6.5) & zone
        lumen |= g.ellipse(side * spread, tr_y + 4, 4.5, 4.5) & zone
    paint(tube, 6, 30.0)
    hu[lumen] = -1000.0
    esophagus = g.ellipse(u(2, 8), float(spine_y.mean()) - r_vb - 6, 7, 6)
    paint(esophagus & (lab != 5), 3, 40.0)

    vb = g.ellipse(0, spine_y, r_vb, r_vb * 0.9)
    vb_core = g.ellipse(0, spine_y, r_vb - 2.2, r_vb * 0.9 - 2.2)
    canal_y = spine_y + r_vb * 0.9 + 8
    arch_ring = g.ellipse(0, canal_y, 13, 12) & ~g.ellipse(0, canal_y, 8, 7)
    spinous = (np.abs(g.x) < 4) & (g.y > canal_y + 10) & (g.y < canal_y + 32) & g.ellipse(0, 0, Ai, Bi)
    bone_hu_core, bone_hu_cortex = u(380, 450), u(900, 1000)
    paint(vb | arch_ring | spinous, 7, bone_hu_cortex)
    hu[vb_core] = bone_hu_core
    paint(g.ellipse(0, canal_y, 8, 7), 3, 40.0)
    pitch, phase = u(24, 28), u(0, 24)
    disc = (((g.zmm + phase) % pitch) < 5.0) & vb
    paint(disc, 3, 80.0)

    # ribs: small bony ovals around the cavity wall, appearing in bands that shift with angle
    n_ribs = int(rng.integers(8, 11))
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
    paint(ribs | sternum, 8, 900.0)
    hu[rib_core | (sternum & (np.abs(g.x) < 9) & (g.y < -Bc - 0) & (g.y > -Bc - 6))] = rib_hu

    # lung vessels (contrast-filled) and airways, as random trees from the hila
    lung_now = lab == 1
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
    hu[walls & lung_now] = 30.0
    hu[vessels & lung_now] = vessel_hu
    hu[airways & lung_now] = -1000.0

    # ground-glass lesions (label 9) in the lungs, keeping vessels visible through them
    n_lesions = int(rng.integers(1, 4))
    for _ in range(n_lesions):
        c = _random_point_in(lab == 1, g, rng)
        r = (u(8, 25), u(8, 25), u(8, 25))
        les = g.ellipsoid(c, r) & (lab == 1)
        lab[les] = 9
        hu[les & ~vessels] = u(-600, -300)

    # mediastinal masses (label 10): centred in mediastinal fat, growing into fat, soft tissue
    # and lung (not into the heart, vessels, airways or bone)
    n_masses = int(rng.integers(1, 3))
    mediastinal_fat = (lab == 2) & g.ellipse(0, -0.15 * Bc, 0.2 * Ac, 0.72 * Bc) & (t > 0.25)
    if not mediastinal_fat.any():
        mediastinal_fat = np.isin(lab, (2, 3)) & (np.abs(g.x) < 30)
    for _ in range(n_masses):
        c = _random_point_in(mediastinal_fat, g, rng)
        r = (u(10, 22), u(10, 20), u(10, 22))
        mass = g.ellipsoid(c, r) & np.isin(lab, (1, 2, 3))
        lab[mass] = 10
        hu[mass] = u(20, 60)

    # partial-volume blur, then smoothed Gaussian noise
    hu = gaussian_filter(hu, sigma=(0, 0.6, 0.6), mode="nearest")
    if cfg.noise_hu > 0:
        noise = gaussian_filter(rng.standard_normal(g.shape).astype(np.float32), sigma=(0, 0.8, 0.8))
        hu += noise * np.float32(cfg.noise_hu / max(float(noise.std()), 1e-6))
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    origin = (g.x0, g.y0, g.z0)
    return PhantomCase(
        case_id=f"phantom_{index:03d}",
        patient_id=f"PHANTOM{cfg.seed:04d}{index:03d}",
        hu=hu, labels=lab, origin_mm=origin,
        spacing_mm=(cfg.slice_mm, cfg.pixel_mm, cfg.pixel_mm),
        contrast_hu=float(contrast), n_lesions=n_lesions, n_masses=n_masses,
    )

