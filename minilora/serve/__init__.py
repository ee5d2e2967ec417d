"""The OpenAI-compatible server: the batching engine and the HTTP app (extra `serve`)."""
