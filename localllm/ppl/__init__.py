"""``localllm ppl``: perplexity of a model on a text, scored in llama.cpp's chunks."""
