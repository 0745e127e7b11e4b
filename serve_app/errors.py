"""The exceptions that cross packages or deployments, in one module (no Ray, no torch):

- ApiError: a failure a client sees, {"error": {"code", "message", ...}} with its HTTP status;
  AccessDenied, its 401/429 form from the key check (serve_app.traffic.access).
- InvalidInput: a variant refusing the array it was sent. It travels back through Ray as
  `RayTaskError.cause`, which the ingress recognises by isinstance (serve_app.api.variant_client).
- ModelLoadError: a model that cannot be loaded (serve_app.checkpoints, serve_app.inference).
"""

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

    def __reduce__(self):
        """Pickled (from a worker process) as a plain ApiError with the same answer."""
        return _api_error, (self.status, self.code, self.message, self.headers, self.details)


def _api_error(status: int, code: str, message: str, headers: dict, details: dict) -> ApiError:
    return ApiError(status, code, message, headers, **details)


def refuse_unknown(given, expected, what: str = "parameters") -> None:
    """422 unknown_field for names not in `expected`: a typo is never ignored."""
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown {what} {unknown}; expected "
                       f"{list(expected)}")


class AccessDenied(ApiError):
    """401 unauthorized or 429 rate_limited, with the key label to count it under."""

    def __init__(self, status: int, code: str, message: str, key_label: str,
                 headers: dict[str, str]):
        super().__init__(status, code, message, headers=headers)
        self.key_label = key_label


class InvalidInput(ValueError):
    """The array handed to a variant is not usable (the router should have caught it)."""


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says what to fix."""
