"""Errors the engine raises for bad input. Services map them to gRPC status codes."""


class HeadwiseError(Exception):
    """Base of every error headwise raises on purpose."""


class InvalidInput(HeadwiseError, ValueError):
    """The caller gave a value outside the allowed range; the message names both."""


class UnsupportedModel(InvalidInput):
    """A model directory that is not a supported Llama/Qwen2/Mistral-family HF model."""
