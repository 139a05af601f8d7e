"""Issue 29, the kit's commands: every bad flag, bad file or fault is one `error:` line with exit status 2, found
before any work, and nothing good is lost."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.cli import UserError, run_main
from tests.test_build_gldv2 import fake_gldv2 as fake_gldv2  # a module fixture: a small GLDv2 download


def run_command(target: str, argv: list[str], capsys) -> tuple[int, str]:
    """run_main of "module:function" on argv: (exit status, stderr)."""
    module, function = target.split(":")
    code = run_main(getattr(importlib.import_module(module), function), argv)
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *named: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for text in named:
        assert text in err, err


@pytest.mark.parametrize(
    "target, argv, named",
    [
        ("train.__main__:main", ["--steps", "abc", "--out", "o", "--data", "d"], "argument --steps: invalid int value"),
        ("local_eval.score:main", ["--task", "foo", "--solution", "s", "--submission", "t"], "argument --task"),
        ("local_eval.projection:main", ["--db", "1e30", "--log", "l", "--profile", "p"], "argument --db: invalid int"),
        ("local_eval.build:main", ["gldv2", "--gldv2", "g", "--test", "x", "--index", "3", "--out", "o"], "--test"),
        ("local_eval.build:main", ["nothing"], "invalid choice: 'nothing'"),
        ("local_eval.replay:main", ["--task", "recognition"], "the following arguments are required"),
        (
            "local_eval.tune:main_merge",
            ["--tables", "t", "--task", "retrieval", "--out", "o", "--bogus"],
            "unrecognized arguments: --bogus",
        ),
        ("export.__main__:main_delg", ["--run", "r"], "required: --out"),
        ("local_eval.show:main_show_pair", ["a.jpg"], "required"),
    ],
)
def test_argparse_errors_are_one_error_line_without_usage(target, argv, named, capsys):
    code, err = run_command(target, argv, capsys)
    assert_one_error_line(code, err, named, "--help")
    assert "usage:" not in err


@pytest.mark.parametrize(
    "target, argv, flag",
    [
        ("local_eval.tradeoff:main", ["--speedup", "nan"], "--speedup"),
        ("local_eval.tradeoff:main", ["--speedup", "inf"], "--speedup"),
        ("local_eval.tradeoff:main", ["--limit-h", "nan"], "--limit-h"),
        ("local_eval.tune:main", ["--limit-h", "inf"], "--limit-h"),
        ("local_eval.tune:main", ["--workers", "1000000"], "--workers must be at most"),
        ("train.tfrecords:main", ["--validation-fraction", "nan"], "--validation-fraction"),
    ],
)
def test_nan_infinite_and_huge_numbers_are_refused_before_any_work(target, argv, flag, tmp_path, capsys):
    required = {
        "local_eval.tradeoff:main": [
            "--competition",
            str(tmp_path / "c"),
            "--task",
            "recognition",
            "--model",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "out"),
        ],
        "local_eval.tune:main": [
            "--competition",
            str(tmp_path / "c"),
            "--task",
            "recognition",
            "--model",
            str(tmp_path / "m"),
            "--out",
            str(tmp_path / "out"),
        ],
        "train.tfrecords:main": ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
    }[target]
    code, err = run_command(target, [*required, *argv], capsys)
    assert_one_error_line(code, err, flag)
    assert not (tmp_path / "out").exists()


def test_an_unknown_command_is_one_error_line(capsys):
    from common.cli import dispatch
    from local_eval.__main__ import COMMANDS

    assert dispatch("local_eval", COMMANDS, ["nosuch"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(2, err, "unknown command 'nosuch'", "replay")


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def competition_skeleton(root: Path) -> Path:
    """The folders and solution file replay checks before it runs anything (no images: nothing runs on it)."""
    (root / "landmark-recognition").mkdir(parents=True)
    (root / "solutions").mkdir()
    (root / "solutions" / "recognition_solution.csv").write_text("id,landmarks,Usage\n")
    return root


def model_skeleton(root: Path) -> Path:
    """A folder that passes replay's SavedModel check (a saved_model.pb file); nothing loads it in these tests."""
    root.mkdir(parents=True)
    (root / "saved_model.pb").write_bytes(b"")
    return root


