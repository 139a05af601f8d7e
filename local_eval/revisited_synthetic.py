"""A synthetic dataset in the revisitop layout (Revisited Oxford / Paris), drawn with the synthetic generator's
panels, clutter, occluders and photometry.

    OUT/<dataset>/jpg/<name>.jpg        query and database images
    OUT/<dataset>/gnd_<dataset>.pkl     {"imlist", "qimlist", "gnd": [{"bbx", "easy", "hard", "junk"}, ...]}

Each queried landmark is photographed from views of graded strength: `easy` views show it large, upright and
unoccluded; `hard` ones far away or close up and cut by the frame, turned, in strong perspective, behind
occluders; `junk` ones show it tiny (well under a quarter of the frame), as the protocol's unclear images. The
database also holds views of other landmarks (siblings of the queried ones among them: alike globally, different
in detail) and pure clutter. Queries show their landmark inside a larger scene; `bbx` is the box around it.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import UserError, atomic_output_dir, check_at_least
from local_eval.layout import BUILD_INFO, check_existing, write_build_info
from local_eval.synthetic import (
    Landmark,
    _perspective_coefficients,
    add_occluders,
    encode,
    make_landmarks,
    photometric,
    render_clutter,
    render_panel,
)

log = logging.getLogger(__name__)

DATASETS = ("roxford5k", "rparis6k")


@dataclass(frozen=True)
class ViewStrength:
    """How far a view departs from the panel seen head-on."""

    scales: tuple[tuple[float, float], ...]  # ranges of the panel's longer side / the image's shorter side
    max_angle: float  # in-plane rotation, degrees either way
    perspective: float  # corner jitter, as a share of the panel's size
    shift: float  # offset of the panel's centre from the image's, as a share of the image
    occluders: bool


VIEWS = {
    "query": ViewStrength(((0.5, 0.65),), 6, 0.02, 0.1, False),
    "easy": ViewStrength(((0.75, 1.0),), 8, 0.03, 0.06, False),
    "hard": ViewStrength(((0.4, 0.5), (1.4, 1.8)), 40, 0.12, 0.2, True),
    "junk": ViewStrength(((0.14, 0.2),), 30, 0.08, 0.3, True),
}


@dataclass(frozen=True)
class RevisitedSize:
    landmarks: int  # queried landmarks
    queries: int  # per landmark
    easy: int  # database views of each queried landmark, per kind
    hard: int
    junk: int
    other_views: int  # database views of landmarks never queried
    clutter: int  # database images of no landmark
    min_side: int
    max_side: int


SIZES = {
    "tiny": RevisitedSize(4, 1, 3, 2, 1, 6, 4, 96, 160),
    "small": RevisitedSize(11, 5, 6, 5, 3, 60, 60, 192, 320),
}


def place_view(
    image: Image.Image, panel: Image.Image, rng: np.random.Generator, view: ViewStrength
) -> tuple[float, float, float, float]:
    """Paste a perspective view of the panel onto the image; its bounding box [x1, y1, x2, y2] within the image."""
    w, h = image.size
    scale_range = view.scales[rng.integers(len(view.scales))]
    size = min(w, h) * rng.uniform(*scale_range)
    scale = size / max(panel.size)
    small = (
        panel.resize(
            (max(8, round(panel.width * scale * 1.3)), max(8, round(panel.height * scale * 1.3))),
            Image.BILINEAR,
            reducing_gap=2.0,
        )
        if scale < 0.75
        else panel
    )
    half = np.array(panel.size) * scale / 2
    angle = math.radians(rng.uniform(-view.max_angle, view.max_angle))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    jitter = view.perspective * size
    quad = (np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half) @ rotation.T
    quad += rng.normal(0, jitter, (4, 2)).clip(-2.5 * jitter, 2.5 * jitter)
    quad += np.array([w, h]) * (0.5 + rng.uniform(-view.shift, view.shift, 2))
    warped = small.transform((w, h), Image.PERSPECTIVE, _perspective_coefficients(quad, *small.size), Image.BILINEAR)
    image.paste(warped, (0, 0), warped)
    x1, y1 = np.clip(quad.min(axis=0), 0, [w, h])
    x2, y2 = np.clip(quad.max(axis=0), 0, [w, h])
    return float(x1), float(y1), float(x2), float(y2)


def render_graded_view(
    landmark: Landmark | None, view: ViewStrength | None, seed: list[int], min_side: int, max_side: int
) -> tuple[bytes, list[float]]:
    """(encoded photo, bbx of the landmark in it): a view of the landmark on clutter, or clutter (view None)."""
    rng = np.random.default_rng(seed)
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = rng.choice([1.0, 4 / 3, 3 / 2]) ** rng.choice([-1, 1])
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    image = render_clutter(rng, w, h)
    box = [0.0, 0.0, float(w), float(h)]
    if view is not None:
        box = [round(v, 2) for v in place_view(image, render_panel(landmark.family_seed, landmark.member), rng, view)]
        if view.occluders:
            add_occluders(image, rng)
    return encode(photometric(image, rng), rng), box


@dataclass(frozen=True)
class Planned:
    name: str
    landmark: Landmark | None  # None: clutter
    view: str | None  # a key of VIEWS, None for clutter


def plan_dataset(size: RevisitedSize, seed: int, dataset: str) -> tuple[list[Planned], list[Planned]]:
    """(queries, database images in imlist order)."""
    rng = np.random.default_rng([seed, DATASETS.index(dataset), 20])
    landmarks = make_landmarks(rng, size.landmarks + max(3, size.landmarks // 2), 0)
    queried, others = landmarks[: size.landmarks], landmarks[size.landmarks :]
    queries = [
        Planned(f"landmark{k:02d}_query{i}", lm, "query") for k, lm in enumerate(queried) for i in range(size.queries)
    ]
    database = [
        Planned(f"landmark{k:02d}_{kind}{i}", lm, kind)
        for k, lm in enumerate(queried)
        for kind in ("easy", "hard", "junk")
        for i in range(getattr(size, kind))
    ]
    database += [Planned(f"other_{i:04d}", others[rng.integers(len(others))], "easy") for i in range(size.other_views)]
    database += [Planned(f"clutter_{i:04d}", None, None) for i in range(size.clutter)]
    return queries, [database[i] for i in rng.permutation(len(database))]


def ground_truth(queries: list[Planned], database: list[Planned], boxes: dict[str, list[float]]) -> list[dict]:
    """Per query: its bbx and the database indices of its landmark's easy, hard and junk views."""

    def indices(landmark, kind: str) -> list[int]:
        return [i for i, d in enumerate(database) if d.landmark == landmark and d.view == kind]

    return [
        {
            "bbx": boxes[q.name],
            "easy": indices(q.landmark, "easy"),
            "hard": indices(q.landmark, "hard"),
            "junk": indices(q.landmark, "junk"),
        }
        for q in queries
    ]


