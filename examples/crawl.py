"""Fetching many URLs: I/O-bound work, where threads win.

The script starts its own web server on 127.0.0.1 (a free port, in a
background thread) serving generated pages, each after a short delay that
stands in for network latency, so it needs no network. It then fetches every
page three ways and compares:

* ``backend="serial"``: one request at a time; the delays add up;
* ``backend="process"``: a few processes; each still waits one page at a time;
* ``backend="thread"``: many threads; while one waits, the others wait too,
  so the delays overlap. Threads are cheap, so use many more than cores.

    python examples/crawl.py
    python examples/crawl.py --pages 20 --latency 0.02   # the quick version
"""

import argparse
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import parmap

LINK = re.compile(rb'href="([^"]+)"')


def page_body(number: int, pages: int) -> bytes:
    links = "".join(f'<a href="/page/{(number * 7 + k) % pages}">next {k}</a>\n' for k in range(3))
    words = " ".join(f"word{(number * k) % 97}" for k in range(200))
    return f"<html><body><h1>Page {number}</h1>\n{links}<p>{words}</p></body></html>".encode()


def make_handler(pages: int, latency: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(latency)
            match = re.fullmatch(r"/page/(\d+)", self.path)
            if not match or int(match.group(1)) >= pages:
                self.send_error(404)
                return
            body = page_body(int(match.group(1)), pages)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request would drown the comparison

    return Handler


class Server(ThreadingHTTPServer):
    # The default listen backlog of 5 drops connections when many threads
    # connect at once; the kernel retries them a second later, which would
    # show up as a mysterious extra second in the thread backend's time.
    request_queue_size = 128


def fetch(url: str) -> tuple[str, int, int]:
    """(url, bytes, links) for one page."""
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    return url, len(body), len(LINK.findall(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=60, help="how many pages to fetch")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the server waits before answering")
    parser.add_argument("--threads", type=int, default=16, help="workers for the thread backend")
    parser.add_argument("--processes", type=int, default=2, help="workers for the process backend")
    args = parser.parse_args()

    server = Server(("127.0.0.1", 0), make_handler(args.pages, args.latency))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    urls = [f"http://{host}:{port}/page/{n}" for n in range(args.pages)]
    print(f"serving {args.pages} pages on http://{host}:{port}/ with {args.latency * 1000:.0f} ms latency each")

    try:
        timings = {}
        expected = None
        for backend, workers in (("serial", 1), ("process", args.processes), ("thread", args.threads)):
            start = time.perf_counter()
            # chunksize=1: with I/O waits, batching pages would only serialise them.
            results = parmap.map(fetch, urls, backend=backend, workers=workers, chunksize=1)
            timings[backend] = time.perf_counter() - start
            if expected is None:
                expected = results
            assert results == expected, f"{backend} fetched something different"
            total_bytes = sum(size for _, size, _ in results)
            links = sum(count for _, _, count in results)
            print(
                f"{backend:>8} x{workers:<3} {timings[backend]:6.2f} s  "
                f"{len(results)} pages, {total_bytes / 1024:.0f} KiB, {links} links"
            )
        print(
            f"threads were {timings['serial'] / timings['thread']:.1f}x faster than serial, "
            f"{timings['process'] / timings['thread']:.1f}x faster than {args.processes} processes"
        )
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
