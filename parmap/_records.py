"""The command line's records: input readers, output writers, and resuming.

Reading is lazy and per line, so line numbers are exact and memory stays
flat. A malformed line ends the input (the :class:`Reader` keeps the error)
instead of raising inside the worker pool, so every result before it is
still written.

Resuming rests on one fact: each result is one ``\\n``-terminated line,
written with a single ``write`` on an unbuffered file. After any interruption
the output is a run of complete lines plus at most one torn line.

* In input order with ``--on-error raise`` (the default), line *k* of the
  output is input item *k*: counting the complete lines says where to go on.
* Otherwise (``--unordered``, or ``--on-error skip`` where a failed item has
  no line) a *journal* next to the output, ``OUTPUT.parmap-journal``, records
  each handled item's input index after its line is written: ``"17 written"``
  or ``"18 skipped"``. On resume the output is cut back to the lines the
  journal accounts for (a line written just before the interruption, whose
  entry never made it, is dropped and recomputed) and the journal's items are
  not run again. The journal is deleted when a run completes with no item
  skipped, since the output alone then says everything is done.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

from ._serialization import short_repr

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "Done",
    "InputError",
    "Item",
    "Output",
    "OutputError",
    "Reader",
    "ResultError",
    "encode_result",
    "estimate_items",
    "journal_path",
    "open_output",
]

INPUT_FORMATS: tuple[str, ...] = ("lines", "jsonl", "csv")
OUTPUT_FORMATS: tuple[str, ...] = ("lines", "jsonl")
JOURNAL_SUFFIX = ".parmap-journal"
_SCAN_BYTES = 1 << 20
_CSV_FIELD_LIMIT = 2**31 - 1  # the most the csv module takes on every platform


class InputError(Exception):
    """A malformed input line (a usage problem: exit status 2)."""

    def __init__(self, lineno: int, problem: str) -> None:
        super().__init__(f"input line {lineno}: {problem}")
        self.lineno = lineno


class ResultError(Exception):
    """A result that cannot be written in the chosen output format."""


class OutputError(Exception):
    """The output cannot be opened or resumed (a usage problem: exit status 2)."""


class Item:
    """One input item: its position among the items, its line number, its value.

    The repr names the line, so parmap's own messages about an item (a crash,
    a timeout) say which input line it came from.
    """

    __slots__ = ("index", "lineno", "value")

    def __init__(self, index: int, lineno: int, value: Any) -> None:
        self.index = index
        self.lineno = lineno
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Item, (self.index, self.lineno, self.value))

    def __repr__(self) -> str:
        return f"input line {self.lineno}: {short_repr(self.value)}"


class Reader:
    """Items from a binary stream, skipping those ``done`` says are finished.

    Iterating stops at the first malformed line and keeps its
    :class:`InputError` in :attr:`error`.
    """

    def __init__(self, stream: IO[bytes], fmt: str, done: Callable[[int], bool]) -> None:
        if fmt not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {fmt!r}")
        self._stream = stream
        self._fmt = fmt
        self._done = done
        self.error: InputError | None = None

    def __iter__(self) -> Iterator[Item]:
        parse = {"lines": self._lines, "jsonl": self._jsonl, "csv": self._csv}[self._fmt]
        try:
            yield from parse()
        except InputError as exc:
            self.error = exc

    def _decoded(self) -> Iterator[tuple[int, str]]:
        encoding = "utf-8-sig"  # a byte-order mark is allowed on the first line only
        lines = enumerate(self._stream, 1)
        lineno = 0
        while True:
            try:
                lineno, raw = next(lines)
            except StopIteration:
                return
            except OSError as exc:  # a failing disk, a terminal that hung up
                raise InputError(lineno + 1, f"cannot be read: {exc.strerror or exc}") from None
            try:
                yield lineno, raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise InputError(lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            encoding = "utf-8"

    def _lines(self) -> Iterator[Item]:
        done = self._done
        for index, (lineno, text) in enumerate(self._decoded()):
            if not done(index):
                yield Item(index, lineno, _strip_newline(text))

    def _jsonl(self) -> Iterator[Item]:
        done = self._done
        index = 0
        for lineno, text in self._decoded():
            if not text.strip():
                continue  # blank lines are not items (a trailing one is common)
            if not done(index):
                try:
                    value = json.loads(_strip_newline(text))  # else an error at its end names column 1 of a line after
                except json.JSONDecodeError as exc:
                    raise InputError(lineno, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
                except (ValueError, RecursionError) as exc:  # an int past the digit limit, nesting too deep
                    raise InputError(lineno, f"JSON that cannot be read: {exc}") from None
                yield Item(index, lineno, value)
            index += 1

    def _csv(self) -> Iterator[Item]:
        done = self._done
        texts = (text for _, text in self._decoded())
        # strict: a quote left open must not swallow the rest of the file
        # into one field. The field limit is the csv module's own, global: a
        # line of any length is fine here, as in the other formats.
        csv.field_size_limit(_CSV_FIELD_LIMIT)
        rows = csv.reader(texts, strict=True)
        header: list[str] | None = []
        while header == []:  # blank lines before the header, as after it, are not rows
            header = self._csv_row(rows)
        if header is None:
            return
        if len(set(header)) != len(header):
            twice = sorted({name for name in header if header.count(name) > 1})
            raise InputError(rows.line_num, f"the CSV header names a column twice: {', '.join(map(repr, twice))}")
        index = 0
        while True:
            lineno = rows.line_num + 1
            row = self._csv_row(rows)
            if row is None:
                return
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise InputError(lineno, f"expected {len(header)} fields (as in the header), got {len(row)}")
            if not done(index):
                yield Item(index, lineno, dict(zip(header, row, strict=True)))
            index += 1

    @staticmethod
    def _csv_row(rows: Any) -> list[str] | None:
        lineno = rows.line_num + 1
        try:
            return next(rows, None)  # type: ignore[no-any-return]
        except csv.Error as exc:
            raise InputError(lineno, f"malformed CSV: {exc}") from None


def _strip_newline(text: str) -> str:
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def estimate_items(path: str, fmt: str) -> int | None:
    """About how many items a regular file holds (for the progress bar), or None.

    Exact for ``lines`` and ``jsonl``; for ``csv`` a quoted field that spans
    lines counts once per line.
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as file:
            if fmt == "lines":
                return _count_lines(file)
            # Blank lines are not items in these formats: the readers skip them.
            if fmt == "jsonl":
                rows = sum(1 for line in file if line.strip())
            else:
                rows = sum(1 for line in file if line not in (b"\n", b"\r\n"))
    except OSError:
        return None  # the reader meets the same error, and names its line
    return max(0, rows - 1) if fmt == "csv" else rows


