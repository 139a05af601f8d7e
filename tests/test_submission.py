"""Unit tests of submission/main.py: constants, model loading (TF2 and TF1), decoding, kNN, matching, scoring."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from local_eval.submission_script import load_submission, sibling
from tests.delg_test_models import write_tf1_model, write_tf2_model

sub = load_submission()
search = sibling("search")
store = sibling("store")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delg_models")
    return write_tf2_model(root / "tf2"), write_tf1_model(root / "tf1")


EXTRACTION = sub.Extraction(scales=(0.5, 1.0, 2.0), global_scale_indices=(0, 1), max_features=200)
GLOBAL_SCALES = EXTRACTION.global_scales()


def delg(model_dir, **overrides):
    return sub.DelgSavedModel(model_dir, dataclasses.replace(EXTRACTION, **overrides))


def textured_image(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    return np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sub.main(["--help"])
    assert exit_info.value.code == 0
    parser = sub.settings_parser()
    assert all(action.help for action in parser._actions)
    assert "--time-budget-h" in capsys.readouterr().out


def test_tf1_model_goes_through_prune_and_matches_tf2(models):
    tf2_dir, tf1_dir = models
    tf2_model, tf1_model = delg(tf2_dir), delg(tf1_dir)
    assert (tf2_model.kind, tf1_model.kind) == ("tf2", "tf1")
    image = textured_image(0)
    np.testing.assert_allclose(
        tf1_model.global_descriptor(image, GLOBAL_SCALES), tf2_model.global_descriptor(image, GLOBAL_SCALES), atol=1e-5
    )
    kp1, desc1, side = tf1_model.local_features(image)
    kp2, desc2, _ = tf2_model.local_features(image)
    assert side == 96
    assert len(kp1) == 200
    np.testing.assert_allclose(kp1, kp2, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(desc1, axis=1), 1.0, atol=1e-5)


def test_border_margin_drops_the_local_features_near_the_image_border(models):
    image = textured_image(2)[:, :64]  # 96 rows, 64 columns: the margin is a share of the longer side
    band = 0.1 * 96
    for model_dir in models:  # our TF2 export and a TF1 model as Google releases them
        every = delg(model_dir).local_features(image)
        inner = delg(model_dir, border_margin=0.1).local_features(image)
        y, x = every.keypoints.T  # pixel i spans [i - 0.5, i + 0.5]
        to_border = np.minimum.reduce([y + 0.5, 96 - 0.5 - y, x + 0.5, 64 - 0.5 - x])
        kept = to_border >= band
        assert 0 < kept.sum() < len(kept)  # the image has features on both sides of the band
        np.testing.assert_array_equal(inner.keypoints, every.keypoints[kept])
        np.testing.assert_array_equal(inner.descriptors, every.descriptors[kept])
        assert inner.side == every.side == 96


def test_border_margin_is_part_of_the_local_cache_key():
    run = sub.Run(task="recognition", data=Path("d"), model=(Path("m"),))
    keys = [store.cache_keys(run, dataclasses.replace(EXTRACTION, border_margin=m)) for m in (0.0, 0.05)]
    assert keys[0]["local"] != keys[1]["local"] and keys[0]["global"] == keys[1]["global"]


def test_global_descriptor_normalizes_each_scale_then_the_sum(models):
    model = delg(models[0])
    image = textured_image(1)
    raw = model(image, 1)["global_descriptors"]
    per_scale = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    expected = per_scale.sum(0) / np.linalg.norm(per_scale.sum(0))
    np.testing.assert_allclose(model.global_descriptor(image, GLOBAL_SCALES), expected, atol=1e-6)
    batch = model.global_batch(np.stack([image, image[::-1]]), GLOBAL_SCALES, "float32")  # no batched signature
    np.testing.assert_allclose(batch[0], expected, atol=1e-6)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(sub.InputError, match="saved_model.pb"):
        delg(tmp_path)


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, contents, shape",
    [
        ("gray.png", lambda a: encoded(a[..., 0], "PNG"), (96, 96, 3)),
        ("cmyk.jpg", lambda a: encoded(a, "JPEG", "CMYK"), (96, 96, 3)),
        ("rgba.png", lambda a: encoded(a, "PNG", "RGBA"), (96, 96, 3)),
        ("pixel.jpg", lambda a: encoded(a[:1, :1], "JPEG"), (32, 32, 3)),
        ("strip.png", lambda a: encoded(np.tile(a[:2], (1, 40, 1)), "PNG"), (32, 1024, 3)),
    ],
)
def test_decoding_odd_images(tmp_path, name, contents, shape):
    path = tmp_path / name
    path.write_bytes(contents(textured_image(2)))
    image = sub.decode_image(path, max_side=1024, min_side=32)
    assert image.dtype == np.uint8 and image.shape == shape


def test_decoding_caps_the_longer_side(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encoded(np.tile(textured_image(3), (2, 3, 1)), "PNG"))
    assert sub.decode_image(path, max_side=100, min_side=32).shape == (67, 100, 3)


@pytest.mark.parametrize("contents", [None, b"", b"not an image", "truncated"])
def test_unreadable_images_decode_to_none(tmp_path, caplog, contents):
    path = tmp_path / "bad.jpg"
    if contents == "truncated":
        contents = encoded(textured_image(4), "JPEG")[:300]
    if contents is not None:
        path.write_bytes(contents)
    assert sub.decode_image(path, max_side=1024, min_side=32) is None
    assert "bad.jpg" in caplog.text


@pytest.mark.parametrize(
    "search",
    [
        lambda q, d, k: sub.knn(q, d, k, block_mb=1),
        lambda q, d, k: search.knn_numpy(q, d, k, q_block=16, db_chunk=300),  # several blocks of both
        lambda q, d, k: search.knn_tensorflow(q, d, k, q_block=16, db_block=300),
    ],
)
def test_knn_blocks_equal_brute_force(search):
    rng = np.random.default_rng(0)
    queries, database = rng.normal(size=(70, 16)), rng.normal(size=(3000, 16))
    scores, indices = search(queries, database, 10)
    expected = np.argsort(-(queries @ database.T), axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, expected, 1), rtol=1e-4)


def test_mutual_matching_keeps_only_mutual_pairs_within_distance():
    a = np.array([[1, 0], [0.95, 0.3122], [0.6, 0.8]], np.float32)
    b = np.array([[1, 0], [0.6, 0.8]], np.float32)
    one_way = sub.putative_matches(a, b, max_distance=0.9, mutual=False)
    assert list(zip(*one_way, strict=True)) == [(0, 0), (1, 0), (2, 1)]
    assert list(zip(*sub.putative_matches(a, b, 0.9, mutual=True), strict=True)) == [(0, 0), (2, 1)]
    assert len(sub.putative_matches(a, b, 0.1, mutual=False)[0]) == 2  # a[1] is 0.32 from b[0]


SETTINGS = sub.Verification(
    match_max_distance=0.9,
    mutual=True,
    min_matches=5,
    ransac_threshold_px=4.0,
    ransac_confidence=0.999,
    ransac_iterations=1000,
    ransac_seed=0,
)


def test_identical_view_has_more_inliers_than_an_unrelated_image(models):
    model = delg(models[0])
    scene = textured_image(5, 128)
    view = np.ascontiguousarray(scene[8:, 16:])  # the same scene, shifted
    inliers = lambda x, y: sub.count_inliers(model.local_features(x), model.local_features(y), SETTINGS)
    same, unrelated = inliers(scene, view), inliers(scene, textured_image(6, 128))
    assert same > 50 and same > 3 * unrelated


def test_too_few_matches_or_ransac_failure_score_zero():
    desc = np.eye(8, 16, dtype=np.float32)
    keypoints = np.zeros((8, 2), np.float32)  # degenerate: every point the same
    features = lambda n: sub.LocalFeatures(keypoints[:n], desc[:n], 96)
    assert sub.count_inliers(features(8), features(8), SETTINGS) == 0
    assert sub.count_inliers(features(3), features(3), SETTINGS) == 0
    assert sub.count_inliers(features(8), features(0), SETTINGS) == 0


def test_retrieval_reorders_the_verified_prefix_by_inliers_then_cosine():
    cosines = np.array([[0.9, 0.8, 0.7, 0.6]])
    inliers = np.array([[3, 40, 40, -1]])
    rows = sub.retrieval_rows(cosines, np.array([[0, 1, 2, 3]]), inliers, ["a", "b", "c", "d"], np.array([True]))
    assert rows == ["b c a d"]


def test_rerank_order_puts_the_most_confident_readable_queries_first():
    order = sub.rerank_order(np.array([0.2, np.nan, 0.9, 0.5]), np.array([True, False, True, True]))
    assert order == [2, 3, 0]


def test_nonlandmark_share_counts_nonlandmarks_among_the_top_k():
    landmark_cos = np.array([[0.9, 0.8, 0.1]])
    nonlandmark_cos = np.array([[0.85, 0.2, 0.1]])
    assert sub.nonlandmark_shares(landmark_cos, nonlandmark_cos, top_k=3)[0] == pytest.approx(1 / 3)
    assert sub.nonlandmark_shares(landmark_cos, np.zeros((1, 0)), top_k=3)[0] == 0


def test_plan_depth_degrades_with_the_time_left(tmp_path):
    timing = sub.Timing(
        tmp_path / "timing.json",
        "recognition",
        sub.Budget(time_budget_h=1.0, safety_margin=0.0),
        started=time.monotonic(),
    )  # the budget counts from now, not from pytest's start
    assert sub.plan_depth(timing, 100, max_depth=10, new_image_share=1.0) == 10  # nothing measured yet
    timing.add("local_features", 10, 1.0)  # 0.1 s per image
    timing.add("verification", 10, 1.0)  # 0.1 s per pair
    roomy = sub.plan_depth(timing, 100, 10, 1.0)
    tight = sub.plan_depth(timing, 5_000, 10, 1.0)
    assert roomy == 10 and 1 < tight < 10
    assert sub.plan_depth(timing, 1_000_000, 10, 1.0) == 1  # depth 1 for as many queries as time allows
    timing.deadline = time.monotonic() + 0.25  # less than one query at depth 1 (0.1 + 0.2 s)
    assert sub.plan_depth(timing, 10, 10, 1.0) == 0


def test_local_cache_is_trimmed_to_its_limit_oldest_first(tmp_path):
    import os

    for age, name in enumerate(["new", "mid", "old"]):
        path = sub.local_path(tmp_path, "train", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1e9 - age, 1e9 - age))
    assert store.trim_local_cache(tmp_path, max_gb=2500 / 2**30) == 1
    assert sorted(p.stem for p in (tmp_path / "train").iterdir()) == ["mid", "new"]


REQUIRED = ["--task", "recognition", "--data", "d", "--model", "m"]


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--warmup-queries", "0", "--warmup-queries must be >= 1, got 0"),
        ("--chunk-size", "-3", "--chunk-size must be >= 1, got -3"),
        ("--time-budget-h", "-1", "--time-budget-h must be > 0, got -1.0"),
        ("--time-budget-h", "nan", "--time-budget-h must be a finite number, got nan"),
        ("--safety-margin", "1", "--safety-margin must be < 1, got 1.0"),
        ("--ransac-threshold", "0", "--ransac-threshold must be > 0, got 0.0"),
        ("--scales", "0.5 -1", "--scales must be > 0, got -1.0"),
        ("--global-scale-indices", "9", "--global-scale-indices 9 is out of range for 7 --scales"),
        ("--shard", "2/2", "--shard 2/2: need 0 <= i < n"),
        ("--border-margin", "0.5", "--border-margin must be < 0.5, got 0.5"),
    ],
)
def test_every_setting_is_range_checked_with_one_line(capsys, flag, value, message):
    assert sub.main([*REQUIRED, flag, *value.split()]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_flag_of_the_wrong_type_is_one_line_too(capsys):
    assert sub.main([*REQUIRED, "--rerank-batch", "two"]) == 2
    assert capsys.readouterr().err.strip() == "error: argument --rerank-batch: invalid int value: 'two'"


def write_json(path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


def test_settings_layer_defaults_preset_file_then_flags(tmp_path):
    file = write_json(
        tmp_path / "tuned.json",
        {"verification": {"ransac_threshold": 0.01, "mutual": True}, "scoring": {"top_k": 5}, "about": {"seed": 3}},
    )
    settings = sub.parse_settings([*REQUIRED, "--preset", "host-2020", "--settings", file, "--top-k", "2"])
    assert settings.verification.ransac_threshold == 0.01 and settings.verification.mutual  # file over preset
    assert settings.verification.ransac_threshold_px == 20.0 and settings.scoring.rerank == 3  # preset
    assert settings.scoring.top_k == 2  # the command line wins
    assert settings.extraction.max_image_side == sub.DELG_MAX_IMAGE_SIDE  # default
    assert settings.sources["top_k"] == "command line" and settings.sources["rerank"] == "preset host-2020"
    assert settings.sources["ransac_threshold"] == f"file {file}"


def test_a_task_default_sits_under_the_preset_and_the_flags():
    """Retrieval's own global stage (TASK_DEFAULTS) applies to retrieval only; a preset or a flag overrides it."""
    retrieval = ["--task", "retrieval", *REQUIRED[2:]]
    assert sub.TASK_DEFAULTS["retrieval"] and not sub.TASK_DEFAULTS["recognition"]
    settings = sub.parse_settings(retrieval)
    for name, value in sub.TASK_DEFAULTS["retrieval"].items():
        section = next(key for key, cls in sub.SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)})
        assert getattr(getattr(settings, section), name) == value != getattr(sub.SECTIONS[section](), name)
        assert settings.sources[name] == "task default retrieval"
    recognition = sub.parse_settings(REQUIRED)  # the sections' defaults
    assert recognition.global_stage == sub.Global() and recognition.scoring == sub.Scoring()
    assert "(default: 20; retrieval: 100)" in " ".join(sub.settings_parser().format_help().split())
    assert sub.parse_settings([*retrieval, "--qe-n", "0"]).global_stage.qe_n == 0
    published = sub.parse_settings([*retrieval, "--preset", "delg-paper"])
    assert published.global_stage.qe_n == published.global_stage.dba_n == 0
    assert published.sources["dba_n"] == "preset delg-paper"


