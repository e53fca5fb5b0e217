"""The training driver: ``python -m ssd_allreduce.train`` (``driver``), with who-am-I detection for
every launcher (``launch``), data sets and shards (``data``), models (``models``), per-mode step
bookkeeping (``modes``), atomic checkpoints (``checkpoint``), the run log (``runlog``) and the
bounded stop when a peer is lost (``watchdog``).

It uses the library like any user script does; the library never imports it.
"""
