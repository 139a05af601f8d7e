"""submission/main.py under the faults of issues 21 and 29: a bad --model or database, a failure, Ctrl-C or a full
disk leave an earlier --out as it was, one run per --work, 16-bit images, the modes of the files it writes, bad
flags and settings files as one error line, bounded numbers."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from common.gldv2 import image_path
from common.kit import SUBMISSION_SCRIPT
from export.retrieval import export_retrieval
from local_eval.submission_script import load_submission, sibling
from tests import HANG_GUARD_S
from tests.delg_test_models import write_tf2_model
from tests.test_export_delg import make_run_dir
from tests.test_submission_e2e import FAST, build_competition, scene

sub = load_submission()
store = sibling("store")
PREVIOUS = "id,landmarks\nabc123,7 0.9\n"  # an earlier good submission that a failed run must leave alone


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_competition")
    build_competition(root)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tf2_model(tmp_path_factory.mktemp("faults_model") / "tf2")


def argv(task: str, data, model, tmp_path, *extra: str) -> list[str]:
    return [
        "--task",
        task,
        "--data",
        str(data),
        "--model",
        str(model),
        "--out",
        str(tmp_path / "s.csv"),
        "--work",
        str(tmp_path / "work"),
        *FAST,
        *extra,
    ]


def fails_with_one_line(capsys, args: list[str], *named: str) -> str:
    assert sub.main(args) == 2
    err = capsys.readouterr().err  # progress bars may come first, ended by a newline or a carriage return
    last = re.split(r"[\r\n]", err.rstrip("\n"))[-1]
    assert last.startswith("error: ") and err.count("error:") == 1 and err.endswith("\n"), err
    assert "usage:" not in err, err
    for text in named:
        assert text in last, last
    return last


def previous_submission(tmp_path):
    out = tmp_path / "s.csv"
    out.write_text(PREVIOUS)
    return out


def write_random_pb(folder):
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(np.random.default_rng(0).bytes(3000))


@pytest.fixture(scope="module")
def retrieval_model(tmp_path_factory):
    """The kit's Kaggle retrieval model (another contract), unzipped as a user would."""
    root = tmp_path_factory.mktemp("retrieval_model")
    make_run_dir(root / "run")
    export_retrieval([root / "run"], root / "retrieval.zip")
    with zipfile.ZipFile(root / "retrieval.zip") as archive:
        archive.extractall(root / "model")
    return root / "model"


def write_wrong_outputs(folder):
    """The DELG inputs, but only one of its outputs."""
    module = tf.Module()
    module.serve = tf.function(lambda **kw: {"features": tf.zeros([1, 128])}).get_concrete_function(
        input_image=tf.TensorSpec([None, None, 3], tf.uint8),
        input_scales=tf.TensorSpec([None], tf.float32),
        input_max_feature_num=tf.TensorSpec([], tf.int32),
        input_abs_thres=tf.TensorSpec([], tf.float32),
        input_global_scales_ind=tf.TensorSpec([None], tf.int32),
    )
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda folder: folder.mkdir(), "is not a SavedModel folder (no saved_model.pb)"),
        (lambda folder: None, "no such folder"),
        (lambda folder: folder.write_text("x"), "not a folder"),
        (write_random_pb, "cannot load it ("),  # and which TensorFlow versions are involved
        ("retrieval", "it is a retrieval model"),
        (write_wrong_outputs, "is not a DELG model: expected the DELG contract"),
    ],
)
def test_a_bad_model_is_one_line_and_leaves_the_previous_submission(
    competition, tmp_path, capsys, request, make, named
):
    bad = tmp_path / "model"
    if make == "retrieval":
        shutil.copytree(request.getfixturevalue("retrieval_model"), bad)
    else:
        make(bad)
    out = previous_submission(tmp_path)
    fails_with_one_line(
        capsys, argv("recognition", competition / "landmark-recognition", bad, tmp_path), f"--model {bad}", named
    )
    assert out.read_text() == PREVIOUS
    assert list(tmp_path.glob(".s.csv*")) == []


def test_the_retrieval_model_error_names_both_contracts(retrieval_model):
    with pytest.raises(sub.InputError) as error:
        sub.DelgSavedModel(retrieval_model, sub.Extraction())
    assert "takes input_image and gives global_descriptor" in str(error.value)
    assert "input_scales, input_max_feature_num" in str(error.value)


def empty_header_train(data):
    (data / "train.csv").write_text("id,landmark_id\n")


