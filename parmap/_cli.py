"""``python -m parmap TARGET [INPUT] [options]``: a function over a file, on every core.

The run loop is ``parmap.imap`` with ``on_error="return"``: every input item
yields exactly one value or one exception, so each failure can be tied to its
input line and the ``--on-error`` policy decided here, per item. Results are
written as they arrive, one line each, straight through to the file, which
is what makes ``--resume`` sound (see :mod:`parmap._records`).

Exit status: 0 success; 1 a task failed; 2 a usage problem; 130 interrupted
(SIGINT), 143 terminated (SIGTERM), 141 standard output closed early.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections import OrderedDict
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from types import FrameType
from typing import IO, Any, NoReturn, cast

from . import __version__
from ._api import imap
from ._chunking import CLI_PULL_BATCH, PULL_BATCH
from ._errors import ParmapError, RemoteTraceback, TaskError
from ._records import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    InputError,
    Item,
    Output,
    OutputError,
    Reader,
    ResultError,
    StdoutWriter,
    encode_result,
    estimate_items,
    journal_path,
    open_output,
)
from ._serialization import short_repr
from ._target import Target, TargetError, TargetFunction, parse_target, resolve
from .backends import BACKEND_NAMES
from .backends._base import take_standard_descriptors

__all__ = ["main"]

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

#: Set by :class:`Step` on an exception raised by the user's function.
_INDEX_ATTRIBUTE = "parmap_input_index"


class UsageError(Exception):
    """A problem with how parmap was called: a one-line message and exit status 2."""


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so the same cleanup runs."""


