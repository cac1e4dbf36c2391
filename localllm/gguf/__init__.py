"""The GGUF file format: header walk, ModelSpec, ggml types, KV layout.

Pure Python over the file's bytes: no llama.cpp and no numpy, so anything above can read a
model's facts (or a remote header's) without loading a library.
"""
