"""The error every service layer raises for a client: a gRPC status code name and a message.

Prefill, decode, tenancy and the OpenAI front door all raise it; decode turns it into the status
(gRPC) or the HTTP error (OpenAI) the client reads. It crosses Ray (pickled) from prefill to decode.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error that crosses to the client as a gRPC status: `code` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # keep code and message through pickling (Ray)
        return (type(self), (self.code, self.message))


def invalid(message: str) -> ServiceError:
    return ServiceError("INVALID_ARGUMENT", message)


def exhausted(message: str) -> ServiceError:
    return ServiceError("RESOURCE_EXHAUSTED", message)
