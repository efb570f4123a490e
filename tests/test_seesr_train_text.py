"""TAD-SR's training text on the tiny SeeSR teacher: ``teacher.train_prompt`` (lq: the inference
prompt of lq's tags; gt: RAM's tags of gt as ``"<tags>,"``, official TAD-SeeSR) and
``method.null_text_ratio`` (the empty prompt per sample, from the run's seeded RNG), checked
against the tagger and the text encoder called here, and the gt prompt through the cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distsr.data.cache import TeacherCache
from distsr.fingerprint import parts_differ
from distsr.recipes.tadsr import DiscriminatorConfig, TadsrConfig, TadsrRecipe
from distsr.teachers import seesr_tiny
from distsr.teachers.cache_job import run_in_process
from distsr.teachers.config import CacheJobConfig
from distsr.teachers.seesr import build_seesr_teacher
from distsr.teachers.source import CachedTeacher
from tests.test_cache_targets import assert_live_equals_cached
from tests.test_seesr_teacher import FIXTURE, seesr_cfg
from tests.test_tadsr_step import make_recipe as toy_recipe
from tests.test_teacher_cache import subset_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_seesr(tmp_path_factory) -> dict:
    """Tiny parts whose tokenizer holds a whole tiny prompt (the shared ones cut at 16
    characters, which would hide the prompts' ends)."""
    unet = json.loads(FIXTURE.read_text())["unet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seesr_tiny, "TINY_MAX_LENGTH", 96)
        return seesr_tiny.write_tiny_seesr(tmp_path_factory.mktemp("seesr"), unet_config=unet)


@pytest.fixture(scope="module")
def teachers(tiny_seesr):
    return {
        src: build_seesr_teacher(seesr_cfg(tiny_seesr, train_prompt=src)) for src in ("lq", "gt")
    }


def recipe_for(teacher, **cfg) -> TadsrRecipe:
    disc = DiscriminatorConfig(levels=[1, 3], include_middle=False,
                               kwargs={"time_embed_dim": 32, "logit_channels": 4})  # fmt: skip
    cfg = TadsrConfig(teacher=teacher.cfg, fresh_noise=False, disc=disc, **cfg)
    recipe = TadsrRecipe(cfg, device=torch.device("cpu"), teacher=teacher)
    recipe.bind(recipe.trainable())  # plain modules stand in for the engines
    return recipe


def batch(n: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lq, gt = torch.rand(n, 3, 8, 8, generator=gen), torch.rand(n, 3, 32, 32, generator=gen)
    gt[-1] = 0  # RAM tags nothing: the official prompt is then ","
    return {"__key__": [f"s{seed}_{i}" for i in range(n)], "lq": lq, "gt": gt}


@torch.no_grad()
def clip(teacher, prompts: list[str]) -> torch.Tensor:
    """The tokenizer and the text encoder called directly, float16-rounded as the cache keeps."""
    tok = teacher.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    return teacher.text_encoder(ids)[0].float().half().float()


def tags_of(teacher, images: torch.Tensor) -> list[str]:
    return teacher.ram.tag_and_embed(images)[0]


COND_ARG = {"student_step": 2, "features": 2, "denoise": 2, "sample": 0}  # where cond is


def texts_seen(teacher, recipe, data: dict) -> dict[str, list[torch.Tensor]]:
    """The prompt embeddings each network call of one training step received."""
    seen: dict[str, list[torch.Tensor]] = {}

    def spy(name):
        real = getattr(teacher, name)

        def call(*args):
            seen.setdefault(name, []).append(args[COND_ARG[name]])
            return real(*args)

        return call

    for name in COND_ARG:
        setattr(teacher, name, spy(name))
    try:
        for _ in recipe.training_step(data, step=0):
            pass
    finally:
        for name in COND_ARG:
            delattr(teacher, name)  # the class's methods again
    return {k: [c["prompt_embeds"] for c in v] for k, v in seen.items()}


def test_gt_train_prompt_is_rams_tags_of_gt_and_lq_stays_the_inference_prompt(teachers):
    data = batch()
    lq_t, gt_t = teachers["lq"], teachers["gt"]
    gt_tags, lq_tags = tags_of(gt_t, data["gt"]), tags_of(gt_t, data["lq"])
    assert any(gt_tags), "the tiny RAM tags nothing: the test would not tell the texts apart"
    want_gt = clip(gt_t, [f"{t}," for t in gt_tags])  # official: make_tags.py's "<tags>,"
    added = gt_t.cfg.added_prompt
    want_lq = clip(gt_t, [f"{t}, {gt_t.cfg.prompt}," + added for t in lq_tags])
    assert not torch.equal(want_gt, want_lq)

    for teacher, want in ((gt_t, want_gt), (lq_t, want_lq)):
        seen = texts_seen(teacher, recipe_for(teacher), data)
        trained = [*seen["student_step"], *seen["features"], *seen["denoise"]]
        assert len(seen["features"]) == 3 and len(seen["denoise"]) == 2  # disc x2, G; HSD x2
        for text in trained:
            assert torch.equal(text, want), teacher.cfg.train_prompt
        # the teacher's trajectory keeps the lq inference prompt (official: SeeSR's outputs)
        assert [torch.equal(t, want_lq) for t in seen["sample"]] == [True]


def test_gt_train_prompt_is_cached_under_its_own_fingerprint(teachers, tiny_shards, tmp_path):
    lq_t, gt_t = teachers["lq"], teachers["gt"]
    assert lq_t.stored == ("z_lq", "image_embeds", "prompt_embeds")  # existing caches' layout
    assert "train_prompt" not in lq_t.fingerprint_parts()  # ... and fingerprint
    assert parts_differ(gt_t.fingerprint_parts(), lq_t.fingerprint_parts()) == [
        "train_prompt ('gt' vs None)"
    ]
    shards = subset_shards(tiny_shards, tmp_path / "in", 1, 4)
    job = CacheJobConfig(teacher=gt_t.cfg, shards=[str(shards)], output=str(tmp_path / "cache"),
                         batch_size=4)  # fmt: skip
    summary = run_in_process(job, gt_t)
    cache = TeacherCache(summary["cache_dir"])
    assert cache.fingerprint == gt_t.fingerprint() != lq_t.fingerprint()
    assert cache.stored == (*lq_t.stored, "prompt_embeds_gt")
    with pytest.raises(ValueError, match="train_prompt"):
        CachedTeacher(cache, lq_t)  # an lq run never reads a gt cache as its own
    (data,) = assert_live_equals_cached(gt_t, cache, shards, steps=1)
    cond = CachedTeacher(cache, gt_t).targets(data)["cond"]
    want = clip(gt_t, [f"{t}," for t in tags_of(gt_t, data["gt"])])
    assert torch.equal(gt_t.train_cond(cond)["prompt_embeds"], want)


def binomial_bound(p: float, n: int, sigmas: float = 5.0) -> float:
    """|fraction - p| <= sigmas * sqrt(p (1 - p) / n): a false failure below 1e-6."""
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 1.0])
def test_null_text_ratio_empties_that_fraction_of_prompts_from_the_seed(teachers, ratio):
    teacher = teachers["gt"]
    recipe = recipe_for(teacher, null_text_ratio=ratio)
    n, data = 4000, batch(n=2)
    cond = teacher.prepare_gt(data["gt"])
    cond["prompt_embeds_gt"] = cond["prompt_embeds_gt"].half().float().repeat(n // 2, 1, 1)
    empty, full = clip(teacher, [""]), cond["prompt_embeds_gt"]

    torch.manual_seed(7)
    state = torch.get_rng_state()
    drop = recipe.null_text(n)
    text = teacher.train_cond(cond, drop)["prompt_embeds"]
    is_empty = (text == empty).flatten(1).all(1)
    assert torch.equal(text[~is_empty], full[~is_empty])  # the rest keep the gt text
    fraction = is_empty.float().mean().item()
    assert abs(fraction - ratio) <= binomial_bound(ratio, n), fraction
    if ratio == 0:
        assert drop is None and torch.equal(torch.get_rng_state(), state)  # nothing drawn
        return
    torch.set_rng_state(state)  # a resumed run restores the checkpointed RNG state
    assert torch.equal(recipe.null_text(n), drop)
    torch.manual_seed(8)
    assert ratio == 1 or not torch.equal(recipe.null_text(n), drop)


def test_null_text_ratio_one_trains_every_network_call_on_the_empty_prompt(teachers):
    teacher = teachers["gt"]
    seen = texts_seen(teacher, recipe_for(teacher, null_text_ratio=1.0), batch())
    empty = clip(teacher, [""])
    for text in [*seen["student_step"], *seen["features"], *seen["denoise"]]:
        assert (text == empty).all()


def test_null_text_ratio_needs_a_teacher_with_text_and_a_probability():
    with pytest.raises(ValueError, match="no text condition"):
        toy_recipe(null_text_ratio=0.5)
    assert [k for k, _ in TadsrConfig(null_text_ratio=1.5).validate()] == ["null_text_ratio"]
