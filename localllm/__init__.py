"""localllm: run quantized LLMs (GGUF) locally with llama.cpp, and understand what they cost."""

from localllm.errors import LocalLLMError

__all__ = ["LocalLLMError", "__version__"]
__version__ = "0.1.0"
