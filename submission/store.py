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
import queue
import shutil
import stat
import tempfile
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image
from savedmodel import DelgSavedModel, LocalFeatures
from settings_cli import InputError
from tqdm import tqdm

if TYPE_CHECKING:  # settings.py's types, for the annotations only
    from settings import Extraction, Run

log = logging.getLogger("submission")


def image_path(data: Path, split: str, image_id: str) -> Path:
    """Image 'abcdef…' of a split lives at split/a/b/c/abcdef….jpg (image_file also finds .jpeg, .JPG, .JPEG)."""
    return data / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")  # what the listing takes as an image, and image_file finds


def image_file(path: Path) -> tuple[Path, os.stat_result]:
    """The file an image path stands for and its stat: path itself or, when only that exists, the same name with
    another JPEG suffix. Only a regular file: a FIFO or a device named *.jpg would block whoever opens it."""
    for candidate in suffixed(path):
        try:
            status = os.stat(candidate)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{candidate} is not a regular file")
        return candidate, status
    raise FileNotFoundError(f"no such file: {path}")


def suffixed(path: Path) -> Iterator[Path]:
    """path, then the same name with each other JPEG suffix (made only when asked for)."""
    yield path
    yield from (path.with_suffix(suffix) for suffix in JPEG_SUFFIXES if suffix != path.suffix)


# Global descriptors are computed on a few fixed sizes so that images can be batched (section 3).
BUCKET_ASPECTS = (9 / 16, 3 / 4, 1.0, 4 / 3, 16 / 9)  # width / height


BUCKET_SIDES = (1.0, 0.75, 0.5, 0.375, 0.25)  # longer side, as a share of --global-max-side


def image_stamps(paths: list[Path]) -> np.ndarray:
    """[n, 2] int64: each image file's size and modification time in ns ([-1, -1] when there is none to read), kept
    beside its cached features: a file changed since (new bytes under the same id) no longer matches them."""
    stamps = np.full((len(paths), 2), -1, np.int64)
    for row, path in enumerate(paths):
        with contextlib.suppress(OSError):
            status = image_file(path)[1]
            stamps[row] = status.st_size, status.st_mtime_ns
    return stamps


def open_rgb(path: Path, layout: Callable[[int, int], tuple[tuple[int, int], tuple[float, ...]]]) -> Image.Image:
    """The file as RGB: layout(width, height) gives the output size and the box of the original to resize into it.
    A JPEG that shrinks is decoded at a reduced scale (PIL's draft mode), which saves most of its decoding time."""
    with Image.open(image_file(path)[0]) as image:
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


def prefetched(
    load: Callable,
    items: Iterable,
    threads: int,
    depth: int,
    timeout_s: float | None = None,
    name: Callable[[object], str] = str,
) -> Iterator:
    """load(item) for each item, in order, computed by `threads` daemon threads up to `depth` items ahead. The
    caller never waits more than timeout_s for one item: a load that takes longer is logged (name(item)) and
    yields None, as an unreadable image; its thread is left to it and a new one takes its place."""
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    started = [start_loader(load, tasks) for _ in range(max(1, threads))]
    pending: deque = deque()

    def next_result():
        future, item = pending.popleft()
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            log.warning("skipping %s: reading it took more than %g s (--decode-timeout-s)", name(item), timeout_s)
            started.append(start_loader(load, tasks))
            return None

    try:
        for item in items:
            pending.append((Future(), item))
            tasks.put(pending[-1])
            if len(pending) >= depth:
                yield next_result()
        while pending:
            yield next_result()
    finally:
        for future, _ in pending:
            future.cancel()
        for _ in started:
            tasks.put(None)  # each live thread ends at one of these


def start_loader(load: Callable, tasks: queue.SimpleQueue) -> threading.Thread:
    """A daemon thread running load on each (future, item) of tasks until it takes None: a load that never ends
    (a hung file system) cannot stop the process from exiting."""

    def work() -> None:
        while (task := tasks.get()) is not None:
            future, item = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(load(item))
            except BaseException as err:  # noqa: BLE001 - handed to the caller, raised where it waits
                future.set_exception(err)

    thread = threading.Thread(target=work, name="loader", daemon=True)
    thread.start()
    return thread


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
        raise InputError(
            f"no space left in {path.parent} while writing {path.name}: it needs more than the "
            f"{size_text(written)} written when the disk filled ({size_text(free)} free now); free some "
            "space there or point --work or --out elsewhere"
        ) from None


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


