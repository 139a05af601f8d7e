"""The Kaggle retrieval zip and the Kaggle bundle folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from export.__main__ import main as export_main
from export.delg import EXPORT_INFO_FILE, GLOBAL_BATCH_FLOAT16
from tests.test_export_delg import LANDMARK_IDS, make_run_dir, random_image
from train.config import RETRIEVAL_SCALES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_kaggle")
    return root / "run", make_run_dir(root / "run")


def test_retrieval_zip_holds_the_saved_model_at_its_root(run, tmp_path, capsys):
    run_dir, model = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "model.zip"), "--no-whiten"]) == 0
    assert "MB (limit 500 MB)" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    assert "saved_model.pb" in names and any(name.startswith("variables/") for name in names)

    serve = tf.saved_model.load(str(tmp_path / "unzipped")).signatures["serving_default"]
    image = random_image(72, 96)
    got = serve(input_image=tf.constant(image))["global_descriptor"].numpy()
    per_scale = [model(tf.image.resize(image[None].astype(np.float32), (round(72 * s), round(96 * s))))["embedding"]
                 for s in RETRIEVAL_SCALES]
    expected = tf.nn.l2_normalize(tf.add_n(per_scale)[0], axis=0).numpy()
    assert got.shape == (64,)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_a_killed_retrieval_export_leaves_a_partial_that_the_next_one_removes(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "model.zip"
    export = subprocess.Popen([sys.executable, "-m", "export", "retrieval", "--run", str(run_dir), "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".model.zip.*.partial/*")) and export.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the model is being written into its partial folder
    os.kill(export.pid, signal.SIGKILL)
    export.wait()
    assert list(tmp_path.glob(f".model.zip.{export.pid}.*.partial")) and not out.exists(), "not caught while writing"
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]
    assert zipfile.is_zipfile(out)


def test_retrieval_dim_other_than_trained_is_refused(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--dim", "512"]) == 2
    assert "embedding_dim 64" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


def test_retrieval_zip_over_the_size_limit_is_not_written(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--max-mb", "0.01",
                        "--no-whiten"]) == 2
    assert "over the --max-mb limit" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


ECHO_SCRIPT = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"  # a main.py that shows what it was given


def run_kernel(bundle: Path, *args: str) -> list[str]:
    """Run the bundle's kernel.py with the dataset path pointed at the bundle; the arguments main.py received."""
    code = (bundle / "kernel.py").read_text()
    dataset_line = next(line for line in code.splitlines() if line.startswith("DATASET = "))
    local = bundle.parent / "kernel_local.py"
    local.write_text(code.replace(dataset_line, f"DATASET = {str(bundle)!r}"))
    result = subprocess.run([sys.executable, str(local), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bundle_has_model_script_wheel_and_metadata(run, tmp_path):
    run_dir, _ = run
    script = tmp_path / "main.py"
    script.write_text(ECHO_SCRIPT)
    wheel = tmp_path / "pydegensac-0.3.0-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    settings = tmp_path / "tuned.json"
    settings.write_text(json.dumps({"scoring": {"rerank": 50}}))
    nonlandmark = tmp_path / "no-landmarks"
    (nonlandmark / "a").mkdir(parents=True)
    Image.fromarray(random_image(40, 30)).save(nonlandmark / "a" / "n1.jpg")
    Image.fromarray(random_image(30, 40)).save(nonlandmark / "n2.png")
    (nonlandmark / "notes.txt").write_text("not an image")
    out = tmp_path / "bundle"
    argv = ["bundle", "--run", str(run_dir), "--out", str(out), "--kaggle-user", "alice", "--dataset", "my-delg",
            "--kernel", "my-submission", "--competition", "landmark-retrieval-2021", "--wheel", str(wheel),
            "--script", str(script), "--time-budget-h", "12", "--settings", str(settings),
            "--nonlandmark-dir", str(nonlandmark), "--float16", "--no-whiten"]
    assert export_main(argv) == 0
    assert (out / "delg" / "saved_model.pb").is_file()
    assert (out / "delg" / "assets" / "label_map.csv").read_text().splitlines()[1:] == [
        f"{i},{landmark}" for i, landmark in enumerate(LANDMARK_IDS)]
    info = json.loads((out / "delg" / "assets" / EXPORT_INFO_FILE).read_text())
    assert info["functions"][GLOBAL_BATCH_FLOAT16]["float16"] is True
    assert (out / "submission" / "main.py").read_text() == script.read_text()
    assert (out / "wheels" / wheel.name).read_bytes() == b"wheel"
    assert (out / "settings.json").read_text() == settings.read_text()
    shipped = sorted(str(p.relative_to(out / "nonlandmark")) for p in (out / "nonlandmark").rglob("*") if p.is_file())
    assert shipped == ["a/n1.jpg", "n2.png"]
    dataset = json.loads((out / "dataset-metadata.json").read_text())
    kernel = json.loads((out / "kernel-metadata.json").read_text())
    assert dataset["id"] == "alice/my-delg"
    assert kernel["id"] == "alice/my-submission"
    assert (kernel["enable_gpu"], kernel["enable_internet"]) == (True, False)
    assert kernel["dataset_sources"] == ["alice/my-delg"]
    assert kernel["competition_sources"] == ["landmark-retrieval-2021"]
    launcher = (out / kernel["code_file"]).read_text()
    assert 'DATASET = "/kaggle/input/my-delg"' in launcher and "--no-index" in launcher

    received = run_kernel(out)
    assert received == ["--task", "retrieval", "--data", "/kaggle/input/landmark-retrieval-2021",
                        "--model", f"{out}/delg", "--out", "/kaggle/working/submission.csv",
                        "--work", "/tmp/landmark-work", "--time-budget-h", "12.0",
                        "--settings", f"{out}/settings.json", "--nonlandmark-dir", f"{out}/nonlandmark"]
    assert run_kernel(out, "--probe", "30") == [*received, "--probe", "30"]


def test_bundle_without_optional_files_passes_none_of_their_flags(run, tmp_path):
    run_dir, _ = run
    script = tmp_path / "main.py"
    script.write_text(ECHO_SCRIPT)
    out = tmp_path / "bundle"
    argv = ["bundle", "--run", str(run_dir), "--out", str(out), "--kaggle-user", "alice", "--script", str(script),
            "--no-whiten"]
    assert export_main(argv) == 0
    assert (out / "kernel.py").is_file() and not (out / "settings.json").exists()
    assert not (out / "nonlandmark").exists()
    assert GLOBAL_BATCH_FLOAT16 not in json.loads((out / "delg" / "assets" / EXPORT_INFO_FILE).read_text())["functions"]
    received = run_kernel(out)
    assert received[:2] == ["--task", "recognition"] and "--settings" not in received
    assert "--nonlandmark-dir" not in received and received[-2:] == ["--time-budget-h", "9.0"]


@pytest.mark.parametrize("flag, content, message", [
    ("--settings", None, "--settings {path}: not a file"),
    ("--settings", "{not json", "--settings {path}: not readable JSON"),
    ("--settings", "[1, 2]", "--settings {path}: expected a JSON object, found list"),
    ("--settings", '{"verification": {"rerank": 50}}', "--settings {path}: unknown setting 'verification.rerank'"),
    ("--settings", '{"scoring": {"rerank": "3"}}', "--settings {path}: 'scoring.rerank' must be int"),
    ("--settings", '{"budget": {"safety_margin": 1.5}}', "--safety-margin must be < 1"),
    ("--settings", '{"extraction": {"scales": [1.0], "global_scale_indices": [2]}}', "--global-scale-indices 2"),
    ("--nonlandmark-dir", None, "--nonlandmark-dir {path}: not a folder"),
    ("--nonlandmark-dir", "folder without images", "--nonlandmark-dir {path}: no .jpg/.jpeg/.png images in it"),
])
def test_bad_bundle_inputs_are_one_line_errors(run, tmp_path, capsys, flag, content, message):
    run_dir, _ = run
    path = tmp_path / "input"
    if content == "folder without images":
        path.mkdir()
        (path / "readme.txt").write_text("no images")
    elif content is not None:
        path.write_text(content)
    argv = ["bundle", "--run", str(run_dir), "--out", str(tmp_path / "b"), "--kaggle-user", "alice", flag, str(path)]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(path=path)) and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_bundle_without_submission_script_is_a_one_line_error(run, tmp_path, capsys):
    run_dir, _ = run
    argv = ["bundle", "--run", str(run_dir), "--out", str(tmp_path / "b"), "--kaggle-user", "alice",
            "--script", str(tmp_path / "missing.py")]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.py" in err and "\n" not in err
    assert not (tmp_path / "b").exists()
