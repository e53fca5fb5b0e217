"""``python -m ssd_allreduce.bench``: see ``bench/cli.py``."""
from .cli import main

main()
