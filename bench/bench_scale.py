"""`python -m bench scale [--json] [--sizes N ...] [--images N ...]`: does the cost model's projection from a small run
hold at a larger one? The notebook's own stage functions run at growing sizes (synthetic 512-d unit descriptors: a
database of --sizes rows and a tenth as many queries; the global pass of an untrained tiny DELG export on --images
small JPEGs); each stage's time and peak memory are measured beside what submission/costs.py projects from the
smallest size (time: its seconds per unit x the units at each size; memory: the smallest size's measure plus the
bytes the model adds). DBA, quadratic in the database, runs on a quarter of each database size. The stages are the
cost model's: knn (query x database products), dba (database x database products), superglobal (global_rerank's
queries), global_pass (global_db's images). Whitening is not one: its time is charged to the kNN stage, and its
eigendecomposition is a fixed cost of the descriptor size, not of the database.

Time is wall-clock seconds, and the process's CPU seconds beside them (a shared machine's load changes the first
far more than the second). Memory is the peak of the allocations Python tracks (numpy's arrays, PIL's images;
tracemalloc) during the call, its inputs included: TensorFlow's own buffers are not seen. Target: at the largest
size, projected / measured within 1.5x for time and memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from local_eval.submission_script import load_submission, sibling

costs = sibling("costs")
DIM, K = 512, 100
DEFAULT_SIZES = (25_000, 50_000, 100_000, 200_000)
DEFAULT_IMAGES = (200, 400, 800)  # a pass carries fixed costs (partial batches, the chunk's save): not at 100
DBA_SHARE, DBA_N = 0.25, 3  # DBA on a quarter of the database (quadratic), n as retrieval's default
SUPERGLOBAL_M, SUPERGLOBAL_K = 100, 9
TARGET = 1.5
MODEL_DIR = Path("work/bench-scale/model")  # the untrained tiny export, made once (git-ignored)


@dataclasses.dataclass
class Stage:
    """A stage of the notebook at one size: its inputs (made inside the memory measure), its call, its units of
    work and the bytes the cost model says it holds."""

    name: str
    prepare: Callable[[int], tuple]
    call: Callable[..., object]
    units: Callable[[int], float]
    model_bytes: Callable[[int], float]


def unit_rows(rows: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((rows, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # in place: the inputs' memory is the rows, once
    return x


def descriptor_stages(sub) -> list[Stage]:
    work = costs.Work(dims=(DIM,), candidates=K)
    rng = lambda: np.random.default_rng(0)
    sizes = lambda n: costs.Sizes(n, n // 10, 0)

    def knn_inputs(n: int) -> tuple:
        generator = rng()
        return unit_rows(n // 10, generator), unit_rows(n, generator)

    def superglobal_inputs(n: int) -> tuple:
        queries, database = knn_inputs(n)
        return (queries, database, *sub.knn(queries, database, SUPERGLOBAL_M))

    dba_rows = lambda n: int(n * DBA_SHARE)
    return [
        Stage(
            "knn",
            knn_inputs,
            lambda q, db: sub.knn(q, db, K),
            lambda n: costs.knn_products(sizes(n), work),
            lambda n: costs.knn_bytes(n // 10, n, work),
        ),
        Stage(
            "dba",
            lambda n: (unit_rows(dba_rows(n), rng()),),
            lambda db: sub.database_augmentation(db, DBA_N, 5.0, work.knn_block_mb, lambda: False),
            lambda n: costs.knn_products(costs.Sizes(dba_rows(n), 0, 0), dataclasses.replace(work, dba=True)),
            lambda n: costs.dba_bytes(dba_rows(n), work, DBA_N),
        ),
        Stage(
            "superglobal",
            superglobal_inputs,
            lambda q, db, c, r: sub.superglobal_rerank(q, db, c, r, SUPERGLOBAL_M, SUPERGLOBAL_K, 0.15),
            lambda n: costs.stage_units(sizes(n), 0, dataclasses.replace(work, superglobal=True))["global_rerank"],
            lambda n: costs.superglobal_bytes(
                n // 10, n, dataclasses.replace(work, candidates=SUPERGLOBAL_M), SUPERGLOBAL_M, SUPERGLOBAL_K
            ),
        ),
    ]


def tiny_model() -> Path:
    """The untrained tiny DELG export the global pass runs (made once under work/)."""
    if not (MODEL_DIR / "saved_model.pb").is_file():
        from export.delg import save_delg
        from train.config import get_config
        from train.model import DelgModel

        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        save_delg(DelgModel(get_config("tiny"), num_classes=10), MODEL_DIR, xla=False)
    return MODEL_DIR


def write_images(folder: Path, count: int) -> list[Path]:
    """count small JPEGs (128-256 px a side, random shapes on noise)."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        height, width = (int(v) for v in rng.integers(128, 257, 2))
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def extraction_stage(sub, folder: Path, largest: int) -> Stage:
    """The global pass (decoding in threads, the batched network, the chunk cache) on the first n images."""
    model_dir = tiny_model()
    settings = sub.parse_settings(
        [
            "--task",
            "retrieval",
            "--data",
            str(folder),
            "--model",
            str(model_dir),
            "--global-max-side",
            "256",
            "--global-xla",
            "off",
            "--work",
            str(folder),
        ]
    )
    model = sub.DelgSavedModel(model_dir, settings.extraction)
    paths = write_images(folder, largest)
    work = costs.Work(dims=(model.global_dim,))
    ids = [p.stem for p in paths]  # one untimed pass compiles every batch shape the images need
    sub.extract_global(model, ids, paths, folder / "warm", settings.extraction, settings.run)

    def run(n: int, cache: Path) -> None:
        sub.extract_global(model, ids[:n], paths[:n], cache, settings.extraction, settings.run)

    counter = iter(range(10**6))
    return Stage(
        "global_pass",
        lambda n: (n, folder / f"cache{next(counter)}"),
        run,
        lambda n: n,
        lambda n: costs.memory_bytes(costs.Sizes(n, 0, 0), work, 0)["global_pass"],
    )