class Step:
    """What a worker runs per item: ``fn(item.value)``, returned with the item's index.

    The index lets out-of-order results say where they belong, and is stamped
    on an exception so its input line can be named.
    """

    def __init__(self, fn: TargetFunction) -> None:
        self.fn = fn

    def __call__(self, item: Item) -> tuple[int, Any]:
        try:
            return item.index, self.fn(item.value)
        except Exception as exc:
            try:
                setattr(exc, _INDEX_ATTRIBUTE, item.index)
            except Exception:  # noqa: S110 - an exception type that refuses attributes
                pass
            raise
        except (KeyboardInterrupt, _Terminated):
            raise  # Ctrl-C or SIGTERM reaching a thread or serial worker: the command's to handle
        except BaseException as exc:
            # A task that exits has failed (status 1), alike on every backend:
            # left alone it would end a worker process (a crash), or on the
            # serial and thread backends the command itself, with its code.
            if isinstance(exc, SystemExit):
                error = RuntimeError(f"the function called sys.exit({exc.code!r})")
            else:
                text = str(exc)
                error = RuntimeError(f"the function raised {type(exc).__qualname__}{': ' if text else ''}{text}")
            setattr(error, _INDEX_ATTRIBUTE, item.index)
            raise error from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    _give_stderr_somewhere()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _usage(f"{exc} (see parmap --help)")
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    except (UsageError, TargetError, OutputError, InputError) as exc:
        return _usage(str(exc))
    except (ParmapError, OSError) as exc:
        # No item's failure (_loop reports those): the run itself could not
        # go on, say workers that cannot start for lack of file descriptors.
        _say(f"parmap: error: the run cannot go on: {' '.join(str(exc).split())}")
        return EXIT_TASK_FAILED
    except KeyboardInterrupt as exc:
        if not getattr(exc, "parmap_said", False):
            _say("parmap: interrupted")
        return EXIT_INTERRUPTED
    except _Terminated as exc:
        if not getattr(exc, "parmap_said", False):
            _say("parmap: terminated")
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block; one line is the contract.
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of ``--help``)."""
    parser = _Parser(
        prog="parmap",
        description="Run FUNCTION over every item of INPUT on every core; write one result per line.",
        epilog=(
            "examples:\n"
            "  parmap examples/wordstats.py:stats examples/data/sample.txt\n"
            "  parmap mypackage.tasks:resize paths.txt -o sizes.jsonl --resume\n"
            "exit status: 0 ok, 1 a task failed, 2 usage problem, 130 interrupted\n"
            "documentation: docs/cli.md"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="TARGET", help="module:function or path/to/file.py:function")
    parser.add_argument("input", metavar="INPUT", nargs="?", help="input file; '-' or absent: standard input")
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="lines",
        help="lines: each line is a str item (default); jsonl: each line is JSON; csv: each row is a dict",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="output file; - or absent: standard output, which then holds the results alone "
        "(what FUNCTION prints goes to stderr)",
    )
    parser.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="jsonl",
        help="jsonl: each result as JSON (default); lines: str(result)",
    )
    parser.add_argument("--unordered", action="store_true", help="write results as they finish, not in input order")
    parser.add_argument("-w", "--workers", type=_positive_int, metavar="N", help="worker count (default: the CPUs)")
    parser.add_argument("-b", "--backend", choices=BACKEND_NAMES, default="auto", help="default: auto")
    parser.add_argument("--chunksize", type=_positive_int, metavar="N", help="items per task (default: automatic)")
    parser.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="fail an item that runs longer")
    parser.add_argument("--retries", type=_non_negative_int, default=0, metavar="N", help="retry a failed item N times")
    parser.add_argument(
        "--max-tasks-per-child",
        type=_positive_int,
        metavar="N",
        help="replace each worker process after it has run N items (for a function that leaks memory)",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="raise: stop at the first failed item (default); skip: report it on stderr and go on",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with -o: continue an interrupted run, keeping the results already in the output",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    parser.add_argument("--version", action="version", version=f"parmap {__version__}")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.output == "-":  # as for INPUT
        args.output = None
    if args.resume and args.output is None:
        raise UsageError("--resume needs -o/--output: there is nothing to resume on standard output")
    if args.output is None and sys.stdout is None:
        raise UsageError("standard output is closed: give -o PATH for the results")
    if args.input in (None, "-") and sys.stdin is None:
        raise UsageError("standard input is closed: give INPUT, the file to read")
    target = parse_target(args.target)
    # Before the target's module runs: what it prints at import is no result either.
    stdout = StdoutWriter() if args.output is None else None
    try:
        return _run_target(args, target, stdout)
    finally:
        if stdout is not None:
            stdout.close()


def _run_target(args: argparse.Namespace, target: Target, stdout: StdoutWriter | None) -> int:
    fn = resolve(target)
    options = _pool_options(args)
    _check_options(options)
    stream = _open_input(args.input, args.output)
    try:
        wants_journal = args.unordered or args.on_error == "skip"
        output = open_output(args.output, resume=args.resume, journal=wants_journal, stdout=stdout)
        if args.resume and output.done.count:
            _say(f"parmap: resuming: {output.done.count} input items already done in {args.output}")
        reader = Reader(stream, args.input_format, output.done)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        if show:
            total = estimate_items(args.input, args.input_format) if args.input not in (None, "-") else None
            options["progress"] = {"desc": target.attribute, "total": total, "initial": output.done.count}
        complete = False
        try:
            status = _loop(Step(TargetFunction(target, fn)), reader, output, options, args)
            complete = status == EXIT_OK
        finally:
            output.close(complete=complete)
        return status
    finally:
        stream.close()


def _loop(step: Step, reader: Reader, output: Output, options: dict[str, Any], args: argparse.Namespace) -> int:
    # Pulled by the workers, not yet written; in input order. An OrderedDict:
    # a dict emptied from the front rescans its deleted slots on every
    # next(iter(...)), a cost that grew with the window (400,000 lines: 23 s).
    in_flight: OrderedDict[int, Item] = OrderedDict()
    arrived: dict[int, Any] = {}  # results waiting for the items before them
    # Where each item in flight sits in imap's input, both ways: parmap's own
    # errors (a crash, a timeout) name that position. It differs from the
    # item's index once --resume has skipped items.
    position_of: dict[int, int] = {}
    index_at: dict[int, int] = {}

    def feed() -> Iterator[Item]:
        for position, item in enumerate(reader):
            in_flight[item.index] = item
            position_of[item.index], index_at[position] = position, item.index
            yield item

    def forget(index: int) -> Item:
        del index_at[position_of.pop(index)]
        return in_flight.pop(index)

    def locate(exc: BaseException) -> Item | None:
        """The in-flight item whose failure ``exc`` is, or None if it cannot be told."""
        if isinstance(exc, ParmapError) and exc.position is not None:
            index = index_at.get(exc.position)
        else:
            index = getattr(exc, _INDEX_ATTRIBUTE, None)  # stamped by Step
        return in_flight.get(index) if isinstance(index, int) else None

    def settle(index: int, result: Any) -> bool:
        """Write or report one item's result; False to stop the run."""
        item = forget(index)
        if isinstance(result, BaseException):
            return _failed(item, result, output, args) == EXIT_OK
        try:
            line = encode_result(result[1], args.output_format)
        except ResultError as exc:
            return _failed(item, exc, output, args) == EXIT_OK
        output.write(index, line)
        return True

    # In input order, imap delivers results in the order feed() produced
    # them, so a failure belongs to the oldest item in flight and memory stays
    # bounded by imap's window. --unordered takes results as they finish and
    # puts each back with its input index.
    ordered = not args.unordered
    # Lines that catch up and then follow (tail -f) go out a few at a time.
    batch = PULL_BATCH.set(CLI_PULL_BATCH)
    try:
        results = cast(Generator[Any, None, None], imap(step, feed(), ordered=ordered, on_error="return", **options))
    finally:
        PULL_BATCH.reset(batch)
    try:
        with closing(results):
            for result in results:
                if isinstance(result, BaseException):
                    item = in_flight[next(iter(in_flight))] if ordered else locate(result)
                    if item is None:
                        if _failed(None, result, output, args) != EXIT_OK:
                            return EXIT_TASK_FAILED
                        continue
                    index = item.index
                else:
                    index = result[0]
                if args.unordered:
                    if not settle(index, result):
                        return EXIT_TASK_FAILED
                    continue
                arrived[index] = result
                while in_flight and (head := next(iter(in_flight))) in arrived:
                    if not settle(head, arrived.pop(head)):
                        return EXIT_TASK_FAILED
            # Left over: items whose failure could not be told apart (already reported).
            for item in list(in_flight.values()):
                if item.index in arrived:
                    if not settle(item.index, arrived.pop(item.index)):
                        return EXIT_TASK_FAILED
                else:
                    forget(item.index)
                    output.skip(item.index)
    except BrokenPipeError:
        # Whoever read standard output (`| head`) has had enough; no message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (KeyboardInterrupt, _Terminated) as exc:
        if args.output is not None:
            how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
            _say(
                f"parmap: {how}; {output.lines} results are in {args.output}: "
                "run the same command with --resume to finish"
            )
            setattr(exc, "parmap_said", True)  # noqa: B010 - main() need not say it again
        raise
    if reader.error is not None:
        where = f"; the {output.lines} results before it are in {args.output}" if args.output else ""
        raise UsageError(f"{reader.error}{where}")
    if output.skipped:
        _say(f"parmap: {output.skipped} item(s) failed and were skipped (listed above)")
    return EXIT_OK


