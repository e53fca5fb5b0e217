"""Tools around the library: the side-by-side benchmark against Horovod (``compare``), Horovod's
synthetic benchmark (``synthetic``), the GLU ablation and convergence studies (``ablation``,
``convergence``), the emulated network (``netns``) and the cluster cost model (``costmodel``).

The library never imports this package; the command is ``python -m ssd_allreduce.bench`` (see
``bench --help`` for its subcommands).
"""
