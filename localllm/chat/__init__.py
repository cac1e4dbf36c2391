"""``localllm chat``: a session with one loaded model (:mod:`~localllm.chat.session`) and
the REPL that drives it from a terminal (:mod:`~localllm.chat.repl`)."""