def unwritable_folder(tmp_path: Path) -> Path:
    """An output folder that cannot be made: under a read-only folder (as root, where permissions do not stop
    writes, under /proc)."""
    if os.geteuid() == 0:
        return Path("/proc") / f"kit-test-{tmp_path.name}"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked / "out"


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder with its bytes (hidden ones included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# 2. An output is never an input


def test_an_output_that_is_an_input_or_inside_one_is_refused(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    (run / "config.json").write_text("{}")
    settings = tmp_path / "settings.json"
    settings.write_text("{}")
    cases = [
        ("export.__main__:main_delg", ["--run", str(run), "--out", str(run)], "is also --run"),
        ("export.__main__:main_delg", ["--run", str(run), "--out", str(run / "model")], "is inside --run"),
        ("export.__main__:main_delg", ["--run", str(run), "--out", str(tmp_path), "--overwrite"], "holds --run"),
        (
            "export.__main__:main_bundle",
            ["--run", str(run), "--out", str(settings), "--kaggle-user", "me", "--settings", str(settings)],
            "is also --settings",
        ),
        ("train.__main__:main", ["--data", str(data), "--out", str(data / "run")], "is inside --data"),
        ("train.tfrecords:main", ["--data", str(data), "--out", str(data)], "is also --data"),
        (
            "local_eval.tune:main_merge",
            ["--tables", str(settings), "--task", "recognition", "--out", str(settings)],
            "is also --tables",
        ),
        (
            "local_eval.show:main_show_pair",
            [str(settings), str(settings), "--model", str(run), "--out", str(settings)],
            "is also IMG1",
        ),
    ]
    before = tree(tmp_path)
    for target, argv, named in cases:
        code, err = run_command(target, argv, capsys)
        assert_one_error_line(code, err, named)
    assert tree(tmp_path) == before


def test_replay_refuses_an_out_inside_or_holding_the_competition(tmp_path, capsys):
    competition = competition_skeleton(tmp_path / "comp")
    model = model_skeleton(tmp_path / "model")
    for out, named in (
        (competition / "landmark-recognition", "is inside --competition"),
        (tmp_path, "holds --competition"),
    ):
        code, err = run_command(
            "local_eval.replay:main",
            ["--competition", str(competition), "--task", "recognition", "--model", str(model), "--out", str(out)],
            capsys,
        )
        assert_one_error_line(code, err, named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp", "model"]


def test_build_gldv2_refuses_an_out_inside_the_download(fake_gldv2, capsys):
    before = sorted(fake_gldv2.rglob("*"))
    code, err = run_command(
        "local_eval.build:main",
        ["gldv2", "--gldv2", str(fake_gldv2), "--test", "5", "--index", "10", "--out", str(fake_gldv2 / "subset")],
        capsys,
    )
    assert_one_error_line(code, err, "is inside --gldv2")
    assert sorted(fake_gldv2.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------
# 3, 19. Replay changes OUT only when its new report is complete


def earlier_report(out: Path) -> dict[str, bytes]:
    """OUT as an earlier replay left it: report, submission, log and a cached feature in work/."""
    (out / "work" / "global").mkdir(parents=True)
    (out / "report.json").write_text('{"status": "ok", "final": {"all": {"gap": 0.0626}}}\n')
    (out / "submission.csv").write_text("id,landmarks\nabc,1 0.5\n")
    (out / "script.log").write_text("done\n")
    (out / "work" / "global" / "cached.npy").write_bytes(b"features")
    return tree(out)


def test_a_bad_model_leaves_the_earlier_report_whole(tmp_path, capsys):
    competition, out = competition_skeleton(tmp_path / "comp"), tmp_path / "report"
    kept = earlier_report(out)
    (tmp_path / "not-a-model").mkdir()
    code, err = run_command(
        "local_eval.replay:main",
        [
            "--competition",
            str(competition),
            "--task",
            "recognition",
            "--model",
            str(tmp_path / "not-a-model"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert_one_error_line(code, err, "--model", "no saved_model.pb")
    assert tree(out) == kept


def test_an_interrupted_replay_leaves_the_earlier_report_and_its_cache(tmp_path, monkeypatch):
    from local_eval import replay

    competition, model, out = competition_skeleton(tmp_path / "comp"), model_skeleton(tmp_path / "m"), tmp_path / "r"
    kept = earlier_report(out)

    def interrupted(command: list[str], log_path: Path, limit_s: float):
        flags = dict(zip(command, command[1:], strict=False))
        Path(flags["--out"]).write_text("id,landmarks\n")  # the new run's first, empty file
        assert (Path(flags["--work"]) / "global" / "cached.npy").is_file()  # the cache goes on with the run
        raise KeyboardInterrupt

    monkeypatch.setattr(replay, "run_with_limit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replay.replay(competition, "recognition", model, out, 1.0)
    assert tree(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comp", "m", "r"]  # no partial folder left


def test_a_script_that_refuses_its_input_is_one_error_line_and_changes_nothing(
    tmp_path, tiny_competition, tiny_model, capsys
):
    out = tmp_path / "report"
    kept = earlier_report(out)
    code, err = run_command(
        "local_eval.replay:main",
        [
            "--competition",
            str(tiny_competition),
            "--task",
            "recognition",
            "--model",
            str(tiny_model),
            "--out",
            str(out),
            "--",
            "--rerank",
            "abc",
        ],
        capsys,
    )
    assert_one_error_line(code, err, "the script refused its input", "--rerank")
    assert tree(out) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_replay_refuses_an_out_that_holds_other_files(tmp_path, capsys):
    competition, model, out = competition_skeleton(tmp_path / "comp"), model_skeleton(tmp_path / "m"), tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, err = run_command(
        "local_eval.replay:main",
        ["--competition", str(competition), "--task", "recognition", "--model", str(model), "--out", str(out)],
        capsys,
    )
    assert_one_error_line(code, err, "holds other files than a replay report")
    assert tree(out) == {"thesis.tex": b"years of work"}


@pytest.mark.parametrize("broken_venv", [False, True])
def test_an_interpreter_that_cannot_run_the_script_is_one_error_line(tmp_path, capsys, broken_venv):
    competition, model = competition_skeleton(tmp_path / "comp"), model_skeleton(tmp_path / "m")
    interpreter = str(tmp_path / "python") if broken_venv else "/bin/false"
    if broken_venv:  # it starts, but fails on any code
        Path(interpreter).write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named encodings' >&2\nexit 1\n")
        Path(interpreter).chmod(0o755)
    code, err = run_command(
        "local_eval.replay:main",
        [
            "--competition",
            str(competition),
            "--task",
            "recognition",
            "--model",
            str(model),
            "--out",
            str(tmp_path / "r"),
            "--python",
            interpreter,
        ],
        capsys,
    )
    assert_one_error_line(code, err, f"--python {interpreter}", "could not run the script")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------------
# 6. show --model B on model A's WORK


def cache_key_of(work: Path, model: Path) -> None:
    """WORK/cache_key.json as the script writes it for a run of `model`."""
    files = {name: [(model / name).stat().st_size, (model / name).stat().st_mtime_ns] for name in ("saved_model.pb",)}
    entry = {"model": str(model.resolve()), "files": files}
    work.mkdir(parents=True, exist_ok=True)
    (work / "cache_key.json").write_text(
        json.dumps({"global": {"models": [entry], "settings": {}}, "local": {**entry, "settings": {}}})
    )


def test_show_refuses_another_models_work(tmp_path, capsys):
    from local_eval.show import check_work_model

    model_a, model_b = model_skeleton(tmp_path / "a"), model_skeleton(tmp_path / "b")
    cache_key_of(tmp_path / "run" / "work", model_a)
    submission = tmp_path / "run" / "submission.csv"
    submission.write_text("id,landmarks\n")
    code, err = run_command(
        "local_eval.show:main_show",
        [
            "--competition",
            str(tmp_path / "comp"),
            "--task",
            "recognition",
            "--submission",
            str(submission),
            "--model",
            str(model_b),
            "--out",
            str(tmp_path / "show"),
        ],
        capsys,
    )
    assert_one_error_line(code, err, f"--model {model_b.resolve()}", str(model_a.resolve()), "cache_key.json")
    assert not (tmp_path / "show").exists()
    check_work_model(tmp_path / "run" / "work", model_a)  # its own model passes
    os.utime(model_a / "saved_model.pb", ns=(1, 1))  # the same folder, another model in it
    with pytest.raises(UserError, match="saved_model.pb changed since"):
        check_work_model(tmp_path / "run" / "work", model_a)


# ---------------------------------------------------------------------------------------------------------
# 10. Cross-checks


def test_time_refuses_a_log_of_the_other_task(tmp_path, capsys):
    log = tmp_path / "timing.json"
    log.write_text(
        json.dumps(
            {
                "task": "retrieval",
                "rerank_depth": 3,
                "stages": {"global_db": {"items": 10, "seconds": 1.0}, "global_query": {"items": 5, "seconds": 0.5}},
            }
        )
    )
    code, err = run_command("local_eval.projection:main", ["--log", str(log), "--profile", "recognition-2020"], capsys)
    assert_one_error_line(code, err, "times a retrieval run", "--profile recognition-2020 is a recognition")


def test_tune_merge_refuses_a_score_outside_0_1(tmp_path, capsys):
    from tests.test_tune import tune_table

    tables = []
    for seed, public in ((0, 0.5), (1, 5.0)):
        tables.append(tmp_path / f"table{seed}.csv")
        tune_table([0, 3], public=public).to_csv(tables[-1], index=False)
    code, err = run_command(
        "local_eval.tune:main_merge",
        ["--tables", *map(str, tables), "--task", "recognition", "--out", str(tmp_path / "merged")],
        capsys,
    )
    assert_one_error_line(code, err, f"{tables[1]}, line 2: public '5.0' is outside [0, 1]")
    assert not (tmp_path / "merged").exists()


def test_revisited_refuses_an_image_both_easy_and_hard(tmp_path, capsys):
    from local_eval.revisited_synthetic import build_revisited_synthetic

    data = build_revisited_synthetic(tmp_path / "data", "roxford5k", "tiny", 0, False)
    path = data / "roxford5k" / "gnd_roxford5k.pkl"
    gnd = pickle.loads(path.read_bytes())
    query = next(q for q, entry in enumerate(gnd["gnd"]) if len(entry["easy"]))
    entry = gnd["gnd"][query]
    entry["hard"] = [*list(entry["hard"]), list(entry["easy"])[0]]
    path.write_bytes(pickle.dumps(gnd))
    code, err = run_command(
        "local_eval.revisited:main",
        ["--data", str(data), "--dataset", "roxford5k", "--model", str(tmp_path), "--out", str(tmp_path / "out")],
        capsys,
    )
    named = gnd["imlist"][list(entry["easy"])[0]]
    assert_one_error_line(code, err, f"query {gnd['qimlist'][query]!r}", f"{named!r}", "both easy and hard")


# ---------------------------------------------------------------------------------------------------------
# 12. Output folders that cannot be written: one line, before any work


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    competition, model = competition_skeleton(tmp_path / "comp"), model_skeleton(tmp_path / "m")
    image = tmp_path / "image.jpg"
    image.write_bytes(b"")
    out = unwritable_folder(tmp_path)
    cases = [
        ("train.__main__:main", ["--data", str(competition), "--out", str(out)]),
        (
            "local_eval.replay:main",
            ["--competition", str(competition), "--task", "recognition", "--model", str(model), "--out", str(out)],
        ),
        (
            "local_eval.tradeoff:main",
            ["--competition", str(competition), "--task", "recognition", "--model", str(model), "--out", str(out)],
        ),
        (
            "local_eval.show:main_show_pair",
            [str(image), str(image), "--model", str(model), "--out", str(out / "pair.png")],
        ),
    ]
    for target, argv in cases:
        code, err = run_command(target, argv, capsys)
        assert_one_error_line(code, err, "cannot write in")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# 13. Corrupt run files


@pytest.mark.parametrize(
    "config, named",
    [
        ("{not json", "not a readable JSON file"),
        ('{"backbone": 5}', "--backbone 5: expected str"),
        ("[1, 2]", "expected a JSON object of config fields"),
    ],
)
def test_export_of_a_run_with_a_corrupt_config_is_one_error_line(tmp_path, capsys, config, named):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config)
    code, err = run_command("export.__main__:main_delg", ["--run", str(run), "--out", str(tmp_path / "model")], capsys)
    assert_one_error_line(code, err, str(run / "config.json"), named)
    assert not (tmp_path / "model").exists()


def test_export_of_a_run_with_a_garbage_checkpoint_is_one_error_line(tmp_path, capsys):
    from tests.test_export_delg import make_run_dir

    run = tmp_path / "run"
    run.mkdir()
    make_run_dir(run)
    for index in (run / "checkpoints").glob("ckpt-*.index"):
        index.write_bytes(b"garbage, not a checkpoint index" * 10)
    code, err = run_command("export.__main__:main_delg", ["--run", str(run), "--out", str(tmp_path / "model")], capsys)
    assert_one_error_line(code, err, str(run / "checkpoints" / "ckpt-1"))
    assert not (tmp_path / "model").exists()


def garbage_checkpoint(run: Path, config: str | None = None) -> None:
    """A run folder whose newest checkpoint (ckpt-5) is garbage, and optionally a config.json."""
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-5"\nall_model_checkpoint_paths: "ckpt-5"\n')
    (checkpoints / "ckpt-5.index").write_bytes(b"garbage, not a checkpoint index" * 10)
    (checkpoints / "ckpt-5.data-00000-of-00001").write_bytes(b"garbage")
    if config is not None:
        (run / "config.json").write_text(config)


@pytest.mark.parametrize(
    "config, named",
    [
        (None, "ckpt-5: not a readable checkpoint"),
        ("{not json", "config.json: not a readable JSON file"),
        ("garbage state", "checkpoint: missing or unreadable, yet 1 checkpoints"),
    ],
)
def test_resuming_from_corrupt_run_files_is_one_error_line(data_dir, tmp_path, capsys, config, named):
    garbage_checkpoint(tmp_path / "run", None if config == "garbage state" else config)
    if config == "garbage state":  # TensorFlow would ignore it and start from step 0
        (tmp_path / "run" / "checkpoints" / "checkpoint").write_text("garbage {{{")
    before = tree(tmp_path / "run")
    code, err = run_command(
        "train.__main__:main", ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--steps", "2"], capsys
    )
    assert_one_error_line(code, err, named)
    assert tree(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------------------
# 14. A full disk while a checkpoint is written


def test_a_full_disk_while_checkpointing_is_one_error_line_and_keeps_the_newest_checkpoint(tmp_path, monkeypatch):
    import tensorflow as tf

    from train.loop import CheckpointWriter

    trainer = SimpleNamespace(
        checkpoint=tf.train.Checkpoint(weights=tf.Variable(tf.ones([4]))),
        strategy=tf.distribute.get_strategy(),
        step=tf.Variable(0, dtype=tf.int64),
    )
    writer = CheckpointWriter(trainer, tmp_path)
    writer.save(2)
    folder = tmp_path / "checkpoints"
    complete = tree(folder)

    def disk_full(self, checkpoint_number=None, **_):  # what TensorFlow leaves and raises on a full disk
        temp = folder / f"ckpt-{checkpoint_number}_temp"
        temp.mkdir()
        (temp / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_bytes(b"half")
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{temp}/part-00000-of-00001.data-00000-of-00001; No space left on device"
        )

    monkeypatch.setattr(tf.train.CheckpointManager, "save", disk_full)
    with pytest.raises(UserError) as raised:
        writer.save(4)
    message = str(raised.value)
    assert "step 4" in message and "No space left on device" in message and "ckpt-2" in message
    assert "\n" not in message
    assert tree(folder) == complete  # no ckpt-4_temp, ckpt-2 untouched
    assert tf.train.latest_checkpoint(str(folder)).endswith("ckpt-2")
    assert writer.last_step == 2


# ---------------------------------------------------------------------------------------------------------
# 16. Builds


def test_build_gldv2_with_a_repeated_train_row_names_the_line(fake_gldv2, tmp_path, capsys):
    gldv2 = tmp_path / "gldv2"
    gldv2.mkdir()
    for entry in fake_gldv2.iterdir():
        (gldv2 / entry.name).symlink_to(entry)
    (gldv2 / "train.csv").unlink()
    lines = (fake_gldv2 / "train.csv").read_text().splitlines()
    (gldv2 / "train.csv").write_text("\n".join([*lines[:4], lines[2], *lines[4:]]) + "\n")  # line 3 again as 5
    code, err = run_command(
        "local_eval.build:main",
        ["gldv2", "--gldv2", str(gldv2), "--test", "5", "--index", "10", "--out", str(tmp_path / "subset")],
        capsys,
    )
    assert_one_error_line(code, err, f"{gldv2 / 'train.csv'}, line 5: id {lines[2].split(',')[0]} repeats line 3")
    assert not (tmp_path / "subset").exists()


def test_a_build_with_nothing_to_do_removes_what_a_killed_build_left(fake_gldv2, tmp_path):
    from local_eval.gldv2_subset import build_gldv2_subset

    out = build_gldv2_subset(fake_gldv2, tmp_path / "subset", n_test=5, n_index=10)
    killed = tmp_path / ".subset.999999999.abcd1234.partial"  # a process id no process has
    (killed / "landmark-recognition").mkdir(parents=True)
    build_gldv2_subset(fake_gldv2, out, n_test=5, n_index=10)  # the same build: nothing to do
    assert not killed.exists() and (out / "build_info.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# 18. A wheel that is no wheel; --overwrite only over the same kind of output


def zip_with(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


WHEEL_NAME = "pydegensac-0.3.0-cp312-cp312-manylinux2014_x86_64.whl"
DIST_INFO = "pydegensac-0.3.0.dist-info"


@pytest.mark.parametrize(
    "files, named",
    [
        (None, "not a zip file"),
        ({"pydegensac/__init__.py": ""}, "no .dist-info/METADATA and .dist-info/WHEEL"),
        ({f"{DIST_INFO}/METADATA": "Name: opencv\n", f"{DIST_INFO}/WHEEL": "Tag: cp312-cp312-x\n"}, "names 'opencv'"),
        ({f"{DIST_INFO}/METADATA": "Name: pydegensac\n", f"{DIST_INFO}/WHEEL": "Wheel-Version: 1.0\n"}, "no Tag"),
    ],
)
def test_a_wheel_that_is_no_wheel_is_one_error_line(tmp_path, capsys, files, named):
    run = tmp_path / "run"
    run.mkdir()
    wheel = tmp_path / WHEEL_NAME
    if files is None:
        wheel.write_bytes(b"not a zip, named like a wheel")
    else:
        zip_with(wheel, files)
    code, err = run_command(
        "export.__main__:main_bundle",
        ["--run", str(run), "--out", str(tmp_path / "bundle"), "--kaggle-user", "me", "--wheel", str(wheel)],
        capsys,
    )
    assert_one_error_line(code, err, f"--wheel {wheel}: not a real wheel", named)
    assert not (tmp_path / "bundle").exists()


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path, capsys):
    from common.cli import atomic_output_dir, marker_kind

    with atomic_output_dir(tmp_path / "tuned", kind="tune result") as tmp:
        (tmp / "table.csv").write_text("a table")
    assert marker_kind(tmp_path / "tuned") == "tune result"
    run = tmp_path / "run"
    run.mkdir()
    before = tree(tmp_path / "tuned")
    code, err = run_command(
        "export.__main__:main_delg", ["--run", str(run), "--out", str(tmp_path / "tuned"), "--overwrite"], capsys
    )
    assert_one_error_line(code, err, "holds a tune result written by this kit, not a DELG SavedModel")
    assert tree(tmp_path / "tuned") == before
    with atomic_output_dir(tmp_path / "tuned", overwrite=True, kind="tune result") as tmp:  # the same kind
        (tmp / "table.csv").write_text("a new table")
    assert (tmp_path / "tuned" / "table.csv").read_text() == "a new table"
