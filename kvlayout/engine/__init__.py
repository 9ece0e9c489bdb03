"""The model runner behind ``kvlayout demo``: a model whose attention runs on kvlayout caches, and an engine
with continuous batching, chunked prefill and preemption. Not imported by ``import kvlayout``."""
