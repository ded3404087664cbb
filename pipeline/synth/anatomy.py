"""The chest anatomy of one phantom: sampled parameters and painting onto the canonical grid.

Model (local mm: body axis at x = y = 0, +x patient Right, +y Anterior, +z Superior, z = 0 at the
first slice):

- body: a superelliptical cylinder along z with a subcutaneous fat layer around soft tissue;
- rib cage: a superelliptical ring under the chest-wall muscle, cut into ribs that run around the
  chest and slope down anteriorly; a sternum anteriorly; a spine posteriorly (vertebral bodies with
  a cortical rim and discs, a spinal canal, transverse and spinous processes);
- lungs: two ellipsoid-like shapes beside a mediastinal gap, clipped by the rib cage, narrowing to
  an apex superiorly and sitting on a domed diaphragm inferiorly (the right dome higher);
- mediastinum: fat around a heart (ellipsoid, anterior-left-inferior, with a pericardial fat rim),
  an aorta (descending beside the spine, arch, ascending), and a trachea (air tube in the midline,
  superior part) that splits at the carina into two main bronchi.

CT numbers are typical textbook values (air -1000, lung -850, fat -100, soft tissue and blood 40,
cancellous bone ~400, cortical bone ~900) with a small per-case jitter. The lung mask labels the
lungs 1 (right) and 2 (left); the heart, aorta, spine, trachea and main bronchi are carved out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from pipeline.synth.shapes import Grid, segment_distance, superellipse

__all__ = ["HU", "Anatomy", "Lung", "paint_anatomy", "sample_anatomy"]

AIR = -1000.0
RIGHT, LEFT = 1, 2  # lung mask labels (patient right / left)
Vec = tuple[float, float, float]


@dataclass(frozen=True)
class HU:
    """Per-case CT numbers of each tissue."""

    lung: float
    lung_gradient: float  # dependent (posterior) lung is denser by this much
    fat: float
    soft: float
    blood: float
    vessel: float
    cancellous: float
    cortical: float
    rib: float
    sternum: float
    disc: float
    csf: float


@dataclass(frozen=True)
class Lung:
    """One lung: an elliptical cross-section that narrows toward the apex, on a domed diaphragm."""

    label: int
    cx: float
    cy: float
    w: float  # lateral semi-axis of the widest section
    h: float  # antero-posterior semi-axis
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) of the k = 2, 3 outline wobble
    z_low: float  # lowest point (costophrenic recess)
    dome: float  # height of the diaphragm dome above z_low
    zc: float  # level of the widest section
    top: float  # apex
    q: float  # apex shape exponent

    def section(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised in-plane radius (below 1 inside the widest section)."""
        dx, dy = (
            (x - np.float32(self.cx)) / np.float32(self.w),
            (y - np.float32(self.cy)) / np.float32(self.h),
        )
        theta = np.arctan2(dy, dx)
        wobble = 1.0 + sum(a * np.cos(k * theta + phi) for k, (a, phi) in enumerate(self.harmonics, 2))
        return np.sqrt(dx * dx + dy * dy) / wobble

    def profile(self, z: np.ndarray) -> np.ndarray:
        """Section scale at height z: 1 up to the widest level, then an elliptic-like cap to the apex."""
        u = np.clip((z - np.float32(self.zc)) / np.float32(self.top - self.zc), 0.0, 1.0)
        return np.where(z > self.top, np.float32(-1.0), np.sqrt(np.clip(1.0 - u**self.q, 0.0, 1.0)))

    def bounds(self) -> tuple[Vec, Vec]:
        """A local mm box that holds the lung."""
        grow = 1.0 + sum(abs(a) for a, _ in self.harmonics)
        return (
            (self.cx - self.w * grow, self.cy - self.h * grow, self.z_low),
            (self.cx + self.w * grow, self.cy + self.h * grow, self.top),
        )


