"""Test helpers: the GGUF writer, header models, the local hub, llama.cpp log parsing."""
