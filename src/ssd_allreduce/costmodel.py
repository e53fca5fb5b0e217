"""``python -m ssd_allreduce.costmodel``: the cost model's command, kept at this name. The model
itself is ``ssd_allreduce.bench.costmodel``; importing this module loads nothing."""

if __name__ == "__main__":
    from ssd_allreduce.bench.costmodel import main

    main()
