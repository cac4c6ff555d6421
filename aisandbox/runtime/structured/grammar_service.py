"""Grammar compilation as a bounded service: worker processes, a deadline per compile, and cancellation.

xgrammar compiles in C++ and cannot be interrupted, and compile time grows with the schema or regex. Run on a
thread, one hard grammar would hold that thread (and its CPU) for as long as it takes, whoever waits for it. So a
client's grammar is first compiled in a worker process, with a deadline (`grammar_compile_timeout_s`):

* past the deadline the worker is killed (its CPU freed at once) and the request gets a 400 `grammar_too_complex`
  naming the field; a fresh worker starts in the background;
* a client that leaves while its grammar compiles cancels the wait, which kills that worker the same way;
* only a grammar that compiled in time is compiled again in the server process, on the engine's own grammar
  thread (never the tokenizer threads), where it is cached for every later request with the same spec: xgrammar's
  compiled grammar is large to send between processes (megabytes for a 49k vocabulary), a second compile of a
  grammar known to be quick costs less.

Plain requests never touch any of this. The workers are started with the `forkserver` method (a clean, small
process: this module's worker imports xgrammar and the grammar module, not torch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aisandbox.errors import InvalidRequest
from aisandbox.runtime.types import GrammarSpec, TokenVocab

__all__ = ["GrammarService", "GrammarServiceStats"]

log = logging.getLogger(__name__)


class _FixedVocab:
    """A VocabSource over a vocabulary already read (what a worker process receives)."""

    def __init__(self, vocab: TokenVocab) -> None:
        self._vocab = vocab

    def vocab_for_grammar(self) -> TokenVocab:
        return self._vocab


def _worker_main(conn: Connection, vocab: TokenVocab, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
    """A worker process: compile each spec it receives and answer whether it compiled."""
    from aisandbox.runtime.structured.grammar import GrammarCompiler

    compiler = GrammarCompiler(_FixedVocab(vocab), vocab_size, stop_token_ids)
    conn.send(("ready", None, None))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        try:
            compiler.check(spec)
            conn.send(("ok", None, None))
        except InvalidRequest as exc:
            conn.send(("invalid", exc.message, exc.param))
        except Exception as exc:  # a worker never dies of a bad grammar
            conn.send(("invalid", f"The grammar could not be compiled: {exc}", None))


@dataclass(frozen=True, slots=True)
class GrammarServiceStats:
    """Counters for /metrics."""

    waiting: int
    """Requests waiting for their grammar to compile now."""
    compiled: int
    timeouts: int
    cancelled: int
    restarts: int


class _Worker:
    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, *args), daemon=True, name="aisandbox-grammar")
        self.process.start()
        child.close()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.process.join(5)


class GrammarService:
    """A pool of grammar worker processes for one tokenizer; use from the event loop."""

    def __init__(
        self, vocab: TokenVocab, vocab_size: int, stop_token_ids: tuple[int, ...], timeout_s: float, workers: int = 1
    ) -> None:
        self.timeout_s = timeout_s
        self._args = (vocab, vocab_size, tuple(stop_token_ids))
        self._ctx = multiprocessing.get_context("forkserver")
        self._size = workers
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        # One blocking `recv` per compile in flight: the waits, not the compiles, run on these threads.
        self._waits = ThreadPoolExecutor(workers, thread_name_prefix="aisandbox-grammar-wait")
        self._closed = False
        self.waiting = self.compiled = self.timeouts = self.cancelled = self.restarts = 0

    async def start(self) -> None:
        """Start the workers (each imports xgrammar and builds its tokenizer info: a second or so)."""
        for _ in range(self._size):
            self._idle.put_nowait(await self._spawn())

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        worker = await loop.run_in_executor(None, _Worker, self._ctx, self._args)
        ready = await loop.run_in_executor(None, worker.conn.recv)
        if ready[0] != "ready":
            raise RuntimeError(f"grammar worker failed to start: {ready}")
        self._all.add(worker)
        return worker

    async def _replace(self, worker: _Worker) -> None:
        self._all.discard(worker)
        await asyncio.get_running_loop().run_in_executor(None, worker.kill)
        if self._closed:
            return
        self.restarts += 1
        try:
            self._idle.put_nowait(await self._spawn())
        except Exception:
            log.exception("could not restart a grammar worker")

    def stats(self) -> GrammarServiceStats:
        return GrammarServiceStats(self.waiting, self.compiled, self.timeouts, self.cancelled, self.restarts)

    async def check(self, spec: GrammarSpec, param: str) -> None:
        """Compile `spec` in a worker within the deadline; return if it compiles.

        Args:
            spec: The client's grammar.
            param: The request field it came from, named in a refusal.

        Raises:
            InvalidRequest: The grammar is invalid (the compiler's message), or did not compile within the deadline
                (code `grammar_too_complex`). asyncio.CancelledError (the client left) kills the compile.
        """
        self.waiting += 1
        worker: _Worker | None = None
        try:
            # Waiting for a free worker costs no CPU and ends when the client leaves; the deadline is the compile's.
            worker = await self._idle.get()
            worker.conn.send(spec)
            wait = asyncio.get_running_loop().run_in_executor(self._waits, _recv, worker.conn, self.timeout_s)
            kind, message, field = await asyncio.shield(wait)
        except _Timeout:
            self.timeouts += 1
            if worker is not None:
                asyncio.get_running_loop().create_task(self._replace(worker))
                worker = None
            raise InvalidRequest(
                f"The grammar is too complex: it did not compile within {self.timeout_s:g} s.",
                param=param,
                code="grammar_too_complex",
            ) from None
        except asyncio.CancelledError:
            self.cancelled += 1
            if worker is not None:  # the client left: stop its compile now
                asyncio.get_running_loop().create_task(self._replace(worker))
                worker = None
            raise
        except (EOFError, OSError) as exc:  # the worker died under it
            if worker is not None:
                asyncio.get_running_loop().create_task(self._replace(worker))
                worker = None
            raise InvalidRequest(f"The grammar could not be compiled: {exc}", param=param) from exc
        finally:
            self.waiting -= 1
            if worker is not None:
                self._idle.put_nowait(worker)
        if kind == "invalid":
            raise InvalidRequest(message, param=field or param, code="invalid_value")
        self.compiled += 1

    async def close(self) -> None:
        """Stop every worker."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for worker in list(self._all):
            await loop.run_in_executor(None, worker.kill)
        self._all.clear()
        self._waits.shutdown(wait=False, cancel_futures=True)


class _Timeout(Exception):
    pass


def _recv(conn: Connection, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise _Timeout
    return conn.recv()
