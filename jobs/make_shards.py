"""Make WebDataset training shards from image folders.

    python jobs/make_shards.py [CONFIG.yaml | -] [key=value ...]

CONFIG holds ``distsr.data.config.ShardsConfig`` fields at its top level (``-`` reads the YAML
from stdin; leave it out to configure by overrides only), e.g.

    python jobs/make_shards.py inputs=[photos/div2k,photos/flickr2k] output=shards/train \\
        crop_size=256 stride=128 degradation.kind=realesrgan workers=8

Re-running the same command resumes: finished shards are kept, missing ones are re-created
identically, and ``OUTPUT/manifest.json`` is rewritten at the end.
"""

from __future__ import annotations

import logging
import sys

from distsr.config import load_job_config
from distsr.data.config import ShardsConfig
from distsr.data.shards import make_shards


def load_config(argv: list[str]) -> ShardsConfig:
    """``[CONFIG.yaml | -] [key=value ...]`` -> a validated ``ShardsConfig``."""
    return load_job_config(ShardsConfig, argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the job; returns the manifest (shards, sample counts, skipped images, config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return {}
    cfg = load_config(argv)
    manifest = make_shards(cfg)
    print(
        f"{cfg.output}: {len(manifest['shards'])} shard(s), {manifest['samples']} sample(s) "
        f"from {manifest['images']} image(s); wrote {len(manifest['written'])} shard(s); "
        f"skipped {manifest['num_bad_images']} unreadable, {manifest['too_small']} too small"
    )
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
