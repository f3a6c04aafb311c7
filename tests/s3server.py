"""A real S3 API on 127.0.0.1 for the suite and the benchmarks: moto's S3 service in its own
process, started and stopped by the caller.

moto's own `moto_server` answers every AWS service and looks the service up on each request
(~175 `stat` calls each); serving its S3 application alone roughly doubles what one Python
process answers per second. Everything else -- the S3 REST API, ListObjectsV2, multipart,
ETags, presigned URLs, error codes -- is moto's.

    python -m tests.s3server --port 9000          # serves until killed

`start()` gives an `S3Server` with the endpoint and the (made-up) credentials; `env()` is what
a client process needs in its environment (boto3, DVC's s3fs and Label Studio all read it).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "labelgate-test-access"
SECRET_KEY = "labelgate-test-secret"
REGION = "us-east-1"


@dataclasses.dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen | None
    port: int

    def env(self) -> dict[str, str]:
        """AWS variables a client process reads (the endpoint is passed separately: params.yaml
        `storage.endpoint_url`, DVC's `endpointurl`, Label Studio's `s3_endpoint`)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION,
                # botocore >= 1.36 sends aws-chunked bodies with CRC trailers by default; moto
                # takes them, but many S3-compatible servers do not. Only when required.
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

    def client(self):
        """A boto3 S3 client for setting up buckets in tests."""
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def alive(self) -> bool:
        try:
            return httpx.get(self.endpoint + "/", timeout=2.0).status_code < 500
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop the server (its data is gone with it: moto keeps buckets in memory)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def pause(self) -> None:
        """The server stops answering (SIGSTOP): connections hang, as with a network outage."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*, port: int | None = None, log: Path | None = None,
          timeout_s: float = 120.0) -> S3Server:
    """Start the server in its own process; returns once it answers (a loaded machine may take
    a while to import moto: `timeout_s`)."""
    port = port or _free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.s3server", "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", process=proc, port=port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 test server exited with {proc.returncode}"
                               + (f"; see {log}" if log else ""))
        if server.alive():
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the S3 test server did not answer within {timeout_s:.0f} s")


def _serve(port: int) -> None:
    from moto.moto_server.werkzeug_app import create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        # keep-alive: HTTP/1.0 (werkzeug's default) costs a connection and a thread per request
        protocol_version = "HTTP/1.1"

        def log_request(self, *args, **kwargs) -> None:  # one line per GET costs ~10 %
            pass

    app = create_backend_app("s3")
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=Quiet)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    _serve(parser.parse_args().port)
