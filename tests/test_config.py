"""Typed config loading: YAML + overrides, every problem reported at once with its YAML path."""

from __future__ import annotations

import pickle

import pytest
import yaml

from distsr.config import ConfigError, apply_overrides, from_dict
from distsr.engine.config import EngineConfig
from distsr.runconfig import load_run_config, to_dict, write_run_record


def test_overrides_reach_nested_typed_fields():
    cfg = load_run_config("resshift_tiny", ["engine.zero_stage=3", "data.batch_size=2", "seed=7"])
    assert cfg.engine.zero_stage == 3
    assert cfg.data.batch_size == 2
    assert cfg.seed == 7
    assert cfg.engine.optimizer.lr == pytest.approx(2e-3)


def test_every_bad_key_and_value_is_reported_in_one_error():
    with pytest.raises(ConfigError) as info:
        load_run_config(
            "resshift_tiny",
            [
                "engine.zero_stage=5",
                "engine.precison=bf16",
                "data.batch_size=two",
                "method.schedule.steps=0",
            ],
        )
    paths = [p for p, _ in info.value.problems]
    assert "engine.zero_stage" in paths
    assert "engine.precison" in paths
    assert "data.batch_size" in paths
    assert "method.schedule.steps" in paths
    message = str(info.value)
    assert "resshift_tiny.yaml" in message
    assert "valid:" in message  # unknown key lists the valid ones


def test_unknown_recipe_lists_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "recipe": "resshfit"}))
    with pytest.raises(ConfigError, match="valid: .*resshift"):
        load_run_config(str(path))


def test_unknown_config_name_lists_available():
    with pytest.raises(ValueError, match="resshift_tiny"):
        load_run_config("no_such_config")


def test_literal_and_types():
    with pytest.raises(ConfigError) as info:
        from_dict(EngineConfig, {"precision": "fp8", "grad_clip": "big", "max_steps": 1.5})
    assert {p for p, _ in info.value.problems} == {"precision", "grad_clip", "max_steps"}
    assert from_dict(EngineConfig, {"grad_clip": 0}).grad_clip == 0.0


