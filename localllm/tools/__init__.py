"""Tool calling: OpenAI's tools in each model family's own call format.

- :mod:`~localllm.tools.api`: the request's tools, tool choice, calls and history
  messages, checked (ToolError names the bad field);
- :mod:`~localllm.tools.families`: the family a chat template speaks (hermes, mistral,
  llama3, generic), detected from its text, and the conversation it renders;
- :mod:`~localllm.tools.grammar`: the GBNF grammar replies are sampled under;
- :mod:`~localllm.tools.parse`: replies (whole or streamed) parsed into text and calls.
"""

from __future__ import annotations