def read_chunk(
    cache: Path, index: int, ids: list[str], fields_: tuple[str, ...], complete: bool = True
) -> list[np.ndarray] | None:
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
    """Collects (row, pixels) by image size and calls the model on full batches of one size (on several devices:
    each batch on the next free one, `close` before reading the rows)."""

    def __init__(self, model: DelgSavedModel, extraction: Extraction, descriptors: np.ndarray, ok: np.ndarray):
        self.model, self.ext, self.descriptors, self.ok = model, extraction, descriptors, ok
        self.pending: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        self.pool = ThreadPoolExecutor(model.parallel) if model.parallel > 1 else None  # one thread per device
        self.running: deque[Future] = deque()

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
        """One batch of the group of this shape: computed here, or handed to the model's devices (at most two
        batches waiting per device)."""
        group = self.pending.pop(shape)
        if self.pool is None:
            self._compute(shape, group)
        else:
            while len(self.running) >= 2 * self.model.parallel:
                self.running.popleft().result()
            self.running.append(self.pool.submit(self._compute, shape, group))
        return len(group)

    def close(self) -> None:
        """Every batch handed to a device done, its rows written."""
        while self.running:
            self.running.popleft().result()
        if self.pool is not None:
            self.pool.shutdown()

    def _compute(self, shape: tuple, group: list[tuple[int, np.ndarray]]) -> None:
        rows = [row for row, _ in group]
        images = np.stack([pixels for _, pixels in group])
        if (self.ext.global_precision, False) in self.model.batched and len(group) < self.ext.global_batch:
            padding = np.zeros((self.ext.global_batch - len(group), *shape), np.uint8)  # one compiled shape
            images = np.concatenate([images, padding])
        with self.model.device_copy("global", len(rows)) as model:
            try:
                found = model.global_batch(
                    images, self.ext.global_scales(), self.ext.global_precision, self.ext.global_xla == "on"
                )
                self.descriptors[rows], self.ok[rows] = found[: len(rows)], True
            except Exception as err:  # noqa: BLE001 - one bad image must not end the run: retry them one by one
                log.warning(
                    "batched global call failed (%s); retrying its %d images one by one",
                    str(err).splitlines()[0][:200],
                    len(rows),
                )
                for row, pixels in group:
                    with contextlib.suppress(Exception):
                        self.descriptors[row] = model.global_descriptor(pixels, self.ext.global_scales())
                        self.ok[row] = True


StopRule = Callable[[int, float], bool]  # (images done, seconds spent) -> stop now


def extract_global(
    model: DelgSavedModel,
    ids: list[str],
    paths: list[Path],
    cache: Path,
    extraction: Extraction,
    run: Run,
    shard: tuple[int, int] = (0, 1),
    stop: StopRule | None = None,
) -> tuple[int, bool]:
    """Extract and cache, chunk by chunk, every missing global descriptor of this shard, batched by size bucket.
    Returns (images finished, stopped): when stop(finished, seconds) says so, the images still waiting for a
    batch are dropped and the current chunk is saved as it is."""
    size = run.chunk_size
    chunks = [c for c in range(math.ceil(len(ids) / size)) if c % shard[1] == shard[0]]
    cached = fresh_chunks(cache, chunks, ids, paths, size)
    todo = [c for c in chunks if c not in cached]
    if len(todo) < len(chunks):
        log.info("%s: %d of %d chunks already cached", cache.name, len(chunks) - len(todo), len(chunks))
    rows = [i for c in todo for i in range(c * size, min(len(ids), (c + 1) * size))]
    load = lambda i: decode_for_global(paths[i], extraction.global_max_side)
    images = prefetched(load, rows, run.decode_threads, run.prefetch, run.decode_timeout_s, lambda i: str(paths[i]))
    dtype = np.float16 if extraction.cache_float16 else np.float32
    finished, began = 0, time.monotonic()
    with tqdm(total=len(rows), desc=f"global {cache.name}", unit="img") as bar:
        for c in todo:
            chunk_ids, stamps = ids[c * size : (c + 1) * size], image_stamps(paths[c * size : (c + 1) * size])
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
            batcher.close()
            saved = descriptors.astype(dtype)
            atomic_save(
                chunk_path(cache, c),
                lambda tmp, d=saved, o=ok, i=chunk_ids, s=stopped, t=stamps: np.savez(
                    tmp, ids=np.array(i), descriptors=d, ok=o, complete=not s, stamps=t
                ),
            )
            if stopped:
                images.close()
                log.warning("%s: stopped after %d of %d images", cache.name, finished, len(rows))
                return finished, True
    return finished, False


