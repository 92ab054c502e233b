"""The HTTP server's access and limit options (kept free of heavy imports: the CLI reads
them before anything loads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Exposure = Literal["public", "protected", "off"]
EXPOSURES: tuple[Exposure, ...] = ("public", "protected", "off")
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
# The names a browser sends for a server bound to loopback. A page on another site that
# resolves its own name to 127.0.0.1 (DNS rebinding) sends its own name instead.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


@dataclass(frozen=True)
class ServerOptions:
    """Access and limits of the HTTP server (the engine's own limits live in EngineConfig)."""

    api_key: str | None = None  # required on every /v1 route when set
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # "protected": behind the API key when one is set (public otherwise); "off": not served.
    docs: Exposure = "protected"
    metrics: Exposure = "protected"
    allowed_hosts: tuple[str, ...] | None = None  # None: any Host header

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")
        for name in ("docs", "metrics"):
            if getattr(self, name) not in EXPOSURES:
                raise ValueError(f"{name} must be one of {EXPOSURES}")

    def needs_key(self, path: str) -> bool:
        if self.api_key is None:
            return False
        if path == "/v1" or path.startswith("/v1/"):
            return True
        if path == "/metrics":
            return self.metrics == "protected"
        if any(path == p or path.startswith(p + "/") for p in DOCS_PATHS):
            return self.docs == "protected"
        return False


def host_name(host: str) -> str:
    """The Host header without its port: ``127.0.0.1:8000`` -> ``127.0.0.1``."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
