"""What the submission script's file checks cost: listing an index folder (regular files only, JPEG suffixes in
any case, duplicate ids, the GLDv2 a/b/c layout) beside a plain rglob, and the stamps (size, modification time)
that key its caches, one stat per image.

20,000 empty files, spread over the a/b/c folders as GLDv2's hexadecimal ids spread them, in a temporary folder.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from local_eval.submission_script import load_submission, sibling

FILES = 20_000


def seconds(step: Callable[[], object]) -> float:
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def main() -> None:
    sub = load_submission()
    store = sibling("store")
    ids = [hashlib.md5(str(i).encode()).hexdigest()[:16] for i in range(FILES)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        paths = [store.image_path(data, "index", image_id) for image_id in ids]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        logging.getLogger("submission").setLevel(logging.ERROR)
        index = data / "index"
        for name, step in [
            ("rglob('*.jpg'), sorted stems", lambda: sorted(p.stem for p in index.rglob("*.jpg"))),
            ("list_image_ids", lambda: sub.list_image_ids(index)),
            ("image_stamps", lambda: store.image_stamps(paths)),
        ]:
            took = seconds(step)
            print(f"{name:<30} {FILES} files  {took:.3f} s  ({took / FILES * 1e6:.0f} us per file)")


if __name__ == "__main__":
    main()
