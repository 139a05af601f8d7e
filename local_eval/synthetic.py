"""A synthetic landmark competition in the exact GLDv2/Kaggle layout, rendered from a seed.

A landmark is one planar panel: its family fixes the palette and the large-scale layout (a facade of
windows, big painted shapes or bands), its member seed adds fine high-contrast glyphs, so siblings look
alike globally and differ in local detail. Every image is a fresh photo-like view of a panel (homography,
scale, rotation, crop, occluders, lighting, blur, noise, JPEG) on a clutter background, or pure clutter.
Beside the two task folders lies a distractor set (layout.nonlandmark_folder): images of no train landmark,
made like the test's non-landmark images (clutter, and views of families that never appear in train or test).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from common.cli import UserError, atomic_output_dir, check_at_least
from common.gldv2 import image_path
from local_eval.layout import BUILD_INFO, check_existing, nonlandmark_folder, task_folder, write_build_info, write_csvs

log = logging.getLogger(__name__)

PANEL_SIDE = 256  # long side of a rendered panel, in pixels
MIN_TRAIN_FOR_TEST = 3  # a landmark is queried only when it has at least this many train images
IGNORED_SHARE = 0.03  # recognition test rows marked Ignored
RETRIEVAL_NONLANDMARK_SHARE = 0.05  # retrieval queries without a landmark (Ignored, images None)


@dataclass(frozen=True)
class CompetitionSize:
    """How many landmarks and images a size holds, and the range of image long sides."""

    landmarks: int
    train: int
    test: int
    index: int
    retrieval_test: int
    nonlandmark: int  # the distractor set
    min_side: int
    max_side: int

    @property
    def unseen(self) -> int:
        """Landmarks of families never seen in train."""
        return max(6, self.landmarks // 3)


SIZES = {
    "tiny": CompetitionSize(30, 240, 80, 100, 40, 40, 96, 160),
    "demo": CompetitionSize(40, 800, 160, 400, 80, 80, 192, 320),  # about a quarter of small: what `make demo` fits
    "half": CompetitionSize(75, 1500, 300, 750, 150, 150, 192, 320),  # half of small (`make demo`'s until 2026-12)
    "small": CompetitionSize(150, 3000, 600, 1500, 300, 300, 192, 320),
    "medium": CompetitionSize(1500, 30000, 6000, 15000, 3000, 3000, 192, 320),
}


class Landmark(NamedTuple):
    landmark_id: int
    family_seed: int
    member: int
    in_train: bool  # False: a landmark of a family never seen in train (a non-landmark for recognition)


class Row(NamedTuple):
    """One image of the competition: where it goes, what it shows (None: pure clutter), its Usage."""

    split: str  # train | test | index | retrieval_test | nonlandmark
    image_id: str
    landmark: Landmark | None
    usage: str = ""


# ---------------------------------------------------------------------------------------------------------
# Rendering: panels, clutter, views


def _colour(
    rng: np.random.Generator, value: tuple[float, float] = (0.3, 1.0), saturation: tuple[float, float] = (0.35, 1.0)
) -> tuple[int, int, int]:
    """A random RGB colour of the given value and saturation ranges."""
    hue, sat, val = rng.random(), rng.uniform(*saturation), rng.uniform(*value)
    rgb = np.clip(np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    return tuple(int(255 * val * (1 - sat + sat * c)) for c in rgb)


def _draw_facade(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, palette: list) -> None:
    rows, cols = rng.integers(2, 6, size=2)
    top = int(h * rng.uniform(0.1, 0.3))
    draw.polygon(
        [(0, top), (w // 2, 0), (w, top)] if rng.random() < 0.5 else [(0, 0), (w, 0), (w, top), (0, top)],
        fill=palette[3],
    )
    cell_w, cell_h = w / cols, (h - top) / rows
    fill = rng.uniform(0.45, 0.75)
    for r in range(rows):
        for c in range(cols):
            x0, y0 = c * cell_w + cell_w * (1 - fill) / 2, top + r * cell_h + cell_h * (1 - fill) / 2
            draw.rectangle(
                [x0, y0, x0 + cell_w * fill, y0 + cell_h * fill],
                fill=palette[1],
                outline=palette[2],
                width=max(2, int(cell_w * 0.06)),
            )


def _draw_shapes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, palette: list) -> None:
    for i in range(rng.integers(2, 5)):
        size = rng.uniform(0.25, 0.6) * min(w, h)
        x, y = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
        box = [x - size / 2, y - size / 2, x + size / 2, y + size / 2]
        kind, colour = rng.integers(3), palette[1 + i % 3]
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)


def _draw_bands(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, palette: list) -> None:
    edges = np.sort(rng.uniform(0, 1, rng.integers(3, 7)))
    vertical = rng.random() < 0.5
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        box = [a * w, 0, b * w, h] if vertical else [0, a * h, w, b * h]
        draw.rectangle(box, fill=palette[1 + i % 3])


LAYOUTS = (_draw_facade, _draw_shapes, _draw_bands)


def _draw_glyph(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, y: float, s: float, colour: tuple
) -> None:
    """One small high-contrast mark with corners: square, ring, cross, corner, triangle, checker, bars."""
    kind, line = rng.integers(7), max(2, int(s * 0.25))
    box = [x - s / 2, y - s / 2, x + s / 2, y + s / 2]
    if kind == 0:
        draw.rectangle(box, fill=colour)
    elif kind == 1:
        draw.ellipse(box, outline=colour, width=line)
    elif kind == 2:
        draw.line([box[0], y, box[2], y], fill=colour, width=line)
        draw.line([x, box[1], x, box[3]], fill=colour, width=line)
    elif kind == 3:
        draw.line([(box[0], box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour, width=line)
    elif kind == 4:
        draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    elif kind == 5:
        draw.rectangle([box[0], box[1], x, y], fill=colour)
        draw.rectangle([x, y, box[2], box[3]], fill=colour)
    else:
        for k in range(3):
            bx = box[0] + k * s / 2.5
            draw.rectangle([bx, box[1], bx + s / 6, box[3]], fill=colour)


@lru_cache(maxsize=256)
def render_panel(family_seed: int, member: int) -> Image.Image:
    """The landmark itself, RGBA: family palette, layout and border, then the member's own glyphs."""
    family = np.random.default_rng([family_seed])
    aspect = family.uniform(0.6, 1.6)
    w, h = (PANEL_SIDE, int(PANEL_SIDE / aspect)) if aspect >= 1 else (int(PANEL_SIDE * aspect), PANEL_SIDE)
    palette = [_colour(family) for _ in range(4)]
    panel = Image.new("RGBA", (w, h), palette[0])
    draw = ImageDraw.Draw(panel)
    LAYOUTS[family.integers(len(LAYOUTS))](draw, family, w, h, palette)
    draw.rectangle([0, 0, w - 1, h - 1], outline=palette[2], width=int(PANEL_SIDE * family.uniform(0.02, 0.05)))
    member_rng = np.random.default_rng([family_seed, member + 1])
    inks = [(20, 20, 20), (240, 240, 240), _colour(member_rng, (0.2, 0.5)), _colour(member_rng, (0.8, 1.0))]
    for _ in range(member_rng.integers(25, 45)):
        s = member_rng.uniform(0.05, 0.11) * PANEL_SIDE
        x, y = member_rng.uniform(s / 2, w - s / 2), member_rng.uniform(s / 2, h - s / 2)
        _draw_glyph(draw, member_rng, x, y, s, inks[member_rng.integers(len(inks))])
    return panel


