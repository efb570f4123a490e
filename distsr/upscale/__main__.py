import sys

from distsr.upscale.cli import main

sys.exit(main())