@pytest.mark.parametrize(
    "content, message",
    [
        ({"scoring": {"top_kk": 3}}, "unknown setting 'scoring.top_kk'"),
        ({"scoring": {"top_k": "3"}}, "'scoring.top_k' must be int, got '3'"),
        ({"scoring": {"top_k": 0}}, "--top-k must be >= 1, got 0"),
        ({"extraction": {"scales": 1.0}}, "'extraction.scales' must be a non-empty list of float"),
        ({"verification": {"mutual": 1}}, "'verification.mutual' must be bool"),
        ([1, 2], "expected an object of sections"),
    ],
)
def test_a_bad_settings_file_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    file = write_json(tmp_path / "bad.json", content)
    assert sub.main([*REQUIRED, "--settings", file]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("preset", sorted(sub.PRESETS))
def test_presets_hold_only_known_settings_of_the_right_type(preset):
    settings = sub.parse_settings([*REQUIRED, "--preset", preset])
    assert set(sub.PRESETS[preset]) == {name for name, source in settings.sources.items() if "preset" in source}


def test_relative_ransac_threshold_scales_with_the_images():
    relative = sub.Verification(ransac_threshold=0.01)
    assert sub.pixel_threshold(relative, 1000, 1000) == pytest.approx(10.0)
    assert sub.pixel_threshold(relative, 200, 300) == pytest.approx(2.5)
    assert sub.pixel_threshold(dataclasses.replace(relative, ransac_threshold_px=7.0), 200, 300) == 7.0


def test_compact_valid_moves_the_ok_rows_up_in_place():
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(3 * sub.KNN_DB_CHUNK + 5, 4)).astype(np.float32)
    ok = rng.random(len(descriptors)) < 0.7
    expected = descriptors[ok]
    valid, rows = sub.compact_valid(descriptors, ok)
    np.testing.assert_array_equal(valid, expected)
    np.testing.assert_array_equal(rows, np.flatnonzero(ok))
    assert np.shares_memory(valid, descriptors)  # no second copy