@dataclass(frozen=True)
class Anatomy:
    """Every sampled dimension of one phantom (local mm)."""

    hu: HU
    height: float
    body: tuple[float, float, float]  # half-width, half-depth, superellipse exponent
    fat: float
    cage: tuple[float, float]  # rib ring centreline half-axes
    rib: tuple[float, float, float, float, float]  # thickness, height, period, anterior drop, phase
    spine: tuple[float, float, float, float]  # vertebral body y, radius, canal y, canal radius
    vertebra: tuple[float, float]  # level pitch, disc height (phase = 0)
    lungs: tuple[Lung, Lung]
    heart: tuple[Vec, Vec, float, float]  # centre, radii, in-plane angle, pericardial fat rim
    aorta: tuple[tuple[Vec, ...], float]  # path points, radius
    trachea: tuple[Vec, Vec, float]  # top, carina, radius
    bronchi: tuple[tuple[Vec, float], ...]  # (end point, radius) right, left
    wall: float  # airway wall thickness
    sternum: tuple[float, float, float]  # half-width, z from, z to
    gap: float  # half-width of the mediastinal gap between the lungs

    @property
    def cage_inner(self) -> tuple[float, float]:
        """Half-axes of the inner surface of the rib cage (the lungs' outer limit)."""
        return _inside_ribs(self.cage, self.rib[0])

    def landmarks(self) -> dict[str, Vec]:
        """Local mm points that lie inside named structures (for reports and tests)."""
        top, carina, _ = self.trachea
        centre, *_ = self.heart
        pitch, disc = self.vertebra
        level = np.floor((centre[2] - disc) / pitch) * pitch + disc + (pitch - disc) / 2
        mid = (carina[2] + self.height) / 2
        t = (mid - carina[2]) / (top[2] - carina[2])
        trachea = tuple(float(c + t * (p - c)) for c, p in zip(carina, top, strict=True))
        return {
            "trachea": trachea,  # type: ignore[dict-item]
            "carina": carina,
            "heart": centre,
            "spine": (0.0, self.spine[0], float(level)),
        }


def _inside_ribs(cage: tuple[float, float], thickness: float) -> tuple[float, float]:
    return cage[0] - thickness / 2 - 1.5, cage[1] - thickness / 2 - 1.5


def sample_hu(rng: np.random.Generator) -> HU:
    """Textbook CT numbers with a small per-case jitter."""
    u = rng.uniform
    return HU(
        lung=u(-880, -850),
        lung_gradient=u(10, 30),
        fat=u(-110, -80),
        soft=u(30, 50),
        blood=u(35, 50),
        vessel=u(30, 60),
        cancellous=u(380, 460),
        cortical=u(800, 1000),
        rib=u(550, 800),
        sternum=u(420, 560),
        disc=u(70, 100),
        csf=u(5, 20),
    )


def _lung(rng: np.random.Generator, label: int, gap: float, inner: tuple[float, float], z: dict) -> Lung:
    side = 1.0 if label == RIGHT else -1.0
    a_in, b_in = inner
    harmonics = tuple((rng.uniform(-0.05, 0.05), rng.uniform(0, 2 * np.pi)) for _ in range(2))
    dome = z["dome"] + (rng.uniform(5, 15) if label == RIGHT else 0.0)  # the liver lifts the right dome
    return Lung(
        label=label,
        cx=side * (gap + a_in) / 2,
        cy=-b_in * rng.uniform(0.0, 0.1),
        w=(a_in - gap) / 2 * rng.uniform(1.05, 1.2),
        h=b_in * rng.uniform(1.0, 1.1),
        harmonics=harmonics,
        z_low=z["low"],
        dome=dome,
        zc=z["low"] + dome + rng.uniform(0.05, 0.2) * (z["top"] - z["low"] - dome),
        top=z["top"] - rng.uniform(0, 6),
        q=rng.uniform(1.6, 2.4),
    )


