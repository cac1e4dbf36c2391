"""What a load will cost and where it goes: model facts and tensor tables, memory estimates,
compute-graph replay, context plans from llama.cpp's dry run, the kv-calc core, verification,
the pre-load check, the split across RPC hosts, RoPE plans and the synthetic GGUF writer."""
