"""task=serve: a real server process answers real HTTP requests as Classifier would.

The module shares one server process (started with run.py, as a user does); the last test
stops it with SIGTERM. Edge cases that need control over the server run it in-process.
"""

import contextlib
import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from data.images import load_image
from engine.predict import Classifier
from engine.serve import decode_image, make_server
from tests.helpers import RUN_PY, clean_env

MAX_BYTES = 1000  # an 8x8 digit's PNG is ~100 bytes, ~300 as a form upload
STARTUP_S = 120  # importing torch and loading the model, on a busy 2-core CI machine
SERVING = re.compile(r"serving (\S+) \((\d+) classes\) on http://127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    output: list[str]  # its stdout and stderr lines so far
    reader: threading.Thread  # appends to output until the process closes its stdout


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, JSON reply, headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read()), reply.headers
    finally:
        conn.close()


def raw_request(port: int, data: bytes):
    """(status, JSON reply, headers) of bytes sent as they are: for requests http.client
    will not make (no Content-Length, a length the body never reaches)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        return reply.status, json.loads(reply.read()), reply.headers


def form(*fields: tuple[str, bytes]) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, file content) fields, as curl -F name=@file sends."""
    boundary = "------------------------d74496d66958873e"
    body = b""
    for name, content in fields:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        body += head.encode() + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [(p["label"], p["index"]) for p in got] == [(p["label"], p["index"]) for p in want]
    np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-5)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> list[Path]:
    """PNG files of 8 different digits: 8x8 grayscale, sklearn's 0..16 scaled to 0..255."""
    folder = tmp_path_factory.mktemp("digits")
    images = load_digits().images[:8]
    paths = [folder / f"digit{i}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        Image.fromarray(np.clip(image * 16, 0, 255).astype(np.uint8)).save(path)
    return paths


@pytest.fixture(scope="module")
def classifier(tiny_run) -> Classifier:
    return Classifier.load(tiny_run)


@pytest.fixture(scope="module")
def expected(classifier, digits) -> list[list[dict]]:
    return [classifier(path) for path in digits]


@contextlib.contextmanager
def serving(*overrides: str, cwd: Path):
    """python run.py task=serve <overrides> on a free port, up and healthy; killed whatever
    happens. Yields its ServerProcess."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), "task=serve", "task.port=0", *overrides],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    # drained all along: a full pipe would block the server's request log
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_S
        port = None
        while port is None:
            match = SERVING.search("".join(output))
            if match:
                port = int(match[3])
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no 'serving ... on http://...' line; output:\n{''.join(output)}")
            else:
                time.sleep(0.1)
        while True:  # listening as soon as the line is printed; polled to be sure
            try:
                if http_request(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield ServerProcess(proc, port, output, reader)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """python run.py task=serve of the tiny run, shared by the module."""
    overrides = (f"task.ckpt={tiny_run}", f"task.max_bytes={MAX_BYTES}")
    with serving(*overrides, cwd=tmp_path_factory.mktemp("serve")) as proc:
        yield proc


@pytest.fixture
def in_process(classifier):
    """A server on a free port in this process: start(**make_server kwargs) -> port."""
    servers = []

    def start(**kwargs) -> int:
        server = make_server(classifier, port=0, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_health(server, classifier):
    status, reply, _ = http_request(server.port, "GET", "/health")
    assert status == 200
    name, count = classifier.trained.model_name, len(classifier.classes)
    assert reply == {"status": "ok", "model": name, "classes": count}
    assert SERVING.search("".join(server.output)).groups()[:2] == (name, str(count))


def test_post_put_and_form_upload_predict_as_the_classifier(server, digits, expected):
    image = digits[0].read_bytes()
    status, reply, headers = http_request(server.port, "POST", "/predict", image)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert_same(reply, expected[0])

    status, reply, _ = http_request(server.port, "PUT", "/predict", image)  # curl -T digit.png
    assert status == 200
    assert_same(reply, expected[0])

    body, content_type = form(("file", image))
    status, reply, _ = http_request(
        server.port, "POST", "/predict", body, {"Content-Type": content_type}
    )
    assert status == 200
    assert_same(reply, expected[0])

    status, reply, _ = http_request(server.port, "POST", "/predictions/digits?topk=2", image)
    assert status == 200
    assert_same(reply, expected[0][:2])


def test_concurrent_requests_each_get_their_own_answer(server, digits, expected):
    images = [path.read_bytes() for path in digits] * 3  # 24 requests, 8 at a time

    def ask(image):
        return http_request(server.port, "POST", "/predict", image)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, images))
    for i, (status, reply, _) in enumerate(replies):
        assert status == 200
        assert_same(reply, expected[i % len(digits)])


def _post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


MISTAKES = {  # what a client sends: (status, words the error message must contain)
    "text": (_post("/predict", b"hello", "Content-Length: 5"), 415, "not an image"),
    "empty": (_post("/predict", b"", "Content-Length: 0"), 400, "no body"),
    "no-length": (_post("/predict", b""), 411, "Content-Length"),
    # refused from the header alone: the server would otherwise wait for 1 GB
    "too-large": (_post("/predict", b"", "Content-Length: 1000000000"), 413, "max_bytes=1000"),
    "topk-0": (_post("/predict?topk=0", b"x", "Content-Length: 1"), 400, "topk='0'"),
    "topk-word": (_post("/predict?topk=two", b"x", "Content-Length: 1"), 400, "topk='two'"),
    "unknown-query": (_post("/predict?top=3", b"x", "Content-Length: 1"), 400, "'top'"),
    "unknown-path": (b"GET /nope HTTP/1.1\r\nHost: test\r\n\r\n", 404, "/predict"),
    "get-predict": (b"GET /predict HTTP/1.1\r\nHost: test\r\n\r\n", 405, "POST or PUT"),
    "post-health": (_post("/health", b"x", "Content-Length: 1"), 405, "GET"),
}


@pytest.mark.parametrize(("request_bytes", "status", "words"), MISTAKES.values(), ids=MISTAKES)
def test_client_mistakes_get_a_4xx_that_says_what_to_do(server, request_bytes, status, words):
    got, reply, headers = raw_request(server.port, request_bytes)
    assert got == status
    assert words in reply["error"]
    assert headers["Connection"] == "close"  # the unread body cannot be taken for a request
    if status == 405:
        assert headers["Allow"]
    assert http_request(server.port, "GET", "/health")[0] == 200


def test_form_upload_of_two_files_is_refused(server, digits):
    image = digits[0].read_bytes()
    body, content_type = form(("file", image), ("topk", b"3"))
    status, reply, _ = http_request(
        server.port, "POST", "/predict", body, {"Content-Type": content_type}
    )
    assert status == 400 and "exactly one field" in reply["error"]


def test_a_body_over_max_bytes_is_refused_and_the_client_reads_why(server):
    # the refused body is not kept, but read and dropped while the connection closes: a client
    # still sending it would otherwise see a reset connection instead of the 413
    status, reply, _ = http_request(server.port, "POST", "/predict", b"x" * 3_000_000)
    assert status == 413 and "max_bytes=1000" in reply["error"]


def test_decoding_follows_exif_orientation_as_load_image(tmp_path):
    image = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "sideways.png", exif=exif)
    decoded = decode_image((tmp_path / "sideways.png").read_bytes())
    assert decoded.size == (2, 4)
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(tmp_path / "sideways.png")))


def test_chunked_upload_and_expect_100_continue(in_process, digits, expected):
    port = in_process(max_bytes=MAX_BYTES)
    image = digits[1].read_bytes()
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (image[:50], image[50:]))
    status, reply, _ = raw_request(
        port, _post("/predict", chunks + b"0\r\n\r\n", "Transfer-Encoding: chunked")
    )
    assert status == 200
    assert_same(reply, expected[1])

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            _post("/predict", b"", "Expect: 100-continue", f"Content-Length: {len(image)}")
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100")  # told to go on before sending it
        sock.sendall(image)
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        assert reply.status == 200
        assert_same(json.loads(reply.read()), expected[1])


def test_a_server_error_is_a_500_and_the_server_keeps_serving(
    in_process, classifier, digits, expected, monkeypatch
):
    port = in_process()
    forward = classifier.probabilities
    calls = []

    def fails_once(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(batch)

    monkeypatch.setattr(classifier, "probabilities", fails_once)
    image = digits[2].read_bytes()
    status, reply, _ = http_request(port, "POST", "/predict", image)
    assert status == 500 and "CUDA out of memory" in reply["error"]
    status, reply, _ = http_request(port, "POST", "/predict", image)
    assert status == 200
    assert_same(reply, expected[2])


def test_bad_settings_fail_before_serving(classifier):
    with pytest.raises(ValueError, match="topk=0"):
        make_server(classifier, port=0, topk=0)
    with pytest.raises(ValueError, match="max_bytes=0"):
        make_server(classifier, port=0, max_bytes=0)


def png_header(width: int, height: int) -> bytes:
    """A PNG file that says width x height RGB in its header, with a few bytes of pixel data:
    cheap to make and send, and only decodable as far as its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_an_image_over_max_pixels_is_refused_from_its_header(server):
    # the 12000 x 12000: decoded it takes 432 MB; its pixel data here is 64 bytes, so a
    # server that tried to decode it would answer 415 (not an image PIL can read), not 413
    status, reply, _ = http_request(server.port, "POST", "/predict", png_header(12000, 12000))
    assert status == 413
    assert "12000 x 12000 = 144,000,000 pixels" in reply["error"]
    assert "task.max_pixels=64000000" in reply["error"]
    assert http_request(server.port, "GET", "/health")[0] == 200


def test_sigterm_stops_the_server_cleanly(server):
    """Last: it stops the module's server."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    server.reader.join(timeout=10)
    assert "stopped serving" in "".join(server.output)
    with pytest.raises(ConnectionRefusedError):
        http_request(server.port, "GET", "/health")


# ---------------------------------------------------------------------------------------------
# Bounded decoding (issue 14): in-process servers whose decode slots the test holds


def test_a_request_that_finds_every_decode_slot_taken_gets_503_then_its_answer(
    classifier, digits, expected
):
    server = make_server(classifier, port=0, max_decodes=1, decode_wait_s=0.2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    image = digits[3].read_bytes()
    try:
        server.decodes.acquire()  # as a large image being decoded would hold it
        try:
            status, reply, headers = http_request(port, "POST", "/predict", image)
        finally:
            server.decodes.release()
        assert status == 503 and headers["Retry-After"] == "1"
        assert "(task.max_decodes=1) and none finished within 0.2 s" in reply["error"]
        # a header-only refusal needs no slot: it is not kept waiting behind the decodes
        server.decodes.acquire()
        try:
            status, _, _ = http_request(port, "POST", "/predict", png_header(9000, 9000))
        finally:
            server.decodes.release()
        assert status == 413
        status, reply, _ = http_request(port, "POST", "/predict", image)  # the slot is free again
        assert status == 200
        assert_same(reply, expected[3])
    finally:
        server.shutdown()
        server.server_close()


def test_bad_decode_limits_fail_before_serving(classifier):
    for key, value in (("max_pixels", 0), ("max_decodes", 1.5), ("decode_wait_s", -1)):
        with pytest.raises(ValueError, match=rf"task\.{key}={value!r} must be"):
            make_server(classifier, port=0, **{key: value})
