"""An H&E phantom: PCam-like patches rendered from a Beer-Lambert stain model, with ground truth.

Each patch is a map of hematoxylin and eosin concentrations (optical density per stain) turned into
RGB by Beer-Lambert absorption, I = 255 * 10^-(c_H * h + c_E * e + background), with the stain
vectors of Ruifrok & Johnston (2001), jittered per patch like slide-to-slide staining variation,
then slightly blurred (optics) and given sensor noise. The scale is PCam's level 2 (~0.97 um/px):
a lymphocyte nucleus is ~7 um across, i.e. ~7 px.

Morphology types (``MORPHOLOGY``), each with its own textures and nuclei:
  0 lymphocytes  dense small round dark nuclei on a faint eosin background
  1 stroma       wavy eosinophilic collagen fibres with sparse spindle-shaped nuclei
  2 adipose      large empty fat cells with thin pink membranes and a few flattened nuclei
  3 tumour       crowded large pleomorphic vesicular nuclei with nucleoli, amphophilic cytoplasm
  4 necrosis     pale amorphous eosin with karyorrhectic nuclear debris and ghost nuclei

Ground truth, as in PCam: label 1 iff tumour lies in the centre 32x32 region (of a 96 px patch).
Tumour appears as whole tumour patches or as nests inside another tissue, so a negative patch can
hold tumour away from its centre. Stored per patch: the dominant morphology type, the tumour
fraction of the patch and of its centre. A small fraction of patches are artefacts that the outlier
filter should remove: empty glass ("background") and out-of-focus tissue ("blur").
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from .dataset import ImageSet

MORPHOLOGY = ("lymphocytes", "stroma", "adipose", "tumour", "necrosis")
TUMOUR = 3
SIZE = 96  # native patch size (PCam)
CENTRE = slice(32, 64)
PAD = 12

# Ruifrok & Johnston optical-density vectors (RGB), normalised below
H_VEC = np.array([0.650, 0.704, 0.286])
E_VEC = np.array([0.072, 0.990, 0.105])


def _unit(v):
    return v / np.linalg.norm(v)


def _noise(rng, shape, sigma):
    """Smooth Gaussian noise with unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def _grid_points(rng, size, spacing, jitter, keep):
    g = np.arange(-spacing, size + spacing, spacing)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    pts += rng.uniform(-jitter, jitter, pts.shape) * spacing
    pts = pts[rng.random(len(pts)) < keep]
    return pts[(pts >= 0).all(1) & (pts < size).all(1)]


def _nuclei(rng, size, pts, a, b, theta, irregular=0.1):
    """Soft masks of elliptical nuclei at ``pts`` (nearest-centre tessellation, vectorised).

    Returns (mask in [0,1], normalised radius d inside each nucleus) for chromatin and nucleoli."""
    if len(pts) == 0:
        z = np.zeros((size, size))
        return z, z + 9.0
    ij = np.clip(np.round(pts).astype(int), 0, size - 1)
    seeds = np.ones((size, size), bool)
    seeds[ij[:, 0], ij[:, 1]] = False
    lab = np.full((size, size), -1)
    lab[ij[:, 0], ij[:, 1]] = np.arange(len(ij))
    _, (iy, ix) = ndi.distance_transform_edt(seeds, return_indices=True)
    k = lab[iy, ix]
    yy, xx = np.mgrid[0:size, 0:size]
    dy, dx = yy - pts[k, 0], xx - pts[k, 1]
    c, s = np.cos(theta[k]), np.sin(theta[k])
    u, v = dx * c + dy * s, -dx * s + dy * c
    d = np.sqrt((u / a[k]) ** 2 + (v / b[k]) ** 2)
    d = d * (1 + irregular * _noise(rng, (size, size), 1.2))
    return 1 / (1 + np.exp(np.clip(-(1 - d) / 0.09, -50, 50))), d


