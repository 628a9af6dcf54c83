"""Errors as huggingface_hub raises them, for tests of what uptrain says about them (no network)."""
import importlib

from huggingface_hub import errors as hf_errors


def http_error(cls, status, server_message=None):
    """An HfHubHTTPError subclass `cls` with an HTTP response of `status`, as the Hub client builds it."""
    http = importlib.import_module(hf_errors.Response.__module__.split(".")[0])  # httpx2 (or httpx)
    resp = http.Response(status, request=http.Request("POST", "https://huggingface.co/api/repos/create"))
    return cls(f"{status} error", response=resp, server_message=server_message)
