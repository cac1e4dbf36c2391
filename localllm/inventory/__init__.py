"""``localllm list`` and ``info``: what the store holds and what a model file says."""
