"""The embedded default data set (``dataset=synthetic``): procedurally rendered red-blood-cell images.

One cell per image, eight morphology classes of the RBC paper (papers/000), drawn analytically on the
pixel grid so any size from 16 to 224 px renders directly, deterministically from a seed, with no download.

How a cell is drawn (all lengths in normalised units: the image spans [-1, 1] on both axes):
- outline: a star-shaped curve r(phi) around the cell centre = base ellipse, optionally times a teardrop
  tail (dacrocyte) plus narrow irregular spicules (acanthocyte); anti-aliased by a soft edge one to a few
  pixels wide. That per-image edge width is the defocus blur: the picture is a smooth function of the grid,
  so the outline is blurred analytically instead of convolving the image.
- haemoglobin density inside: uniform, lowered by a central pallor (a flat-topped elliptic dip; a narrow
  bent slit for stomatocytes), with a dense central spot restored inside the pallor for codocytes.
- colour: Beer-Lambert absorption of a light background by a pink-to-purple stain, per-image stain
  strength, background tint, illumination gradient and pixel noise. Some images show parts of
  normal-looking neighbour cells at the border, as crops from a smear do.
Class parameter ranges overlap (sizes, pallor width and depth, aspect) so the task is learnable but not
trivial.
"""

from __future__ import annotations

import numpy as np

from bloodfl.data.table import SampleTable
from bloodfl.errors import BloodflError

SYNTHETIC_CLASSES = [
    "elliptocyte",
    "codocyte",
    "dacrocyte",
    "hypochromic",
    "spherocyte",
    "stomatocyte",
    "acanthocyte",
    "normal",
]

MAX_SPIKES = 10  # spicules per acanthocyte, upper bound
MAX_NEIGHBOURS = 2  # partial neighbour cells per image, upper bound
_CHUNK_PIXELS = 1 << 17  # pixels rendered per numpy pass: keeps temporaries in cache-friendly sizes

# Stain absorption per RGB channel (relative optical density): eosin-like pink absorbs green most,
# a purple (more haematoxylin) stain absorbs red more and blue less.
_PINK = np.array([0.20, 1.00, 0.55], dtype=np.float32)
_PURPLE = np.array([0.55, 1.00, 0.30], dtype=np.float32)

Params = dict[str, np.ndarray]


