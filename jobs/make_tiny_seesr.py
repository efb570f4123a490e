"""Write a tiny random SeeSR teacher (SD-2 parts, SeeSR UNet/ControlNet, RAM + tag files) for
laptop runs of configs/tadsr_seesr_tiny.yaml and configs/cache_seesr_tiny.yaml.

    python jobs/make_tiny_seesr.py [OUT=weights/tiny_seesr]
"""

from __future__ import annotations

import sys

from distsr.teachers.seesr_tiny import write_tiny_seesr


def main(argv: list[str]) -> int:
    out = argv[0] if argv else "weights/tiny_seesr"
    section = write_tiny_seesr(out)
    print(f"[tiny seesr] wrote {out} (sd2_dir={section['sd2_dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
