"""``python -m ssd_allreduce.train``: see ``train/driver.py``."""
import sys

from .driver import main

sys.exit(main())
