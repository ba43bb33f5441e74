"""The command line, run for real: ``python -m parmap`` in a subprocess.

Each run gets its own process group, killed at teardown, so the CLI's
workers cannot outlive a failed test.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import os
import pty
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import parmap
from parmap._cli import Step
from parmap._records import Done, InputError, Item, Reader, journal_path, open_output
from parmap._target import TargetFunction, parse_target

REPO = Path(__file__).resolve().parents[1]

TARGETS = """
import os
import time


class Point:
    def __init__(self, x):
        self.x = x


def square(x):
    return int(x) ** 2


def echo(x):
    return x


def fail_on_3(x):
    if str(x) == "3":
        raise ValueError(f"cannot take {x!r}")
    return int(x)


def crash_on_3(x):
    if x == "3":
        os._exit(7)
    return x


def slow_square(x):
    time.sleep(0.01)
    return int(x) ** 2


def slow_fail_sevens(x):
    time.sleep(0.01)
    if int(x) % 7 == 0:
        raise ValueError("a multiple of seven")
    return int(x) ** 2


def jitter(x):
    time.sleep(0.03 if int(x) % 2 else 0.0)
    return int(x)


def a_set(x):
    return {x}


def two_lines(x):
    return x + "\\nmore"


def point(x):
    return Point(x)


def huge_int(x):
    return 10**5000


class Halt(BaseException):
    pass


def halt_on_2(x):
    if x == "2":
        raise Halt("stop here")
    return x


def generator_exit_on_2(x):
    if x == "2":
        raise GeneratorExit
    return x
"""

_started: list[subprocess.Popen[bytes]] = []


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _kill_process_groups():
    yield
    while _started:
        proc = _started.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``tgt.py``, the functions these tests run."""
    directory = tmp_path_factory.mktemp("targets")
    (directory / "tgt.py").write_text(textwrap.dedent(TARGETS))
    return directory


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def start(*args: str | Path, cwd: Path, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "parmap", *map(str, args)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=_env(),
        start_new_session=True,  # its own process group, for killpg
    )
    _started.append(proc)
    return proc


