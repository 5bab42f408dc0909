"""The OpenAI-compatible HTTP API (chat completions, models) over the decode worker."""
