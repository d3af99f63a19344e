"""The errors a client causes: ``APIError`` (an HTTP status, a message, the request field at fault and an error
code), answered as ``{"error": {"message", "type", "param", "code"}}`` with the status it carries (``app.py``), and
``bad_request``, the 400 of a field.  Below every other server module: it imports none of them.
"""
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               409: "invalid_request_error",                500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)
