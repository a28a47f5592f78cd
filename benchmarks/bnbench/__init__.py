"""The bnjax benchmark suite behind ``benchmarks/bench.py`` (run that script; this is its package).

Modules: ``workloads`` (shapes, modes, the function each mode jits), ``contenders`` (one builder
per library, the PyTorch and memory-traffic contenders), ``timing`` (compilation, interleaved
rounds, summaries), ``micro`` (part 1: one record per workload), ``convnet`` (part 2),
``report`` (environment, Markdown) and ``cli`` (arguments, ``main``).
"""
