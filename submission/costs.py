"""The one cost model of submission/main.py: for each stage, the units of work at a given size and settings, the
seconds per unit measured, how a server's devices change them, and the bytes held in memory and on disk.

Shipped beside main.py (which imports it from its own folder); it imports nothing of the kit. The script's plan
and --probe, and the kit's `local_eval time`, `tradeoff`, `tune` and `bench scale` all project with these
functions: nothing else counts products or divides seconds by items.

Units of work: global_db / global_query: images; knn: query x database products (the suppression's database x
non-landmark products, DBA's database x database products and alpha-QE's second search included); global_rerank:
queries (SuperGlobal); global_train: train images of retrieval's label transfer (extracted with --train-data, or
loaded from --train-descriptors); bridge: its products (queries and database x train) and the hubness correction's
(database x database); local_features: images; verification: (query, candidate) pairs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SAFETY_MARGIN = 0.15  # share of every limit (time, memory, disk) kept free: the plan's and every verdict's
TIMING_STAGES = (
    "global_db",
    "global_query",
    "global_train",
    "knn",
    "global_rerank",
    "bridge",
    "local_features",
    "verification",
)
GLOBAL_PASSES = (
    "global_db",
    "global_query",
    "global_train",
)  # decoding in threads on the CPU, the network on its device
RETRIEVAL_ONLY = ("global_train", "bridge")  # label transfer's and hubness's stages: a recognition run has none
PRODUCT_STAGES = ("knn", "bridge")  # units: query x database products (a small run takes the timed product's rate)
DEVICE = {
    "global_db": "cnn",
    "global_query": "cnn",
    "global_train": "cnn",  # none when the run loaded the train set from a file (Work.train_pass False)
    "local_features": "cnn",
    "knn": "matmul",
    "global_rerank": "matmul",
    "bridge": "matmul",
    "verification": "cpu",
}  # what runs each stage's work: the factor it takes
TIMED_PRODUCT = (256, 16_384)  # queries x database rows of the timed kNN (search.knn_seconds_per_item)
KNN_DB_CHUNK = 8192  # database rows per numpy multiply (measured best with KNN_Q_BLOCK on 2 cores)
KNN_Q_BLOCK = 512  # queries per numpy multiply
DBA_BLOCK = KNN_Q_BLOCK * 8  # database rows DBA augments per search
SUPERGLOBAL_BATCH = 8  # queries SuperGlobal refines at a time

# Measured figures (DESIGN.md "Numbers to know"), the sources of the defaults and of --matmul-speedup's help:
GPU_KNN_S = {"float16": 2.15, "float32": 6.18}  # H200, 117,577 x 1,580,470 x 512, top 100, blocked matmul
NUMPY_16_CORES_KNN_S = 1318.0  # the same kNN, numpy on 16 CPU cores (projected from a slice)
GPU_MATMUL_SPEEDUP = NUMPY_16_CORES_KNN_S / GPU_KNN_S["float32"]  # ~213: one GPU against 16 numpy cores
GPU_R50_MS_PER_IMAGE = 1.09  # H200, ResNet-50 at 1024x768, one scale, batch 32, float16
JPEG_DECODE_MS_PER_CORE = 10.3  # a 1024x768 JPEG, PIL, one core (on the same machine)

# Bytes (memory and disk)
FLOAT32 = 4
LOCAL_FEATURE_BYTES = 2 * 4 + 128 * 2  # one cached local feature: keypoint [y, x] float32, descriptor float16
NPZ_OVERHEAD = 1024  # per cached local-feature file (zip headers, the side)
PAIR_ROW_BYTES = 80  # one row of WORK/verified_pairs.csv
ID_BYTES = 64  # an image id stored in a cache's or neighbours.npz's string array (16 characters, 4 bytes each)
SUBMISSION_TOKEN_BYTES = {"retrieval": 17, "recognition": 30}  # an id and its space; a recognition row's "id lm s"
VERIFYING_IMAGES = 32  # local-feature sets held at once while verifying (two per pair, a pair per worker)
BASELINE_RSS_GB = 2.5  # the process before any descriptor (TensorFlow, the model): used when a log has no measure
GB = 2**30


class Sizes(NamedTuple):
    """Image counts of a run, for projections (train: the labelled train set of retrieval's label transfer)."""

    db: int
    queries: int
    nonlandmarks: int
    train: int = 0


@dataclass(frozen=True)
class Work:
    """What a run's cost depends on beyond its sizes (timing.json's "work")."""

    suppression: bool = False  # database x non-landmark kNN (recognition)
    dba: bool = False  # database x database kNN and a copy of the database
    qe: bool = False  # alpha-QE: a second search, query x database
    superglobal: bool = False  # SuperGlobal: per query, over its top M
    bridge: bool = False  # label transfer: queries and database x train products, the train set held
    train_pass: bool = False  # the train set's global pass runs here (--train-data), not loaded from a file
    hubness: bool = False  # the hubness correction: database x database products
    dims: tuple[int, ...] = (512,)  # global descriptor size of each model (an ensemble concatenates them)
    candidates: int = 100  # neighbours kept per query
    max_features: int = 1000  # local features per image
    knn_block_mb: int = 512  # one block of the similarity matrix
    local_cache_gb: float = 10.0  # the local-feature cache's cap on disk
    gpu: bool = False  # the kNN's blocks: a GPU's are block_mb, numpy's a few MB

    @classmethod
    def from_record(cls, record: dict | None) -> Work:
        """From timing.json's "work" (older logs: one global_rerank flag for alpha-QE and SuperGlobal)."""
        record = record or {}
        legacy = bool(record.get("global_rerank"))
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if k == "dims" else v) for k, v in record.items() if k in known}
        return cls(**{"qe": legacy, "superglobal": legacy, **values})

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "dims": list(self.dims)}

    @property
    def dim(self) -> int:
        """The descriptor searched: every model's, concatenated."""
        return sum(self.dims)


