"""Image decoding and the feature caches of submission/main.py: global descriptors in resumable chunks, local
features one file per image, every file written atomically.

Shipped beside main.py (which imports it from its own folder). The model is savedmodel.py's DelgSavedModel, passed in.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image
from settings_cli import InputError
from tqdm import tqdm

if TYPE_CHECKING:  # the types of main.py and the files beside it, for the annotations only
    from main import Extraction, Run
    from savedmodel import DelgSavedModel

log = logging.getLogger("submission")


def image_path(data: Path, split: str, image_id: str) -> Path:
    """Image 'abcdef…' of a split lives at split/a/b/c/abcdef….jpg."""
    return data / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


# Global descriptors are computed on a few fixed sizes so that images can be batched (section 3).
BUCKET_ASPECTS = (9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9)  # width / height


BUCKET_SIDES = (1.0, 0.75, 0.5, 0.375, 0.25)  # longer side, as a share of --global-max-side


def open_rgb(path: Path, layout: Callable[[int, int], tuple[tuple[int, int], tuple[float, ...]]]) -> Image.Image:
    """The file as RGB: layout(width, height) gives the output size and the box of the original to resize into it.
    A JPEG that shrinks is decoded at a reduced scale (PIL's draft mode), which saves most of its decoding time."""
    with Image.open(path) as image:
        width, height = image.size
        size, box = layout(width, height)
        shrink = min(size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1]))
        if shrink < 1:
            image.draft("RGB", (math.ceil(width * shrink), math.ceil(height * shrink)))
        fx, fy = image.size[0] / width, image.size[1] / height
        image = eight_bits(image).convert("RGB")
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        if image.size == size and box == (0, 0, *image.size):
            return image
        return image.resize(size, Image.BILINEAR, box=box)


def eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (mode I;16*, or I as older Pillow opens such PNGs) scaled to 8 bits, as TensorFlow's
    decoder does in training; convert("RGB") would clip every pixel above 255 to white. Other modes as they are."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    return Image.fromarray(np.clip(np.asarray(image).astype(np.int64) >> 8, 0, 255).astype(np.uint8))


def warn_unreadable(path: Path, err: Exception) -> None:
    log.warning("skipping unreadable image %s: %s", path, (str(err).splitlines() or [type(err).__name__])[0][:200])


def decode_image(path: Path, max_side: int, min_side: int) -> np.ndarray | None:
    """RGB uint8 [H,W,3] for local features: longer side capped, shorter side edge-padded; None (logged) when
    unreadable."""
    def capped(width: int, height: int):
        factor = min(1.0, max_side / max(width, height))
        return (max(1, round(width * factor)), max(1, round(height * factor))), (0, 0, width, height)

    try:
        pixels = np.asarray(open_rgb(path, capped))
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped, never fatal
        warn_unreadable(path, err)
        return None
    pad_rows, pad_cols = max(0, min_side - pixels.shape[0]), max(0, min_side - pixels.shape[1])
    return np.pad(pixels, [(0, pad_rows), (0, pad_cols), (0, 0)], mode="edge")


def global_bucket(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the bucket an image is fed at for its global descriptor: the nearest of
    BUCKET_ASPECTS, and the largest of BUCKET_SIDES (x max_side) not above the image's longer side (the
    smallest when the image is smaller than all). Sides are multiples of 16."""
    aspect = min(BUCKET_ASPECTS, key=lambda a: abs(math.log(width / height / a)))
    sides = [max(16, round(max_side * share / 16) * 16) for share in BUCKET_SIDES]
    long_side = next((side for side in sides if side <= max(width, height)), sides[-1])
    short_side = max(16, round(long_side * min(aspect, 1 / aspect) / 16) * 16)
    return (long_side, short_side) if aspect >= 1 else (short_side, long_side)


def decode_for_global(path: Path, max_side: int) -> np.ndarray | None:
    """RGB uint8 of the image's bucket: the centred part of the image with the bucket's aspect, resized to it (an
    image between 9:16 and 16:9 loses at most ~13% of its longer side; wider ones more). None when unreadable."""
    def centred_crop(width: int, height: int):
        bucket = global_bucket(width, height, max_side)
        scale = max(bucket[0] / width, bucket[1] / height)
        crop_w, crop_h = min(width, bucket[0] / scale), min(height, bucket[1] / scale)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return bucket, (left, top, left + crop_w, top + crop_h)

    try:
        return np.asarray(open_rgb(path, centred_crop))
    except Exception as err:  # noqa: BLE001 - any unreadable image is skipped, never fatal
        warn_unreadable(path, err)
        return None


def prefetched(load: Callable, items: Iterable, threads: int, depth: int) -> Iterator:
    """load(item) for each item, in order, computed by `threads` threads up to `depth` items ahead."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() gives a new file; mkstemp's files are private (0600)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def size_text(count: int) -> str:
    """Bytes as '3.2 KB', '51.0 MB' or '2.4 GB'."""
    unit = max(1, min(3, int(math.log(max(count, 1), 1024))))
    return f"{count / 1024**unit:.1f} {('KB', 'MB', 'GB')[unit - 1]}"


