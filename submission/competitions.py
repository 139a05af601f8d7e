"""The Kaggle competitions the kit targets, written down once: slug, task, database and test sizes, notebook limit
and the machine the notebook runs on. local_eval's projection profiles and export's bundle (kernel.py's
--time-budget-h) read this table.

Shipped beside main.py; it imports nothing of the kit.
"""

from __future__ import annotations

from typing import NamedTuple


class Machine(NamedTuple):
    """A notebook's machine: RAM, CPUs, GPUs and the disk of its working folder."""

    ram_gb: float
    cpus: int
    gpus: int
    disk_gb: float


# Kaggle's GPU notebook: P100, or 2x T4, with 4 vCPUs and about 29-31 GB RAM (the lower figure kept); /kaggle/working
# holds 20 GB (DESIGN.md "Numbers to know").
KAGGLE_GPU = Machine(ram_gb=29.0, cpus=4, gpus=1, disk_gb=20.0)


class Competition(NamedTuple):
    """A competition's scale; `db` is the train set (recognition) or the index (retrieval); `train`: the labelled
    train set retrieval's label transfer votes with (GLDv2-clean)."""

    slug: str
    task: str
    db: int
    test: int
    limit_h: float
    machine: Machine
    train: int = 0


# GLDv2: train-clean 1,580,470 images; index 761,757; test 117,577. The notebook limit: 9 h in 2020, 12 h in 2021.
COMPETITIONS: dict[str, Competition] = {
    competition.slug: competition
    for competition in (
        Competition("landmark-recognition-2020", "recognition", 1_580_470, 117_577, 9.0, KAGGLE_GPU),
        Competition("landmark-recognition-2021", "recognition", 1_580_470, 117_577, 12.0, KAGGLE_GPU),
        Competition("landmark-retrieval-2020", "retrieval", 761_757, 117_577, 9.0, KAGGLE_GPU, 1_580_470),
        Competition("landmark-retrieval-2021", "retrieval", 761_757, 117_577, 12.0, KAGGLE_GPU, 1_580_470),
    )
}


def profile_name(competition: Competition) -> str:
    """'recognition-2021' for landmark-recognition-2021: the kit's short name of a competition."""
    return competition.slug.removeprefix("landmark-")