def _count_lines(file: IO[bytes]) -> int:
    lines = 0
    last = b"\n"
    while block := file.read(_SCAN_BYTES):
        lines += block.count(b"\n")
        last = block[-1:]
    return lines + (last != b"\n")


def encode_result(value: Any, fmt: str) -> bytes:
    """One output line for ``value``; :class:`ResultError` if the format cannot hold it."""
    if fmt == "jsonl":
        try:
            text = json.dumps(value, ensure_ascii=False)
        except Exception as exc:
            raise ResultError(f"the result {short_repr(value)} is not JSON-serialisable: {exc}") from None
    else:
        try:
            text = value if isinstance(value, str) else str(value)
        except Exception as exc:  # an int past the digit limit, a __str__ that raises
            raise ResultError(f"the result {short_repr(value)} cannot be turned into text: {exc}") from None
        if "\n" in text or "\r" in text:
            # One result per line is what lets --resume count results.
            raise ResultError(f"the result {short_repr(text)} contains a line break; use --output-format jsonl")
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ResultError(f"the result {short_repr(value)} cannot be encoded as UTF-8: {exc.reason}") from None


class Done:
    """Input indices already handled: every index below :attr:`below`, plus :attr:`extra`.

    Kept this way so that an in-order run costs no memory however long it is.
    """

    def __init__(self, below: int = 0) -> None:
        self.below = below
        self.extra: set[int] = set()
        self.skipped = 0

    def __call__(self, index: int) -> bool:
        return index < self.below or index in self.extra

    def add(self, index: int) -> None:
        if index != self.below:
            self.extra.add(index)
            return
        self.below += 1
        while self.below in self.extra:
            self.extra.remove(self.below)
            self.below += 1

    @property
    def count(self) -> int:
        return self.below + len(self.extra)


def journal_path(output: str) -> str:
    """Where the journal of ``output`` lives."""
    return output + JOURNAL_SUFFIX


class _Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...
    def close(self) -> None: ...


class Output:
    """Where results go, one line each, written through at once.

    With a journal, every handled item is also recorded there (see the
    module docstring).
    """

    def __init__(self, stream: _Sink, journal: IO[bytes] | None, done: Done, path: str | None) -> None:
        self._stream = stream
        self._journal = journal
        self._path = path
        # Absolute now: a task may change the working directory (serial, thread).
        self._journal_path = None if path is None else os.path.abspath(journal_path(path))
        self.done = done
        self.skipped = 0
        self.lines = done.count - done.skipped  # results in the output, earlier runs' included

    def write(self, index: int, line: bytes) -> None:
        """Write one result line (then its journal entry)."""
        self._write(self._stream, line)
        self.lines += 1
        if self._journal is not None:
            self._write(self._journal, b"%d written\n" % index)

    def skip(self, index: int) -> None:
        """Record that the item at ``index`` failed and was left out."""
        self.skipped += 1
        self.done.skipped += 1
        if self._journal is not None:
            self._write(self._journal, b"%d skipped\n" % index)

    def _write(self, file: _Sink, data: bytes) -> None:
        try:
            _write_all(file, data)
        except BrokenPipeError:
            raise  # a reader that went away (| head): the command's to handle
        except OSError as exc:  # a full disk, an I/O error
            where = "standard output" if self._path is None else repr(self._path)
            if file is self._journal:
                where = repr(journal_path(str(self._path)))
            raise OutputError(f"cannot write to {where}: {exc.strerror or exc}") from None

    def close(self, *, complete: bool) -> None:
        """Close the files; a complete run with nothing skipped needs no journal."""
        if self._path is None:
            return
        self._stream.close()
        if self._journal is not None:
            self._journal.close()
            if complete and self.done.skipped == 0 and self._journal_path is not None:
                with contextlib.suppress(FileNotFoundError):  # someone else's doing; the run is complete
                    os.remove(self._journal_path)