@contextlib.contextmanager
def space_checked(path: Path, partial: Path | None = None) -> Iterator[None]:
    """A full disk while writing path (or its temporary copy `partial`) becomes one InputError naming the folder,
    the file, how much of it was written and what is free."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        written = (partial or path).stat().st_size if (partial or path).is_file() else 0
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        raise InputError(f"no space left in {path.parent} while writing {path.name}: it needs more than the "
                         f"{size_text(written)} written when the disk filled ({size_text(free)} free now); free some "
                         "space there or point --work or --out elsewhere") from None


def atomic_save(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file beside path, then rename it over path (as an ordinary file, mode 0644 under
    the usual umask)."""
    tmp = None
    try:
        with space_checked(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
            os.close(fd)
        with space_checked(path, Path(tmp)):
            write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def save_json(path: Path, content: dict) -> None:
    atomic_save(path, lambda tmp: tmp.write_text(json.dumps(content, indent=1, default=str)))


def chunk_path(cache: Path, index: int) -> Path:
    return cache / f"chunk_{index:06d}.npz"


def read_chunk(cache: Path, index: int, ids: list[str], fields_: tuple[str, ...],
               complete: bool = True) -> list[np.ndarray] | None:
    """The named arrays of a cached chunk (only its ids are read for no fields), or None when the chunk is
    missing, unreadable, for other ids, or (with complete) cut short by a deadline."""
    try:
        with np.load(chunk_path(cache, index)) as chunk:
            if chunk["ids"].tolist() == ids and (not complete or bool(chunk["complete"])):
                return [chunk[name] for name in fields_]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    return None


class Batcher:
    """Collects (row, pixels) by image size and calls the model on full batches of one size."""

    def __init__(self, model: DelgSavedModel, extraction: Extraction, descriptors: np.ndarray, ok: np.ndarray):
        self.model, self.ext, self.descriptors, self.ok = model, extraction, descriptors, ok
        self.pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}

    def add(self, row: int, pixels: np.ndarray | None) -> int:
        """Queue one image; the number of images this call finished (computed, or unreadable)."""
        if pixels is None:
            return 1
        group = self.pending.setdefault(pixels.shape, [])
        group.append((row, pixels))
        if len(group) >= self.ext.global_batch:
            return self._run(pixels.shape)
        if sum(map(len, self.pending.values())) > 4 * self.ext.global_batch:  # bounded memory with many sizes
            return self._run(max(self.pending, key=lambda shape: len(self.pending[shape])))
        return 0

    def flush(self) -> int:
        return sum(self._run(shape) for shape in list(self.pending))

    def _run(self, shape: tuple) -> int:
        group = self.pending.pop(shape)
        rows = [row for row, _ in group]
        images = np.stack([pixels for _, pixels in group])
        if (self.ext.global_precision, False) in self.model.batched and len(group) < self.ext.global_batch:
            padding = np.zeros((self.ext.global_batch - len(group), *shape), np.uint8)  # one compiled shape
            images = np.concatenate([images, padding])
        try:
            found = self.model.global_batch(images, self.ext.global_scales(), self.ext.global_precision,
                                            self.ext.global_xla == "on")
            self.descriptors[rows], self.ok[rows] = found[:len(rows)], True
        except Exception as err:  # noqa: BLE001 - one bad image must not end the run: retry them one by one
            log.warning("batched global call failed (%s); retrying its %d images one by one",
                        str(err).splitlines()[0][:200], len(rows))
            for row, pixels in group:
                with contextlib.suppress(Exception):
                    self.descriptors[row] = self.model.global_descriptor(pixels, self.ext.global_scales())
                    self.ok[row] = True
        return len(rows)


StopRule = Callable[[int, float], bool]  # (images done, seconds spent) -> stop now