def train_rows_without_images(data):
    ids = [f"{i:04d}deadbeef" for i in range(3)]
    pd.DataFrame({"id": ids, "landmark_id": [1, 2, 1]}).to_csv(data / "train.csv", index=False)
    for image_id in ids:
        image_path(data, "train", image_id).unlink(missing_ok=True)


def empty_index(data):
    for path in (data / "index").rglob("*.jpg"):
        path.unlink()


def index_of_unnamed_files(data):
    for number, path in enumerate(sorted((data / "index").rglob("*.jpg"))):
        path.rename(path.with_name(f"x{number}.jpg"))  # too short to be an image id


@pytest.mark.parametrize(
    "task, damage, named",
    [
        ("recognition", empty_header_train, "train.csv lists no images"),
        ("retrieval", empty_index, "holds no .jpg images named by an image id"),
        ("retrieval", index_of_unnamed_files, "holds no .jpg images named by an image id"),
        ("recognition", lambda data: shutil.rmtree(data / "test"), "test not found"),
    ],
)
def test_an_empty_database_is_an_error_that_leaves_the_previous_submission(
    competition, model, tmp_path, capsys, task, damage, named
):
    data = tmp_path / "data"
    shutil.copytree(competition / f"landmark-{task}", data)
    damage(data)
    out = previous_submission(tmp_path)
    fails_with_one_line(capsys, argv(task, data, model, tmp_path), str(data), named)
    assert out.read_text() == PREVIOUS