def knn_products(sizes: Sizes, work: Work) -> int:
    """Query x database products of the global stage: the search (and the non-landmark set's), the suppression's
    database x non-landmarks, DBA's database x database, alpha-QE's second search."""
    products = sizes.queries * (sizes.db + sizes.nonlandmarks)
    products += sizes.db * sizes.nonlandmarks if work.suppression else 0
    products += sizes.db * sizes.db if work.dba else 0
    products += sizes.queries * sizes.db if work.qe else 0
    return products


def bridge_products(sizes: Sizes, work: Work) -> int:
    """Products of label transfer (queries and database x train) and of the hubness correction (database x
    database)."""
    products = (sizes.queries + sizes.db) * sizes.train if work.bridge else 0
    return products + (sizes.db * sizes.db if work.hubness else 0)


def stage_units(sizes: Sizes, depth: int, work: Work = Work(), new_image_share: float = 1.0) -> dict[str, float]:
    """The work of each stage of a whole run at these sizes, verifying `depth` candidates per query of which
    `new_image_share` need their local features extracted (an upper bound at 1: candidates repeat)."""
    return {
        "global_db": sizes.db + sizes.nonlandmarks,
        "global_query": sizes.queries,
        "global_train": sizes.train if work.bridge else 0,
        "knn": knn_products(sizes, work),
        "global_rerank": sizes.queries if work.superglobal else 0,
        "bridge": bridge_products(sizes, work),
        "local_features": sizes.queries * (1 + depth * new_image_share) if depth else 0,
        "verification": sizes.queries * depth,
    }


def rate(stage: dict | None) -> float | None:
    """Seconds per item of a stage's log {"items", "seconds"}, or None where it did no work."""
    if not stage or stage.get("items", 0) <= 0:
        return None
    return stage["seconds"] / stage["items"]


def log_rates(log: dict) -> dict[str, float | None]:
    """Seconds per unit of each stage of a timing log. kNN and the bridge's products: the run's own products when it
    did at least as many as the timed product of TIMED_PRODUCT's shape, else that timed product (a small run's
    search is mostly overhead)."""
    rates = {name: rate(log["stages"].get(name)) for name in TIMING_STAGES}
    timed = (log.get("timed_products") or {}).get("knn")
    for name in PRODUCT_STAGES:
        own = log["stages"].get(name) or {}
        if timed and timed.get("items", 0) > own.get("items", 0):
            rates[name] = rate(timed)
    return rates


def project_seconds(rates: dict[str, float | None], units: dict[str, float]) -> dict[str, float | None]:
    """Seconds per stage: units x rate; None where work is due but the rate was never measured."""
    return {
        name: (0.0 if not units.get(name) else None if rates.get(name) is None else rates[name] * units[name])
        for name in TIMING_STAGES
    }


class Server(NamedTuple):
    """How the server's devices differ from the machine that measured: the CNN passes' factor (--speedup), the
    matrix products' (--matmul-speedup), and the CPUs that decode (None: as measured)."""

    speedup: float = 1.0
    matmul_speedup: float = 1.0
    cpus: int | None = None


def decode_rate(log: dict) -> float | None:
    """Seconds of one core to decode one image for the global pass (timing.json's "decode"), or None."""
    return rate(log.get("decode"))