def render_clutter(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A muted background: smooth colour noise plus random shapes and lines."""
    coarse = rng.uniform(0, 255, size=(rng.integers(2, 7), rng.integers(2, 7), 3))
    coarse = coarse.mean(axis=2, keepdims=True) + rng.uniform(0.1, 0.5) * (coarse - coarse.mean(axis=2, keepdims=True))
    image = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 14)):
        x0, x1 = np.sort(rng.uniform(-0.2, 1.2, 2) * w)
        y0, y1 = np.sort(rng.uniform(-0.2, 1.2, 2) * h)
        kind, colour = rng.integers(3), _colour(rng, (0.1, 0.9), (0.0, 0.6))
        if kind == 0:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, 8)))
    return image


def _perspective_coefficients(quad: np.ndarray, w: int, h: int) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points `quad` back to the corners of a w x h panel."""
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(quad, corners, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    return np.linalg.solve(a, corners.reshape(8)).tolist()


def place_panel(image: Image.Image, panel: Image.Image, rng: np.random.Generator) -> None:
    """Paste a homography view of the panel onto the image: scale 0.6-1.5x, rotation, perspective, crop."""
    w, h = image.size
    size = 0.9 * min(w, h) * math.exp(rng.uniform(math.log(0.6), math.log(1.5)))
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
    quad = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
    angle = math.radians(rng.uniform(-20, 20))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    quad = quad @ rotation.T + rng.normal(0, 0.08 * size, (4, 2)).clip(-0.2 * size, 0.2 * size)
    shift = 0.2 if rng.random() < 0.8 else 0.45  # now and then a partial crop
    quad += np.array([w, h]) * (0.5 + rng.uniform(-shift, shift, 2))
    coefficients = _perspective_coefficients(quad, *small.size)
    warped = small.transform((w, h), Image.PERSPECTIVE, coefficients, Image.BILINEAR)
    image.paste(warped, (0, 0), warped)


def add_occluders(image: Image.Image, rng: np.random.Generator) -> None:
    """Zero to two poles, signs or blobs in front of the object."""
    w, h = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice(3, p=[0.6, 0.3, 0.1])):
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        rw, rh = rng.uniform(0.03, 0.15) * w, rng.uniform(0.05, 0.25) * h
        box = [cx - rw, cy - rh, cx + rw, cy + rh]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_colour(rng, (0.1, 0.9), (0.0, 0.6)))