def sample_anatomy(rng: np.random.Generator, fov: float, height: float) -> Anatomy:
    """Draw one patient's anatomy; the body fits a field of view of ``fov`` mm."""
    u = rng.uniform
    hu = sample_hu(rng)
    a = u(130.0, max(131.0, min(170.0, fov / 2 - 14)))
    b = a * u(0.72, 0.85)
    p = u(2.0, 2.6)
    fat, muscle, rib_t = u(5, 18), u(8, 14), u(7, 10)
    ca, cb = a - fat - muscle - rib_t / 2, b - fat - muscle - rib_t / 2
    inner = _inside_ribs((ca, cb), rib_t)
    gap = u(10, 20)
    z = {"low": height * u(0.05, 0.11), "top": height * u(0.9, 0.97), "dome": u(30, 48)}
    lungs = (_lung(rng, RIGHT, gap, inner, z), _lung(rng, LEFT, gap, inner, z))

    canal_r = u(6, 8)
    canal_y = -(b - fat) + u(28, 36)
    vb_r = u(14, 19)
    vb_y = canal_y + canal_r + 2 + vb_r

    left = lungs[1]
    heart_r = tuple(r * np.clip(inner[1] / 80, 0.8, 1.1) for r in (u(48, 62), u(38, 48), u(42, 55)))
    heart_c = (-u(15, 30), cb * u(0.1, 0.3), left.z_low + left.dome + heart_r[2] * u(0.3, 0.6))
    lung_height = z["top"] - z["low"]
    carina = (u(-3, 3), vb_y + vb_r + u(15, 22), z["low"] + u(0.55, 0.65) * lung_height)
    trachea_top = (carina[0] + u(-3, 3), carina[1] + u(5, 15), height + 20.0)
    bronchi = (
        ((gap + u(15, 25), carina[1] + u(-5, 5), carina[2] - u(20, 30)), u(6.0, 7.5)),
        ((-gap - u(20, 30), carina[1] + u(-5, 5), carina[2] - u(25, 35)), u(5.0, 6.5)),
    )
    aorta_r = u(10, 14)
    arch_z = carina[2] + u(10, 20)
    desc = (-(vb_r + aorta_r) * 0.8, vb_y + 0.3 * vb_r)
    aorta_path = (
        (desc[0], desc[1], -20.0),
        (desc[0], desc[1], arch_z),
        (-5.0, carina[1] + u(25, 32), arch_z + 5),
        (u(10, 20), heart_c[1] + 0.3 * heart_r[1], heart_c[2] + 0.6 * heart_r[2]),
    )
    return Anatomy(
        hu=hu,
        height=height,
        body=(a, b, p),
        fat=fat,
        cage=(ca, cb),
        rib=(rib_t, u(8, 11), u(24, 30), u(30, 55), u(0, 30)),
        spine=(vb_y, vb_r, canal_y, canal_r),
        vertebra=(u(24, 30), u(5, 7)),
        lungs=lungs,
        heart=(heart_c, heart_r, np.deg2rad(u(20, 45)), u(2, 5)),
        aorta=(aorta_path, aorta_r),
        trachea=(trachea_top, carina, u(7, 10)),
        bronchi=bronchi,
        wall=u(1.5, 2.5),
        sternum=(u(10, 16), heart_c[2] - u(0, 20), z["top"] - u(10, 25)),
        gap=gap,
    )