def pass_pace(network_s: float, decode_core_s: float | None, cpus: int | None) -> tuple[float, str]:
    """(seconds per image of a global pass, what bounds it): decoding runs in threads on the CPUs while the
    network runs on its device, so the slower of the two sets the pace. What does not overlap (the first image's
    decode, a batch's assembly) is inside the measured network rate."""
    if decode_core_s is None or not cpus:
        return network_s, "network"
    decode_s = decode_core_s / cpus
    return (decode_s, "decode") if decode_s > network_s else (network_s, "network")


def server_rates(log: dict, server: Server) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each stage's seconds per unit on the server and, for the global passes, which of decoding and the network
    bounds it. The measured pass rate is the network's upper bound here (decoding overlapped it)."""
    rates, bounds = log_rates(log), {}
    factor = {"cnn": server.speedup, "matmul": server.matmul_speedup, "cpu": 1.0}
    loaded = not Work.from_record(log.get("work")).train_pass  # the train set came from a file: no CNN pass
    for name, value in rates.items():
        if value is None or (name == "global_train" and loaded):
            continue
        rates[name] = value / factor[DEVICE[name]]
        if name in GLOBAL_PASSES:
            cpus = server.cpus or (log.get("decode") or {}).get("threads")
            rates[name], bounds[name] = pass_pace(rates[name], decode_rate(log), cpus)
    return rates, bounds


AS_MEASURED = Server()


