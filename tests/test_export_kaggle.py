"""The Kaggle retrieval zip and the Kaggle bundle folder."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from common.kit import load_submission, sibling
from export.__main__ import main as export_main
from export.bundle import KAGGLE_PYTHONS, SUBMISSION_SCRIPT, WHEEL_PLATFORM
from export.delg import EXPORT_INFO_FILE, GLOBAL_BATCH_FLOAT16, export_delg
from local_eval.projection import PROFILES
from tests import HANG_GUARD_S
from tests.test_export_delg import LANDMARK_IDS, TINY_DIM, make_run_dir, random_image
from train.config import RETRIEVAL_SCALES
from train.model import DelgModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline_pip(tmp_path_factory, monkeypatch):
    """pip finds packages in an empty folder of its own only (never the internet), which a test may fill."""
    index = tmp_path_factory.mktemp("index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_kaggle")
    return root / "run", make_run_dir(root / "run")


@pytest.fixture(scope="module")
def second_run(tmp_path_factory):
    """An ensemble's second member: another untrained tiny run, with 32-dimensional descriptors."""
    run_dir = tmp_path_factory.mktemp("export_kaggle_second") / "run"
    return run_dir, make_run_dir(run_dir, embedding_dim=32)


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
    assert got.shape == (TINY_DIM,)
    np.testing.assert_allclose(got, keras_descriptor(model, image), atol=1e-4)


def keras_descriptor(model: DelgModel, image: np.ndarray) -> np.ndarray:
    """The Keras model's retrieval descriptor: its embeddings at RETRIEVAL_SCALES summed, L2-normalized."""
    height, width = image.shape[:2]
    per_scale = [
        model(tf.image.resize(image[None].astype(np.float32), (round(height * s), round(width * s))))["embedding"]
        for s in RETRIEVAL_SCALES
    ]
    return tf.nn.l2_normalize(tf.add_n(per_scale)[0], axis=0).numpy()


def retrieval_descriptor(runs: list[Path], out: Path, image: np.ndarray, *flags: str) -> np.ndarray:
    """Export the runs' retrieval zip, load it back unzipped, and describe the image with it."""
    argv = [
        "retrieval",
        *[arg for run_dir in runs for arg in ("--run", str(run_dir))],
        "--out",
        str(out),
        "--no-whiten",
        *flags,
    ]
    assert export_main(argv) == 0
    with zipfile.ZipFile(out) as archive:
        archive.extractall(out.with_suffix(""))
    serve = tf.saved_model.load(str(out.with_suffix(""))).signatures["serving_default"]
    assert [spec.name for spec in serve.structured_input_signature[1].values()] == ["input_image"]
    return serve(input_image=tf.constant(image))["global_descriptor"].numpy()