def _u(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    return rng.uniform(lo, hi, n).astype(np.float32)


def _base_params(n: int, rng: np.random.Generator) -> Params:
    """A normal discocyte: round, central pallor; the classes below override some of these."""
    p: Params = {
        "radius": _u(rng, 0.50, 0.66, n),
        "aspect": _u(rng, 0.86, 1.0, n),  # minor / major axis
        "cx": _u(rng, -0.10, 0.10, n),
        "cy": _u(rng, -0.10, 0.10, n),
        "theta": _u(rng, 0.0, 2 * np.pi, n),
        "density": _u(rng, 0.85, 1.10, n),
        "pallor": _u(rng, 0.33, 0.56, n),  # pallor semi-axes as a fraction of the cell's
        "pallor_depth": _u(rng, 0.25, 0.60, n),
        "slit": np.ones(n, np.float32),  # pallor minor/major ratio relative to the cell (1 = same shape)
        "bend": np.zeros(n, np.float32),  # curvature of the pallor's long axis (stomatocyte mouth)
        "spot": np.zeros(n, np.float32),  # radius of a dense central spot (codocyte), 0 = none
        "spot_strength": np.zeros(n, np.float32),
        "tail": np.zeros(n, np.float32),  # teardrop tail length relative to the radius, 0 = none
        "tail_width": np.ones(n, np.float32),  # tail half-width (chord at unit radius)
        "spike_amp": np.zeros((n, MAX_SPIKES), np.float32),
        "spike_angle": np.zeros((n, MAX_SPIKES), np.float32),
        "spike_width": np.ones((n, MAX_SPIKES), np.float32),
    }
    return p


def _elliptocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["aspect"] = _u(rng, 0.42, 0.80, n)
    p["pallor"] = _u(rng, 0.25, 0.50, n)
    p["pallor_depth"] = _u(rng, 0.10, 0.45, n)


def _codocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["radius"] = _u(rng, 0.50, 0.68, n)
    p["pallor"] = _u(rng, 0.55, 0.75, n)
    p["pallor_depth"] = _u(rng, 0.45, 0.80, n)
    p["spot"] = _u(rng, 0.14, 0.26, n)
    p["spot_strength"] = _u(rng, 0.55, 1.0, n)


def _dacrocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["radius"] = _u(rng, 0.42, 0.58, n)
    p["aspect"] = _u(rng, 0.80, 1.0, n)
    p["tail"] = _u(rng, 0.45, 1.15, n)
    p["tail_width"] = _u(rng, 0.35, 0.75, n)
    p["pallor_depth"] = _u(rng, 0.10, 0.45, n)
    # shift the body away from the tail so the whole teardrop stays in the frame
    shift = 0.45 * p["tail"] * p["radius"]
    p["cx"] -= shift * np.cos(p["theta"])
    p["cy"] -= shift * np.sin(p["theta"])


def _hypochromic(p: Params, n: int, rng: np.random.Generator) -> None:
    p["pallor"] = _u(rng, 0.62, 0.84, n)
    p["pallor_depth"] = _u(rng, 0.55, 0.90, n)
    p["density"] = _u(rng, 0.65, 0.95, n)


def _spherocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["radius"] = _u(rng, 0.38, 0.53, n)
    p["aspect"] = _u(rng, 0.90, 1.0, n)
    p["pallor_depth"] = _u(rng, 0.0, 0.15, n)
    p["density"] = _u(rng, 1.10, 1.45, n)


def _stomatocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["pallor"] = _u(rng, 0.45, 0.65, n)
    p["slit"] = _u(rng, 0.15, 0.32, n)
    p["bend"] = _u(rng, -0.8, 0.8, n)
    p["pallor_depth"] = _u(rng, 0.50, 0.85, n)


def _acanthocyte(p: Params, n: int, rng: np.random.Generator) -> None:
    p["radius"] = _u(rng, 0.40, 0.56, n)
    p["pallor_depth"] = _u(rng, 0.0, 0.25, n)
    p["density"] = _u(rng, 1.0, 1.3, n)
    count = rng.integers(4, MAX_SPIKES + 1, n)
    present = np.arange(MAX_SPIKES)[None, :] < count[:, None]
    p["spike_amp"] = (rng.uniform(0.12, 0.36, (n, MAX_SPIKES)) * present).astype(np.float32)
    p["spike_angle"] = rng.uniform(0, 2 * np.pi, (n, MAX_SPIKES)).astype(np.float32)
    p["spike_width"] = rng.uniform(0.18, 0.40, (n, MAX_SPIKES)).astype(np.float32)


def _normal(p: Params, n: int, rng: np.random.Generator) -> None:
    pass


_CLASS_SHAPES = {
    "elliptocyte": _elliptocyte,
    "codocyte": _codocyte,
    "dacrocyte": _dacrocyte,
    "hypochromic": _hypochromic,
    "spherocyte": _spherocyte,
    "stomatocyte": _stomatocyte,
    "acanthocyte": _acanthocyte,
    "normal": _normal,
}


def _appearance_params(n: int, rng: np.random.Generator) -> Params:
    """Staining, background, optics and neighbours: drawn identically for every class."""
    hue = rng.uniform(0, 1, (n, 1)).astype(np.float32)
    bg = rng.uniform(0.84, 0.97, (n, 1)) + rng.uniform(-0.03, 0.03, (n, 3))
    angle = rng.uniform(0, 2 * np.pi, (n, MAX_NEIGHBOURS))
    dist = rng.uniform(1.05, 1.45, (n, MAX_NEIGHBOURS))
    count = rng.choice(MAX_NEIGHBOURS + 1, n, p=[0.45, 0.35, 0.20])
    present = np.arange(MAX_NEIGHBOURS)[None, :] < count[:, None]
    return {
        "absorb": (1 - hue) * _PINK + hue * _PURPLE,
        "stain": _u(rng, 0.9, 1.7, n),
        "bg": np.clip(bg, 0, 1).astype(np.float32),
        "edge_px": _u(rng, 1.0, 2.6, n),  # outline softness (defocus), pixels at 64 px
        "noise": _u(rng, 0.01, 0.06, n),  # standard deviation of the pixel noise
        "grad": rng.uniform(-0.06, 0.06, (n, 2)).astype(np.float32),  # illumination slope
        "nb_x": (dist * np.cos(angle)).astype(np.float32),
        "nb_y": (dist * np.sin(angle)).astype(np.float32),
        "nb_r": (rng.uniform(0.45, 0.65, (n, MAX_NEIGHBOURS)) * present).astype(np.float32),  # 0 = absent
    }


def _col(a: np.ndarray) -> np.ndarray:
    """Per-image values broadcast against (k, H, W)."""
    return a[:, None, None]


def _soft_inside(dist: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Coverage 1 inside, 0 outside a curve from its signed distance (negative inside), smoothstep edge."""
    t = np.clip(0.5 - dist / edge, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _outline_radius(p: Params, u: np.ndarray, v: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """The outline's distance from the centre along each pixel's direction."""
    major = _col(p["radius"] / np.sqrt(p["aspect"]))
    minor = _col(p["radius"] * np.sqrt(p["aspect"]))
    ell = np.sqrt((u / major) ** 2 + (v / minor) ** 2)
    safe = np.maximum(rho, 1e-6)
    radius = safe / np.maximum(ell, 1e-6)  # ellipse radius in this direction
    cos_phi, sin_phi = u / safe, v / safe
    if np.any(p["tail"]):
        # chord to the +u axis on the unit circle: linear in the angle near the tip, so the tail is pointed
        chord = np.sqrt(np.maximum(2 - 2 * cos_phi, 0))
        tail = np.maximum(1 - chord / _col(p["tail_width"]), 0) ** 1.5
        radius = radius * (1 + _col(p["tail"]) * tail)
    if np.any(p["spike_amp"]):
        base = _col(p["radius"])
        for k in range(p["spike_amp"].shape[1]):
            c, s = np.cos(p["spike_angle"][:, k]), np.sin(p["spike_angle"][:, k])
            chord = np.sqrt(np.maximum(2 - 2 * (cos_phi * _col(c) + sin_phi * _col(s)), 0))
            bump = np.maximum(1 - chord / _col(p["spike_width"][:, k]), 0) ** 1.5
            radius = radius + base * _col(p["spike_amp"][:, k]) * bump
    return radius


def _density(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Haemoglobin density inside the cell: pallor dip, optional slit shape and target spot."""
    major = _col(p["radius"] / np.sqrt(p["aspect"]) * p["pallor"])
    minor = _col(p["radius"] * np.sqrt(p["aspect"]) * p["pallor"] * p["slit"])
    bent = v - _col(p["bend"]) * u * u / major
    q2 = (u / major) ** 2 + (bent / minor) ** 2
    pallor = np.exp(-(q2 * q2))  # flat-topped dip with a soft rim
    if np.any(p["spot"]):
        spot_r = _col(p["spot"] * p["radius"])
        pallor = pallor * (1 - _col(p["spot_strength"]) * np.exp(-(u * u + v * v) / (spot_r * spot_r)))
    return _col(p["density"]) * (1 - _col(p["pallor_depth"]) * pallor)


def _add_neighbours(
    od: np.ndarray, a: Params, x: np.ndarray, y: np.ndarray, p: Params, edge: np.ndarray
) -> None:
    """Add partial normal-looking neighbour cells around the main cell to the optical density ``od``."""
    for m in range(a["nb_r"].shape[1]):
        rows = np.flatnonzero(a["nb_r"][:, m])  # only the images that have this neighbour
        if rows.size == 0:
            continue
        dx = x - _col(p["cx"][rows] + a["nb_x"][rows, m])
        dy = y - _col(p["cy"][rows] + a["nb_y"][rows, m])
        d2 = dx * dx + dy * dy
        r = _col(a["nb_r"][rows, m])
        q2 = d2 / (0.45 * r) ** 2
        nb = _soft_inside(np.sqrt(d2) - r, edge[rows]) * (1 - 0.45 * np.exp(-(q2 * q2)))
        od[rows] = np.maximum(od[rows], nb)


def _render_chunk(p: Params, a: Params, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render the k cells described by per-image parameter arrays of length k; float32 (k, H, W, 3)."""
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    x, y = grid[None, None, :], grid[None, :, None]
    dx, dy = x - _col(p["cx"]), y - _col(p["cy"])
    c, s = _col(np.cos(p["theta"])), _col(np.sin(p["theta"]))
    u, v = c * dx + s * dy, -s * dx + c * dy  # cell frame: major axis (and tail) along +u
    rho = np.sqrt(u * u + v * v)
    # edge softness is drawn in pixels of a 64 px image: larger renderings look the same, smaller ones
    # keep at least a pixel of anti-aliasing
    edge = _col(a["edge_px"] * 2 / min(size, 64))
    cover = _soft_inside(rho - _outline_radius(p, u, v, rho), edge)
    od = cover * _density(p, u, v)
    _add_neighbours(od, a, x, y, p, edge)
    # Beer-Lambert: transmitted light falls exponentially with stain optical density, per channel
    optical = (_col(a["stain"]) * od)[..., None] * a["absorb"][:, None, None, :]
    light = a["bg"][:, None, None, :] * np.exp(-optical)
    light *= (1 + _col(a["grad"][:, 0]) * x + _col(a["grad"][:, 1]) * y)[..., None]
    # uniform noise with the drawn standard deviation: a fifth of the cost of Gaussian draws
    noise = rng.random(light.shape, dtype=np.float32) - 0.5
    light += noise * (a["noise"] * np.float32(np.sqrt(12)))[:, None, None, None]
    return light


def _rows(p: Params, part: slice) -> Params:
    return {k: v[part] for k, v in p.items()}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def render_synthetic(n_per_class: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n_per_class`` cells of every class in ``SYNTHETIC_CLASSES``.

    Returns uint8 images (N, image_size, image_size, 3) and int64 labels (N,), N = 8 * n_per_class,
    grouped by class: rows [c * n_per_class, (c + 1) * n_per_class) are class c. Each class draws from
    its own child of ``SeedSequence(seed)``, so the same seed gives the identical array.
    """
    if n_per_class < 1 or image_size < 8:
        raise BloodflError(
            f"synthetic data needs n_per_class >= 1 and image_size >= 8 (got {n_per_class}, {image_size}): "
            "raise them in the dataset config"
        )
    streams = np.random.SeedSequence(seed).spawn(len(SYNTHETIC_CLASSES))
    images = np.empty((len(SYNTHETIC_CLASSES) * n_per_class, image_size, image_size, 3), np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (image_size * image_size))
    for label, (name, stream) in enumerate(zip(SYNTHETIC_CLASSES, streams)):
        rng = np.random.default_rng(stream)
        shape = _base_params(n_per_class, rng)
        _CLASS_SHAPES[name](shape, n_per_class, rng)
        look = _appearance_params(n_per_class, rng)
        for start in range(0, n_per_class, chunk):
            part = slice(start, min(start + chunk, n_per_class))
            rendered = _render_chunk(_rows(shape, part), _rows(look, part), image_size, rng)
            first = label * n_per_class
            images[first + part.start : first + part.stop] = _to_uint8(rendered)
    labels = np.repeat(np.arange(len(SYNTHETIC_CLASSES), dtype=np.int64), n_per_class)
    return images, labels


def synthetic_table(n_per_class: int = 150, image_size: int = 64, seed: int = 0) -> SampleTable:
    """The synthetic data set as a SampleTable whose ``images`` hold the rendered pixels."""
    images, labels = render_synthetic(n_per_class, image_size, seed)
    refs = [f"synthetic/{name}/{i:05d}" for name in SYNTHETIC_CLASSES for i in range(n_per_class)]
    return SampleTable(
        refs=refs, labels=labels, classes=list(SYNTHETIC_CLASSES), name="synthetic", images=images
    )