def paint_anatomy(grid: Grid, an: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Paint the anatomy: a float32 HU image and a uint8 lung mask (both Fortran-ordered, (i, j, k))."""
    image = np.empty(grid.shape, dtype=np.float32, order="F")
    mask = np.zeros(grid.shape, dtype=np.uint8, order="F")
    x, y, _ = grid.offsets(grid.box((-1e9,) * 3, (1e9,) * 3))
    x2, y2 = np.broadcast_arrays(x[:, :, 0], y[:, :, 0])
    a, b, p = an.body
    body = superellipse(x2, y2, a, b, p)
    inner = superellipse(x2, y2, a - an.fat, b - an.fat, p)
    section = np.where(body < 1, np.float32(an.hu.fat), np.float32(AIR))
    section[inner < 1] = an.hu.soft
    image[...] = section[:, :, None]
    cage = superellipse(x2, y2, *an.cage_inner, p) < 1
    _paint_mediastinal_fat(image, grid, an, cage)
    for lung in an.lungs:
        _paint_lung(image, mask, grid, an, lung, cage)
    _paint_heart(image, mask, grid, an, cage)
    _paint_tubes(image, mask, grid, an.aorta[0], an.aorta[1], an.hu.blood)
    _paint_spine(image, mask, grid, an)
    _paint_ribs(image, grid, an, x2, y2)
    _paint_airway(image, mask, grid, an)
    return image, mask


def _paint_mediastinal_fat(image: np.ndarray, grid: Grid, an: Anatomy, cage: np.ndarray) -> None:
    """Fat between the lungs, anterior to the spine, above the diaphragm."""
    z0 = an.lungs[1].z_low + 0.8 * an.lungs[1].dome
    box = grid.box((-an.gap - 15, an.spine[0], z0), (an.gap + 15, 1e9, an.lungs[0].top))
    sub = image[box]
    sub[cage[box[:2]]] = an.hu.fat + 20


def _paint_lung(
    image: np.ndarray, mask: np.ndarray, grid: Grid, an: Anatomy, lung: Lung, cage: np.ndarray
) -> None:
    box = grid.box(*lung.bounds())
    x, y, z = grid.offsets(box)
    rho = lung.section(x[:, :, 0], y[:, :, 0])
    diaphragm = lung.z_low + lung.dome * np.clip(1.0 - rho * rho, 0.0, 1.0)
    inside = (rho[:, :, None] <= lung.profile(z)) & (z >= diaphragm[:, :, None]) & cage[box[:2]][:, :, None]
    dependent = np.clip(-(y[:, :, 0] - lung.cy) / lung.h, -1.0, 1.0)
    value = (an.hu.lung + an.hu.lung_gradient * dependent).astype(np.float32)
    sub = image[box]
    sub[...] = np.where(inside, value[:, :, None], sub)
    mask[box][inside] = lung.label


def _paint_heart(image: np.ndarray, mask: np.ndarray, grid: Grid, an: Anatomy, cage: np.ndarray) -> None:
    """Blood-filled ellipsoid, long axis turned toward anterior-left, in a pericardial fat rim."""
    centre, radii, angle, rim = an.heart
    box, (dx, dy, dz) = grid.around(centre, max(radii) + rim)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along, across = c * dx - s * dy, s * dx + c * dy  # long axis points to -x (left), +y (anterior)
    rho = np.sqrt((along / radii[0]) ** 2 + (across / radii[1]) ** 2 + (dz / radii[2]) ** 2)
    fat = (rho < 1 + rim / np.mean(radii)) & cage[box[:2]][:, :, None]
    sub = image[box]
    sub[fat] = an.hu.fat
    sub[fat & (rho < 1)] = an.hu.blood
    mask[box][fat] = 0


def _paint_tubes(
    image: np.ndarray, mask: np.ndarray, grid: Grid, path: tuple, radius: float, value: float
) -> None:
    """A tube of constant radius along a polyline (carved out of the lung mask)."""
    for p0, p1 in pairwise(path):
        box, dist, _ = segment_distance(grid, p0, p1, radius)
        inside = dist < radius
        image[box][inside] = value
        mask[box][inside] = 0


def _paint_spine(image: np.ndarray, mask: np.ndarray, grid: Grid, an: Anatomy) -> None:
    """Vertebral bodies (cancellous core, cortical rim, discs) and the posterior elements."""
    vb_y, vb_r, canal_y, canal_r = an.spine
    hu = an.hu
    back = -(an.body[1] - an.fat) + 3
    box = grid.box((-vb_r - 16, back, -1e9), (vb_r + 16, vb_y + vb_r + 6, 1e9))
    x, y, z = grid.offsets(box)
    x2, y2 = x[:, :, 0], y[:, :, 0]
    r_body = np.hypot(x2, y2 - vb_y)
    r_canal = np.hypot(x2, y2 - canal_y)
    transverse = (np.abs(x2) < vb_r + 15) & (np.abs(y2 - canal_y) < 4)
    spinous = (np.abs(x2) < 4) & (y2 < canal_y)
    posterior = (r_canal < canal_r + 5) | transverse | spinous
    pitch, disc = an.vertebra
    is_disc = (np.mod(z[0, 0], pitch) < disc)[None, None, :]
    vertebral = np.where(r_body > vb_r - 2, np.float32(hu.cortical), np.float32(hu.cancellous))
    sub = image[box]
    body3 = (r_body < vb_r)[:, :, None]
    sub[...] = np.where(body3, np.where(is_disc, np.float32(hu.disc), vertebral[:, :, None]), sub)
    sub[...] = np.where(posterior[:, :, None], np.float32(hu.rib), sub)
    sub[(r_canal < canal_r)] = hu.csf
    carve = (r_body < vb_r + 5) | posterior
    mask[box][np.broadcast_to(carve[:, :, None], sub.shape)] = 0


def _paint_ribs(image: np.ndarray, grid: Grid, an: Anatomy, x2: np.ndarray, y2: np.ndarray) -> None:
    """Ribs (bands of the cage ring that slope down anteriorly, sparing the midline) and the sternum."""
    ca, cb = an.cage
    thick, rib_h, period, drop, phase = an.rib
    ring = superellipse(x2, y2, ca, cb, an.body[2])
    band = np.abs(ring - 1) * (ca + cb) / 2 < thick / 2
    band &= ~((y2 > 0) & (np.abs(x2) < an.sternum[0] + 12))  # costal cartilage gap
    band &= ~((y2 < 0) & (np.abs(x2) < an.spine[1] + 10))  # ribs meet the spine at the processes
    ix, iy = np.nonzero(band)
    shift = drop * (y2[ix, iy] + cb) / (2 * cb)  # anterior end lies `drop` mm lower
    zz = grid.axes[2][None, :] + shift[:, None]
    lungs = an.lungs
    rib = (np.mod(zz - phase, period) < rib_h) & (zz > lungs[0].z_low - 15) & (zz < lungs[0].top)
    values = image[ix, iy, :]
    image[ix, iy, :] = np.where(rib, np.float32(an.hu.rib), values)
    half, z0, z1 = an.sternum
    box = grid.box((-half, cb - 8, z0), (half, cb + 8, z1))
    sx, sy, _ = grid.offsets(box, (0.0, cb, 0.0))
    sternum = superellipse(sx[:, :, 0], sy[:, :, 0], half, 6.0, 4.0) < 1
    image[box][np.broadcast_to(sternum[:, :, None], image[box].shape)] = an.hu.sternum


def _paint_airway(image: np.ndarray, mask: np.ndarray, grid: Grid, an: Anatomy) -> None:
    """Trachea and main bronchi: air lumen in a soft-tissue wall, carved out of the lung mask."""
    top, carina, radius = an.trachea
    tubes = [(top, carina, radius, radius)]
    tubes += [(carina, end, radius * 0.8, r) for end, r in an.bronchi]
    for p0, p1, r0, r1 in tubes:
        box, dist, t = segment_distance(grid, p0, p1, max(r0, r1) + an.wall)
        r = r0 + (r1 - r0) * t
        wall = dist < r + an.wall
        sub = image[box]
        sub[wall & (sub < an.hu.soft)] = an.hu.soft
        mask[box][wall] = 0
    for p0, p1, r0, r1 in tubes:  # lumens last, so a wall never covers another tube's lumen
        box, dist, t = segment_distance(grid, p0, p1, max(r0, r1))
        image[box][dist < r0 + (r1 - r0) * t] = AIR
