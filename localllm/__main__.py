from localllm.cli import run

run()
