"""Stop strings, matched on text with hold-back so that no part of a stop string is ever streamed."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Feeds text through, holding back any tail that could still become a stop string.

    `feed()` returns the text that is safe to emit and, once a stop string appears, the stop string itself;
    the text from the stop string on is dropped, as OpenAI does.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        # Longest tail that could be the start of a stop string.
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)

    @property
    def active(self) -> bool:
        """Whether there is any stop string to look for."""
        return bool(self._stops)

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the matched stop string or None)."""
        if not self._stops:
            return text, None
        buf = self._held + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            idx = buf.find(stop)
            if idx != -1 and (first is None or idx < first[0]):
                first = (idx, stop)
        if first is not None:
            self._held = ""
            return buf[: first[0]], first[1]
        keep = self._held_length(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Return the held-back text at the end of the sequence (no stop string followed)."""
        held, self._held = self._held, ""
        return held

    def _held_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0
