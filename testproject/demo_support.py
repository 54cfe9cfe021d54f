"""What the sections of ``manage.py demo`` share: log capture, whole statements, progress lines.

* :func:`capturing` installs, for the run of the demo, a logging handler on the root logger
  that prints every warning or error record (the library's, Django's, Python warnings) in
  the narrative: marked ``expected`` when a section announced it with :func:`expect` (the
  demo provoked it on purpose: a replica stopped, Redis cut off), else ``UNEXPECTED``. The
  project's own handlers on ``django_dbscale`` (settings ``LOGGING``) are set aside for the
  run so no record is printed twice, and put back afterwards. The library's logging is not
  touched.
* :func:`problem` records an unexpected outcome that is not a log record (a row on the wrong
  shard, a stale read). The demo command exits non-zero when either happened.
* :func:`statement_log` prints every statement whole, with its parameters bound, broken at
  clause keywords (``sqlparse``, which Django depends on) so that it can be copied.
* :func:`progress` and :func:`wait_for` print the ``...`` lines of steps that take a while.
"""

from __future__ import annotations

import logging
import re
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import sqlparse
from django.db import connections

Out = Callable[[str], None]

#: Lines are wrapped at this width (statements and messages; tables keep theirs).
WIDTH = 100


def wrap(text: str, indent: str = "  ", hang: str = "    ") -> str:
    """Return *text* wrapped at :data:`WIDTH`, its first line indented by *indent*."""
    return "\n".join(
        textwrap.wrap(
            text,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=hang,
            break_long_words=False,
            break_on_hyphens=False,
        )
        or [indent]
    )


def progress(out: Out, text: str) -> None:
    """Print a progress line: what a step that takes a while is doing."""
    out(wrap(f"... {text}", "  ", "      "))


def wait_for(out: Out, what: str, check: Callable[[], bool], timeout: float) -> float | None:
    """Poll *check* until true; print a progress line every 2 s. Return seconds, or None."""
    started = time.monotonic()
    shown = started
    while not check():
        now = time.monotonic()
        if now - started > timeout:
            return None
        if now - shown >= 2.0:
            progress(out, f"{what}: {now - started:.0f} s so far (giving up at {timeout:.0f} s)")
            shown = now
        time.sleep(0.05)
    return time.monotonic() - started


# -- log capture --------------------------------------------------------------------------------


@dataclass
class _Expectation:
    logger: str
    pattern: re.Pattern[str]
    why: str
    seen: int = 0

    def matches(self, record: logging.LogRecord, message: str) -> bool:
        name = record.name
        in_logger = name == self.logger or name.startswith(self.logger + ".")
        return in_logger and self.pattern.search(message) is not None


class LogCapture(logging.Handler):
    """Print each warning/error record as expected or UNEXPECTED; count them."""

    def __init__(self, out: Out) -> None:
        super().__init__(logging.WARNING)
        self.out = out
        self.expectations: list[_Expectation] = []
        self.expected = 0
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is still news
            message = f"{record.msg!r} % {record.args!r}"
        kind = record.levelname.lower()
        for expectation in reversed(self.expectations):
            if expectation.matches(record, message):
                expectation.seen += 1
                self.note_expected(kind, expectation.why, message)
                return
        self.unexpected.append(f"{record.levelname} from {record.name}: {message}")
        lines = [wrap(f"UNEXPECTED {record.levelname} from {record.name}: {message}")]
        if record.exc_info:
            for chunk in traceback.format_exception(*record.exc_info):
                lines += ["      " + line for line in chunk.rstrip("\n").splitlines()]
        self.out("\n".join(lines))

    def note_expected(self, kind: str, why: str, message: str) -> None:
        with self.lock:
            self.expected += 1
            self.out(wrap(f"expected {kind} ({why}): {message}"))

    def problem(self, text: str) -> None:
        with self.lock:
            self.unexpected.append(text)
            self.out(wrap(f"UNEXPECTED: {text}"))


_capture: LogCapture | None = None


@contextmanager
def capturing(out: Out) -> Iterator[LogCapture]:
    """Route warning/error records to a :class:`LogCapture` until the block ends."""
    global _capture
    capture = LogCapture(out)
    root = logging.getLogger()
    project = logging.getLogger("django_dbscale")
    set_aside = list(project.handlers)
    propagate = project.propagate
    for handler in set_aside:
        project.removeHandler(handler)
    project.propagate = True
    root.addHandler(capture)
    logging.captureWarnings(True)
    _capture = capture
    try:
        yield capture
    finally:
        _capture = None
        logging.captureWarnings(False)
        root.removeHandler(capture)
        project.propagate = propagate
        for handler in set_aside:
            project.addHandler(handler)


@contextmanager
def expect(logger: str, pattern: str, why: str) -> Iterator[None]:
    """Within the block, records of *logger* (or a child) matching *pattern* are expected.

    *why* says in a few words why the demo provokes them. Without an active capture (a
    section run on its own) the block does nothing.
    """
    capture = _capture
    if capture is None:
        yield
        return
    expectation = _Expectation(logger, re.compile(pattern), why)
    with capture.lock:
        capture.expectations.append(expectation)
    try:
        yield
    finally:
        with capture.lock:
            capture.expectations.remove(expectation)


def expected(out: Out, level: str, why: str, message: str) -> None:
    """Print and count a record seen elsewhere (another process) that the demo expected."""
    if _capture is not None:
        _capture.note_expected(level.lower(), why, message)
    else:
        out(wrap(f"expected {level.lower()} ({why}): {message}"))


def problem(out: Out, text: str) -> None:
    """Record and print an unexpected outcome (the demo then exits non-zero)."""
    if _capture is not None:
        _capture.problem(text)
    else:
        out(wrap(f"UNEXPECTED: {text}"))


# -- statements ---------------------------------------------------------------------------------


def statement_text(context: dict[str, Any], sql: str, params: Any, many: bool) -> str:
    """Return *sql* with its parameters bound (as PostgreSQL receives it), one clause a line."""
    text = sql
    if many:
        text = f"{sql}\n-- executemany with {len(params)} parameter sets"
    elif params is not None:
        try:
            # Client-side binding only: no round trip, the statement is not run twice.
            raw = context["connection"].connection
            text = psycopg.ClientCursor(raw).mogrify(sql, params)
        except Exception:
            text = f"{sql}\n-- parameters: {params!r}"
    return sqlparse.format(text, reindent=True, wrap_after=WIDTH - 30).strip()


@contextmanager
def statement_log(
    out: Out,
    aliases: Any,
    indent: str = "    ",
    skip: Callable[[str], bool] = lambda sql: False,
) -> Iterator[list[tuple[str, str]]]:
    """Print every statement run on *aliases* whole, after the alias that ran it.

    Yields the list of ``(alias, sql)`` run, statements *skip* rejects left out.
    """
    ran: list[tuple[str, str]] = []
    lock = threading.Lock()

    def make(alias: str) -> Callable[..., Any]:
        def log(
            execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
        ) -> Any:
            if not skip(sql):
                with lock:
                    ran.append((alias, sql))
                label = f"{indent}[{alias:>15}] "
                lines = statement_text(context, sql, params, many).splitlines()
                hang = " " * len(label)
                out("\n".join([label + lines[0]] + [hang + line for line in lines[1:]]))
            return execute(sql, params, many, context)

        return log

    with ExitStack() as stack:
        for alias in aliases:
            stack.enter_context(connections[alias].execute_wrapper(make(alias)))
        yield ran
