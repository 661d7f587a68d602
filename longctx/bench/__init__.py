"""The benchmark: time and memory versus sequence length for every attention backend, next to SDPA.

`python -m longctx.bench` (settings in conf/bench.yaml). Modules, one job each: config (settings
and configurations), workloads (what is timed), measure (clocks and memory gauges), worker (one
configuration as a row), isolation (a fresh process per configuration), plan (what to skip),
anchors (third-party implementations), load (competing processes for `load`), report (ratios,
exponents, files), sanity (the clock against timeit), run (the whole run).
"""