@pytest.mark.parametrize(
    "rows, message",
    [
        ("aaa1,abc", "train.csv line 2: id aaa1: landmark_id 'abc' is not an integer"),
        ("aaa1,", "train.csv line 2: id aaa1: landmark_id '' is not an integer"),
        ("aaa1,12.5", "train.csv line 2: id aaa1: landmark_id '12.5' is not an integer"),
        ("aaa1,3\nab,95", "train.csv line 3: id 'ab' is not an image id"),
        ("aaa1,3\nbbb2,4\naaa1,5", "train.csv line 4: id aaa1 repeats line 2"),
    ],
)
def test_bad_train_rows_name_the_file_line_and_id(tmp_path, rows, message):
    (tmp_path / "train.csv").write_text("id,landmark_id\n" + rows + "\n")
    with pytest.raises(sub.InputError) as error:
        sub.read_train_labels(tmp_path)
    assert message in str(error.value)


def test_bad_sample_submission_ids_are_errors(tmp_path):
    (tmp_path / "sample_submission.csv").write_text("id,landmarks\nabc1,\na/b/c,\n")
    with pytest.raises(sub.InputError, match="line 3: id 'a/b/c' is not an image id"):
        sub.read_test_ids(tmp_path)


@pytest.mark.parametrize("out", ["file/s.csv", "folder"])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys, out):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    assert sub.main([*REQUIRED, "--out", str(tmp_path / out), "--work", str(tmp_path / "work")]) == 2
    assert str(tmp_path / out) in capsys.readouterr().err