def photometric(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur, per-channel gain, a lighting gradient, gamma and sensor noise."""
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.3)))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    h, w = pixels.shape[:2]
    ramp = (
        rng.uniform(-0.25, 0.25) * (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
        + rng.uniform(-0.25, 0.25) * (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    )
    gain = rng.uniform(0.9, 1.1, 3).astype(np.float32) * rng.uniform(0.7, 1.25)
    pixels = np.clip(pixels * gain * (1 + ramp[..., None]), 0, 1) ** rng.uniform(0.8, 1.25)
    pixels = pixels * 255 + rng.normal(0, rng.uniform(0, 6), pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def encode(image: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG of quality 60-95; a few grayscale, a few PNG bytes (saved under .jpg, as on the real set)."""
    if rng.random() < 0.03:
        image = image.convert("L")
    buffer = io.BytesIO()
    if rng.random() < 0.02:
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue()


def render_view(landmark: Landmark | None, seed: list[int], min_side: int, max_side: int) -> bytes:
    """One encoded photo: a view of the landmark on clutter, or pure clutter when landmark is None."""
    rng = np.random.default_rng(seed)
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]) ** rng.choice([-1, 1])
    w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    image = render_clutter(rng, w, h)
    if landmark is not None:
        place_panel(image, render_panel(landmark.family_seed, landmark.member), rng)
        add_occluders(image, rng)
    return encode(photometric(image, rng), rng)


def _render_to_file(job: tuple[Path, Landmark | None, list[int], int, int]) -> None:
    path, landmark, seed, min_side, max_side = job
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_view(landmark, seed, min_side, max_side))


# ---------------------------------------------------------------------------------------------------------
# Planning: which landmarks, which images, which Usage


def make_id(seed: int, split: str, index: int) -> str:
    """A GLDv2-style id (16 lowercase hex characters), fixed by the seed, the split and the position."""
    return hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).hexdigest()


def make_landmarks(rng: np.random.Generator, count: int, in_train: int) -> list[Landmark]:
    """`count` landmarks in families of 1-3 siblings, the first `in_train` of them seen in train.

    Landmark ids are distinct, sparse integers; no family straddles the seen and the unseen ones.
    """
    members: list[tuple[int, int]] = []
    while len(members) < count:
        family_seed = int(rng.integers(2**31))
        family_size = rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])
        if len(members) < in_train:
            family_size = min(family_size, in_train - len(members))
        members += [(family_seed, m) for m in range(family_size)]
    ids = rng.choice(40 * count, size=count, replace=False)
    return [
        Landmark(int(i), family, member, k < in_train)
        for k, (i, (family, member)) in enumerate(zip(ids, members[:count], strict=True))
    ]