def fresh_chunks(cache: Path, chunks: list[int], ids: list[str], paths: list[Path], size: int) -> set[int]:
    """The chunks cached whole for these ids and these very files (image_stamps). A chunk whose images changed
    since is deleted, and the count said; a chunk of an older cache without stamps is redone."""
    fresh, dropped, changed = set(), 0, 0
    for c in chunks:
        rows = slice(c * size, (c + 1) * size)
        part = read_chunk(cache, c, ids[rows], ("stamps",))
        if part is None:
            continue
        differs = int(np.any(part[0] != image_stamps(paths[rows]), axis=1).sum())
        if differs:
            chunk_path(cache, c).unlink(missing_ok=True)
            dropped, changed = dropped + 1, changed + differs
        else:
            fresh.add(c)
    if dropped:
        log.warning(
            "%s: dropped %d cached chunks: %d of their images changed (size or time) since they were cached",
            cache.name,
            dropped,
            changed,
        )
    return fresh


def load_global(
    cache: Path, ids: list[str], chunk_size: int, dim: int = 0, allow_missing: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """All cached descriptors [n,D] float32 and their ok mask, in the order of ids, filled chunk by chunk into
    one array (dim: the width when no chunk has any). A missing chunk is an error unless allow_missing (a pass
    cut by the deadline): its rows are then not ok."""
    descriptors, ok = None, np.zeros(len(ids), bool)
    for c in range(math.ceil(len(ids) / chunk_size)):
        rows = slice(c * chunk_size, (c + 1) * chunk_size)
        part = read_chunk(cache, c, ids[rows], ("descriptors", "ok", "stamps"), complete=False)
        if part is None:
            if not allow_missing:
                raise InputError(f"{cache}: descriptor chunk {c} is missing (run every --shard first)")
            continue
        if descriptors is None:
            descriptors = np.zeros((len(ids), part[0].shape[1]), np.float32)
        descriptors[rows], ok[rows] = part[:2]  # float16 chunks are converted in place
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
        part = rows[start : start + block]
        descriptors[start : start + len(part)] = descriptors[part]
    return descriptors[: len(rows)], rows


def local_path(cache: Path, split: str, image_id: str) -> Path:
    return cache / split / f"{image_id}.npz"


def load_local(path: Path) -> LocalFeatures:
    with np.load(path) as features:
        return LocalFeatures(features["keypoints"], features["descriptors"].astype(np.float32), int(features["side"]))


def cached_stamp(path: Path) -> np.ndarray | None:
    """The image stamp (image_stamps) a cached feature file was made from; None when the file is missing, does not
    open (cut short by a crash) or lacks an array."""
    try:
        with np.load(path) as features:
            if {"keypoints", "descriptors", "side", "stamp"} <= set(features.files):
                return features["stamp"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    return None


def local_todo(data: Path, images: list[tuple[str, str]], cache: Path) -> list[tuple[str, str, np.ndarray]]:
    """(split, id, image stamp) of every image whose local features are not cached from this very file. Cached
    files that do not match (the image changed, or the file is unreadable) are deleted; changed ones are counted."""
    todo, changed = [], 0
    for split, image_id in dict.fromkeys(images):
        path = local_path(cache, split, image_id)
        stamp = image_stamps([image_path(data, split, image_id)])[0]
        cached = cached_stamp(path)
        if cached is None or np.any(cached != stamp):
            changed += cached is not None
            path.unlink(missing_ok=True)
            todo.append((split, image_id, stamp))
    if changed:
        log.warning("local: dropped %d cached features: their images changed (size or time) since", changed)
    return todo


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


def extract_local(
    model: DelgSavedModel,
    data: Path,
    images: list[tuple[str, str]],
    cache: Path,
    extraction: Extraction,
    run: Run,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Cache local features of every (split, id) not cached yet from its present file (local_todo; unreadable
    image: zero features), until stop() says so; the count extracted."""
    todo = local_todo(data, images, cache)
    load = lambda item: decode_image(image_path(data, *item[:2]), extraction.max_image_side, extraction.min_image_side)
    decoded = prefetched(
        load,
        todo,
        run.decode_threads,
        run.prefetch,
        run.decode_timeout_s,
        lambda item: str(image_path(data, *item[:2])),
    )

    def features_of(item: tuple[tuple[str, str, object], np.ndarray | None]) -> LocalFeatures | None:
        """The image's features (none when unreadable or failing), or None once stop() says so."""
        (_, image_id, _), image = item
        if stop():
            return None
        features = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 0), np.float32), 0)
        if image is not None:
            try:
                with model.device_copy("local", 1) as copy:
                    features = copy.local_features(image)
            except Exception as err:  # noqa: BLE001 - one bad image must not end the run
                log.warning("local extraction failed for %s: %s", image_id, str(err).splitlines()[0][:200])
        return features

    found = prefetched(features_of, zip(todo, decoded, strict=True), model.parallel, model.parallel)  # one per device
    done = 0
    for (split, image_id, stamp), features in zip(
        todo, tqdm(found, total=len(todo), desc="local", unit="img"), strict=False
    ):
        if features is None:
            break
        atomic_save(
            local_path(cache, split, image_id),
            lambda tmp, f=features, t=stamp: np.savez(
                tmp, keypoints=f.keypoints, descriptors=f.descriptors.astype(np.float16), side=f.side, stamp=t
            ),
        )
        done += 1
    found.close()
    decoded.close()
    return done


