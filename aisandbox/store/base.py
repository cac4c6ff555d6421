"""The store protocol: what the Responses front end needs from a database, nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from aisandbox.errors import StoreUnavailable

__all__ = ["ResponseStore", "StoreUnavailable", "StoredResponse"]


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: its id, the response body, and the input items that produced it."""

    id: str
    created_at: int
    response: dict[str, Any]
    input_items: list[dict[str, Any]]


class ResponseStore(Protocol):
    def put(self, stored: StoredResponse) -> None: ...

    def get(self, response_id: str) -> StoredResponse | None: ...

    def delete(self, response_id: str) -> bool: ...

    def purge_older_than(self, cutoff: int) -> int: ...

    def close(self) -> None: ...