def build_revisited_synthetic(
    out: Path, dataset: str = "roxford5k", size: str = "tiny", seed: int = 0, overwrite: bool = False
) -> Path:
    """Write the dataset into out/<dataset> (atomically); an identical build there is kept. Returns out."""
    out = Path(out)
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if size not in SIZES:
        raise UserError(f"--size {size!r}: unknown; expected one of {', '.join(SIZES)}")
    check_at_least("--seed", seed, 0)
    info = {"source": "revisited-synthetic", "dataset": dataset, "size": size, "seed": seed}
    if check_existing(out, info, overwrite):
        log.info("%s already holds this dataset (%s); nothing to do", out, json.dumps(info))
        return out
    spec = SIZES[size]
    queries, database = plan_dataset(spec, seed, dataset)
    with atomic_output_dir(out, overwrite=overwrite, marker=BUILD_INFO) as tmp:
        folder = tmp / dataset / "jpg"
        folder.mkdir(parents=True)
        boxes = {}
        for index, item in enumerate(queries + database):
            view = VIEWS[item.view] if item.view else None
            data, boxes[item.name] = render_graded_view(
                item.landmark, view, [seed, DATASETS.index(dataset), index], spec.min_side, spec.max_side
            )
            (folder / f"{item.name}.jpg").write_bytes(data)
        gnd = {
            "imlist": [d.name for d in database],
            "qimlist": [q.name for q in queries],
            "gnd": ground_truth(queries, database, boxes),
        }
        with open(tmp / dataset / f"gnd_{dataset}.pkl", "wb") as file:
            pickle.dump(gnd, file)
        write_build_info(tmp, info)
    return out


def summary(out: Path, dataset: str) -> str:
    """One screen: how many queries and database images, and the positives per query of each kind."""
    with open(Path(out) / dataset / f"gnd_{dataset}.pkl", "rb") as file:
        gnd = pickle.load(file)
    per_query = {kind: [len(g[kind]) for g in gnd["gnd"]] for kind in ("easy", "hard", "junk")}
    counts = ", ".join(f"{kind} {min(n)}-{max(n)}" for kind, n in per_query.items())
    return (
        f"revisited dataset at {Path(out) / dataset}\n  {len(gnd['qimlist'])} queries, {len(gnd['imlist'])} "
        f"database images\n  per query: {counts}"
    )