def projected_seconds(
    log: dict, sizes: Sizes, depth: int, server: Server = AS_MEASURED, work: Work | None = None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Seconds per stage of a whole run at these sizes (None: due but not measured), and what bounds each global
    pass. work: the log's own by default."""
    rates, bounds = server_rates(log, server)
    units = stage_units(sizes, depth, work or Work.from_record(log.get("work")))
    return project_seconds(rates, units), bounds


# Rerank depth: local features of the query and its new candidates, and the verification of `depth` pairs.
def rerank_seconds_per_query(per_image: float, per_pair: float, depth: int, new_image_share: float = 1.0) -> float:
    return per_image * (1 + depth * new_image_share) + per_pair * depth if depth else 0.0


def depth_that_fits(
    seconds: float, queries: int, per_image: float, per_pair: float, new_image_share: float = 1.0
) -> float:
    """The rerank depth at which `queries` queries take `seconds` (fractional; below 1 when not even depth 1 fits
    them all, below 0 when not even their own local features do)."""
    per_candidate = per_image * new_image_share + per_pair
    if per_candidate <= 0:
        return math.inf
    return (seconds / max(1, queries) - per_image) / per_candidate


# Memory and disk
def knn_blocks(db_rows: int, k: int, block_mb: int, gpu: bool) -> tuple[int, int]:
    """(queries, database rows) of one block of search.knn's similarity matrix."""
    if gpu:
        db_block = min(db_rows, max(k, block_mb * 2**20 // FLOAT32 // 1024))
        return max(1, block_mb * 2**20 // FLOAT32 // max(1, db_block)), db_block
    db_chunk = max(k, KNN_DB_CHUNK)
    return max(1, min(KNN_Q_BLOCK, block_mb * 2**20 // FLOAT32 // db_chunk)), db_chunk


def knn_block_bytes(work: Work, db_rows: int, queries: int) -> int:
    """One block of scores (float32) and its mask (numpy's, one byte a score)."""
    q_block, db_block = knn_blocks(db_rows, work.candidates, work.knn_block_mb, work.gpu)
    return min(q_block, queries) * db_block * (FLOAT32 + (0 if work.gpu else 1))


def descriptor_rows_bytes(rows: int, work: Work) -> int:
    return rows * work.dim * FLOAT32


def candidates_bytes(queries: int, work: Work) -> int:
    """Each query's cosines (float32) and rows (int64), twice: the search's and the reranked copy."""
    return queries * work.candidates * (FLOAT32 + 8) * 2


def knn_bytes(queries: int, db: int, work: Work) -> int:
    """The search: both sets of descriptors, one block, the candidates."""
    return (
        descriptor_rows_bytes(queries + db, work) + knn_block_bytes(work, db, queries) + candidates_bytes(queries, work)
    )


def dba_bytes(db: int, work: Work, n: int = 10) -> int:
    """DBA: the database, its augmented copy, one search's block and a block's neighbours' vectors."""
    return (
        2 * descriptor_rows_bytes(db, work)
        + knn_block_bytes(work, db, min(db, DBA_BLOCK))
        + min(db, DBA_BLOCK) * n * work.dim * FLOAT32
    )


def superglobal_bytes(queries: int, db: int, work: Work, m: int, k: int) -> int:
    """SuperGlobal: the descriptors, the candidates (and their copies), a batch's m x m similarities and the
    k neighbours' vectors of each of its m candidates."""
    batch = SUPERGLOBAL_BATCH * m * (2 * m * FLOAT32 + (k + 3) * work.dim * FLOAT32)
    return descriptor_rows_bytes(queries + db, work) + 2 * candidates_bytes(queries, work) + batch


def memory_bytes(sizes: Sizes, work: Work, depth: int) -> dict[str, int]:
    """Bytes each stage holds at its peak, beside the process's baseline (TensorFlow and the models).

    global_pass: every model's descriptors of the database, queries and non-landmarks; an ensemble also holds the
    weighted parts, their concatenation and its normalized copy while combining; then the searched database is a
    compacted copy. global_stage: the combined descriptors (whitened in place), DBA's copy of the database, one
    kNN block (scores and mask), the candidates, the non-landmark cosines. rerank: the candidates and the local
    features of the pairs being verified. Label transfer's train set is held beside the other descriptors."""
    rows = sizes.db + sizes.queries + sizes.nonlandmarks + (sizes.train if work.bridge else 0)
    held = descriptor_rows_bytes(rows, work)
    combining = 4 * held if len(work.dims) > 1 else held
    global_pass = combining + descriptor_rows_bytes(sizes.db, work)
    candidates = candidates_bytes(sizes.queries, work)
    global_stage = (
        held
        + (descriptor_rows_bytes(sizes.db, work) if work.dba else 0)
        + knn_block_bytes(work, sizes.db, max(sizes.queries, DBA_BLOCK if work.dba else 0))
        + candidates
        + sizes.db * 10 * FLOAT32 * work.suppression
    )
    rerank = candidates + VERIFYING_IMAGES * work.max_features * (128 * FLOAT32 + 8)
    return {"global_pass": int(global_pass), "global_stage": int(global_stage), "rerank": int(rerank) if depth else 0}


def disk_bytes(sizes: Sizes, work: Work, depth: int, task: str = "retrieval") -> dict[str, int]:
    """Bytes WORK holds at the end: the global descriptors' cache (every model: float32 rows and their ids), the
    local features of the queries and their candidates (capped by --local-cache-gb), the candidates
    (neighbours.npz), the verified pairs and the global-only submission. A train pass (--train-data) is cached
    too."""
    rows = sizes.db + sizes.queries + sizes.nonlandmarks + (sizes.train if work.train_pass else 0)
    local_images = sizes.queries * (1 + depth) if depth else 0
    local = min(local_images * (work.max_features * LOCAL_FEATURE_BYTES + NPZ_OVERHEAD), work.local_cache_gb * GB)
    ids_per_row = min(sizes.db, work.candidates, 100) if task == "retrieval" else 1
    return {
        "global_cache": rows * sum(FLOAT32 * dim + ID_BYTES + 1 for dim in work.dims),
        "local_cache": int(local),
        "neighbours": (
            sizes.queries * work.candidates * (FLOAT32 + 8)
            + sizes.db * 10 * FLOAT32
            + (sizes.queries + sizes.db) * ID_BYTES
        ),
        "verified_pairs": sizes.queries * depth * PAIR_ROW_BYTES,
        "submission": sizes.queries * ids_per_row * SUBMISSION_TOKEN_BYTES[task],
    }


def baseline_rss_bytes(log: dict) -> float:
    """The process's memory before any descriptor: measured by the run (peak RSS less the data the model says it
    held at its own size), else BASELINE_RSS_GB."""
    measured = log.get("memory") or {}
    return float(measured.get("baseline_bytes", BASELINE_RSS_GB * GB))


def projected_memory(log: dict, sizes: Sizes, depth: int, gpu: bool | None = None) -> dict:
    """{"peak": GB, "baseline": GB, "stages": {stage: GB}} of the process (baseline included) at these sizes, with
    the log's work (on a GPU or not: as measured by default)."""
    work = Work.from_record(log.get("work"))
    stages = memory_bytes(sizes, work if gpu is None else dataclasses.replace(work, gpu=gpu), depth)
    baseline = baseline_rss_bytes(log)
    in_gb = {name: (baseline + value) / GB for name, value in stages.items()}
    return {"peak": max(in_gb.values()), "baseline": baseline / GB, "stages": in_gb}


def projected_disk(log: dict, sizes: Sizes, depth: int) -> dict:
    """{"work": GB, and each part in GB} of WORK at these sizes, with the log's work."""
    parts = disk_bytes(sizes, Work.from_record(log.get("work")), depth, log.get("task") or "retrieval")
    return {"work": sum(parts.values()) / GB, **{name: value / GB for name, value in parts.items()}}


# The machine
def machine_ram_bytes() -> int | None:
    """This machine's memory: the cgroup's limit when there is one (a container), else /proc/meminfo's total."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's VmHWM (of this program only: ru_maxrss would carry
    over the peak of the process that forked it, kept across exec), elsewhere ru_maxrss."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident memory now (Linux's /proc/self/statm; its peak elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under a folder (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