def test_ensemble_retrieval_model_combines_its_runs_as_the_notebook_does(run, second_run, tmp_path):
    """Each run's descriptor is its Keras model's (what its own zip serves: the test above)."""
    image = random_image(72, 96, seed=3)
    first, second = keras_descriptor(run[1], image), keras_descriptor(second_run[1], image)
    both = retrieval_descriptor([run[0], second_run[0]], tmp_path / "ab.zip", image, "--model-weights", "1", "0.7")
    assert (first.shape, second.shape, both.shape) == ((TINY_DIM,), (32,), (TINY_DIM + 32,))
    ok = np.ones(1, bool)
    expected, _ = load_submission().combine([(first[None], ok), (second[None], ok)], (1.0, 0.7))
    np.testing.assert_allclose(both, expected[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(both[TINY_DIM:]) / np.linalg.norm(both[:TINY_DIM]), 0.7, rtol=1e-5)


def test_a_killed_retrieval_export_leaves_a_partial_that_the_next_one_removes(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "model.zip"
    export = subprocess.Popen(
        [sys.executable, "-m", "export", "retrieval", "--run", str(run_dir), "--out", str(out), "--no-whiten"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".model.zip.*.partial/*")) and export.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the model is being written into its partial folder
    os.kill(export.pid, signal.SIGKILL)
    export.wait()
    assert list(tmp_path.glob(f".model.zip.{export.pid}.*.partial")) and not out.exists(), "not caught while writing"
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(out), "--no-whiten"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip"]
    assert zipfile.is_zipfile(out)


def test_retrieval_dim_other_than_trained_is_refused(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--dim", "512"]) == 2
    assert f"embedding_dim {TINY_DIM}" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


def test_retrieval_zip_over_the_size_limit_is_not_written(run, tmp_path, capsys):
    run_dir, _ = run
    assert (
        export_main(
            ["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--max-mb", "0.01", "--no-whiten"]
        )
        == 2
    )
    assert "over the --max-mb limit" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# A main.py that shows what it was given, through a module beside it (the bundle ships the folder's .py files).
ECHO_SCRIPT = "import sys\nfrom echo_helper import show\nshow(sys.argv[1:])\n"
ECHO_HELPER = "import json\n\n\ndef show(argv):\n    print(json.dumps(argv))\n"
THIS_TAG = "cp{}{}".format(*sys.version_info[:2])


def echo_script(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "echo_helper.py").write_text(ECHO_HELPER)
    script = folder / "main.py"
    script.write_text(ECHO_SCRIPT)
    return script


def wheel_name(tag: str) -> str:
    return f"pydegensac-0.3.0-{tag}-{tag}-manylinux_2_17_x86_64.{WHEEL_PLATFORM}.whl"


def write_wheel(folder: Path, tag: str) -> Path:
    """A small installable pydegensac wheel for Python `tag` whose module says which wheel it came from."""
    files = {
        "pydegensac/__init__.py": f"WHEEL_TAG = {tag!r}\n",
        "pydegensac-0.3.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: pydegensac\nVersion: 0.3.0\n",
        "pydegensac-0.3.0.dist-info/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-"
        f"{WHEEL_PLATFORM}\n",
    }
    files["pydegensac-0.3.0.dist-info/RECORD"] = "".join(
        f"{name},,\n" for name in [*files, "pydegensac-0.3.0.dist-info/RECORD"]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel_name(tag)
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def kernel_here(bundle: Path) -> Path:
    """The bundle's kernel.py with its dataset path pointed at the bundle."""
    code = (bundle / "kernel.py").read_text()
    dataset_line = next(line for line in code.splitlines() if line.startswith("DATASET = "))
    local = bundle.parent / "kernel_local.py"
    local.write_text(code.replace(dataset_line, f"DATASET = {str(bundle)!r}"))
    return local


def run_kernel(bundle: Path, *args: str, python: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """Run the bundle's kernel.py; the arguments main.py received."""
    result = subprocess.run(
        [*python, str(kernel_here(bundle)), *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def bundle_argv(run_dir: Path, out: Path, *extra: str) -> list[str]:
    """A bundle of the test run, unwhitened (its run records no training data; tests/test_whitening.py bundles
    whitened)."""
    return ["bundle", "--run", str(run_dir), "--out", str(out), "--kaggle-user", "alice", "--no-whiten", *extra]


class ExportOnce:
    """export_delg that exports a run once per set of arguments and copies that folder for each later call."""

    def __init__(self, root: Path):
        self.root, self.exported = root, {}

    def __call__(self, run_dir: Path, out_dir: Path, **kwargs) -> Path:
        key = (str(run_dir), repr(sorted(kwargs.items())))
        if key not in self.exported:
            self.exported[key] = export_delg(run_dir, self.root / str(len(self.exported)), **kwargs)
        shutil.copytree(self.exported[key], out_dir)
        return Path(out_dir)


@pytest.fixture(scope="module")
def delg_exports(tmp_path_factory) -> ExportOnce:
    return ExportOnce(tmp_path_factory.mktemp("delg_exports"))


@pytest.fixture
def export_once(delg_exports, monkeypatch) -> None:
    """The bundle's models come from delg_exports: the bundle tests share each model's export."""
    monkeypatch.setattr("export.bundle.export_delg", delg_exports)


def test_bundle_has_model_script_wheel_and_metadata(run, tmp_path, export_once):
    run_dir, _ = run
    script = echo_script(tmp_path / "scripts")
    wheels = [write_wheel(tmp_path / "wheels", tag) for tag in ("cp311", "cp312")]
    settings = tmp_path / "tuned.json"
    settings.write_text(json.dumps({"scoring": {"rerank": 50}}))
    nonlandmark = tmp_path / "no-landmarks"
    (nonlandmark / "a").mkdir(parents=True)
    Image.fromarray(random_image(40, 30)).save(nonlandmark / "a" / "n1.jpg")
    Image.fromarray(random_image(30, 40)).save(nonlandmark / "n2.png")
    (nonlandmark / "notes.txt").write_text("not an image")
    out = tmp_path / "bundle"
    argv = [
        "bundle",
        "--run",
        str(run_dir),
        "--out",
        str(out),
        "--kaggle-user",
        "alice",
        "--dataset",
        "my-delg",
        "--kernel",
        "my-submission",
        "--competition",
        "landmark-retrieval-2021",
        "--wheel",
        str(wheels[0]),
        "--wheel",
        str(wheels[1]),
        "--script",
        str(script),
        "--time-budget-h",
        "12",
        "--settings",
        str(settings),
        "--nonlandmark-dir",
        str(nonlandmark),
        "--float16",
        "--no-whiten",
    ]
    assert export_main(argv) == 0
    assert (out / "delg" / "saved_model.pb").is_file()
    assert (out / "delg" / "assets" / "label_map.csv").read_text().splitlines()[1:] == [
        f"{i},{landmark}" for i, landmark in enumerate(LANDMARK_IDS)
    ]
    info = json.loads((out / "delg" / "assets" / EXPORT_INFO_FILE).read_text())
    assert info["functions"][GLOBAL_BATCH_FLOAT16]["float16"] is True
    assert info["versions"] == {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }
    assert sorted(p.name for p in (out / "submission").iterdir()) == ["echo_helper.py", "main.py"]
    assert (out / "submission" / "main.py").read_text() == script.read_text()
    assert sorted(p.name for p in (out / "wheels").iterdir()) == [w.name for w in wheels]
    assert all((out / "wheels" / w.name).read_bytes() == w.read_bytes() for w in wheels)
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
    assert received == [
        "--task",
        "retrieval",
        "--data",
        "/kaggle/input/landmark-retrieval-2021",
        "--model",
        f"{out}/delg",
        "--out",
        "/kaggle/working/submission.csv",
        "--work",
        "/tmp/landmark-work",
        "--time-budget-h",
        "12.0",
        "--settings",
        f"{out}/settings.json",
        "--nonlandmark-dir",
        f"{out}/nonlandmark",
    ]
    assert run_kernel(out, "--probe", "30") == [*received, "--probe", "30"]


def test_bundle_without_optional_files_passes_none_of_their_flags(run, tmp_path, export_once):
    run_dir, _ = run
    out = tmp_path / "bundle"
    argv = bundle_argv(
        run_dir,
        out,
        "--script",
        str(echo_script(tmp_path / "scripts")),
        "--wheel",
        str(write_wheel(tmp_path, THIS_TAG)),
    )
    assert export_main(argv) == 0
    assert (out / "kernel.py").is_file() and not (out / "settings.json").exists()
    assert not (out / "nonlandmark").exists()
    assert GLOBAL_BATCH_FLOAT16 not in json.loads((out / "delg" / "assets" / EXPORT_INFO_FILE).read_text())["functions"]
    received = run_kernel(out)
    assert received[:2] == ["--task", "recognition"] and "--settings" not in received
    limit_h = PROFILES["recognition-2021"].limit_h  # the default competition's limit, as the profile has it
    assert "--nonlandmark-dir" not in received and received[-2:] == ["--time-budget-h", str(limit_h)]


def test_bundle_of_two_runs_ships_both_models_and_passes_both_to_main(run, second_run, tmp_path, export_once):
    out = tmp_path / "bundle"
    argv = bundle_argv(
        run[0],
        out,
        "--run",
        str(second_run[0]),
        "--model-weights",
        "1",
        "0.7",
        "--script",
        str(echo_script(tmp_path / "scripts")),
        "--wheel",
        str(write_wheel(tmp_path, THIS_TAG)),
    )
    assert export_main(argv) == 0
    dims = [
        json.loads((out / model / "assets" / EXPORT_INFO_FILE).read_text())["global_dim"]
        for model in ("delg", "delg-2")
    ]
    assert dims == [TINY_DIM, 32]  # each run in its folder, in --run order
    received = run_kernel(out)
    assert received[4:11] == ["--model", f"{out}/delg", "--model", f"{out}/delg-2", "--model-weights", "1.0", "0.7"]
    parsed = load_submission().parse_settings(received).run  # the notebook's own flags read it as an ensemble
    assert parsed.model == (out / "delg", out / "delg-2") and parsed.model_weights == (1.0, 0.7)


@pytest.mark.parametrize(
    "flag, content, message",
    [
        ("--settings", None, "--settings {path}: not a file"),
        ("--settings", "{not json", "--settings {path}: not readable JSON"),
        ("--settings", "[1, 2]", "--settings {path}: expected a JSON object, found list"),
        ("--settings", '{"verification": {"rerank": 50}}', "--settings {path}: unknown setting 'verification.rerank'"),
        ("--settings", '{"scoring": {"rerank": "3"}}', "--settings {path}: 'scoring.rerank' must be int"),
        ("--settings", '{"budget": {"safety_margin": 1.5}}', "--safety-margin must be < 1"),
        ("--settings", '{"extraction": {"scales": [1.0], "global_scale_indices": [2]}}', "--global-scale-indices 2"),
        ("--nonlandmark-dir", None, "--nonlandmark-dir {path}: not a folder"),
        ("--nonlandmark-dir", "folder without images", "--nonlandmark-dir {path}: no .jpg/.jpeg/.png images in it"),
    ],
)
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
    argv = [
        "bundle",
        "--run",
        str(run_dir),
        "--out",
        str(tmp_path / "b"),
        "--kaggle-user",
        "alice",
        "--script",
        str(tmp_path / "missing.py"),
    ]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.py" in err and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_bundle_fetches_a_wheel_for_each_kaggle_python_by_default(run, tmp_path, offline_pip, export_once):
    """Without --wheel, pip downloads pydegensac for KAGGLE_PYTHONS (here from a local folder, not the internet)."""
    run_dir, _ = run
    tags = ["cp" + version.replace(".", "") for version in KAGGLE_PYTHONS]
    for tag in ["cp310", *tags]:
        write_wheel(offline_pip, tag)
    out = tmp_path / "bundle"
    assert export_main(bundle_argv(run_dir, out)) == 0
    assert sorted(p.name for p in (out / "wheels").iterdir()) == sorted(wheel_name(tag) for tag in tags)
    assert {p.name for p in (out / "submission").iterdir()} == {p.name for p in SUBMISSION_SCRIPT.parent.glob("*.py")}


def test_bundle_adds_fetched_wheels_to_the_given_ones(run, tmp_path, offline_pip, export_once):
    run_dir, _ = run
    write_wheel(offline_pip, "cp310")
    given = write_wheel(tmp_path / "mine", "cp39")
    out = tmp_path / "bundle"
    assert (
        export_main(
            bundle_argv(
                run_dir,
                out,
                "--wheel",
                str(given),
                "--python",
                "3.10",
                "--script",
                str(echo_script(tmp_path / "scripts")),
            )
        )
        == 0
    )
    assert sorted(p.name for p in (out / "wheels").iterdir()) == [wheel_name("cp310"), wheel_name("cp39")]


def test_a_failed_download_is_one_line_that_says_to_pass_wheel(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(bundle_argv(run_dir, tmp_path / "b", "--python", "3.12")) == 2  # the local index is empty
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --python 3.12: pip could not download pydegensac==0.3.0") and "\n" not in err
    assert err.endswith("pass the wheels you have as --wheel PATH (repeatable)")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--python", "3", "--python '3': expected a Python version such as 3.12"),
        ("--wheel", "missing.whl", "--wheel {tmp}/missing.whl: not a .whl file"),
        ("--wheel", "other-1.0-py3-none-any.whl", "--wheel {tmp}/other-1.0-py3-none-any.whl: not a pydegensac wheel"),
    ],
)
def test_bad_wheel_flags_are_one_line_errors(run, tmp_path, capsys, flag, value, message):
    run_dir, _ = run
    (tmp_path / "other-1.0-py3-none-any.whl").write_bytes(b"")
    argument = value if flag == "--python" else str(tmp_path / value)
    assert export_main(bundle_argv(run_dir, tmp_path / "b", flag, argument)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and "\n" not in err


@pytest.fixture(scope="module")
def kernel_bundle(run, tmp_path_factory, delg_exports):
    """A bundle whose wheels are for the running Python and two others (pip would refuse those two here)."""
    run_dir, _ = run
    root = tmp_path_factory.mktemp("kernel_bundle")
    minor = sys.version_info[1]
    wheels = [write_wheel(root / "wheels", THIS_TAG)]
    for other in (minor - 1, minor + 1):
        wheels.append(write_wheel(root / "wheels", f"cp3{other}"))
    argv = bundle_argv(
        run_dir,
        root / "bundle",
        "--script",
        str(echo_script(root / "scripts")),
        *[arg for wheel in wheels for arg in ("--wheel", str(wheel))],
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("export.bundle.export_delg", delg_exports)
        assert export_main(argv) == 0
    return root / "bundle"


def python_without_pydegensac(folder: Path) -> Path:
    """A fresh venv's Python: the interpreter's own packages (pip among them), not the kit's pydegensac."""
    venv.create(folder, system_site_packages=True, with_pip=False, symlinks=True)
    python = folder / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import pip, importlib.util as u; assert u.find_spec('pydegensac') is None"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("the base interpreter lacks pip, or has pydegensac itself")
    return python


def test_kernel_installs_the_wheel_tagged_for_its_python(kernel_bundle, tmp_path):
    python = python_without_pydegensac(tmp_path / "venv")
    received = run_kernel(kernel_bundle, "--probe", "30", python=(str(python),))
    assert received[-2:] == ["--probe", "30"]
    installed = subprocess.run(
        [str(python), "-c", "import pydegensac; print(pydegensac.WHEEL_TAG)"], capture_output=True, text=True
    )
    assert installed.stdout.strip() == THIS_TAG


def test_kernel_without_a_wheel_for_its_python_ends_with_one_error_line(kernel_bundle, tmp_path):
    dataset = tmp_path / "dataset"  # the bundle's kernel.py with wheels for other Pythons only
    (dataset / "wheels").mkdir(parents=True)
    others = sorted(p.name for p in (kernel_bundle / "wheels").iterdir() if p.name != wheel_name(THIS_TAG))
    for name in others:
        (dataset / "wheels" / name).write_bytes((kernel_bundle / "wheels" / name).read_bytes())
    (dataset / "kernel.py").write_text((kernel_bundle / "kernel.py").read_text())
    result = subprocess.run(
        [sys.executable, "-S", str(kernel_here(dataset))], capture_output=True, text=True, timeout=HANG_GUARD_S
    )  # -S: without site-packages, pydegensac is not importable
    assert result.returncode == 2 and result.stdout == ""  # main.py never started
    assert result.stderr.strip() == (
        f"error: no pydegensac wheel for this Python {platform.python_version()} "
        f"({THIS_TAG}) in {dataset}/wheels; wheels found: {', '.join(others)}"
    )


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under folder by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def exported_models(run, second_run, delg_exports, root: Path) -> list[Path]:
    """Two DELG exports as `export delg` writes them (each run's, unwhitened) in folders of their own."""
    return [delg_exports(run_dir, root / name, whiten=None) for run_dir, name in ((run[0], "a"), (second_run[0], "b"))]


def test_bundle_of_exports_ships_them_byte_for_byte(run, second_run, delg_exports, tmp_path, monkeypatch, caplog):
    models = exported_models(run, second_run, delg_exports, tmp_path / "exports")
    monkeypatch.setattr("export.bundle.export_delg", lambda *args, **kwargs: pytest.fail("exported again"))
    out = tmp_path / "bundle"
    argv = [
        "bundle",
        "--model",
        str(models[0]),
        "--model",
        str(models[1]),
        "--model-weights",
        "1",
        "0.5",
        "--out",
        str(out),
        "--kaggle-user",
        "alice",
        "--script",
        str(echo_script(tmp_path / "scripts")),
        "--wheel",
        str(write_wheel(tmp_path, THIS_TAG)),
    ]
    with caplog.at_level("INFO"):
        assert export_main(argv) == 0
    for model, shipped in zip(models, ("delg", "delg-2"), strict=True):
        assert folder_bytes(out / shipped) == folder_bytes(model)  # every file, the same bytes
        assert f"shipping {model} as {shipped}/, byte for byte" in caplog.text
    received = run_kernel(out)
    assert received[4:11] == ["--model", f"{out}/delg", "--model", f"{out}/delg-2", "--model-weights", "1.0", "0.5"]


def test_bundle_of_a_run_says_that_it_exports_again(run, tmp_path, export_once, caplog):
    out = tmp_path / "bundle"
    argv = bundle_argv(
        run[0], out, "--script", str(echo_script(tmp_path / "scripts")), "--wheel", str(write_wheel(tmp_path, THIS_TAG))
    )
    with caplog.at_level("INFO"):
        assert export_main(argv) == 0
    assert f"re-exporting run {run[0]} as delg/ (a new export: not one that was replayed" in caplog.text
    assert (out / "delg" / "saved_model.pb").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--run", "{run}", "--model", "{model}"], "--model and --run together"),
        ([], "give --model EXPORT_DIR"),
        (["--model", "{run}"], "--model {run}: not a SavedModel folder (no saved_model.pb)"),
        (["--model", "{model}", "--model", "{model}"], "--model {model} is given twice"),
        (["--model", "{model}", "--model-weights", "1", "2"], "--model-weights gives 2 weights for 1 --model"),
        (["--model", "{model}", "--float16"], "--float16 has no effect with --model"),
        (["--model", "{model}", "--whiten-images", "10"], "--whiten-images has no effect with --model"),
        (["--model", "{model}", "--no-whiten"], "--no-whiten has no effect with --model"),
    ],
)
def test_bad_bundle_sources_are_one_line_errors(run, delg_exports, tmp_path, capsys, flags, message):
    model = delg_exports(run[0], tmp_path / "export", whiten=None)
    names = {"run": run[0], "model": model}
    argv = [
        "bundle",
        *[flag.format(**names) for flag in flags],
        "--out",
        str(tmp_path / "b"),
        "--kaggle-user",
        "alice",
        "--wheel",
        str(write_wheel(tmp_path, THIS_TAG)),
    ]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: " + message.format(**names)) and "\n" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "competition, settings, nonlandmarks, warned",
    [
        ("landmark-recognition-2021", None, False, "global_stage.suppression (the default)"),
        ("landmark-recognition-2021", {"global_stage": {"suppression": False}}, False, None),
        (
            "landmark-recognition-2021",
            {"global_stage": {"suppression": False}, "scoring": {"nonlandmark_penalty": 0.5}},
            False,
            "scoring.nonlandmark_penalty 0.5",
        ),
        ("landmark-recognition-2021", None, True, None),
        ("landmark-retrieval-2021", None, False, None),  # retrieval uses no non-landmark images
    ],
)
def test_bundle_warns_when_its_settings_need_nonlandmarks_it_lacks(
    run, delg_exports, tmp_path, caplog, competition, settings, nonlandmarks, warned
):
    model = delg_exports(run[0], tmp_path / "export", whiten=None)
    argv = [
        "bundle",
        "--model",
        str(model),
        "--out",
        str(tmp_path / "b"),
        "--kaggle-user",
        "alice",
        "--competition",
        competition,
        "--script",
        str(echo_script(tmp_path / "scripts")),
        "--wheel",
        str(write_wheel(tmp_path, THIS_TAG)),
    ]
    if settings is not None:
        (tmp_path / "tuned.json").write_text(json.dumps(settings))
        argv += ["--settings", str(tmp_path / "tuned.json")]
    if nonlandmarks:
        (tmp_path / "nl").mkdir()
        Image.fromarray(random_image(40, 30)).save(tmp_path / "nl" / "n1.jpg")
        argv += ["--nonlandmark-dir", str(tmp_path / "nl")]
    assert export_main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "non-landmark" in r.getMessage()]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "--nonlandmark-dir" in warnings[0]


def test_bundle_ships_a_train_file_of_its_model_and_refuses_one_of_another(
    run, second_run, delg_exports, tmp_path, capsys
):
    models = exported_models(run, second_run, delg_exports, tmp_path / "exports")
    bridge = sibling("bridge")
    train = tmp_path / "train.npz"
    found = bridge.TrainSet(np.eye(2, 8, dtype=np.float32), np.array([1, 2]))
    bridge.write_train_descriptors(train, found, ["a", "b"], bridge.model_fingerprint(models[0]), {})

    def argv(model: Path, out: Path) -> list[str]:
        return [
            "bundle",
            "--model",
            str(model),
            "--out",
            str(out),
            "--kaggle-user",
            "alice",
            "--competition",
            "landmark-retrieval-2021",
            "--script",
            str(echo_script(tmp_path / "scripts")),
            "--wheel",
            str(write_wheel(tmp_path, THIS_TAG)),
            "--train-descriptors",
            str(train),
        ]

    out = tmp_path / "bundle"
    assert export_main(argv(models[0], out)) == 0
    received = run_kernel(out)
    assert received[received.index("--train-descriptors") + 1] == f"{out}/train-descriptors.npz"
    assert (out / "train-descriptors.npz").read_bytes() == train.read_bytes()
    capsys.readouterr()
    assert export_main(argv(models[1], tmp_path / "other")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "another model" in errors[0] and str(train) in errors[0]
    assert not (tmp_path / "other").exists()