def test_a_database_of_unreadable_images_is_an_error(competition, model, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(competition / "landmark-recognition", data)
    train_rows_without_images(data)
    out = previous_submission(tmp_path)
    fails_with_one_line(
        capsys, argv("recognition", data, model, tmp_path), "none of the 3 database images", str(data / "train")
    )
    assert out.read_text() == PREVIOUS  # the error came after the inputs were checked and WORK written


def interrupt(*_, **__):
    raise KeyboardInterrupt  # what Ctrl-C raises in the main thread


def allocate_too_much(*_, **__):
    return np.zeros((2**40, 512), np.float32)  # numpy's ArrayMemoryError, as --global-batch 1e9 gave


def test_verification_workers_leave_ctrl_c_to_the_main_process():
    verifier = sibling("verifier")
    own = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN when started in the background
    with verifier.verification_pool(sub.count_inliers, sub.Verification(), 2) as pool:  # no traceback per worker:
        assert pool.executor.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == own  # this process still stops on Ctrl-C as it did
    assert signal.getsignal(signal.SIGINT) == own


def square_or_die(task: int) -> int:
    """task squared; a worker process given task 5 dies at once, as a crashed one does (SIGSEGV, the OOM killer)."""
    if task == 5 and multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return task * task


def test_a_worker_that_dies_leaves_its_tasks_to_this_process(caplog):
    verifier = sibling("verifier")
    tasks = list(range(24))
    with caplog.at_level("WARNING", logger="submission"), verifier.worker_pool((), 2) as pool:
        first = verifier.pooled_map(square_or_die, tasks, pool)  # before, the pool waited for the dead task forever
        assert pool.executor is None  # the broken pool is let go: the next batch runs here from the start
        second = verifier.pooled_map(square_or_die, tasks, pool)
    assert first == second == [t * t for t in tasks]  # complete and in order
    assert caplog.text.count("a worker process died") == 1, caplog.text


def test_a_stopped_map_returns_what_is_done_and_cancels_the_rest():
    verifier = sibling("verifier")
    with verifier.worker_pool((), 2) as pool:
        done = verifier.pooled_map(abs, list(range(-400, 0)), pool, stop=lambda: True)
    assert done == [400]


@pytest.mark.parametrize(
    "failure",
    [
        (store, "extract_global", interrupt, 130, "interrupted: --out is left as it was"),  # during the global pass
        (sub, "knn", allocate_too_much, 2, "out of memory (Unable to allocate"),
    ],
)
def test_an_interrupted_or_failed_run_leaves_out_byte_for_byte(
    competition, model, tmp_path, capsys, monkeypatch, failure
):
    module, name, fail, status, named = failure  # where it fails, how, and the exit status and error it gives
    monkeypatch.setattr(module, name, fail)
    out = tmp_path / "s.csv"
    out.write_bytes(PREVIOUS.encode() + b"\xff\x00 not even CSV\r\n")
    before = out.read_bytes()
    assert sub.main(argv("recognition", competition / "landmark-recognition", model, tmp_path)) == status
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and named in last, last
    assert out.read_bytes() == before
    latest = pd.read_csv(tmp_path / "work" / "submission_latest.csv", dtype=str, keep_default_na=False)
    assert len(latest) > 0 and (latest["landmarks"] == "").all()


def test_an_empty_test_set_gives_a_header_only_submission(competition, model, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(competition / "landmark-retrieval", data)
    (data / "sample_submission.csv").write_text("id,images\n")
    assert sub.main(argv("retrieval", data, model, tmp_path)) == 0
    assert (tmp_path / "s.csv").read_text().strip() == "id,images"
    assert "lists no test images" in caplog.text


def test_a_bad_nonlandmark_dir_leaves_the_previous_submission(competition, model, tmp_path, capsys):
    out = previous_submission(tmp_path)
    args = argv(
        "recognition",
        competition / "landmark-recognition",
        model,
        tmp_path,
        "--nonlandmark-dir",
        str(tmp_path / "none"),
    )
    fails_with_one_line(capsys, args, "--nonlandmark-dir")
    assert out.read_text() == PREVIOUS


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_one_run_per_work_folder_and_a_killed_run_does_not_block(competition, model, tmp_path, capsys):
    data = competition / "landmark-recognition"
    args = argv("recognition", data, model, tmp_path)
    first = subprocess.Popen(
        [sys.executable, str(SUBMISSION_SCRIPT), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    lock = tmp_path / "work" / ".lock"
    try:
        wait_for(lambda: lock.is_file() and f"process {first.pid}," in lock.read_text() or first.poll() is not None)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock for as long as the test needs
        assert first.poll() is None, "the first run ended before it could be caught"
        before = sorted(p.name for p in (tmp_path / "work").rglob("*"))
        fails_with_one_line(
            capsys, args, f"--work {tmp_path / 'work'} is in use by another run", f"process {first.pid}"
        )
        assert sorted(p.name for p in (tmp_path / "work").rglob("*")) == before
    finally:
        first.kill()
        first.wait()
    assert sub.main(args) == 0  # the killed run's lock went with it
    assert f"process {os.getpid()}," in lock.read_text()


def test_written_files_are_ordinary_files(competition, model, tmp_path):
    assert sub.main(argv("recognition", competition / "landmark-recognition", model, tmp_path)) == 0
    mask = os.umask(0o022)
    os.umask(mask)
    written = [tmp_path / "s.csv", *(p for p in (tmp_path / "work").rglob("*") if p.is_file())]
    assert {
        "timing.json",
        "settings.json",
        "submission_global_only.csv",
        "neighbours.npz",
        "verified_pairs.csv",
        "cache_key.json",
        ".lock",
    } <= {p.name for p in written}
    assert any(p.suffix == ".npz" and "local" in p.parts for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


def fill_then_fail(path, *_, **__):
    """What a write does on a full disk: some bytes land, then ENOSPC."""
    with open(path, "ab") as file:
        file.write(b"x" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "writer, folder, name",
    [
        ("csv", "{tmp}/work", "submission_latest.csv"),  # the first write: the all-empty submission, in WORK
        ("npz", "{tmp}/work/global/m0/train", "chunk_000000.npz"),  # database descriptors
        ("append", "{tmp}/work", "verified_pairs.csv"),  # appended batch after batch
    ],
)
def test_a_full_disk_is_one_line_naming_the_folder(
    competition, model, tmp_path, capsys, monkeypatch, writer, folder, name
):
    to_csv = pd.DataFrame.to_csv
    if writer == "csv":
        monkeypatch.setattr(pd.DataFrame, "to_csv", lambda frame, path, **kw: fill_then_fail(path))
    elif writer == "npz":
        monkeypatch.setattr(np, "savez", fill_then_fail)
    else:
        monkeypatch.setattr(
            pd.DataFrame,
            "to_csv",
            lambda frame, path, mode="w", **kw: (
                fill_then_fail(path) if mode == "a" else to_csv(frame, path, mode=mode, **kw)
            ),
        )
    out = previous_submission(tmp_path)
    args = argv("recognition", competition / "landmark-recognition", model, tmp_path, "--plan", "fixed")
    err = fails_with_one_line(
        capsys,
        args,
        f"no space left in {folder.format(tmp=tmp_path)} while writing {name}: it needs more than the ",
        "written when the disk filled",
        "free now",
    )
    assert re.search(r"more than the ([4-9]\.\d) KB written", err), err  # fill_then_fail's 4 KB (and a header)
    assert [p for p in tmp_path.rglob(".*") if p.name != ".lock"] == []  # no half-written file is left
    assert out.read_text() == PREVIOUS  # --out changes only when a run finishes
    if writer != "csv":  # the intermediate file the run had written before the disk filled, whole
        expected = pd.read_csv(competition / "landmark-recognition" / "sample_submission.csv", dtype=str)["id"]
        latest = tmp_path / "work" / "submission_latest.csv"
        assert pd.read_csv(latest, dtype=str)["id"].tolist() == expected.tolist()


def sixteen_bit(pixels: np.ndarray, mode: str) -> bytes:
    """pixels (uint16) as a PNG (I;16) or a TIFF (I;16B, and I as older Pillow opens 16-bit PNGs)."""
    image = {
        "I;16": lambda: Image.fromarray(pixels),
        "I": lambda: Image.fromarray(pixels).convert("I"),
        "I;16B": lambda: Image.frombytes("I;16B", pixels.shape[::-1], pixels.astype(">u2").tobytes()),
    }[mode]()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode == "I;16" else "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grayscale_is_scaled_to_8_bits_as_training_reads_it(tmp_path, mode):
    wide = scene(5)[..., 0].astype(np.uint16) * 257 + np.arange(96, dtype=np.uint16)[None]
    path = tmp_path / "deep.jpg"  # the name says JPEG; Pillow and TensorFlow go by the contents
    path.write_bytes(sixteen_bit(wide, mode))
    assert Image.open(path).mode == mode
    expected = np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert expected.std() > 20  # a real picture, not one grey (or white) level
    np.testing.assert_array_equal(sub.decode_image(path, max_side=1024, min_side=32), expected)
    np.testing.assert_array_equal(store.decode_for_global(path, max_side=96), expected)  # its bucket is 96x96
    if mode == "I;16":  # training decodes with TensorFlow (train/data.py)
        trained = tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(trained, expected)


FLAGS_ONLY = ["--task", "recognition", "--data", "no-data", "--model", "no-model"]  # parsing fails before reading them


@pytest.mark.parametrize(
    "args, named",
    [
        (["--rerank", "abc"], "error: argument --rerank: invalid int value: 'abc'"),
        (
            ["--shard", "-1/2"],
            "argument --shard: expected one argument (a value that starts with '-' is written --shard=",
        ),
        (["--shard=-1/2"], "--shard -1/2: need 0 <= i < n"),
        (["--task", "foo"], "argument --task: invalid choice: 'foo'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argparse_errors_are_one_line_without_the_usage_block(capsys, args, named):
    fails_with_one_line(capsys, [*FLAGS_ONLY, *args], named)


def test_help_still_prints_the_usage_and_exits_0(capsys):
    with pytest.raises(SystemExit) as stopped:
        sub.parse_settings(["--help"])
    assert stopped.value.code == 0 and "usage:" in capsys.readouterr().out


def section_of(name: str) -> str:
    return next(section for section, cls in sub.SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)})


@pytest.mark.parametrize(
    "name, given, in_file, named",
    [
        ("attention_threshold", "nan", "NaN", "--attention-threshold must be a finite number, got nan{}"),
        ("time_budget_h", "inf", "Infinity", "--time-budget-h must be a finite number, got inf{}"),
        ("ransac_threshold_px", "-inf", "-Infinity", "--ransac-threshold-px must be a finite number, got -inf{}"),
        ("max_features", "3000000000", "3000000000", "--max-features must be <= 100000, got 3000000000{}"),
        ("top_k", str(10**23), str(10**23), "--top-k must be <= 1000, got " + str(10**23) + "{}"),  # 1e23, an integer
        ("global_batch", "1000000000", "1000000000", "--global-batch must be <= 1024, got 1000000000{}"),
        ("attention_threshold", "1e23", "1e23", "--attention-threshold must be <= 1000000.0, got 1e+23{}"),
        ("scales", "nan", "[1.0, NaN]", "--scales must be a finite number, got nan{}"),
    ],
)
def test_numbers_are_bounded_alike_on_the_command_line_and_in_settings_files(
    capsys, tmp_path, name, given, in_file, named
):
    flag_given = f"--{name.replace('_', '-')}={given}"  # = lets a value start with '-'
    assert fails_with_one_line(capsys, [*FLAGS_ONLY, flag_given], named.format("")).endswith(named.format(""))
    path = tmp_path / "settings.json"
    path.write_text(f'{{"{section_of(name)}": {{"{name}": {in_file}}}}}')
    fails_with_one_line(capsys, [*FLAGS_ONLY, "--settings", str(path)], named.format(f" (from the file {path})"))


def test_a_float_where_an_integer_belongs_and_an_integer_beyond_floats_are_one_line(capsys, tmp_path):
    path = tmp_path / "settings.json"
    path.write_text('{"extraction": {"max_features": 1e23}}')
    fails_with_one_line(
        capsys, [*FLAGS_ONLY, "--settings", str(path)], "'extraction.max_features' must be int, got 1e+23"
    )
    path.write_text('{"extraction": {"attention_threshold": %s}}' % ("9" * 400))
    fails_with_one_line(
        capsys,
        [*FLAGS_ONLY, "--settings", str(path)],
        "'extraction.attention_threshold' is out of range, got 99999999999999999999...(400 characters)",
    )


def test_every_numeric_setting_has_finite_bounds_that_hold_its_default():
    cli = sibling("settings_cli")
    for cls in [sub.Run, *sub.SECTIONS.values()]:
        for f in dataclasses.fields(cls):
            if cli.field_type(f)[0] not in (int, float):
                continue
            meta = f.metadata
            bounds = [meta.get(key) for key in ("minimum", "above", "maximum", "below") if key in meta]
            assert ({"minimum", "above"} & set(meta)) and ({"maximum", "below"} & set(meta)), f.name
            assert all(math.isfinite(bound) for bound in bounds), f.name
    cli.check_settings(sub.Run(task="recognition", data=Path("d"), model=(Path("m"),)))
    for cls in sub.SECTIONS.values():
        cli.check_settings(cls())


@pytest.mark.parametrize(
    "content, named",
    [
        ('{"Scoring": {"rerank": 5}}', "unknown top-level key 'Scoring' (did you mean 'scoring'?)"),
        ('{"verifcation": {}}', "unknown top-level key 'verifcation' (did you mean 'verification'?)"),
        ('{"rerank": 5}', "unknown top-level key 'rerank' (a setting of 'scoring': put it inside that section)"),
        ('{"scoring": {"rerannk": 5}}', "unknown setting 'scoring.rerannk' (did you mean 'rerank'?)"),
        ('{"scoring": {"mutual": true}}', "unknown setting 'scoring.mutual' (it belongs in 'verification')"),
        ('{"scoring": {"rerank": 5, "rerank": 7}}', "key 'rerank' is given twice in one object"),
        ('{"scoring": {"rerank": 5}, "budget": {}, "scoring": {}}', "key 'scoring' is given twice in one object"),
        ("[" * 100_000 + "]" * 100_000, "not a settings file (JSON nested too deeply)"),
        ('{"about": ' * 100_000 + "1" + "}" * 100_000, "not a settings file (JSON nested too deeply)"),
    ],
)
def test_settings_file_mistakes_are_one_line_naming_the_key(capsys, tmp_path, content, named):
    path = tmp_path / "settings.json"
    path.write_text(content)
    fails_with_one_line(capsys, [*FLAGS_ONLY, "--settings", str(path)], f"--settings {path}: {named}")


def test_a_settings_fifo_or_folder_is_one_line_not_a_hang(capsys, tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    fails_with_one_line(capsys, [*FLAGS_ONLY, "--settings", str(tmp_path / "fifo.json")], "not a regular file")
    fails_with_one_line(capsys, [*FLAGS_ONLY, "--settings", str(tmp_path)], f"--settings {tmp_path}: not a regular")
    fails_with_one_line(capsys, [*FLAGS_ONLY, "--settings", str(tmp_path / "none.json")], "cannot read it (No such")


def test_a_run_record_and_a_tune_file_keep_their_other_top_level_keys(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(
        json.dumps(
            {
                "run": {"task": "retrieval"},
                "sources": {},
                "versions": {},
                "plan": {},
                "about": {},
                "scoring": {"rerank": 5},
            }
        )
    )
    assert sub.parse_settings([*FLAGS_ONLY, "--settings", str(path)]).scoring.rerank == 5


@pytest.mark.parametrize(
    "out, extra, named",
    [
        ("{data}/train.csv", [], "--out {data}/train.csv is inside --data {data}"),
        ("{data}/sample_submission.csv", [], "--out {data}/sample_submission.csv is inside --data {data}"),
        ("{data}/new/s.csv", [], "--out {data}/new/s.csv is inside --data {data}"),  # a folder it would create
        ("{tmp}/t.json", ["--settings", "{tmp}/t.json"], "--out {tmp}/t.json is --settings {tmp}/t.json"),
        ("{tmp}/hard.json", ["--settings", "{tmp}/t.json"], "--out {tmp}/hard.json is --settings {tmp}/t.json"),
        ("{tmp}/link.csv", [], "--out {tmp}/link.csv is inside --data {data}"),  # a symbolic link to train.csv
        ("{tmp}/model/s.csv", [], "--out {tmp}/model/s.csv is inside --model {tmp}/model"),
        ("{tmp}/nl/s.csv", ["--nonlandmark-dir", "{tmp}/nl"], "is inside --nonlandmark-dir {tmp}/nl"),
        ("{tmp}/s.csv", ["--work", "{data}/work"], "--work {data}/work is inside --data {data}"),
        ("{tmp}/s.csv", ["--work", "{tmp}/model"], "--work {tmp}/model is --model {tmp}/model"),
        (
            "{tmp}/work/global/s.csv",
            [],
            "--out {tmp}/work/global/s.csv is inside --work {tmp}/work, whose files and "
            "caches the script rewrites and deletes",
        ),
    ],
)
def test_an_output_that_is_an_input_is_refused_before_any_work(tmp_path, capsys, out, extra, named):
    data = tmp_path / "data"
    for folder in (data, tmp_path / "model", tmp_path / "nl"):
        folder.mkdir()
    (data / "train.csv").write_text("id,landmark_id\nabc123,1\n")
    (data / "sample_submission.csv").write_text("id,landmarks\nabc124,\n")
    (tmp_path / "t.json").write_text('{"scoring": {"rerank": 3}}')
    os.link(tmp_path / "t.json", tmp_path / "hard.json")
    (tmp_path / "link.csv").symlink_to(data / "train.csv")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    where = {"data": data, "tmp": tmp_path}
    args = [
        "--task",
        "recognition",
        "--data",
        str(data),
        "--model",
        str(tmp_path / "model"),
        "--out",
        out.format(**where),
        "--work",
        str(tmp_path / "work"),
        *(a.format(**where) for a in extra),
    ]
    fails_with_one_line(capsys, args, named.format(**where))
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


def retrieval_copy(competition, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(competition / "landmark-retrieval", data)
    return data


def first_index_image(data):
    return sorted((data / "index").rglob("*.jpg"))[0]


def test_the_same_index_id_in_two_folders_is_an_error_naming_both(competition, tmp_path, capsys):
    data = retrieval_copy(competition, tmp_path)
    original = first_index_image(data)
    twin = data / "index" / "x" / "y" / "z" / original.name
    twin.parent.mkdir(parents=True)
    shutil.copyfile(original, twin)
    out = previous_submission(tmp_path)
    fails_with_one_line(
        capsys,
        argv("retrieval", data, tmp_path / "no-model", tmp_path),
        f"image id {original.stem} is found twice, as {original} and {twin}",
    )
    assert out.read_text() == PREVIOUS


def test_listing_takes_jpeg_suffixes_in_any_case_and_skips_what_it_cannot_read_saying_so(tmp_path, caplog):
    for name in (
        "a/b/c/abc1.jpg",
        "a/b/c/abc2.JPG",
        "a/b/c/abc3.jpeg",
        "a/b/c/abc4.JPEG",
        "x/y/z/abc5.jpg",
        "a/b/c/zz.jpg",
        "a/b/c/abc7.png",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"\xff\xd8")
    os.mkfifo(tmp_path / "a/b/c/abc6.jpg")
    (tmp_path / "a/b/c/abc8.jpg").mkdir()
    assert sub.list_image_ids(tmp_path) == ["abc1", "abc2", "abc3", "abc4"]
    for why, first in [
        ("whose names are no image ids", "a/b/c/zz.jpg"),
        ("that are no regular files", "a/b/c/abc6.jpg"),
        ("outside their id's folder a/b/c", "x/y/z/abc5.jpg"),
    ]:
        assert f"skipping 1 .jpg files {why} (first: {tmp_path / first})" in caplog.text
    assert store.image_file(sub.image_path(tmp_path.parent, tmp_path.name, "abc4"))[0] == tmp_path / "a/b/c/abc4.JPEG"


def test_an_upper_case_jpg_index_image_is_searched(competition, model, tmp_path):
    data = retrieval_copy(competition, tmp_path)
    image = first_index_image(data)
    image.rename(image.with_suffix(".JPG"))
    assert sub.main(argv("retrieval", data, model, tmp_path)) == 0
    rows = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)["images"]
    readable = rows[rows != ""]
    assert len(readable) > 0 and all(image.stem in row.split() for row in readable)  # 8 index images: all listed


def test_an_empty_nonlandmark_dir_is_an_error(competition, tmp_path, capsys):
    (tmp_path / "nl").mkdir()
    args = argv(
        "recognition",
        competition / "landmark-recognition",
        tmp_path / "no-model",
        tmp_path,
        "--nonlandmark-dir",
        str(tmp_path / "nl"),
    )
    fails_with_one_line(capsys, args, f"--nonlandmark-dir {tmp_path / 'nl'} holds no files")


def test_fifos_named_jpg_do_not_hang_the_run(competition, model, tmp_path):
    data = retrieval_copy(competition, tmp_path)
    (data / "index/f/f/f").mkdir(parents=True, exist_ok=True)
    os.mkfifo(data / "index/f/f/f/fff000fifo.jpg")
    test_ids = pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].tolist()
    fifo_query = image_path(data, "test", test_ids[0])
    fifo_query.unlink()
    os.mkfifo(fifo_query)
    (tmp_path / "nl").mkdir()
    os.mkfifo(tmp_path / "nl" / "fifo.jpg")
    shutil.copyfile(first_index_image(data), tmp_path / "nl" / "plain.jpg")
    result = subprocess.run(
        [
            sys.executable,
            str(SUBMISSION_SCRIPT),
            *argv("retrieval", data, model, tmp_path),
            "--nonlandmark-dir",
            str(tmp_path / "nl"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping 1 .jpg files that are no regular files" in result.stderr
    assert f"skipping unreadable image {fifo_query}: {fifo_query} is not a regular file" in result.stderr
    rows = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert rows["id"].tolist() == test_ids and rows["images"].iloc[0] == "" and (rows["images"].iloc[1:4] != "").all()


def test_a_decode_that_never_ends_is_skipped_after_the_timeout(competition, model, tmp_path, monkeypatch, caplog):
    data = competition / "landmark-recognition"
    stuck_id = pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].iloc[0]
    stuck, release = image_path(data, "test", stuck_id), threading.Event()
    decode = store.decode_for_global

    def hangs_on_one(path, max_side):
        if path == stuck:
            release.wait()  # a read that never returns (a hung file system)
        return decode(path, max_side)

    monkeypatch.setattr(store, "decode_for_global", hangs_on_one)
    try:
        assert sub.main(argv("recognition", data, model, tmp_path, "--decode-timeout-s", "2")) == 0
    finally:
        release.set()
    assert f"skipping {stuck}: reading it took more than 2 s (--decode-timeout-s)" in caplog.text
    rows = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert rows["landmarks"].iloc[0] == "" and (rows["landmarks"].iloc[1:4] != "").all()


def test_swapped_image_bytes_give_fresh_predictions_on_the_same_work(competition, model, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(competition / "landmark-recognition", data)
    first, second = (
        image_path(data, "test", i) for i in pd.read_csv(data / "sample_submission.csv", dtype=str)["id"].iloc[:2]
    )
    args = argv("recognition", data, model, tmp_path, "--workers", "0")
    assert sub.main(args) == 0
    before = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    caplog.clear()
    assert sub.main(args) == 0  # the same --work: its caches were made from the old files
    rerun = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert "test: dropped 1 cached chunks: 2 of their images changed (size or time) since" in caplog.text
    assert "local: dropped 2 cached features: their images changed (size or time) since" in caplog.text
    fresh = tmp_path / "fresh"
    assert sub.main(argv("recognition", data, model, fresh, "--workers", "0")) == 0
    expected = pd.read_csv(fresh / "s.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(rerun, expected)
    assert not rerun.equals(before)  # the stale caches would have given the earlier rows again
    landmark = lambda frame, row: frame["landmarks"].iloc[row].split()[0]
    assert [landmark(rerun, 0), landmark(rerun, 1)] == [landmark(before, 1), landmark(before, 0)]
