"""``torch.compile`` bookkeeping: a fresh compiler state per run unit, and a log line
whenever Dynamo gives up on a function at its recompile limit.

Dynamo keeps compiled code per Python code object, so every ``DINOModel.forward`` of a
process shares one cache, with one entry per set of input shapes and per module object.
A run over several datasets and seeds would add entries unit after unit, and once
``torch._dynamo.config.recompile_limit`` (8; ``cache_size_limit`` before torch 2.6) is
reached Dynamo runs that function eagerly from then on, with only a warning of its own.
:func:`fresh_compile_state` empties the caches before each unit, and the watcher turns
that warning into a line of the run's own log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

_MARK = "torch._dynamo hit config."  # the start of Dynamo's warning, torch 2.3 to 2.14


class RecompileLimitWatcher(logging.Handler):
    """Forwards Dynamo's recompile-limit warnings to ``log``; counts them in ``hits``."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.log: Callable[[str], None] = print
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break training
            return
        if not text.startswith(_MARK):
            return
        lines = [ln.strip() for ln in text.splitlines()]
        limit = lines[0][len("torch._dynamo hit "):]
        where = next((ln.split(":", 1)[1].strip() for ln in lines
                      if ln.startswith("function:")), "a compiled function")
        self.hits.append(where)
        self.log(f"torch.compile hit {limit} for {where}: that function now runs in eager "
                 "mode (slower, same results). Each run unit starts with an empty compiler "
                 "cache; raise torch._dynamo.config.recompile_limit if one unit needs more "
                 "shapes")


WATCHER = RecompileLimitWatcher()


def watch_recompile_limit(log: Callable[[str], None]) -> RecompileLimitWatcher:
    """Send Dynamo's recompile-limit warnings to ``log`` from now on (one handler per
    process, on the ``torch._dynamo`` logger; the latest ``log`` wins)."""
    WATCHER.log = log
    logger = logging.getLogger("torch._dynamo")
    if WATCHER not in logger.handlers:
        logger.addHandler(WATCHER)
    return WATCHER


def fresh_compile_state(log: Callable[[str], None]) -> RecompileLimitWatcher:
    """Empty Dynamo's caches (compiled code, guards, counters) and watch its recompile
    limit, hits counted from here: called before each run unit (or bench) that compiles."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them; per unit they read better
    WATCHER.hits.clear()
    return watch_recompile_limit(log)


def recompile_limit_name() -> str:
    """The config field of the per-function limit in this torch."""
    cfg = torch._dynamo.config
    return "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