def _failed(item: Item | None, exc: BaseException, output: Output, args: argparse.Namespace) -> int:
    where = f"input line {item.lineno}" if item is not None else "an input line parmap could not identify"
    error = _describe(exc)
    if args.on_error == "skip":
        _say(f"parmap: {where}: {error} (skipped)")
        if item is not None:
            output.skip(item.index)
        return EXIT_OK
    shown = f" (item {short_repr(item.value)})" if item is not None else ""
    message = f"parmap: task failed on {where}{shown}: {error}"
    if args.output is not None:
        message += (
            f"\nThe {output.lines} results before it are in {args.output}; "
            "fix the problem and run the same command with --resume to go on from this line."
        )
    details = _worker_traceback(exc)
    _say(message + ("\n\n" + details if details else ""))
    return EXIT_TASK_FAILED


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (TaskError, ResultError)):
        return str(exc)
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__") and not module.startswith("_parmap_target_"):
        name = f"{module}.{name}"
    text = str(exc)
    return f"{name}: {text}" if text else name


def _worker_traceback(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause.text.rstrip()
    if isinstance(exc, TaskError) and exc.traceback_text:
        return exc.traceback_text.rstrip()
    if exc.__traceback__ is not None and not isinstance(exc, ResultError):
        return "".join(traceback.format_exception(exc)).rstrip()
    return ""


def _pool_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "workers": args.workers,
        "backend": args.backend,
        "chunksize": args.chunksize,
        "timeout": args.timeout,
        "retries": args.retries,
        "max_tasks_per_child": args.max_tasks_per_child,
    }


def _check_options(options: dict[str, Any]) -> None:
    """Let parmap validate the options (backend and timeout, say) before any output is touched."""
    try:
        for _ in imap(_nothing, iter(()), **options):  # unsized, as the real input: the same workers
            pass
    except (ValueError, TypeError, ImportError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # a Dask scheduler that cannot be reached
        parts = [str(exc), *(note.removeprefix("parmap: ") for note in getattr(exc, "__notes__", ()))]
        raise UsageError(" ".join("; ".join(parts).split())) from None
    except OverflowError as exc:  # -w 99999999999999999999
        raise UsageError(f"-w/--workers {options['workers']}: {exc}") from None


def _nothing(item: object) -> object:  # pragma: no cover - never called: the input is empty
    return item


def _open_input(path: str | None, output: str | None) -> IO[bytes]:
    if path is None or path == "-":
        return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by _run
    except OSError as exc:
        raise UsageError(f"cannot read input {path!r}: {exc.strerror or exc}") from None
    if output is not None:
        for clash in (output, journal_path(output)):
            if os.path.exists(clash) and os.path.samefile(path, clash):
                stream.close()
                raise UsageError(f"INPUT {path!r} is also where results go ({clash!r})")
    return stream


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _usage(message: str) -> int:
    _say(f"parmap: error: {message}")
    return EXIT_USAGE


def _give_stderr_somewhere() -> None:
    """With descriptor 2 closed (``2>&-``) Python has no ``sys.stderr``: the
    null device stands in, so that messages, progress and what the function
    prints (which goes to standard error, see StdoutWriter) vanish there
    rather than fail or land between the results on standard output."""
    take_standard_descriptors()
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


def _say(message: str) -> None:
    if "tqdm" in sys.modules:  # a bar may be showing: tqdm.write keeps it intact
        sys.modules["tqdm"].tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


_MAIN_PID = os.getpid()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked worker inherited this handler: die of the signal, quietly, as it would have.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise _Terminated


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
