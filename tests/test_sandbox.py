"""`local_eval replay --bundle`: the bundle's kernel.py run as Kaggle runs it (read-only inputs, no network, a capped
/kaggle/working, the wheel installed offline), scored, with the same predictions as a plain replay."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from common.cli import mark_output_dir, run_main
from export.bundle import BundleSpec, build_bundle
from local_eval import sandbox
from local_eval.replay import REPORT_KIND, replay
from local_eval.replay import main as replay_main
from local_eval.sandbox import HIDDEN_PACKAGE, Limits, bundle_names, replay_bundle
from tests import LIGHT as LIGHT_BASE

THIS_TAG = "cp{}{}".format(*sys.version_info[:2])
LIGHT = [*LIGHT_BASE, "--rerank", "3", "--warmup-queries", "4", "--rerank-batch", "8", "--plan", "fixed"]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")


def installed_wheel(folder: Path, tag: str = THIS_TAG) -> Path:
    """The installed pydegensac packed back into a wheel for Python `tag` (its files and its dist-info)."""
    dist = importlib.metadata.distribution(HIDDEN_PACKAGE)
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{HIDDEN_PACKAGE}-{dist.version}-{tag}-{tag}-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for file in dist.files:
            path = Path(dist.locate_file(file))
            if path.is_file() and "__pycache__" not in file.parts and file.name not in ("INSTALLER", "REQUESTED"):
                archive.write(path, str(file))
    return wheel


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's bundle for the recognition competition, with the installed pydegensac as its wheel."""
    root = tmp_path_factory.mktemp("bundle")
    spec = BundleSpec(
        "me",
        "landmark-delg",
        "landmark-submission",
        competition="landmark-recognition-2021",
        wheels=[installed_wheel(root / "wheels")],
    )
    return build_bundle([tiny_run], root / "bundle", spec)


def altered_bundle(bundle: Path, target: Path, change) -> Path:
    """A copy of the bundle with change(copy) applied."""
    shutil.copytree(bundle, target)
    change(target)
    return target


@root_only
def test_the_bundle_in_the_sandbox_gives_the_plain_replays_predictions(tiny_competition, bundle, tmp_path):
    report = replay_bundle(
        tiny_competition,
        "recognition",
        bundle,
        tmp_path / "sandboxed",
        1.0,
        Limits(disk_gb=1, cpus=1, ram_gb=16),
        extra_args=LIGHT,
    )
    assert report["status"] == "ok", report.get("log_tail")
    facts = report["sandbox"]
    assert facts["mode"] == "namespaces" and facts["network"]["cut"] and facts["input_read_only"]
    assert facts["cpus"]["count"] == 1 and facts["disk"]["limit_gb"] == 1 and facts["ram"]["limit_gb"] == 16
    assert 0 < facts["ram"]["peak_gb"] < 16 and 0 < facts["disk"]["peak_gb"] < 1
    sandbox_python = tmp_path / "sandboxed" / "sandbox" / "python"
    installed = list(sandbox_python.glob(f"lib/python*/site-packages/{HIDDEN_PACKAGE}"))
    assert installed, "kernel.py installed its wheel into the sandbox's interpreter"
    plain = replay(tiny_competition, "recognition", bundle / "delg", tmp_path / "plain", 1.0, LIGHT)
    assert plain["status"] == "ok"
    # the same predictions; a confidence may differ in its last digit (one CPU sums in another order than two)
    read = lambda folder: pd.read_csv(folder / "submission.csv", dtype=str, keep_default_na=False)
    sandboxed, plain_rows = (
        read(tmp_path / name)["landmarks"].str.split(" ", expand=True) for name in ("sandboxed", "plain")
    )
    assert (sandboxed[0] == plain_rows[0]).all()
    assert (sandboxed[1].astype(float) - plain_rows[1].astype(float)).abs().max() <= 2e-6
    assert report["final"]["all"]["gap"] == pytest.approx(plain["final"]["all"]["gap"], abs=1e-4)
    saved = json.loads((tmp_path / "sandboxed" / "report.json").read_text())
    assert saved["sandbox"] == facts


