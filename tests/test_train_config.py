"""python -m train's flags: every bad value is one `error:` line naming the flag (exit 2), before any training."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from common.cli import run_main
from train.__main__ import main
from train.config import CONFIGS, FIELD_RULES, TrainConfig, check_config, get_config
from train.run_files import load_config, save_config


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = run_main(main, args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--backbone", "resnet5"], "--backbone resnet5: must be one of tiny, resnet50, resnet101"),
        (["--backbone-weights", "missing.h5"], "--backbone-weights missing.h5: must be"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--batch-size", "-4"], "--batch-size -4: must be at least 1"),
        (["--learning-rate", "0"], "--learning-rate 0.0: must be greater than 0"),
        (["--learning-rate", "nan"], "--learning-rate nan: must be greater than 0"),
        (["--validation-fraction", "1"], "--validation-fraction 1.0: must be in [0, 1)"),
        (["--crop-min-area", "0"], "--crop-min-area 0.0: must be in (0, 1]"),
        (["--crop-aspect-range", "2", "1"], "--crop-aspect-range 2.0 1.0: must be two ratios 0 < MIN <= MAX"),
        (["--tiny-widths", "8", "16"], "--tiny-widths 8 16: must be 4 channel counts"),
        (["--momentum", "1"], "--momentum 1.0: must be in [0, 1)"),
        (["--image-size", "16"], "--image-size 16: must be at least 32"),
        (["--local-stride", "8"], "--local-stride 8: must be one of 16, 32"),
        (["--precision", "float8"], "--precision float8: must be one of float32, float16, bfloat16"),
        (["--log-every", "0"], "--log-every 0: must be at least 1"),
        (["--not-clean-weight", "-1"], "--not-clean-weight -1.0: must be 0 or more"),
        (["--not-clean-weight", "inf"], "--not-clean-weight inf: must be 0 or more"),
        (["--subcenters", "0"], "--subcenters 0: must be at least 1"),
        (["--dynamic-margin", "0.4,0.25"], "--dynamic-margin 0.4 0.25: must be three numbers"),
        (["--dynamic-margin", "0.4,-1,0"], "--dynamic-margin 0.4 -1.0 0.0: must be three numbers"),
        (
            ["--dynamic-margin", "2,0,0"],
            "--dynamic-margin 2.0,0.0,0.0: the margins range from 2.000 to 2.000 on this data",
        ),
    ],
)
def test_a_flag_out_of_range_is_one_error_line_naming_it(flags, named, data_dir, tmp_path, capsys):
    code, err = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "run"), *flags], capsys)
    assert code == 2 and err.startswith(f"error: {named}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_under_a_file_is_one_error_line(data_dir, tmp_path, capsys):
    (tmp_path / "F").write_text("not a folder")
    code, err = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "F" / "run")], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'F'} is a file") and err.count("\n") == 1, err
    code, err = run_cli(["--data", str(data_dir), "--out", str(tmp_path / "F")], capsys)
    assert code == 2 and "is a file, but it would be the run folder" in err and err.count("\n") == 1, err


def test_flags_the_strategy_cannot_run_are_one_error_line(data_dir, tmp_path, capsys, monkeypatch):
    base = ["--data", str(data_dir), "--out", str(tmp_path / "run")]
    code, err = run_cli([*base, "--strategy", "mirrored", "--batch-size", "7"], capsys)  # 2 logical CPUs
    assert code == 2 and err.startswith("error: --batch-size 7: not a multiple of the 2 replicas"), err
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code, err = run_cli([*base, "--strategy", "multiworker"], capsys)
    assert code == 2 and err.startswith("error: --strategy multiworker: TF_CONFIG is not set"), err
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}')
    code, err = run_cli([*base, "--strategy", "multiworker"], capsys)
    assert code == 2 and "task index 3 is not one of the 1 worker addresses" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_numbers_of_a_flag_may_be_comma_or_space_separated(data_dir, tmp_path):
    from train.__main__ import add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    add_config_flags(parser)
    commas = config_from_args(parser.parse_args(["--dynamic-margin", "0.5,0.25,-0.05", "--global-only"]))
    spaces = config_from_args(parser.parse_args(["--dynamic-margin", "0.5", "0.25", "-0.05", "--global-only"]))
    assert commas == spaces == get_config("tiny", dynamic_margin=(0.5, 0.25, -0.05), global_only=True)


def test_every_named_config_passes_its_own_checks():
    for cfg in CONFIGS.values():
        check_config(cfg)
    assert set(FIELD_RULES) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_a_config_json_of_an_older_kit_still_loads(tmp_path):
    save_config(tmp_path, get_config("tiny"))
    fields = json.loads((tmp_path / "config.json").read_text())
    del fields["precision"], fields["local_stride"]
    fields["mixed_precision"] = False  # the switch --precision replaced; runs then had a stride-16 local head
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert load_config(tmp_path) == get_config("tiny", precision="float32", local_stride=16)