def global_settings(extraction) -> dict:
    return {
        "global_scales": list(extraction.global_scales()),
        "global_max_side": extraction.global_max_side,
        "global_precision": extraction.global_precision,
    }


def cache_keys(run: Run, extraction: Extraction) -> dict:
    """What each feature cache depends on: the models' files and the settings of their features."""

    def files(model_dir: Path) -> dict:
        model = model_dir.resolve()
        return {
            "model": str(model),
            "files": {
                name: [(model / name).stat().st_size, (model / name).stat().st_mtime_ns]
                for name in ("saved_model.pb", "variables/variables.index")
                if (model / name).is_file()
            },
        }

    ext = dataclasses.asdict(extraction)
    local = {
        name: ext[name]
        for name in (
            "scales",
            "max_image_side",
            "min_image_side",
            "max_features",
            "attention_threshold",
            "border_margin",
        )
    }
    global_ = {
        **global_settings(extraction),
        "cache_float16": extraction.cache_float16,
        "buckets": [BUCKET_ASPECTS, BUCKET_SIDES],
    }
    return json.loads(
        json.dumps(
            {
                "global": {"models": [files(m) for m in run.model], "settings": global_},
                "local": {**files(run.verifying_model()), "settings": local},
            }
        )
    )


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


class ImageSet(NamedTuple):
    """The images of one global pass and the folder caching their descriptors."""

    ids: list[str]
    paths: list[Path]
    cache: Path


def timed_global(model, images: ImageSet, extraction, run, timing, stage, shard=(0, 1), stop=None) -> bool:
    """extract_global, its images and seconds added to the timing's stage; whether stop() cut it short."""
    began = time.monotonic()
    count, stopped = extract_global(model, images.ids, images.paths, images.cache, extraction, run, shard, stop)
    timing.add(stage, count, time.monotonic() - began)
    return stopped