def cli(*args: str | Path, cwd: Path, stdin: str | None = None) -> Result:
    proc = start(*args, cwd=cwd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    out, err = proc.communicate(stdin.encode() if stdin is not None else None, timeout=30)
    return Result(proc.returncode, out.decode(), err.decode())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- targets and formats ------------------------------------------------------------


def test_module_target(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n")
    result = cli("tgt:square", "in.txt", "-w", "2", cwd=targets)
    assert (result.code, result.out, result.err) == (0, "1\n4\n9\n", "")


@pytest.mark.parametrize("backend", [None, "process", "fork", "pool", "apply_async", "thread", "serial"])
def test_file_target_on_each_backend(targets: Path, tmp_path: Path, backend: str | None) -> None:
    numbers = write(tmp_path / "numbers.txt", "".join(f"{i}\n" for i in range(20)))
    options = ["-b", backend] if backend else []
    result = cli(targets / "tgt.py:square", numbers, "-w", "2", *options, cwd=tmp_path)
    assert result.code == 0, result.err
    assert result.out == "".join(f"{i * i}\n" for i in range(20))


def test_file_target_travels_to_spawned_workers(targets: Path) -> None:
    # The CLI has no start-method option; this is what it sends to workers, under spawn.
    step = Step(TargetFunction(parse_target(f"{targets / 'tgt.py'}:square")))
    items = [Item(i, i + 1, str(i)) for i in range(6)]
    results = parmap.map(step, items, backend="process", start_method="spawn", workers=2)
    assert results == [(i, i * i) for i in range(6)]


def test_relative_file_target_from_another_directory(targets: Path, tmp_path: Path) -> None:
    write(tmp_path / "in.txt", "a\nb\n")
    relative = os.path.relpath(targets / "tgt.py", tmp_path)
    result = cli(f"{relative}:echo", "in.txt", "--output-format", "lines", cwd=tmp_path)
    assert (result.code, result.out) == (0, "a\nb\n")


def test_jsonl_in_and_out(targets: Path) -> None:
    records = [{"a": 1}, [1, "two"], "three", None, 4.5]
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"  # a trailing blank line is allowed
    write(targets / "in.jsonl", text)
    result = cli("tgt:echo", "in.jsonl", "--input-format", "jsonl", cwd=targets)
    assert result.code == 0, result.err
    assert [json.loads(line) for line in result.out.splitlines()] == records


def test_csv_rows_are_dicts(targets: Path) -> None:
    write(targets / "in.csv", 'name,note\nada,"likes, commas"\n\nbob,"two\nlines"\n')
    result = cli("tgt:echo", "in.csv", "--input-format", "csv", cwd=targets)
    assert result.code == 0, result.err
    assert [json.loads(line) for line in result.out.splitlines()] == [
        {"name": "ada", "note": "likes, commas"},
        {"name": "bob", "note": "two\nlines"},
    ]


def test_lines_output_format_and_unicode(targets: Path) -> None:
    write(targets / "in.txt", "héllo\r\nwörld\n")
    result = cli("tgt:echo", "in.txt", "--output-format", "lines", cwd=targets)
    assert (result.code, result.out) == (0, "héllo\nwörld\n")
    result = cli("tgt:echo", "in.txt", cwd=targets)
    assert result.out == '"héllo"\n"wörld"\n'


@pytest.mark.parametrize("dash", [True, False])
def test_standard_input(targets: Path, dash: bool) -> None:
    result = cli("tgt:square", *(["-"] if dash else []), cwd=targets, stdin="4\n5\n")
    assert (result.code, result.out) == (0, "16\n25\n")


def test_unordered_gives_the_same_multiset(targets: Path) -> None:
    write(targets / "in.txt", "".join(f"{i}\n" for i in range(12)))
    result = cli("tgt:jitter", "in.txt", "--unordered", "-w", "2", "--chunksize", "1", cwd=targets)
    assert result.code == 0, result.err
    assert Counter(result.out.splitlines()) == Counter(str(i) for i in range(12))


def test_output_file(targets: Path, tmp_path: Path) -> None:
    write(targets / "in.txt", "1\n2\n")
    out = tmp_path / "out.jsonl"
    result = cli("tgt:square", "in.txt", "-o", out, cwd=targets)
    assert (result.code, result.out, out.read_text()) == (0, "", "1\n4\n")
    assert not Path(journal_path(str(out))).exists()


# -- exit codes and messages ------------------------------------------------------------


def test_version(targets: Path) -> None:
    result = cli("--version", cwd=targets)
    assert (result.code, result.out) == (0, f"parmap {parmap.__version__}\n")


def test_help(targets: Path) -> None:
    result = cli("--help", cwd=targets)
    assert result.code == 0
    assert "--resume" in result.out and "--on-error" in result.out


def test_task_failure_exits_1_naming_line_item_and_error(targets: Path, tmp_path: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n4\n")
    out = tmp_path / "out.jsonl"
    result = cli("tgt:fail_on_3", "in.txt", "-o", out, cwd=targets)
    assert result.code == 1
    first = result.err.splitlines()[0]
    assert "input line 3" in first and "'3'" in first and "ValueError: cannot take '3'" in first
    assert "Traceback (most recent call last)" in result.err and "in fail_on_3" in result.err
    assert out.read_text() == "1\n2\n"  # what came before is written and intact


def test_worker_crash_exits_1_naming_the_line(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n4\n")
    result = cli("tgt:crash_on_3", "in.txt", "-b", "process", "-w", "2", cwd=targets)
    assert result.code == 1
    assert "input line 3" in result.err and "WorkerCrashedError" in result.err


def test_unordered_resume_skips_the_line_that_crashed(targets: Path, tmp_path: Path) -> None:
    # Resumed past two lines, the crashing item is imap's first (position 0)
    # but the input's third: the skip must land on line 3.
    write(targets / "in.txt", "1\n2\n3\n4\n5\n6\n")
    out = tmp_path / "out.jsonl"
    out.write_text('"1"\n"2"\n')
    args = ("tgt:crash_on_3", "in.txt", "--unordered", "--on-error", "skip", "-o", out, "--resume")
    result = cli(*args, "-w", "2", "-b", "process", cwd=targets)
    assert result.code == 0, result.err
    assert "input line 3: parmap.WorkerCrashedError" in result.err
    assert sorted(out.read_text().splitlines()) == ['"1"', '"2"', '"4"', '"5"', '"6"']


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_a_task_calling_sys_exit_fails_like_any_task(targets: Path, backend: str) -> None:
    write(targets / "exits.py", "import sys\n\ndef on_2(x):\n    if x == '2':\n        sys.exit(4)\n    return x\n")
    write(targets / "in.txt", "1\n2\n3\n")
    result = cli("exits:on_2", "in.txt", "-b", backend, "-w", "2", cwd=targets)
    assert result.code == 1, result.err
    assert "input line 2" in result.err and "sys.exit(4)" in result.err
    assert result.out == '"1"\n'


@pytest.mark.parametrize("backend", ["serial", "thread", "process", "fork", "pool"])
def test_what_the_function_prints_goes_to_stderr_when_results_go_to_stdout(targets: Path, backend: str) -> None:
    # Standard output is one result per line, for whatever reads it.
    write(targets / "chatty.py", "def shout(x):\n    print('working on', x)\n    return x.upper()\n")
    write(targets / "in.txt", "a\nb\nc\n")
    result = cli("chatty:shout", "in.txt", "-b", backend, "-w", "2", cwd=targets)
    assert (result.code, result.out) == (0, '"A"\n"B"\n"C"\n'), result.err
    # Workers printing at once may interleave their pieces there, as on any terminal.
    assert result.err.count("working on") == 3
    assert sorted(c for c in result.err.replace("working on", "") if c.isalpha()) == ["a", "b", "c"]


def _run_cli_with(preexec: Any, *args: str, cwd: Path, stderr: int | None = None) -> Result:
    """The CLI with ``preexec`` run in its process first (a descriptor closed, a limit lowered)."""
    proc = subprocess.run(
        [sys.executable, "-m", "parmap", *args],
        stdin=subprocess.DEVNULL,
        capture_output=stderr is None,
        stdout=None if stderr is None else subprocess.PIPE,
        cwd=cwd,
        env=_env(),
        timeout=30,
        preexec_fn=preexec,
        start_new_session=True,
    )
    return Result(proc.returncode, proc.stdout.decode(), (proc.stderr or b"").decode())


@pytest.mark.parametrize("backend", ["process", "pool"])
def test_with_standard_error_closed_standard_output_still_holds_the_results_alone(targets: Path, backend: str) -> None:
    # `2>&-`: sys.stderr is None. The run failed at once (an AttributeError),
    # or what the function printed, and the failure report, came out among
    # the results.
    write(targets / "chatty.py", "def shout(x):\n    print('working on', x)\n    return x.upper()\n")
    write(targets / "in.txt", "a\nb\nc\n")
    result = _run_cli_with(lambda: os.close(2), "chatty:shout", "in.txt", "-b", backend, cwd=targets, stderr=-1)
    assert (result.code, result.out) == (0, '"A"\n"B"\n"C"\n')
    write(targets / "in.txt", "1\n2\n3\n4\n")
    result = _run_cli_with(lambda: os.close(2), "tgt:fail_on_3", "in.txt", "-b", backend, cwd=targets, stderr=-1)
    assert (result.code, result.out) == (1, "1\n2\n")


def test_with_standard_error_closed_a_usage_error_stays_off_standard_output(targets: Path) -> None:
    write(targets / "in.txt", "1\n")
    result = _run_cli_with(lambda: os.close(2), "tgt:square", "in.txt", "-w", "0", cwd=targets, stderr=-1)
    assert (result.code, result.out) == (2, "")


@pytest.mark.parametrize("backend", ["process", "pool"])
def test_workers_that_cannot_start_make_a_one_line_error(targets: Path, backend: str) -> None:
    # Too few file descriptors: a Python traceback, exit 1, before.
    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (12, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    write(targets / "in.txt", "1\n2\n3\n4\n")
    result = _run_cli_with(few_descriptors, "tgt:square", "in.txt", "-b", backend, "-w", "2", cwd=targets)
    assert result.code == 1
    assert result.err.startswith("parmap: error: the run cannot go on: ") and result.err.count("\n") == 1, result.err


def test_dash_output_is_standard_output(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n")
    result = cli("tgt:square", "in.txt", "-o", "-", cwd=targets)
    assert (result.code, result.out) == (0, "1\n4\n")
    assert not (targets / "-").exists()


def test_on_error_skip_reports_and_goes_on(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n4\n")
    result = cli("tgt:fail_on_3", "in.txt", "--on-error", "skip", "-w", "2", cwd=targets)
    assert (result.code, result.out) == (0, "1\n2\n4\n")
    assert "input line 3: ValueError: cannot take '3' (skipped)" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("tgt:a_set", "not JSON-serialisable"),
        ("tgt:point", "not JSON-serialisable"),
    ],
)
def test_unwritable_result_exits_1(targets: Path, target: str, expected: str) -> None:
    write(targets / "in.txt", "x\n")
    result = cli(target, "in.txt", cwd=targets)
    assert result.code == 1 and "input line 1" in result.err and expected in result.err


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_result_without_text_fails_its_item(targets: Path, on_error: str) -> None:
    # str(10**5000) raises: it used to end the command with parmap's own traceback.
    write(targets / "in.txt", "x\ny\n")
    result = cli("tgt:huge_int", "in.txt", "--output-format", "lines", "--on-error", on_error, cwd=targets)
    assert "input line 1" in result.err and "cannot be turned into text" in result.err
    assert "Traceback" not in result.err and result.out == ""
    assert result.code == (1 if on_error == "raise" else 0)


def test_a_task_raising_a_base_exception_fails_like_any_task(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n")
    result = cli("tgt:halt_on_2", "in.txt", "-w", "2", cwd=targets)
    assert result.code == 1, result.err
    assert "task failed on input line 2" in result.err and "Halt: stop here" in result.err
    assert result.out == '"1"\n'


def test_what_the_target_prints_at_import_stays_off_standard_output(targets: Path) -> None:
    write(targets / "noisy.py", "print('loading the model')\n\ndef f(x):\n    return x\n")
    write(targets / "in.txt", "a\n")
    result = cli("noisy:f", "in.txt", cwd=targets)
    assert (result.code, result.out) == (0, '"a"\n')
    assert "loading the model" in result.err


@pytest.mark.parametrize("closed", ["stdin", "stdout"])
def test_a_closed_standard_stream_is_a_usage_error(targets: Path, closed: str) -> None:
    write(targets / "in.txt", "1\n")
    args = ["tgt:square"] if closed == "stdin" else ["tgt:square", "in.txt"]
    redirect = "0<&-" if closed == "stdin" else "1>&-"
    command = " ".join([sys.executable, "-m", "parmap", *args, redirect])
    proc = subprocess.run(
        command,
        shell=True,
        cwd=targets,
        env=_env(),
        capture_output=closed == "stdin",
        timeout=30,
        stderr=None if closed == "stdin" else subprocess.PIPE,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and f"standard {closed[3:]}" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("where", ["-o", "stdout"])
def test_a_full_disk_is_one_line_not_a_traceback(targets: Path, where: str) -> None:
    write(targets / "in.txt", "1\n2\n3\n")
    args = [sys.executable, "-m", "parmap", "tgt:square", "in.txt", "-w", "2"]
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            args + (["-o", "/dev/full"] if where == "-o" else []),
            cwd=targets,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=full if where == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "No space left on device" in err, err


def test_line_break_in_lines_output_exits_1(targets: Path) -> None:
    write(targets / "in.txt", "x\n")
    result = cli("tgt:two_lines", "in.txt", "--output-format", "lines", cwd=targets)
    assert result.code == 1 and "line break" in result.err and result.out == ""


# A module-level __getattr__ importing an optional dependency, and a property that fails.
LAZY_MODULE = """
class Holder:
    @property
    def f(self):
        raise ValueError("broken property")


Holder = Holder()


def __getattr__(name):
    import optional_dep

    return getattr(optional_dep, name)
"""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["nosuchmodule:fn", "in.txt"], "No module named 'nosuchmodule'"),
        (["tgt:nosuchfunction", "in.txt"], "no attribute 'nosuchfunction'"),
        (["missing.py:fn", "in.txt"], "no such file"),
        (["tgt", "in.txt"], "module:function"),
        (["tgt:square", "missing.txt"], "missing.txt"),
        (["tgt:square", "in.txt", "-w", "0"], "--workers"),
        (["tgt:square", "in.txt", "--input-format", "xml"], "--input-format"),
        (["tgt:square", "in.txt", "--bogus"], "--bogus"),
        (["tgt:square", "in.txt", "-b", "thread", "--timeout", "1"], "timeout"),
        (["tgt:square", "in.txt", "-b", "pool", "--max-tasks-per-child", "3"], "max_tasks_per_child=3"),
        (["tgt:square", "in.txt", "--max-tasks-per-child", "0"], "--max-tasks-per-child"),
        (["tgt:square", "in.txt", "--resume"], "--resume needs -o"),
        (["tgt:square", "in.txt", "-o", "in.txt"], "also where results go"),
        (["tgt:square", "in.txt", "-w", "99999999999999999999"], "--workers"),
        (["raises.py:f", "in.txt"], "(line 2): RuntimeError: first; second"),
        (["lazy:f", "in.txt"], "cannot get 'f' from 'lazy': ModuleNotFoundError: No module named 'optional_dep'"),
        (["lazy:Holder.f", "in.txt"], "cannot get 'Holder.f' from 'lazy': ValueError: broken property"),
        (["unprintable.py:f", "in.txt"], "Unprintable: (its message cannot be shown)"),
        ([], "TARGET"),
    ],
)
def test_usage_errors_exit_2_with_one_line(targets: Path, args: list[str], expected: str) -> None:
    write(targets / "in.txt", "1\n")
    write(targets / "raises.py", "x = 1\nraise RuntimeError('first\\nsecond')\n")
    write(targets / "lazy.py", LAZY_MODULE)
    write(targets / "unprintable.py", "class Unprintable(Exception):\n    __str__ = None\n\nraise Unprintable\n")
    result = cli(*args, cwd=targets)
    assert result.code == 2
    assert result.err.count("\n") == 1 and result.err.startswith("parmap: error:"), result.err
    assert expected in result.err and "Traceback" not in result.err
    assert (targets / "in.txt").read_text() == "1\n"


def test_max_tasks_per_child_replaces_the_workers(targets: Path) -> None:
    write(targets / "pid.py", "import os\n\ndef f(line):\n    return os.getpid()\n")
    write(targets / "lines.txt", "".join(f"{i}\n" for i in range(12)))
    result = cli("pid.py:f", "lines.txt", "-w", "2", "--max-tasks-per-child", "3", cwd=targets)
    assert result.code == 0, result.err
    runs = collections.Counter(result.out.split())
    assert sum(runs.values()) == 12 and max(runs.values()) <= 3


def test_malformed_json_line_exits_2_after_writing_what_came_before(targets: Path, tmp_path: Path) -> None:
    write(targets / "in.jsonl", "1\n2\n{oops\n4\n")
    out = tmp_path / "out.jsonl"
    result = cli("tgt:square", "in.jsonl", "--input-format", "jsonl", "-o", out, cwd=targets)
    assert result.code == 2
    assert "input line 3: malformed JSON" in result.err and "Traceback" not in result.err
    assert result.err.count("\n") == 1
    assert out.read_text() == "1\n4\n"


@pytest.mark.parametrize(
    ("fmt", "text", "line", "expected"),
    [
        ("jsonl", "1\n" + "9" * 5000 + "\n", 2, "JSON that cannot be read"),  # past the int digit limit
        ("jsonl", "1\n" + "[" * 100_000 + "]" * 100_000 + "\n", 2, "JSON that cannot be read"),
        ("csv", 'a,b\n1,2\n1,"open\n2,3\n', 3, "unexpected end of data"),  # it used to swallow the rest
        ("csv", "a,a\n1,2\n", 1, "names a column twice: 'a'"),
    ],
    ids=["json-int-too-long", "json-too-deep", "csv-open-quote", "csv-duplicate-column"],
)
def test_unreadable_input_names_its_line(targets: Path, fmt: str, text: str, line: int, expected: str) -> None:
    write(targets / "in.data", text)
    result = cli("tgt:echo", "in.data", "--input-format", fmt, cwd=targets)
    assert result.code == 2 and result.err.count("\n") == 1, result.err
    assert f"input line {line}: " in result.err and expected in result.err


def _read(data: bytes | io.RawIOBase, fmt: str) -> tuple[list[object], InputError | None]:
    reader = Reader(io.BufferedReader(data) if isinstance(data, io.RawIOBase) else io.BytesIO(data), fmt, Done())
    return [item.value for item in reader], reader.error


def test_blank_lines_before_a_csv_header_are_skipped() -> None:
    assert _read(b"\n\r\nname,age\n\nada,3\n", "csv") == ([{"name": "ada", "age": "3"}], None)


def test_a_cut_short_json_line_names_the_column_where_it_ends() -> None:
    values, error = _read(b'1\n{"name": "ada", "age":\n', "jsonl")
    assert values == [1] and error is not None
    assert str(error) == "input line 2: malformed JSON: Expecting value (column 23)"


class _FailingDisk(io.RawIOBase):
    """Two lines, then the read fails as a dying disk's (or a hung-up terminal's) does."""

    def __init__(self) -> None:
        self._left = [b"1\n2\n"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._left:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        data = self._left.pop()
        buffer[: len(data)] = data
        return len(data)


def test_an_input_that_fails_to_read_names_the_line_it_stopped_at() -> None:
    values, error = _read(_FailingDisk(), "lines")
    assert values == ["1", "2"]
    assert str(error) == "input line 3: cannot be read: Input/output error"


def test_a_complete_run_removes_its_journal_after_a_task_changed_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    output = open_output("out.jsonl", resume=False, journal=True)
    output.write(0, b"1\n")
    monkeypatch.chdir(tmp_path.parent)  # what os.chdir() in a serial or thread task does
    output.close(complete=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_csv_field_may_be_long(targets: Path) -> None:
    # Longer than the csv module's default limit of 128 KiB.
    write(targets / "in.csv", "a,b\n1," + "x" * 200_000 + "\n")
    result = cli("tgt:echo", "in.csv", "--input-format", "csv", cwd=targets)
    assert result.code == 0, result.err
    assert json.loads(result.out) == {"a": "1", "b": "x" * 200_000}


def test_malformed_csv_row_names_its_line(targets: Path) -> None:
    write(targets / "in.csv", "a,b\n1,2\n3\n")
    result = cli("tgt:echo", "in.csv", "--input-format", "csv", cwd=targets)
    assert result.code == 2 and "input line 3" in result.err and result.out == '{"a": "1", "b": "2"}\n'


def test_progress_bar_on_request_only(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n")
    shown = cli("tgt:square", "in.txt", "--progress", cwd=targets)
    assert shown.code == 0 and "3/3" in shown.err
    hidden = cli("tgt:square", "in.txt", "--no-progress", cwd=targets)
    assert hidden.code == 0 and hidden.err == ""


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("lines", "1\n\n3\n"),  # a blank line is an item here
        ("jsonl", "1\n\n  \n2\r\n\n3"),
        ("csv", "x\n1\n\n2\r\n\r\n3\n"),
    ],
)
def test_progress_total_counts_the_items_not_the_lines(targets: Path, fmt: str, text: str) -> None:
    write(targets / "in.txt", text)
    shown = cli("tgt:echo", "in.txt", "--input-format", fmt, "--progress", cwd=targets)
    assert shown.code == 0 and "3/3" in shown.err, shown.err


def test_progress_bar_by_default_on_a_terminal_of_unknown_size(targets: Path) -> None:
    # A pseudo-terminal nobody sized reports 0 x 0, as a test harness's does.
    write(targets / "in.txt", "1\n2\n3\n")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "parmap", "tgt:square", "in.txt"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        cwd=targets,
        env=_env(),
        start_new_session=True,
    )
    _started.append(proc)
    os.close(terminal)
    shown = b""
    with suppress(OSError):  # EIO once the last writer has closed the terminal
        while chunk := os.read(controller, 4096):
            shown += chunk
    os.close(controller)
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, b"1\n4\n9\n")
    assert b"3/3" in shown, shown


@pytest.mark.timeout(60)
def test_lines_that_catch_up_and_then_follow_come_out_as_they_arrive(targets: Path) -> None:
    # tail -f log | parmap ...: 5,000 lines at once, then one every 20 ms.
    # The first line after the burst waited for a batch of the input's
    # reading to fill (64 lines, or up to half a chunk before that).
    proc = start("tgt:echo", "-w", "2", "--output-format", "lines", cwd=targets, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    fed = 0

    def feed() -> None:
        nonlocal fed
        with suppress(OSError):  # closed once the result came
            proc.stdin.write(b"".join(b"fast\n" for _ in range(5000)))
            proc.stdin.flush()
            for i in range(1000):
                fed = i + 1
                proc.stdin.write(b"slow\n")
                proc.stdin.flush()
                time.sleep(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    for line in proc.stdout:
        if line == b"slow\n":
            break
    late = fed
    proc.kill()
    proc.wait(timeout=10)
    # At most a batch of CLI_PULL_BATCH (4) lines, and what trickled in
    # while the chunk ran.
    assert late <= 16, late


# -- interruption and --resume ------------------------------------------------------------

ITEMS = 100  # ~0.5 s of work on 2 workers: an interrupt at a quarter lands well before the end


@pytest.fixture(scope="module")
def slow_input(targets: Path) -> Path:
    return write(targets / "slow.txt", "".join(f"{i}\n" for i in range(1, ITEMS + 1)))


@pytest.fixture(scope="module")
def reference(targets: Path, slow_input: Path) -> bytes:
    """The output of an uninterrupted run."""
    out = targets / "reference.jsonl"
    result = cli("tgt:slow_square", slow_input, "-w", "2", "-o", out, cwd=targets)
    assert result.code == 0, result.err
    return out.read_bytes()


def _interrupt_midway(proc: subprocess.Popen[bytes], out: Path, sig: int) -> None:
    deadline = time.monotonic() + 20
    while not (out.exists() and out.read_bytes().count(b"\n") >= ITEMS // 4):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C or `kill -9 -PGID` would


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_resume_after_interrupt_matches_an_uninterrupted_run(
    targets: Path, slow_input: Path, reference: bytes, tmp_path: Path, sig: int
) -> None:
    out = tmp_path / "out.jsonl"
    args = ("tgt:slow_square", slow_input, "-w", "2", "-o", out)
    proc = start(*args, cwd=targets)
    _interrupt_midway(proc, out, sig)
    began = time.monotonic()
    _, err = proc.communicate(timeout=10)
    assert time.monotonic() - began < 3, "Ctrl-C must stop the run promptly"
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    partial = out.read_bytes()
    assert 0 < len(partial) < len(reference)
    if sig == signal.SIGINT:
        assert partial.endswith(b"\n") and reference.startswith(partial)  # flushed and intact
        assert b"--resume" in err
        # Ctrl-C can land between a line's write and its count: one short at worst.
        lines = partial.count(b"\n")
        assert any(f"interrupted; {n} results are in".encode() in err for n in (lines, lines - 1)), err
        assert err.count(b"parmap: interrupted") == 1, err  # not again on its own line
    resumed = cli(*args, "--resume", cwd=targets)
    assert resumed.code == 0, resumed.err
    assert out.read_bytes() == reference


@pytest.mark.parametrize("backend", ["serial", "auto"])
def test_sigterm_ends_the_run_even_inside_a_task_on_the_callers_thread(
    targets: Path, slow_input: Path, reference: bytes, tmp_path: Path, backend: str
) -> None:
    # On serial the signal lands inside fn: it was a failure of that item,
    # which --on-error skip then left out, for good, resume or not.
    out = tmp_path / "out.jsonl"
    args = ("tgt:slow_square", slow_input, "-w", "2", "-b", backend, "--on-error", "skip", "-o", out)
    proc = start(*args, cwd=targets)
    _interrupt_midway(proc, out, signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 143 and err.count(b"parmap: terminated") == 1 and b"skipped" not in err, err
    resumed = cli(*args, "--resume", cwd=targets)
    assert resumed.code == 0, resumed.err
    assert out.read_bytes() == reference


def test_a_task_raising_generator_exit_fails_its_item(targets: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n")
    result = cli("tgt:generator_exit_on_2", "in.txt", "-w", "2", "--on-error", "skip", cwd=targets)
    assert result.code == 0 and result.out == '"1"\n"3"\n', result.err
    assert "input line 2: RuntimeError: the function raised GeneratorExit (skipped)" in result.err


def test_a_resumed_failure_counts_the_results_of_earlier_runs(targets: Path, tmp_path: Path) -> None:
    write(targets / "in.txt", "1\n2\n3\n4\n")
    out = tmp_path / "out.jsonl"
    out.write_text("1\n2\n")  # an earlier run's results for lines 1 and 2
    result = cli("tgt:fail_on_3", "in.txt", "-o", out, "--resume", cwd=targets)
    assert result.code == 1
    assert f"The 2 results before it are in {out}" in result.err
    assert out.read_text() == "1\n2\n"


def test_resume_repairs_a_torn_last_line(targets: Path, slow_input: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    lines = reference.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:10]) + lines[10][:3])
    result = cli("tgt:slow_square", slow_input, "-w", "2", "-o", out, "--resume", cwd=targets)
    assert result.code == 0, result.err
    assert out.read_bytes() == reference


def test_resume_of_a_finished_run_changes_nothing(
    targets: Path, slow_input: Path, reference: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(reference)
    result = cli("tgt:slow_square", slow_input, "-o", out, "--resume", cwd=targets)
    assert result.code == 0 and out.read_bytes() == reference


def test_resume_unordered_after_kill(targets: Path, slow_input: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    args = ("tgt:slow_square", slow_input, "-w", "2", "--unordered", "-o", out)
    proc = start(*args, cwd=targets)
    _interrupt_midway(proc, out, signal.SIGKILL)
    proc.wait(timeout=10)
    assert Path(journal_path(str(out))).exists()
    resumed = cli(*args, "--resume", cwd=targets)
    assert resumed.code == 0, resumed.err
    assert Counter(out.read_bytes().splitlines()) == Counter(reference.splitlines())  # nothing lost or doubled
    assert not Path(journal_path(str(out))).exists()


def test_resume_with_skipped_failures(targets: Path, slow_input: Path, tmp_path: Path) -> None:
    expected_out = tmp_path / "expected.jsonl"
    args = ("tgt:slow_fail_sevens", slow_input, "-w", "2", "--on-error", "skip")
    assert cli(*args, "-o", expected_out, cwd=targets).code == 0
    out = tmp_path / "out.jsonl"
    proc = start(*args, "-o", out, cwd=targets)
    _interrupt_midway(proc, out, signal.SIGKILL)
    proc.wait(timeout=10)
    resumed = cli(*args, "-o", out, "--resume", cwd=targets)
    assert resumed.code == 0, resumed.err
    assert out.read_bytes() == expected_out.read_bytes()
    assert out.read_bytes().count(b"\n") == ITEMS - ITEMS // 7
