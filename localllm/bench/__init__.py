"""``localllm bench``: llama-bench's tests and numbers, with where the time and memory go.

- :mod:`~localllm.bench.request`: the flags parsed into a request and its tests;
- :mod:`~localllm.bench.run`: the run (one load, a context per test) and its events;
- :mod:`~localllm.bench.record`: results as llama-bench records;
- :mod:`~localllm.bench.formats`: the records as md, csv, json and jsonl.
"""
