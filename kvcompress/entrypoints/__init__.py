"""Entry points: the ``kvcompress`` command, the offline ``LLM`` and the OpenAI server.

They sit on one floor above the engine and use only its public API.
"""