@root_only
def test_a_wheel_for_another_python_stops_with_the_servers_error_line(tiny_competition, bundle, tmp_path):
    def other_python_only(copy: Path) -> None:
        for wheel in (copy / "wheels").iterdir():
            wheel.unlink()
        installed_wheel(copy / "wheels", "cp399")

    changed = altered_bundle(bundle, tmp_path / "bundle", other_python_only)
    report = replay_bundle(tiny_competition, "recognition", changed, tmp_path / "out", 1.0, extra_args=LIGHT)
    assert report["status"] == "crash" and report["sandbox"]["exit_code"] == 2
    assert (
        f"error: no pydegensac wheel for this Python {sys.version.split()[0]} ({THIS_TAG}) in "
        "/kaggle/input/landmark-delg/wheels"
    ) in report["log_tail"]
    assert report["final"] is None


@root_only
def test_a_script_writing_under_kaggle_input_fails_as_on_the_server(tiny_competition, bundle, tmp_path):
    def writes_input(copy: Path) -> None:
        kernel = copy / "kernel.py"
        kernel.write_text(
            kernel.read_text().replace(
                "status = subprocess.run(", "Path(DATASET, 'cache.npz').write_bytes(b'')\nstatus = subprocess.run(", 1
            )
        )

    changed = altered_bundle(bundle, tmp_path / "bundle", writes_input)
    report = replay_bundle(tiny_competition, "recognition", changed, tmp_path / "out", 1.0, extra_args=LIGHT)
    assert report["status"] == "crash"
    assert "OSError: [Errno 30] Read-only file system: '/kaggle/input/landmark-delg/cache.npz'" in report["log_tail"]


def test_bundle_names_and_a_task_the_bundle_does_not_run(bundle, tiny_competition, tmp_path, capsys):
    assert bundle_names(bundle) == ("landmark-delg", "landmark-recognition-2021", "recognition")
    argv = [
        "--competition",
        str(tiny_competition),
        "--task",
        "retrieval",
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
    ]
    assert run_main(replay_main, argv) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --bundle {bundle} runs recognition (landmark-recognition-2021), not --task retrieval"
    )


def test_without_root_the_sandbox_is_read_only_copies_and_says_the_network_was_not_cut(
    tiny_competition, bundle, tmp_path, monkeypatch
):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # what a user who is not root gets
    report = replay_bundle(
        tiny_competition, "recognition", bundle, tmp_path / "out", 1.0, Limits(disk_gb=1), extra_args=LIGHT
    )
    assert report["status"] == "ok", report.get("log_tail")
    facts = report["sandbox"]
    assert facts["mode"] == "copies" and not facts["network"]["cut"] and "NOT cut" in facts["network"]["how"]
    copied = tmp_path / "out" / "sandbox" / "kaggle" / "input" / "landmark-delg" / "kernel.py"
    assert copied.is_file() and not copied.stat().st_mode & 0o222
    assert 0 <= report["final"]["all"]["gap"] <= 1


@root_only
def test_a_run_over_its_ram_limit_is_killed_and_says_so(tiny_competition, bundle, tmp_path):
    report = replay_bundle(
        tiny_competition, "recognition", bundle, tmp_path / "out", 1.0, Limits(ram_gb=0.1), extra_args=LIGHT
    )  # TensorFlow alone needs more
    assert report["status"] == "killed" and report["sandbox"]["killed"] == "ram above its limit"
    assert report["sandbox"]["ram"]["peak_gb"] > 0.1 and report["final"] is None


def test_an_interrupted_bundle_replay_leaves_the_earlier_report_as_it_was(
    tiny_competition, bundle, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "submission.csv").write_text("id,landmarks\nabc,1 0.5\n")
    mark_output_dir(out, kind=REPORT_KIND)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*_, **__):
        raise KeyboardInterrupt  # Ctrl-C while kernel.py runs

    monkeypatch.setattr(sandbox, "run_with_limit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay_bundle(tiny_competition, "recognition", bundle, out, 1.0, extra_args=LIGHT)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # before, submission.csv was deleted first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial folder left beside it