def _voronoi_edges(pts, size, width):
    """Cell borders: where the nearest and second-nearest centres are about equally far (a k-d tree
    query: a full per-pixel sort over all centres was a third of the rendering time)."""
    yy, xx = np.mgrid[0:size, 0:size]
    d, _ = cKDTree(pts).query(np.stack([yy.ravel(), xx.ravel()], 1), k=2)
    d = d.reshape(size, size, 2)
    return np.exp(-0.5 * ((d[..., 1] - d[..., 0]) / width) ** 2)


# --------------------------------------------------------------------------- tissue renderers
def _lymphocytes(rng, n):
    spacing = rng.uniform(6.8, 8.5)
    pts = _grid_points(rng, n, spacing, 0.35, rng.uniform(0.75, 0.95))
    big = rng.random(len(pts)) < 0.06  # scattered histiocytes / immunoblasts: larger, paler nuclei
    r = rng.uniform(2.7, 3.6, len(pts))
    m, _ = _nuclei(rng, n, pts[~big], r[~big] * rng.uniform(1.0, 1.2, (~big).sum()), r[~big],
                   rng.uniform(0, np.pi, (~big).sum()), 0.08)
    rb = rng.uniform(4.5, 5.5, big.sum())
    mb, _ = _nuclei(rng, n, pts[big], rb, rb * 0.85, rng.uniform(0, np.pi, big.sum()), 0.1)
    chrom = 0.85 + 0.15 * _noise(rng, (n, n), 0.7)
    ch = m * rng.uniform(1.05, 1.35) * chrom + 0.55 * mb * (1 - m) + 0.06
    ce = 0.12 + 0.05 * _noise(rng, (n, n), 4) + 0.1 * (1 - m) * (1 + mb)
    return ch, np.clip(ce, 0, None)


