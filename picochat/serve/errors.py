"""Errors the HTTP layer turns into OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Optional


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Optional[dict] = None):
        from fastapi.responses import JSONResponse
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param)


def not_found(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(404, message, param, type="not_found_error", code="not_found")