def extract_global(model: DelgSavedModel, ids: list[str], paths: list[Path], cache: Path, extraction: Extraction,
                   run: Run, shard: tuple[int, int] = (0, 1), stop: StopRule | None = None) -> tuple[int, bool]:
    """Extract and cache, chunk by chunk, every missing global descriptor of this shard, batched by size bucket.
    Returns (images finished, stopped): when stop(finished, seconds) says so, the images still waiting for a
    batch are dropped and the current chunk is saved as it is."""
    size = run.chunk_size
    chunks = [c for c in range(math.ceil(len(ids) / size)) if c % shard[1] == shard[0]]
    todo = [c for c in chunks if read_chunk(cache, c, ids[c * size:(c + 1) * size], ()) is None]
    if len(todo) < len(chunks):
        log.info("%s: %d of %d chunks already cached", cache.name, len(chunks) - len(todo), len(chunks))
    rows = [i for c in todo for i in range(c * size, min(len(ids), (c + 1) * size))]
    load = lambda i: decode_for_global(paths[i], extraction.global_max_side)
    images = prefetched(load, rows, run.decode_threads, run.prefetch)
    dtype = np.float16 if extraction.cache_float16 else np.float32
    finished, began = 0, time.monotonic()
    with tqdm(total=len(rows), desc=f"global {cache.name}", unit="img") as bar:
        for c in todo:
            chunk_ids = ids[c * size:(c + 1) * size]
            descriptors, ok = np.zeros((len(chunk_ids), model.global_dim), np.float32), np.zeros(len(chunk_ids), bool)
            batcher, stopped = Batcher(model, extraction, descriptors, ok), False
            for j in range(len(chunk_ids)):
                count = batcher.add(j, next(images))
                finished += count
                bar.update(count)
                if stop is not None and stop(finished, time.monotonic() - began):
                    stopped = True
                    break
            if not stopped:
                count = batcher.flush()
                finished += count
                bar.update(count)
            saved = descriptors.astype(dtype)
            atomic_save(chunk_path(cache, c), lambda tmp, d=saved, o=ok, i=chunk_ids, s=stopped:
                        np.savez(tmp, ids=np.array(i), descriptors=d, ok=o, complete=not s))
            if stopped:
                images.close()
                log.warning("%s: stopped after %d of %d images", cache.name, finished, len(rows))
                return finished, True
    return finished, False


