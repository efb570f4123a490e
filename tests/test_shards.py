"""Shard layer: the make-shards job on real photos, and the WebDataset training/eval reader."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from skimage import data as skdata

from distsr.config import ConfigError, from_dict
from distsr.data.config import DataConfig
from distsr.data.reader import (
    SkipCounter,
    iter_samples,
    list_shards,
    make_train_loader,
    paired_crop,
)

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_shards_job", ROOT / "jobs/make_shards.py")
job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(job)

# grid crops of 128 px: astronaut 512x512 -> 4x4, chelsea 451x300 -> 4x3, coffee 600x400 -> 5x4
GRID_128 = {"astronaut": 16, "chelsea": 12, "coffee": 20}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skdata.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.jpg", quality=95)
    Image.fromarray(skdata.camera()[:100, :90]).save(folder / "small.png")  # grey, too small
    (folder / "broken.png").write_bytes(b"this is not a png " * 20)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_job(photos: Path, out: Path, *overrides: str) -> dict:
    return job.main([f"inputs=[{photos}]", f"output={out}", "crop_size=128", *overrides])


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    run_job(photos, out, "shard_size=8", "shuffle=false")  # image order: predictable keys
    return out


# ---------------------------------------------------------------- the job


def test_job_writes_shards_and_manifest_with_every_crop(photos, tmp_path, caplog):
    config = tmp_path / "shards.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(photos)], "shard_size": 100}))
    with caplog.at_level(logging.WARNING):
        manifest = job.main([str(config), f"output={tmp_path / 'out'}", "crop_size=128"])
    expected = sum(GRID_128.values())
    assert manifest["samples"] == expected and manifest["complete"]
    assert [s["name"] for s in manifest["shards"]] == ["train-000000.tar"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["samples"] == expected and on_disk["config"]["shard_size"] == 100
    files = read_tar(tmp_path / "out" / "train-000000.tar")
    assert len(files) == 3 * expected
    gt = np.asarray(Image.open(io.BytesIO(files["astronaut_0005.gt.png"])))
    lq = np.asarray(Image.open(io.BytesIO(files["astronaut_0005.lq.png"])))
    assert gt.shape == (128, 128, 3) and lq.shape == (32, 32, 3)
    np.testing.assert_array_equal(gt, skdata.astronaut()[128:256, 128:256])  # row 1, column 1
    meta = json.loads(files["coffee_0019.meta.json"])
    assert meta["crop"] == {"image": "coffee.jpg", "top": 272, "left": 472}  # border-aligned


def test_unreadable_image_is_reported_and_skipped(shards, photos, tmp_path, caplog):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_bad_images"] == 1
    assert Path(manifest["bad_images"][0]["path"]).name == "broken.png"
    with caplog.at_level(logging.WARNING):
        run_job(photos, tmp_path / "again", "shard_size=8")
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_min_size_filter_skips_small_images(photos, tmp_path):
    manifest = run_job(photos, tmp_path, "min_size=450")  # only astronaut is >= 450 both ways
    assert manifest["samples"] == GRID_128["astronaut"]
    assert manifest["too_small"] == 3 and manifest["images"] == 1


def test_shards_are_cut_into_shard_size_groups(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    counts = [s["samples"] for s in manifest["shards"]]
    assert counts == [8] * 6  # 48 crops
    keys = [k for s in manifest["shards"] for k in _keys(shards / s["name"])]
    assert len(set(keys)) == 48 and keys[:2] == ["astronaut_0000", "astronaut_0001"]


def test_default_plan_mixes_every_image_across_shards(photos, shards, tmp_path):
    run_job(photos, tmp_path / "mixed", "shard_size=8")
    manifest = json.loads((tmp_path / "mixed" / "manifest.json").read_text())
    per_shard = [_keys(tmp_path / "mixed" / s["name"]) for s in manifest["shards"]]
    ordered = json.loads((shards / "manifest.json").read_text())["shards"]
    assert sorted(k for keys in per_shard for k in keys) == sorted(
        k for s in ordered for k in _keys(shards / s["name"])
    )
    images_per_shard = [len({k.rsplit("_", 1)[0] for k in keys}) for keys in per_shard]
    assert min(images_per_shard) >= 2  # no shard holds a single photo's crops


def _keys(path: Path) -> list[str]:
    return list(dict.fromkeys(n.split(".")[0] for n in read_tar(path)))


def test_same_config_gives_byte_identical_lq(photos, tmp_path):
    args = ["degradation.kind=realesrgan", "crop_mode=random", "random_crops=2", "seed=3"]
    first = run_job(photos, tmp_path / "a", *args)
    run_job(photos, tmp_path / "b", *args)
    other = run_job(photos, tmp_path / "c", *args[:-1], "seed=4")
    assert first["samples"] == 6
    a, b = read_tar(tmp_path / "a/train-000000.tar"), read_tar(tmp_path / "b/train-000000.tar")
    c = read_tar(tmp_path / "c/train-000000.tar")
    lq_names = [n for n in a if n.endswith(".lq.png")]
    assert len(lq_names) == 6 and all(a[n] == b[n] for n in lq_names)
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (
        tmp_path / "b/train-000000.tar"
    ).read_bytes()
    assert sum(a[n] != c.get(n) for n in lq_names) >= 1  # the seed matters
    assert other["fingerprint"] != first["fingerprint"]


def test_resume_rewrites_only_the_missing_shard(photos, tmp_path):
    run_job(photos, tmp_path, "shard_size=8")
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    before = {n: (tmp_path / n).read_bytes() for n in names}
    stamps = {n: (tmp_path / n).stat().st_mtime_ns for n in names}
    (tmp_path / "train-000002.tar").unlink()
    (tmp_path / "train-000002.tar.tmp").write_bytes(before["train-000002.tar"][:5000])  # crash
    manifest = run_job(photos, tmp_path, "shard_size=8")
    assert manifest["written"] == ["train-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    assert {n: (tmp_path / n).read_bytes() for n in names} == before
    assert all((tmp_path / n).stat().st_mtime_ns == stamps[n] for n in names if n != names[2])
    assert manifest["samples"] == 48


def test_resume_with_another_config_is_refused(photos, tmp_path):
    run_job(photos, tmp_path, "shard_size=30")
    with pytest.raises(ValueError, match="another config"):
        run_job(photos, tmp_path, "shard_size=30", "stride=64")


def test_config_errors_name_the_bad_keys(photos, tmp_path):
    with pytest.raises(ConfigError) as info:
        run_job(photos, tmp_path, "crop_size=130", "stride=0", "degradation.final_sinc_prob=2")
    paths = {p for p, _ in info.value.problems}
    assert paths == {"crop_size", "stride", "degradation.final_sinc_prob"}
    assert "multiple of degradation.scale=4" in str(info.value)
    with pytest.raises(ConfigError, match="shard_sise: unknown key"):
        run_job(photos, tmp_path, "shard_sise=5")
    with pytest.raises(ValueError, match="holds no image"):
        job.main([f"inputs=[{tmp_path / 'nothing'}]", f"output={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        from_dict(DataConfig, {"gt_size": 30, "batch_size": 0}, path="data")
    assert {p for p, _ in info.value.problems} == {"data.gt_size", "data.batch_size"}


# ---------------------------------------------------------------- the reader


def reader_cfg(shard_dir, **kw) -> DataConfig:
    base = dict(shards=[str(shard_dir)], batch_size=4, shuffle=16, gt_size=64, scale=4)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_rank_yields_exactly_steps_batches(shards, num_workers):
    cfg = reader_cfg(shards, num_workers=num_workers)
    keys = []
    for rank in range(2):
        batches = list(make_train_loader(cfg, rank=rank, world_size=2, steps=7, seed=5))
        assert len(batches) == 7
        for b in batches:
            assert b["gt"].shape == (4, 3, 64, 64) and b["lq"].shape == (4, 3, 16, 16)
            assert b["gt"].dtype == b["lq"].dtype == torch.float32
            assert b["lq"].min() >= 0.0 and b["gt"].max() <= 1.0 and b["skipped"] == 0
            assert len(b["meta"]) == 4 and "crop" in b["meta"][0]
        keys.append([k for b in batches for k in b["__key__"]])
    assert keys[0] != keys[1]


def test_stream_is_seeded_by_seed_rank_and_start_step(shards):
    cfg = reader_cfg(shards)

    def keys(**kw):
        loader = make_train_loader(cfg, rank=0, world_size=1, steps=4, seed=1, **kw)
        return [k for b in loader for k in b["__key__"]]

    assert keys() == keys()
    assert keys() != keys(start_step=4)


def test_paired_crop_keeps_lq_aligned_with_gt():
    gt = np.arange(32 * 24 * 3, dtype=np.int64).reshape(32, 24, 3)
    lq = gt[::4, ::4]  # lq pixel (i, j) is gt pixel (4i, 4j)
    rng = random.Random(0)
    for _ in range(20):
        gt_crop, lq_crop = paired_crop(gt, lq, 16, 4, rng)
        assert gt_crop.shape == (16, 16, 3) and lq_crop.shape == (4, 4, 3)
        np.testing.assert_array_equal(gt_crop[::4, ::4], lq_crop)


@pytest.fixture
def damaged(shards, tmp_path) -> Path:
    """corrupt.tar: sample 2 has bad lq.png bytes, sample 5 lacks meta.json; trunc.tar is cut."""
    with wds.TarWriter(str(tmp_path / "corrupt.tar"), encoder=False) as sink:
        for i, sample in enumerate(
            wds.WebDataset(str(shards / "train-000000.tar"), shardshuffle=False)
        ):
            sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            if i == 2:
                sample["lq.png"] = b"\x89PNG\r\n\x1a\n garbage"
            if i == 5:
                del sample["meta.json"]
            sink.write(sample)
    full = (shards / "train-000001.tar").read_bytes()
    (tmp_path / "trunc.tar").write_bytes(full[: len(full) * 6 // 10])
    return tmp_path


def test_eval_reader_skips_and_counts_corrupt_data(damaged, caplog):
    counter = SkipCounter()
    urls = [str(damaged / "corrupt.tar"), str(damaged / "trunc.tar")]
    with caplog.at_level(logging.WARNING):
        keys = [s["__key__"] for s in iter_samples(urls, scale=4, counter=counter)]
    assert keys[:6] == ["astronaut_0000", "astronaut_0001"] + [
        f"astronaut_000{i}" for i in (3, 4, 6, 7)
    ]
    assert 0 < len(keys) - 6 < 8  # the readable head of the truncated shard
    assert counter.total == 3
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "astronaut_0002" in messages and "corrupt.tar" in messages and "trunc.tar" in messages


def test_train_loader_keeps_going_past_corrupt_data(damaged, shards):
    (damaged / "good.tar").write_bytes((shards / "train-000003.tar").read_bytes())
    cfg = reader_cfg(damaged, num_workers=2, shuffle=4)
    loader = make_train_loader(cfg, rank=1, world_size=2, steps=12, seed=0)
    batches = list(loader)
    assert len(batches) == 12
    assert loader.skipped == sum(b["skipped"] for b in batches) >= 2
    keys = {k for b in batches for k in b["__key__"]}
    assert not keys & {"astronaut_0002", "astronaut_0005"}


def test_all_corrupt_shards_raise_instead_of_spinning(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\0junk" * 100)
    loader = make_train_loader(
        reader_cfg(tmp_path, shuffle=0), rank=0, world_size=1, steps=1, seed=0
    )
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(loader)


def test_list_shards_expands_dirs_globs_and_braces(shards, tmp_path):
    (shards / "train-000009.tar.tmp").write_bytes(b"")  # never listed
    every = list_shards([str(shards)])
    assert [Path(u).name for u in every] == [f"train-00000{i}.tar" for i in range(6)]
    assert list_shards(str(shards / "train-00000{0..1}.tar")) == every[:2]
    assert list_shards([str(shards / "*-00000[45].tar"), str(shards)]) == every[4:] + every[:4]
    with pytest.raises(ValueError, match="nothing-here"):
        list_shards([str(shards), str(tmp_path / "nothing-here/*.tar")])
    with pytest.raises(ValueError, match="does not exist"):
        list_shards(str(shards / "train-00000{4..7}.tar"))
    with pytest.raises(ValueError, match="empty"):
        list_shards([])
    (shards / "train-000009.tar.tmp").unlink()
