"""The one error every emulator piece raises: an Alibaba-shaped refusal that `api.py` turns into JSON."""
from __future__ import annotations


class ApiError(Exception):
    """An answer the API gives as `{"RequestId", "HostId", "Code", "Message"}` with an HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def missing(name: str) -> ApiError:
    """MissingParameter, worded as Alibaba words it."""
    return ApiError("MissingParameter", f"The input parameter {name} that is mandatory for processing this "
                    "request is not supplied.")