def load_global(cache: Path, ids: list[str], chunk_size: int, dim: int = 0,
                allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All cached descriptors [n,D] float32 and their ok mask, in the order of ids, filled chunk by chunk into
    one array (dim: the width when no chunk has any). A missing chunk is an error unless allow_missing (a pass
    cut by the deadline): its rows are then not ok."""
    descriptors, ok = None, np.zeros(len(ids), bool)
    for c in range(math.ceil(len(ids) / chunk_size)):
        rows = slice(c * chunk_size, (c + 1) * chunk_size)
        part = read_chunk(cache, c, ids[rows], ("descriptors", "ok"), complete=False)
        if part is None:
            if not allow_missing:
                raise InputError(f"{cache}: descriptor chunk {c} is missing (run every --shard first)")
            continue
        if descriptors is None:
            descriptors = np.zeros((len(ids), part[0].shape[1]), np.float32)
        descriptors[rows], ok[rows] = part  # float16 chunks are converted in place
    return (np.zeros((len(ids), dim), np.float32) if descriptors is None else descriptors), ok


def cached_global(cache: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, descriptors, ok) of every readable chunk in a cache folder, whatever order it was written in."""
    ids, descriptors, ok = [], [], []
    for path in sorted(cache.glob("chunk_*.npz")):
        with contextlib.suppress(OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile), np.load(path) as chunk:
            part = chunk["ids"].tolist(), chunk["descriptors"].astype(np.float32), chunk["ok"]
            ids += part[0]
            descriptors.append(part[1])
            ok.append(part[2])
    if not ids:
        return [], np.zeros((0, 0), np.float32), np.zeros(0, bool)
    return ids, np.concatenate(descriptors), np.concatenate(ok)


def compact_valid(descriptors: np.ndarray, ok: np.ndarray, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(the ok rows, their row numbers): the rows move to the front in place, so no second full-size copy."""
    rows = np.flatnonzero(ok)
    for start in range(0, len(rows), block):  # a row only moves up, past rows already moved
        part = rows[start:start + block]
        descriptors[start:start + len(part)] = descriptors[part]
    return descriptors[:len(rows)], rows


class LocalFeatures(NamedTuple):
    keypoints: np.ndarray  # [N,2] y, x in the pixels of the image fed to the model
    descriptors: np.ndarray  # [N,128] L2-normalized
    side: int  # longer side of that image: relative RANSAC thresholds scale with it


def local_path(cache: Path, split: str, image_id: str) -> Path:
    return cache / split / f"{image_id}.npz"


def load_local(path: Path) -> LocalFeatures:
    with np.load(path) as features:
        return LocalFeatures(features["keypoints"], features["descriptors"].astype(np.float32),
                             int(features["side"]))


def readable_local(path: Path) -> bool:
    """A cached feature file that opens (a file cut short by a crash does not) and holds every array."""
    try:
        with np.load(path) as features:
            return {"keypoints", "descriptors", "side"} <= set(features.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def trim_local_cache(cache: Path, max_gb: float) -> int:
    """Delete the oldest cached local features until the cache holds at most max_gb; the count deleted.

    At full size the features of every reranked image would not fit on a notebook's disk (~250 KB each)."""
    files = sorted(((f.stat().st_mtime, f.stat().st_size, f) for f in cache.rglob("*.npz")), reverse=True)
    total, deleted = 0, 0
    for _, size, path in files:  # newest first: keep while there is room
        total += size
        if total > max_gb * 2**30:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def extract_local(model: DelgSavedModel, data: Path, images: list[tuple[str, str]], cache: Path,
                  extraction: Extraction, run: Run, stop: Callable[[], bool] = lambda: False) -> int:
    """Cache local features of every (split, id) not cached yet or cached unreadably (unreadable image: zero
    features), until stop() says so; the count extracted."""
    todo = [(split, i) for split, i in dict.fromkeys(images) if not readable_local(local_path(cache, split, i))]
    load = lambda item: decode_image(image_path(data, *item), extraction.max_image_side, extraction.min_image_side)
    decoded = prefetched(load, todo, run.decode_threads, run.prefetch)
    done = 0
    for (split, image_id), image in zip(todo, tqdm(decoded, total=len(todo), desc="local", unit="img"), strict=False):
        if stop():
            decoded.close()
            break
        features = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), 0)
        if image is not None:
            try:
                features = model.local_features(image)
            except Exception as err:  # noqa: BLE001 - one bad image must not end the run
                log.warning("local extraction failed for %s: %s", image_id, str(err).splitlines()[0][:200])
        atomic_save(local_path(cache, split, image_id), lambda tmp, f=features:
                    np.savez(tmp, keypoints=f.keypoints, descriptors=f.descriptors.astype(np.float16), side=f.side))
        done += 1
    return done


def global_settings(extraction) -> dict:
    return {"global_scales": list(extraction.global_scales()), "global_max_side": extraction.global_max_side,
            "global_precision": extraction.global_precision}


def cache_keys(run: Run, extraction: Extraction) -> dict:
    """What each feature cache depends on: the models' files and the settings of their features."""
    def files(model_dir: Path) -> dict:
        model = model_dir.resolve()
        return {"model": str(model), "files": {name: [(model / name).stat().st_size, (model / name).stat().st_mtime_ns]
                                               for name in ("saved_model.pb", "variables/variables.index")
                                               if (model / name).is_file()}}
    ext = dataclasses.asdict(extraction)
    local = {name: ext[name] for name in ("scales", "max_image_side", "min_image_side", "max_features",
                                          "attention_threshold", "border_margin")}
    global_ = {**global_settings(extraction), "cache_float16": extraction.cache_float16,
               "buckets": [BUCKET_ASPECTS, BUCKET_SIDES]}
    return json.loads(json.dumps({"global": {"models": [files(m) for m in run.model], "settings": global_},
                                  "local": {**files(run.verifying_model()), "settings": local}}))


def clear_stale_caches(work: Path, keys: dict) -> None:
    """Delete WORK/global or WORK/local when WORK/cache_key.json was written for other models or settings."""
    path = work / "cache_key.json"
    try:
        old = json.loads(path.read_text()) if path.is_file() else keys
    except ValueError:
        old = {}
    for folder in ("global", "local"):
        if old.get(folder) != keys[folder]:
            log.warning("model or %s settings changed since %s: deleting WORK/%s", folder, path, folder)
            shutil.rmtree(work / folder, ignore_errors=True)
    save_json(path, keys)


def timed_global(model, ids, paths, cache, extraction, run, timing, stage, shard=(0, 1), stop=None) -> bool:
    began = time.monotonic()
    count, stopped = extract_global(model, ids, paths, cache, extraction, run, shard, stop)
    timing.add(stage, count, time.monotonic() - began)
    return stopped