def test_round_robin_covers_every_landmark_before_a_second_image_of_any():
    labels = np.array([5, 5, 5, 7, 9, 9])
    order = sub.round_robin(labels)
    assert labels[order].tolist() == [5, 7, 9, 5, 9, 5]
    assert order.tolist() == [0, 3, 4, 1, 5, 2]


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((1024, 768), (1024, 768)),
        ((768, 1024), (768, 1024)),
        ((4000, 3000), (1024, 768)),
        ((800, 600), (768, 576)),
        ((300, 300), (256, 256)),
        ((1, 1), (256, 256)),
        ((3840, 2), (1024, 576)),
    ],
)
def test_global_buckets_are_few_and_never_upscale_big_images(size, bucket):
    assert store.global_bucket(*size, max_side=1024) == bucket


def test_global_decoding_crops_the_centre_to_the_bucket(tmp_path):
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # a white centre third
    path = tmp_path / "wide.png"
    path.write_bytes(encoded(wide, "PNG"))
    pixels = store.decode_for_global(path, max_side=128)
    assert pixels.shape == (64, 128, 3)  # the 16:9 bucket (rounded to 16 px): the centre 200 x 100 pixels
    assert pixels[:, 40:88].mean() > 200 and pixels[:, :24].mean() < 30 and pixels[:, -24:].mean() < 30
    assert store.decode_for_global(tmp_path / "missing.jpg", 128) is None