def test_apply_overrides_parses_yaml_values():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c=true", "d.e=null", "f=x=y"])
    assert data == {"a": {"b": [1, 2], "c": True}, "d": {"e": None}, "f": "x=y"}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_run_record_holds_resolved_config_and_command(tmp_path):
    cfg = load_run_config("resshift_tiny", [f"output_dir={tmp_path}", "engine.max_steps=3"])
    run_dir = write_run_record(cfg, ["python", "-m", "distsr.launch", "resshift_tiny"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == to_dict(cfg)
    assert saved["engine"]["max_steps"] == 3
    record = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert record["command"].startswith("python -m distsr.launch")
    assert record["git_revision"]


def test_missing_weights_are_a_clear_error_before_any_work(tmp_path, capsys):
    from distsr.launch import main

    code = main(
        ["resshift_realsr_x4", f"output_dir={tmp_path}", "method.unet_checkpoint=/no/such/unet.pth",
         "method.autoencoder.checkpoint=/no/such/vq.pth"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "method.unet_checkpoint: weights file not found: /no/such/unet.pth" in err
    assert "method.autoencoder.checkpoint: weights file not found: /no/such/vq.pth" in err
    assert not (tmp_path / "resshift_realsr_x4").exists()  # nothing started, nothing written


def test_relative_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config("resshift_tiny", ["output_dir=out", "data.shards=[sh/a,s3://b/c.tar]"])
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.data.shards == [str(tmp_path / "sh" / "a"), "s3://b/c.tar"]


def test_unwritable_output_folder_is_refused_before_work(tmp_path, capsys):
    from distsr.launch import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["resshift_tiny", f"output_dir={blocker}"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_full_disk_is_refused_before_work(tmp_path, capsys):
    from distsr.launch import main

    assert main(["resshift_tiny", f"output_dir={tmp_path}", "engine.min_free_gb=1000000000.0"]) == 2
    err = capsys.readouterr().err
    assert "GB free" in err and "min_free_gb" in err
    assert not (tmp_path / "resshift_tiny" / "config.yaml").exists()


def test_dry_run_prints_resolved_config_and_deepspeed_json(capsys):
    from distsr.launch import main

    assert main(["resshift_tiny", "engine.zero_stage=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe: resshift" in out
    assert '"stage": 3' in out


def test_method_is_parsed_once_into_the_recipes_typed_config(tmp_path):
    """The driver's object is what workers get (pickled) and what config.yaml reloads to."""
    from distsr.registry import get_recipe

    cfg = load_run_config("resshift_tiny", [f"output_dir={tmp_path}", "method.scale=4"])
    assert type(cfg.method) is get_recipe("resshift").Config
    assert cfg.method.schedule.steps == 4 and cfg.method.unet["model_channels"] == 32
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    run_dir = write_run_record(cfg, ["python", "-m", "distsr.launch", "resshift_tiny"])
    assert load_run_config(str(run_dir / "config.yaml")) == cfg


def test_method_problems_come_with_the_others_in_one_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"recipe": "resshift", "method": {"scael": 4}, "seed": "x"}))
    with pytest.raises(ConfigError) as info:
        load_run_config(str(path))
    problems = dict(info.value.problems)
    assert set(problems) == {"name", "seed", "method.scael"}
    assert problems["method.scael"].startswith("unknown key (valid: ")
    assert "scale" in problems["method.scael"]


def test_dry_run_plans_without_weights_and_lists_them(tmp_path, monkeypatch, capsys):
    from distsr.launch import main

    monkeypatch.chdir(tmp_path)  # the config's relative weight paths name nothing here
    assert main(["resshift_realsr_x4", "method.unet_checkpoint=w/unet.pth", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# resolved config" in out and '"stage": 2' in out
    planned = out[out.index("# missing files") :].splitlines()[1:]
    assert sorted(planned) == [
        "#   method.autoencoder.checkpoint: weights file not found: weights/autoencoder_vq_f4.pth",
        "#   method.unet_checkpoint: weights file not found: w/unet.pth",
    ]
    # the same command without --dry-run refuses, naming the same files, before any work
    assert main(["resshift_realsr_x4", "method.unet_checkpoint=w/unet.pth"]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "method.unet_checkpoint: weights file not found" in err
    assert not (tmp_path / "runs").exists()


def test_dry_run_still_refuses_other_problems(tmp_path, monkeypatch, capsys):
    from distsr.launch import main

    monkeypatch.chdir(tmp_path)
    assert main(["resshift_realsr_x4", "engine.zero_stage=5", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "engine.zero_stage" in err


def test_tadsr_resshift_dry_run_without_any_weight_file(tmp_path, monkeypatch, capsys):
    from distsr.launch import main

    monkeypatch.chdir(tmp_path)
    assert main(["tadsr_resshift", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe: tadsr" in out
    missing = out[out.index("# missing files") :]
    assert "method.teacher.unet_checkpoint: weights file not found" in missing
    assert "method.teacher.autoencoder.checkpoint: weights file not found" in missing
    assert main(["tadsr_resshift"]) == 2
    assert "method.teacher.unet_checkpoint: weights file not found" in capsys.readouterr().err


def test_planning_lists_missing_files_only_inside_its_block(tmp_path):
    from distsr.config import planning_without_files
    from distsr.models.autoencoder import AutoencoderConfig

    data = {"kind": "vq_f4", "checkpoint": str(tmp_path / "vq.pth")}
    with planning_without_files() as missing:
        assert from_dict(AutoencoderConfig, data, path="method.autoencoder").kind == "vq_f4"
    assert missing == [
        ("method.autoencoder.checkpoint", f"weights file not found: {tmp_path / 'vq.pth'}")
    ]
    with pytest.raises(ConfigError, match="weights file not found"):
        from_dict(AutoencoderConfig, data)
    (tmp_path / "vq.pth").write_bytes(b"")
    with planning_without_files() as missing:
        from_dict(AutoencoderConfig, data)
    assert missing == []


def test_missing_folders_are_planned_like_missing_files(tmp_path):
    from distsr.config import missing_dir, planning_without_files, raise_problems

    problems = missing_dir("cache_dir", str(tmp_path / "cache"), "teacher cache")
    assert problems == [("cache_dir", f"teacher cache not found: {tmp_path / 'cache'}")]
    with planning_without_files() as missing:
        raise_problems(problems)
    assert missing == problems
    assert missing_dir("cache_dir", str(tmp_path)) == []