def _stroma(rng, n):
    theta = rng.uniform(0, np.pi)
    # collagen: noise smeared along one direction (anisotropic Gaussian), rotated and gently warped
    big = 2 * n
    fib = ndi.gaussian_filter(rng.standard_normal((big, big)), (0.9, rng.uniform(6, 10)), mode="wrap")
    fib = ndi.rotate(fib, np.degrees(theta), reshape=False, order=1, mode="wrap")[n // 2:n // 2 + n, n // 2:n // 2 + n]
    fib = np.clip(fib / (fib.std() + 1e-8), -2.5, 2.5)
    fib = 1 / (1 + np.exp(-1.8 * fib))
    ce = 0.16 + 0.38 * fib * (0.8 + 0.2 * _noise(rng, (n, n), 6))
    cleft = _noise(rng, (n, n), 3.0) > 1.6  # retraction clefts
    ce = np.where(cleft, ce * 0.25, ce)
    pts = _grid_points(rng, n, rng.uniform(15, 22), 0.45, rng.uniform(0.35, 0.6))
    a = rng.uniform(4.5, 7.5, len(pts))
    m, _ = _nuclei(rng, n, pts, a, rng.uniform(1.2, 1.9, len(pts)), theta + rng.normal(0, 0.2, len(pts)), 0.05)
    ch = m * rng.uniform(0.85, 1.15) + 0.04 + 0.03 * fib
    return ch, np.clip(ce, 0, None) * (1 - 0.6 * m)


def _adipose(rng, n):
    pts = _grid_points(rng, n, rng.uniform(22, 30), 0.3, 1.0)  # small adipocytes: >= ~10 cells a patch
    if len(pts) < 3:
        pts = rng.uniform(0, n, (4, 2))
    edge = _voronoi_edges(pts, n, rng.uniform(0.8, 1.1))
    ce = 0.6 * edge + 0.015
    # a few flattened nuclei sitting on the membranes
    cand = np.argwhere(edge > 0.9)
    k = min(len(cand), rng.integers(1, 5))
    npts = cand[rng.choice(len(cand), k, replace=False)].astype(float) if k else np.zeros((0, 2))
    m, _ = _nuclei(rng, n, npts, rng.uniform(3.5, 5, k), rng.uniform(1.0, 1.5, k), rng.uniform(0, np.pi, k), 0.05)
    ch = 0.9 * m + 0.03 * edge + 0.01
    return ch, ce


def _tumour(rng, n):
    pts = _grid_points(rng, n, rng.uniform(12, 16), 0.3, rng.uniform(0.8, 0.97))
    a = rng.uniform(4.5, 8.5, len(pts))
    b = a * rng.uniform(0.6, 0.95, len(pts))
    m, d = _nuclei(rng, n, pts, a, b, rng.uniform(0, np.pi, len(pts)), 0.18)
    rim = np.clip((d - 0.7) / 0.3, 0, 1) * (d < 1.05)  # chromatin on the nuclear membrane
    nucleolus = 1 / (1 + np.exp(-(0.22 - d) / 0.04))
    chrom = 0.8 + 0.2 * _noise(rng, (n, n), 0.8)
    ch = m * (rng.uniform(0.45, 0.7) * chrom + 0.45 * rim) + 0.7 * nucleolus + 0.12
    borders = _voronoi_edges(pts, n, 0.8) if len(pts) >= 2 else 0
    ce = (0.22 + 0.05 * _noise(rng, (n, n), 5) + 0.1 * borders) * (1 - 0.5 * m)
    return ch, np.clip(ce, 0, None)


def _necrosis(rng, n):
    ce = 0.3 + 0.1 * _noise(rng, (n, n), 6) + 0.04 * _noise(rng, (n, n), 1.5)
    pts = _grid_points(rng, n, rng.uniform(7, 10), 0.5, rng.uniform(0.3, 0.55))
    r = rng.uniform(0.8, 1.8, len(pts))
    m, _ = _nuclei(rng, n, pts, r * 1.3, r, rng.uniform(0, np.pi, len(pts)), 0.3)
    gpts = _grid_points(rng, n, 18, 0.45, 0.4)
    gr = rng.uniform(3.5, 5, len(gpts))
    _, gd = _nuclei(rng, n, gpts, gr, gr * 0.85, rng.uniform(0, np.pi, len(gpts)), 0.1)
    ghost = np.exp(-0.5 * ((gd - 1) / 0.12) ** 2)
    ch = 1.15 * m + 0.22 * ghost + 0.1 + 0.05 * _noise(rng, (n, n), 3)
    return np.clip(ch, 0, None), np.clip(ce, 0.05, None)


RENDER = (_lymphocytes, _stroma, _adipose, _tumour, _necrosis)


def _tumour_region(rng, n, fraction, centre: bool | None):
    """A soft blob covering about ``fraction`` of the canvas; centre=True forces it to cover the
    patch centre, False keeps it off the centre 32x32 region, None leaves it to chance."""
    for _ in range(20):
        field = _noise(rng, (n, n), rng.uniform(9, 14))
        if centre is not None:
            yy, xx = np.mgrid[0:n, 0:n]
            c = (n - 1) / 2
            if centre:
                cy, cx = c + rng.uniform(-12, 12, 2)
            else:
                ang = rng.uniform(0, 2 * np.pi)
                cy, cx = c + 50 * np.sin(ang), c + 50 * np.cos(ang)
            field = field + 2.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 20 ** 2))
        t = np.quantile(field, 1 - fraction)
        soft = 1 / (1 + np.exp(-(field - t) / 0.08))
        inner = soft[PAD:PAD + SIZE, PAD:PAD + SIZE]
        hit = (inner[CENTRE, CENTRE] > 0.5).any()
        if centre is None or hit == centre:
            return soft
    return soft if centre is None or centre else np.zeros((n, n))


