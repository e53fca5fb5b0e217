"""``python -m ssd_allreduce.bench``: see ``bench/cli.py``."""
import sys

from .cli import main

sys.exit(main())
