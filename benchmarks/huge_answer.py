"""Benchmark: memory of the FHIR client when a server answers a huge body (scp.web's size cap).

    .venv/bin/python benchmarks/huge_answer.py [--gib 1] [--cap-mib 64]

Starts a stand-in HTTP server in a subprocess (so its buffers are not counted) that answers
every request with a --gib GiB body, without Content-Length, then sends one FHIR request
through scp.sinks.fhir.client.FhirClient with fhir.max_response_bytes = --cap-mib MiB and
reads this process's peak RSS (VmHWM in /proc/self/status) before and after.

Prints the growth of the peak RSS, the cap, and how much of the answer was read.
Target: the request fails as retryable ("answer too large") and the peak RSS grows by at
most cap + 16 MiB. Exit status 1 when missed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
total = int(sys.argv[1])
block = b" " * 2**20
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        try:
            while sent < total:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass
        sys.stderr.write(f"sent {sent}\n")
    def log_message(self, *args):
        pass
server = HTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.handle_request()
"""


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--cap-mib", type=int, default=64)
    args = parser.parse_args()

    from scp.config import FhirConfig
    from scp.errors import DeliveryRetryable
    from scp.sinks.fhir.client import FhirClient

    server = subprocess.Popen([sys.executable, "-c", SERVER, str(int(args.gib * 2**30))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        cap = args.cap_mib * 2**20
        client = FhirClient(FhirConfig(url=f"http://127.0.0.1:{port}/R4", max_response_bytes=cap))
        before = peak_rss()
        started = time.monotonic()
        try:
            client.request("GET", "ImagingStudy")
            outcome = "answered (not expected)"
        except DeliveryRetryable as exc:
            outcome = f"retryable: {exc}"
        took = time.monotonic() - started
        grown = peak_rss() - before
        _, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    print(f"answer offered      {args.gib:g} GiB")
    print(f"cap                 {args.cap_mib} MiB")
    print(f"stand-in sent       {err.strip().removeprefix('sent ')} bytes (the rest never left it)")
    print(f"peak RSS growth     {grown / 2**20:.1f} MiB")
    print(f"time                {took:.2f} s")
    print(f"outcome             {outcome}")
    ok = outcome.startswith("retryable") and "answer too large" in outcome and grown <= cap + 16 * 2**20
    print("target met" if ok else "TARGET MISSED: peak RSS growth must stay <= cap + 16 MiB, retryable")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