def render_patch(rng: np.random.Generator, positive: bool):
    """One patch: (uint8 [96,96,3], morphology type, tumour fraction, centre tumour fraction)."""
    n = SIZE + 2 * PAD
    tumour_m = np.zeros((n, n))
    if positive and rng.random() < 0.6:
        base = TUMOUR
        tumour_m = _tumour_region(rng, n, rng.uniform(0.65, 1.0), centre=True)
    else:
        base = int(rng.choice([0, 1, 2, 4]))
        if positive:
            tumour_m = _tumour_region(rng, n, rng.uniform(0.15, 0.45), centre=True)
        elif rng.random() < 0.3:
            tumour_m = _tumour_region(rng, n, rng.uniform(0.1, 0.3), centre=False)
    if base == TUMOUR:
        bg_h, bg_e = _stroma(rng, n)  # desmoplastic stroma around the tumour
        t_h, t_e = _tumour(rng, n)
    else:
        bg_h, bg_e = RENDER[base](rng, n)
        t_h, t_e = _tumour(rng, n) if tumour_m.any() else (0.0, 0.0)
    ch = (1 - tumour_m) * bg_h + tumour_m * t_h
    ce = (1 - tumour_m) * bg_e + tumour_m * t_e
    inner = (slice(PAD, PAD + SIZE),) * 2
    mask = tumour_m[inner] > 0.5
    frac, centre_frac = float(mask.mean()), float(mask[CENTRE, CENTRE].mean())
    if frac > 0.5:
        base = TUMOUR
    return _to_rgb(rng, ch[inner], ce[inner]), base, frac, centre_frac


def _to_rgb(rng, ch, ce, blur: float = 0.55):
    h = _unit(H_VEC + rng.normal(0, 0.04, 3).clip(-0.1, 0.1))
    e = _unit(E_VEC + rng.normal(0, 0.04, 3).clip(-0.1, 0.1))
    sh, se = rng.uniform(0.8, 1.15), rng.uniform(0.7, 1.1)  # stain intensity of this "slide"
    od = sh * ch[..., None] * h + se * ce[..., None] * e + 0.04
    rgb = 255.0 * np.power(10.0, -od)
    rgb = ndi.gaussian_filter(rgb, (blur, blur, 0))
    rgb += rng.normal(0, 2.0, rgb.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def _background(rng):
    od = 0.02 + 0.01 * _noise(rng, (SIZE, SIZE), 8)[..., None] * np.array([1, 1, 1]) + 0.01
    rgb = 250 * np.power(10.0, -od) + rng.normal(0, 1.0, (SIZE, SIZE, 3))
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def generate(n: int, seed: int, artefact_rate: float = 0.04, progress=None, split: str = "train") -> ImageSet:
    """``n`` patches, about half of them positive, plus ground truth in ``meta``."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, SIZE, SIZE, 3), np.uint8)
    y = np.zeros(n, np.int64)
    morph = np.zeros(n, np.int64)
    frac = np.zeros(n)
    centre = np.zeros(n)
    artefact = np.full(n, "none", dtype=object)
    it = range(n) if progress is None else progress(range(n), desc=f"phantom {split}", unit="img")
    for i in it:
        r = rng.random()
        if r < artefact_rate / 2:
            x[i], morph[i], artefact[i] = _background(rng), -1, "background"
            continue
        img, morph[i], frac[i], centre[i] = render_patch(rng, positive=rng.random() < 0.5)
        if r < artefact_rate:
            img = ndi.gaussian_filter(img.astype(float), (2.5, 2.5, 0)).round().astype(np.uint8)
            artefact[i] = "blur"
        x[i] = img
        y[i] = int(centre[i] > 0)  # PCam: tumour anywhere in the centre 32x32 region
    meta = {"source_index": np.arange(n), "morphology": morph, "tumour_fraction": frac,
            "centre_tumour_fraction": centre, "artefact": artefact.astype(str)}
    return ImageSet(x, y, meta, {"source": "phantom", "split": split, "seed": seed,
                                 "morphology_types": list(MORPHOLOGY)})