def long_tail_counts(rng: np.random.Generator, n: int, total: int) -> np.ndarray:
    """Images per landmark: Zipf-like (many with 1-3, some with dozens), at least 1 each, summing to total."""
    weights = rng.permutation(np.arange(1, n + 1)) ** -1.5
    cap = max(8, 6 * total // n)
    counts_at = lambda k: np.minimum(cap, 1 + np.floor(k * weights)).astype(int)
    lo, hi = 0.0, float(total) * n
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts_at(mid).sum() <= total else (lo, mid)
    counts = counts_at(lo)
    open_slots = np.flatnonzero(counts < cap)
    top_up = open_slots[np.argsort(-weights[open_slots], kind="stable")][: total - counts.sum()]
    counts[top_up] += 1
    return counts


def assign_usage(rng: np.random.Generator, n: int, ignored_share: float) -> list[str]:
    """About `ignored_share` Ignored, then one third Public and two thirds Private, in random order."""
    n_ignored = round(n * ignored_share)
    n_public = round((n - n_ignored) / 3)
    usage = ["Ignored"] * n_ignored + ["Public"] * n_public + ["Private"] * (n - n_ignored - n_public)
    return [usage[i] for i in rng.permutation(n)]


def _pick(rng: np.random.Generator, items: list, n: int, weights: np.ndarray | None = None) -> list:
    """n items drawn with replacement, uniformly or in proportion to weights."""
    if not items or not n:
        return []
    p = None if weights is None else weights / weights.sum()
    return [items[i] for i in rng.choice(len(items), size=n, p=p)]


def _rows(seed: int, split: str, landmarks: list, usage: list[str] | None = None) -> list[Row]:
    usage = usage or [""] * len(landmarks)
    return [Row(split, make_id(seed, split, i), lm, u) for i, (lm, u) in enumerate(zip(landmarks, usage, strict=True))]


def plan_retrieval(
    rng: np.random.Generator, size: CompetitionSize, queryable: list[Landmark], everything: list[Landmark]
) -> tuple[list, list, list[str]]:
    """Index landmarks (of 40% of the queryable and half the unseen ones) with their views plus distractors,
    queries of those landmarks plus a few non-landmark (Ignored) ones, and the queries' Usage."""
    unseen = [lm for lm in everything if not lm.in_train]
    index_landmarks = [queryable[i] for i in rng.permutation(len(queryable))[: int(len(queryable) * 0.4)]]
    index_landmarks += unseen[: len(unseen) // 2]
    index_counts = np.minimum(long_tail_counts(rng, len(index_landmarks), int(size.index * 0.4)) + 1, 30)
    relevant = [lm for lm, c in zip(index_landmarks, index_counts, strict=True) for _ in range(c)]
    in_index = set(index_landmarks)
    others = [lm for lm in everything if lm not in in_index]
    n_distractors = size.index - len(relevant)
    index = relevant + _pick(rng, others, n_distractors // 2) + [None] * (n_distractors - n_distractors // 2)
    n_ignored = max(1, round(size.retrieval_test * RETRIEVAL_NONLANDMARK_SHARE))
    queries = _pick(rng, index_landmarks, size.retrieval_test - n_ignored) + [None] * n_ignored
    usage = [
        "Ignored" if lm is None else u for lm, u in zip(queries, assign_usage(rng, len(queries), 0.0), strict=True)
    ]
    return index, queries, usage


def plan_competition(size: CompetitionSize, seed: int, nonlandmark_share: float) -> list[Row]:
    """Every image of the competition with its landmark (None for pure clutter) and Usage."""
    rng = np.random.default_rng([seed, 1])
    landmarks = make_landmarks(rng, size.landmarks + size.unseen, size.landmarks)
    seen, unseen = landmarks[: size.landmarks], landmarks[size.landmarks :]
    counts = long_tail_counts(rng, len(seen), size.train)
    train = [lm for lm, c in zip(seen, counts, strict=True) for _ in range(c)]
    queryable = [lm for lm, c in zip(seen, counts, strict=True) if c >= MIN_TRAIN_FOR_TEST]
    popularity = np.sqrt(counts[counts >= MIN_TRAIN_FOR_TEST])  # popular landmarks are photographed more
    n_nonlandmark = round(size.test * nonlandmark_share)
    test = (
        _pick(rng, queryable, size.test - n_nonlandmark, popularity)
        + _pick(rng, unseen, n_nonlandmark // 2)
        + [None] * (n_nonlandmark - n_nonlandmark // 2)
    )
    test_usage = assign_usage(rng, len(test), IGNORED_SHARE)
    index, queries, query_usage = plan_retrieval(rng, size, queryable, landmarks)
    return (
        _rows(seed, "train", train)
        + _rows(seed, "test", test, test_usage)
        + _rows(seed, "index", index)
        + _rows(seed, "retrieval_test", queries, query_usage)
    )


def plan_nonlandmark(size: CompetitionSize, seed: int, competition: list[Row]) -> list[Row]:
    """The distractor set: half views of new never-trained families (none in the competition), half clutter.

    It draws from its own random stream, so the competition's own images stay as they were without it."""
    rng = np.random.default_rng([seed, 2])
    known = {r.landmark.family_seed for r in competition if r.landmark is not None}
    families = [lm for lm in make_landmarks(rng, size.unseen, 0) if lm.family_seed not in known]
    n_views = size.nonlandmark // 2
    return _rows(seed, "nonlandmark", _pick(rng, families, n_views) + [None] * (size.nonlandmark - n_views))


# ---------------------------------------------------------------------------------------------------------
# Writing


def image_location(root: Path, row: Row) -> Path:
    """Where a planned image lives in the Kaggle layout (distractors: flat in their own folder)."""
    if row.split == "nonlandmark":
        return nonlandmark_folder(root) / f"{row.image_id}.jpg"
    if row.split == "train" or row.split == "test":
        return image_path(task_folder(root, "recognition"), row.split, row.image_id)
    return image_path(task_folder(root, "retrieval"), "index" if row.split == "index" else "test", row.image_id)


def render_images(rows: list[Row], root: Path, seed: int, size: CompetitionSize, workers: int) -> None:
    """Render every planned image into root; each image's randomness depends only on the seed and its id."""
    jobs = sorted(
        (
            (image_location(root, r), r.landmark, [seed, int(r.image_id, 16)], size.min_side, size.max_side)
            for r in rows
        ),
        key=lambda job: (job[1] is None, job[1] or ()),
    )
    progress = tqdm(total=len(jobs), desc="render", unit="img", mininterval=2)
    if workers <= 1:
        for job in jobs:
            _render_to_file(job)
            progress.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_to_file, jobs, chunksize=32):
                progress.update()
    progress.close()


def _frame(rows: list[Row], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).sort_values("id", kind="stable")


def write_competition_csvs(rows: list[Row], root: Path) -> None:
    """The rows as the three frames layout.write_csvs writes: train, test and retrieval queries."""
    by_split: dict[str, list[Row]] = {
        s: [r for r in rows if r.split == s] for s in ("train", "test", "index", "retrieval_test")
    }
    index_of: dict[Landmark, list[str]] = {}
    for r in by_split["index"]:
        if r.landmark is not None:
            index_of.setdefault(r.landmark, []).append(r.image_id)
    train = _frame([(r.image_id, r.landmark.landmark_id) for r in by_split["train"]], ["id", "landmark_id"])
    test = _frame(
        [
            (r.image_id, str(r.landmark.landmark_id) if r.landmark and r.landmark.in_train else "", r.usage)
            for r in by_split["test"]
        ],
        ["id", "landmarks", "Usage"],
    )
    queries = _frame(
        [
            (r.image_id, "None" if r.usage == "Ignored" else " ".join(sorted(index_of[r.landmark])), r.usage)
            for r in by_split["retrieval_test"]
        ],
        ["id", "images", "Usage"],
    )
    write_csvs(root, train, test, queries)


def build_synthetic(
    out: Path,
    size: str = "tiny",
    seed: int = 0,
    nonlandmark_share: float = 0.7,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Build the synthetic competition into `out` (atomically) and return `out`; an identical build there is kept."""
    out = Path(out)
    if size not in SIZES:
        raise UserError(f"--size {size!r}: unknown; expected one of {', '.join(SIZES)}")
    check_at_least("--seed", seed, 0)
    if not 0.0 <= nonlandmark_share < 1.0:
        raise UserError(f"--nonlandmark-share must be in [0, 1), got {nonlandmark_share}")
    spec = SIZES[size]
    info = {
        "source": "synthetic",
        "size": size,
        "seed": seed,
        "nonlandmark_share": nonlandmark_share,
        "distractors": spec.nonlandmark,
    }
    if check_existing(out, info, overwrite):
        log.info("%s already holds this competition (%s); nothing to do", out, json.dumps(info))
        return out
    rows = plan_competition(spec, seed, nonlandmark_share)
    rows += plan_nonlandmark(spec, seed, rows)
    if workers is None:
        workers = 1 if len(rows) < 1000 else min(2, os.cpu_count() or 1)
    with atomic_output_dir(out, overwrite=overwrite, marker=BUILD_INFO) as tmp:
        render_images(rows, tmp, seed, spec, workers)
        write_competition_csvs(rows, tmp)
        write_build_info(tmp, info)
    log.info("built %s: %d images", out, len(rows))
    return out
