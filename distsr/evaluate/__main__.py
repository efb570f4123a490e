import sys

from distsr.evaluate.cli import main

sys.exit(main())
