"""The parent-worker byte stream: pickled parts, raw payloads, socket buffers."""

from __future__ import annotations

import os
import pickle
import socket
import threading
from pathlib import Path

import pytest
import workfns

import parmap
from parmap import _wire
from parmap._serialization import MEMOLESS_LIMIT, dump_data, plain_text
from parmap._wire import SOCKET_BUFFER_BYTES, recv_framed, send_framed, worker_pipe


def test_big_bytes_are_pickled_by_reference_and_the_rest_copied():
    big = b"x" * 200_000
    mutable = bytearray(b"y" * 200_000)
    pickled = dump_data([big, 7, mutable], "item", [0, 1, 2])
    assert any(part is big for part in pickled.parts)
    assert pickled.nbytes == sum(len(p) for p in pickled.parts)
    mutable[:3] = b"zzz"  # after pickling: must not leak into what was pickled
    assert pickle.loads(pickled.getvalue()) == [big, 7, bytearray(b"y" * 200_000)]


def test_chunks_of_text_are_pickled_without_the_memo():
    text = ["some words " * 4] * 1000  # one object, repeated: the memo would refer back to it
    assert plain_text(text) and plain_text([b"a", b"b"])
    assert not plain_text(["a", 1]) and not plain_text([]) and not plain_text([("a",)])
    memoless, with_memo = dump_data(text, "item", range(1000)), dump_data(text, "item", range(1000), memoless=False)
    assert memoless.nbytes > with_memo.nbytes
    assert pickle.loads(memoless.getvalue()) == text


def test_a_chunk_repeating_one_big_string_is_pickled_with_the_memo_after_all():
    big = ["x" * (1 << 20)] * (MEMOLESS_LIMIT // (1 << 20) + 8)
    pickled = dump_data(big, "item", range(len(big)))
    assert pickled.nbytes < 2 * (1 << 20)
    assert pickle.loads(pickled.getvalue()) == big


@pytest.mark.parametrize("backend", ["process", "fork"])
def test_results_that_share_a_part_still_share_it(backend):
    for first, second in parmap.map(workfns.same_list_twice, range(6), workers=2, backend=backend):
        assert first is second


def test_parts_arrive_whole_through_a_socket_smaller_than_them():
    # More parts than one writev takes, and more bytes than the socket
    # buffers hold: the writer must wait for the reader part-way through.
    parts = [bytes([i % 251]) * (i * 97 % 5000) for i in range(3 * _wire._PARTS_PER_WRITE)]
    parts.append(b"z" * (3 * SOCKET_BUFFER_BYTES))
    expected = b"".join(parts)
    parent, child = worker_pipe()
    received: list[bytes | bytearray] = []
    reader = threading.Thread(target=lambda: received.append(recv_framed(child)))
    reader.start()
    try:
        send_framed(parent, parts)
    finally:
        reader.join(timeout=30)
        parent.close()
        child.close()
    assert bytes(received[0]) == expected


def test_payloads_keep_their_boundaries():
    parent, child = worker_pipe()
    try:
        send_framed(parent, [b"ab", b"", b"c"])
        send_framed(parent, [])
        send_framed(parent, [b"d" * 70_000])
        assert [bytes(recv_framed(child)) for _ in range(3)] == [b"abc", b"", b"d" * 70_000]
    finally:
        parent.close()
        child.close()


def test_a_payload_cut_short_is_an_eof():
    # A worker killed mid-send leaves a frame shorter than its length says.
    parent, child = worker_pipe()
    os.write(parent.fileno(), _wire._LENGTH.pack(10) + b"abc")
    parent.close()
    with pytest.raises(EOFError):
        recv_framed(child)
    child.close()


def test_worker_sockets_hold_a_whole_chunk_where_the_kernel_allows():
    limit = Path("/proc/sys/net/core/wmem_max")
    if not limit.exists():
        pytest.skip("the kernel's send buffer limit is Linux-only")
    wanted = min(SOCKET_BUFFER_BYTES, int(limit.read_text()))
    for end in worker_pipe():
        sock = socket.socket(fileno=end.fileno())
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= wanted
        finally:
            sock.detach()
            end.close()


def test_short_writes_resume_where_they_stopped(monkeypatch):
    # A signal can cut a blocking write short; make every write a short one.
    real_writev = _wire.os.writev

    def short_writev(fd, views):
        budget, taken = 1000, []
        for view in views:
            taken.append(view[:budget])
            budget -= len(taken[-1])
            if not budget:
                break
        return real_writev(fd, taken)

    monkeypatch.setattr(_wire.os, "writev", short_writev)
    parts = [b"a" * 2500, b"b", b"", b"c" * 999, b"d" * 4001]
    parent, child = worker_pipe()
    try:
        send_framed(parent, parts)
        assert bytes(recv_framed(child)) == b"".join(parts)
    finally:
        parent.close()
        child.close()