def measure_once(stage: Stage, size: int) -> tuple[float, float, float]:
    """(wall seconds of the call, the process's CPU seconds in it, peak MB Python tracked during the call, its
    inputs included)."""
    tracemalloc.start()
    inputs = stage.prepare(size)
    tracemalloc.reset_peak()  # from the inputs held: not their making's temporaries
    began, began_cpu = time.perf_counter(), time.process_time()
    stage.call(*inputs)
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del inputs
    return seconds, cpu_seconds, peak / 2**20


def measure(stage: Stage, size: int, repeats: int) -> tuple[float, float, float]:
    """The fastest of `repeats` calls (wall and CPU seconds apart) and their largest peak: a shared machine's load
    only ever adds time, so the minimum is the call's own cost."""
    runs = [measure_once(stage, size) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)


def scale(stage: Stage, sizes: list[int], repeats: int) -> dict:
    """Measured and projected time and memory at each size; the projection anchored at the smallest size."""
    measured = [measure(stage, size, repeats) for size in sizes]
    projected = lambda column: [
        round(measured[0][column] / stage.units(sizes[0]) * stage.units(size), 3) for size in sizes
    ]
    anchor_mb = measured[0][2] - stage.model_bytes(sizes[0]) / 2**20
    return {
        "sizes": sizes,
        "measured_s": [round(m[0], 3) for m in measured],
        "projected_s": projected(0),
        "measured_cpu_s": [round(m[1], 3) for m in measured],
        "projected_cpu_s": projected(1),
        "measured_mb": [round(m[2], 1) for m in measured],
        "projected_mb": [round(anchor_mb + stage.model_bytes(size) / 2**20, 1) for size in sizes],
    }


def ratio(result: dict, measured: str, projected: str) -> float:
    """projected / measured at the largest size."""
    return result[projected][-1] / max(result[measured][-1], 1e-9)


def table(results: dict) -> str:
    lines = [
        "| stage | size | measured s | projected s | measured CPU s | projected CPU s | measured MB | projected MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        for i, size in enumerate(r["sizes"]):
            lines.append(
                f"| {name} | {size:,} | {r['measured_s'][i]:.2f} | {r['projected_s'][i]:.2f} | "
                f"{r['measured_cpu_s'][i]:.2f} | {r['projected_cpu_s'][i]:.2f} | {r['measured_mb'][i]:.1f} | "
                f"{r['projected_mb'][i]:.1f} |"
            )
    lines.append("")
    for name, r in results.items():
        time_ratio, cpu_ratio = ratio(r, "measured_s", "projected_s"), ratio(r, "measured_cpu_s", "projected_cpu_s")
        memory_ratio = ratio(r, "measured_mb", "projected_mb")
        within = lambda value: "within" if 1 / TARGET <= value <= TARGET else "OUTSIDE"
        lines.append(
            f"- {name}, largest size, projected/measured: time {time_ratio:.2f} ({within(time_ratio)} "
            f"{TARGET}x), CPU time {cpu_ratio:.2f} ({within(cpu_ratio)}), memory {memory_ratio:.2f} "
            f"({within(memory_ratio)})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        help="database rows (queries: a tenth; DBA: a quarter), smallest first",
    )
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=list(DEFAULT_IMAGES),
        help="images of the global pass, smallest first (0: skip it)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="calls per stage and size; the fastest counts (default: 3)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"stages": {name: {"sizes", "measured_s", '
        '"projected_s", "measured_cpu_s", "projected_cpu_s", "measured_mb", "projected_mb"}}}',
    )
    args = parser.parse_args(argv or [])  # `python -m bench` calls main() with none
    sub = load_submission()
    results = {}
    for stage in descriptor_stages(sub):
        results[stage.name] = scale(stage, sorted(args.sizes), args.repeats)
    if max(args.images) > 0:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
            stage = extraction_stage(sub, Path(folder), max(args.images))
            results[stage.name] = scale(stage, sorted(args.images), args.repeats)
    print(json.dumps({"stages": results}, indent=1) if args.json else table(results))


if __name__ == "__main__":
    main()
