"""The OpenAI-compatible HTTP server (``kvcompress serve``)."""