def test_a_cut_short_local_feature_file_is_extracted_again(models, tmp_path):
    model = delg(models[0])
    data = tmp_path / "data"
    path = sub.image_path(data, "test", "abc123")
    path.parent.mkdir(parents=True)
    path.write_bytes(encoded(textured_image(7), "PNG"))
    run = sub.Run(task="retrieval", data=data, model=models[0], workers=0)
    cache = tmp_path / "local"
    assert sub.extract_local(model, data, [("test", "abc123")], cache, EXTRACTION, run) == 1
    cached = sub.local_path(cache, "test", "abc123")
    cached.write_bytes(cached.read_bytes()[:100])  # a crash while writing, or a disk error
    assert sub.extract_local(model, data, [("test", "abc123")], cache, EXTRACTION, run) == 1
    assert len(sub.load_local(cached).keypoints) == 200
    assert sub.extract_local(model, data, [("test", "abc123")], cache, EXTRACTION, run) == 0


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (1024, 576), (97, 131)])
def test_global_decoding_of_images_with_a_bucket_aspect(tmp_path, size):
    path = tmp_path / "image.jpg"
    path.write_bytes(encoded(np.zeros((size[1], size[0], 3), np.uint8), "JPEG"))
    pixels = store.decode_for_global(path, max_side=1024)
    assert pixels.shape == (*reversed(store.global_bucket(*size, max_side=1024)), 3)
