"""The larger commands, one module each; ``localllm/cli.py`` registers them on the app."""
