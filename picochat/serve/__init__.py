"""The chat service: OpenAI-compatible API, conversation store (SQLite) and the web page, one FastAPI app."""