def open_output(path: str | None, *, resume: bool, journal: bool, stdout: StdoutWriter | None = None) -> Output:
    """Open the output (``stdout`` when ``path`` is None), resuming if asked.

    ``journal`` says whether this run's order and error policy need one; a
    resumed run keeps the journal an earlier run left, whatever it needs.
    The caller owns ``stdout`` and closes it.
    """
    if path is None:
        if stdout is None:
            raise ValueError("results for standard output need its StdoutWriter")
        return Output(stdout, None, Done(), None)
    jpath = journal_path(path)
    try:
        if not resume or not os.path.exists(path):
            stream = open(path, "wb", buffering=0)  # noqa: SIM115 - Output owns it
            if os.path.exists(jpath):
                os.remove(jpath)  # a stale journal would describe some other run
            log = open(jpath, "wb", buffering=0) if journal else None  # noqa: SIM115
            return Output(stream, log, Done(), path)
        stream = open(path, "r+b", buffering=0)  # noqa: SIM115
        if os.path.exists(jpath):
            log = open(jpath, "r+b", buffering=0)  # noqa: SIM115
            done = _resume_with_journal(path, stream, log)
        else:
            lines, end = _scan_lines(stream, None)
            stream.truncate(end)  # a torn last line is dropped and recomputed
            done = Done(lines)
            log = None
            if journal:
                log = open(jpath, "wb", buffering=0)  # noqa: SIM115
                for start in range(0, lines, 65536):
                    stop = min(lines, start + 65536)
                    _write_all(log, b"".join(b"%d written\n" % i for i in range(start, stop)))
        stream.seek(0, os.SEEK_END)
        return Output(stream, log, done, path)
    except OSError as exc:
        raise OutputError(f"cannot open output {path!r}: {exc.strerror or exc}") from None


def _resume_with_journal(path: str, stream: IO[bytes], log: IO[bytes]) -> Done:
    _, end = _scan_lines(log, None)
    log.seek(0)
    data = log.read(end)
    log.truncate(end)
    log.seek(0, os.SEEK_END)
    done = Done()
    written = 0
    for number, entry in enumerate(data.splitlines(), 1):
        parts = entry.split()
        if len(parts) != 2 or not parts[0].isdigit() or parts[1] not in (b"written", b"skipped"):
            raise OutputError(f"{journal_path(path)!r} line {number} is not a journal entry: {entry[:60]!r}")
        done.add(int(parts[0]))
        if parts[1] == b"written":
            written += 1
        else:
            done.skipped += 1
    lines, cut = _scan_lines(stream, written)
    if lines < written:
        raise OutputError(
            f"{path!r} has {lines} complete lines but its journal records {written}; "
            "it was changed after the interrupted run (run again without --resume)"
        )
    stream.truncate(cut)
    return done


def _scan_lines(file: IO[bytes], limit: int | None) -> tuple[int, int]:
    """(complete lines, offset just after the last of them), stopping after ``limit`` lines."""
    file.seek(0)
    lines = 0
    end = 0
    offset = 0
    while block := file.read(_SCAN_BYTES):
        position = -1
        while (position := block.find(b"\n", position + 1)) != -1:
            lines += 1
            end = offset + position + 1
            if limit is not None and lines == limit:
                return lines, end
        offset += len(block)
    return lines, end


def _write_all(file: _Sink, data: bytes) -> None:
    view = memoryview(data)
    while view:
        count = file.write(view)
        view = view[count or 0 :]


class StdoutWriter:
    """Standard output's bytes, flushed after every line so a reader sees results as they come.

    Standard output is the results' alone: while this is open, the process's
    descriptor 1 points at standard error, so what the function prints (here,
    or in a worker, which inherits the descriptor) goes there instead of
    between result lines (a ``| jq`` downstream would choke on it).
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._broken = False
        try:
            out, err = sys.stdout.fileno(), sys.stderr.fileno()
            sys.stdout.flush()
            self._fd = os.dup(out)
            os.dup2(err, out)
        except (AttributeError, OSError, ValueError):  # not real descriptors: share them, as before
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def write(self, data: bytes | memoryview) -> int:
        if self._fd is None:
            out = sys.stdout.buffer
            count = out.write(data)
            out.flush()
            return count
        try:
            return os.write(self._fd, data)
        except BrokenPipeError:
            self._broken = True
            raise

    def close(self) -> None:
        if self._fd is None:
            sys.stdout.buffer.flush()
            return
        sys.stdout.flush()  # what was printed here goes to standard error still
        if not self._broken:  # else leave descriptor 1 where the broken-pipe handling put it
            os.dup2(self._fd, sys.stdout.fileno())
        os.close(self._fd)
        self._fd = None
