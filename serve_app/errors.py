"""One error shape for the whole API: {"error": {"code", "message", ...}}."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A failure a client should see, with its HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None,
                 **details: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.details}}
