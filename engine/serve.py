"""An HTTP server for a trained model: send an image, get its top-k predictions back as JSON.

    python run.py task=serve task.ckpt=outputs/<date>/<time> task.port=8000
    curl --data-binary @cat.jpg http://127.0.0.1:8000/predict        # raw bytes, POST
    curl -T cat.jpg http://127.0.0.1:8000/predict                    # raw bytes, PUT
    curl -F file=@cat.jpg "http://127.0.0.1:8000/predict?topk=3"     # a form upload
    curl http://127.0.0.1:8000/health

A prediction is `Classifier`'s top-k list, [{"label": "tabby", "score": 0.91, "index": 3}, ...].
Errors are {"error": "<what is wrong and what to do>"}: 4xx for the client's mistakes, 500 only
for the server's own, after which it keeps serving. Standard library only: a thread per
connection, one forward pass at a time.

Memory is bounded: an upload over `max_bytes` is refused (413) before it is read, an image over
`max_pixels` is refused (413) from its header before any pixel is decoded, and at most
`max_decodes` images are decoded and preprocessed at once (each takes ~5 bytes a pixel while
it is decoded); a request that finds no free slot within `decode_wait_s` is answered 503
with Retry-After. Without these, 4 parallel 12000 x 12000 JPEGs took a server from 0.9 to 4.9 GB
(peak RSS); now they are refused from their headers, and 4 parallel 7900 x 7900 ones peak at
1.5 GB instead of 2.6 GB.
"""

import io
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import torch
from PIL import Image, ImageOps

from data.images import to_rgb

log = logging.getLogger(__name__)

LINGER_S = 2  # s: the longest a closing connection reads what its client still sends
ROUTES = {"/health": ("GET", "HEAD"), "/predict": ("POST", "PUT")}  # path: its methods

# Pillow stores pixels in blocks of this size. Its default, 16 MiB, is under glibc's largest
# mmap threshold (32 MiB): freed blocks of a large image stayed in the heap of the thread that
# decoded it (RSS 1.7 GB, not 0.9 GB, after two 12000 x 12000 JPEGs). Blocks above it are
# mapped and unmapped, so the memory goes back to the system when the request is answered.
PIL_BLOCK_BYTES = 64 << 20

HOW_TO_SEND = "curl --data-binary @cat.jpg URL, curl -T cat.jpg URL or curl -F file=@cat.jpg URL"


class HTTPError(Exception):
    """A reply other than 200: its status and a message that says what to do."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def decode_image(data: bytes) -> Image.Image:
    """Image file bytes as 8-bit RGB the right way up, as data.images.load_image reads a file."""
    with Image.open(io.BytesIO(data)) as image:
        return decoded(image)


def decoded(image: Image.Image) -> Image.Image:
    """An opened (header-only) image's pixels, decoded, as 8-bit RGB the right way up."""
    # in place: exif_transpose's default returns a copy even of an upright image, which made
    # each decode hold the pixels twice
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb(image)


def form_file(body: bytes, content_type: str) -> bytes:
    """The content of the one field of a multipart/form-data body (curl -F file=@cat.jpg)."""
    header = EmailMessage()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not boundary:
        raise HTTPError(400, f"Content-Type {content_type!r} names no boundary; {HOW_TO_SEND}")
    # RFC 2046: parts are separated by CRLF "--" boundary; the last one is followed by "--"
    parts = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))[1:]
    fields = []
    for part in parts:
        if part.startswith(b"--"):
            break
        head, blank, content = part.partition(b"\r\n\r\n")
        if not blank:
            raise HTTPError(400, f"malformed multipart/form-data body; {HOW_TO_SEND}")
        headers = BytesHeaderParser(policy=HTTP).parsebytes(head.lstrip(b" \t\r\n") + b"\r\n")
        fields.append((headers.get_param("name", "?", header="content-disposition"), content))
    if len(fields) != 1:
        names = ", ".join(repr(name) for name, _ in fields) or "none"
        raise HTTPError(
            400,
            f"a form upload takes exactly one field, the image; got {len(fields)} ({names}). "
            "Send one file (curl -F file=@cat.jpg URL) and ask for top-k with ?topk=N",
        )
    return fields[0][1]


class PredictionServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that answers with `classifier`'s top-k predictions."""

    daemon_threads = True
    # an idle keep-alive connection holds a thread; shutting down waits for requests, not for it
    block_on_close = False

    def __init__(
        self,
        address,
        classifier,
        topk: int = 5,
        max_bytes: int = 20_000_000,
        max_pixels: int = 64_000_000,
        max_decodes: int = 2,
        decode_wait_s: float = 10.0,
    ):
        for key, value, least in (
            ("topk", topk, "1 (a prediction lists at least 1 class)"),
            ("max_bytes", max_bytes, "1 (requests need room for an image)"),
            ("max_pixels", max_pixels, "1 (e.g. 64000000: 8000 x 8000)"),
            ("max_decodes", max_decodes, "1 (images decoded at once)"),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"task.{key}={value!r} must be a whole number of at least {least}")
        if not isinstance(decode_wait_s, int | float) or not decode_wait_s >= 0:
            raise ValueError(f"task.decode_wait_s={decode_wait_s!r} must be 0 or more seconds")
        self.classifier = classifier
        self.topk, self.max_bytes, self.max_pixels = topk, max_bytes, max_pixels
        self.max_decodes, self.decode_wait_s = max_decodes, float(decode_wait_s)
        self.decodes = threading.BoundedSemaphore(max_decodes)
        Image.core.set_block_size(max(PIL_BLOCK_BYTES, Image.core.get_block_size()))
        # torch modules are not documented as safe to call from several threads at once, and
        # one forward already uses every core (intra-op threads): one at a time loses nothing
        self.model_lock = threading.Lock()
        self._active = 0  # requests being answered
        self._idle = threading.Condition()
        host, port = address
        if ":" in host:  # an IPv6 address, such as :: (every interface) or ::1
            self.address_family = socket.AF_INET6
        try:
            super().__init__(address, RequestHandler)
        except OSError as err:
            raise OSError(
                f"cannot listen on host {host!r}, port {port} ({err}); if the port is taken, "
                "choose another task.port, or task.port=0 for any free one"
            ) from err

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def predict(self, image: torch.Tensor, topk: int) -> list[dict]:
        """Top-k of one preprocessed image (C, H, W)."""
        with self.model_lock:
            probs = self.classifier.probabilities(image.unsqueeze(0))
        return self.classifier.top(probs, topk)[0]

    @contextmanager
    def decode_slot(self):
        """One of `max_decodes` slots for decoding an image, or a 503 after `decode_wait_s`."""
        if not self.decodes.acquire(timeout=self.decode_wait_s):
            raise HTTPError(
                503,
                "the server is decoding as many images as it decodes at once "
                f"(task.max_decodes={self.max_decodes}) and none finished within "
                f"{self.decode_wait_s:g} s; send the image again shortly",
                {"Retry-After": str(max(1, math.ceil(self.decode_wait_s)))},
            )
        try:
            yield
        finally:
            self.decodes.release()

    @contextmanager
    def busy(self):
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered (True), or `timeout` seconds (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def shutdown_request(self, request):
        # a "lingering close": closing a socket with unread data resets the connection, and a
        # client still sending a refused body (413) would lose the reply; drop what it sends
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER_S)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and request.recv(1 << 16):
                pass
        except OSError:
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        # a client that hung up mid-request: nobody to answer, nothing wrong with the server
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        log.exception("error on the connection from %s", client_address)


class RequestHandler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries a Content-Length
    server_version = "imgcls-serve"
    timeout = 60  # s: an idle connection, or a client stalled mid-upload, is dropped
    # headers and body go out in two writes: without TCP_NODELAY the second waits for the
    # client's delayed ACK (40 ms on Linux), which would cap one client at ~20 requests/s
    disable_nagle_algorithm = True

    def dispatch(self):
        with self.server.busy():
            headers = {}
            try:
                status, payload = HTTPStatus.OK, self.route()
            except HTTPError as err:
                status, payload, headers = err.status, {"error": err.message}, err.headers
            except ConnectionError:  # the client hung up: nobody to answer
                raise
            except Exception as err:  # the server's fault: say so, log it, keep serving
                log.exception("%s %s failed", self.command, self.path)
                status = HTTPStatus.INTERNAL_SERVER_ERROR
                payload = {"error": f"server error ({type(err).__name__}: {err}); see its log"}
            self.reply(status, payload, headers)

    # methods with no endpoint still get a JSON 405 (or 404) rather than http.server's HTML 501
    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = dispatch

    def route(self):
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path.startswith("/predictions/"):  # TorchServe's /predictions/<model name>
            path = "/predict"
        if path not in ROUTES:
            raise HTTPError(
                404, f"no endpoint {url.path!r}: POST or PUT an image to /predict, GET /health"
            )
        methods = ROUTES[path]
        if self.command not in methods:
            raise HTTPError(
                405,
                f"{self.command} {url.path} is not supported; use {' or '.join(methods)}",
                {"Allow": ", ".join(methods)},
            )
        if path == "/health":
            classifier = self.server.classifier
            return {
                "status": "ok",
                "model": classifier.trained.model_name,
                "classes": len(classifier.classes),
                # multi-label: sigmoid scores; a label is predicted at or above the threshold
                **({"threshold": classifier.threshold} if classifier.multi_label else {}),
            }
        topk = self.query_topk(parse_qs(url.query, keep_blank_values=True))
        try:
            body = self.read_body()
        except TimeoutError as err:
            raise HTTPError(408, f"the body did not arrive within {self.timeout} s") from err
        if self.headers.get_content_type() == "multipart/form-data":
            body = form_file(body, self.headers["Content-Type"])
        return self.server.predict(self.read_input(body), topk)

    def query_topk(self, query: dict[str, list[str]]) -> int:
        unknown = sorted(set(query) - {"topk"})
        if unknown:
            raise HTTPError(400, f"unknown query parameter {unknown[0]!r}; the only one is ?topk=N")
        if "topk" not in query:
            return self.server.topk
        value = query["topk"][-1]
        if not value.isdigit() or int(value) < 1:
            raise HTTPError(
                400,
                f"topk={value!r} is not a whole number of 1 or more; "
                f"ask for ?topk=1 to ?topk={len(self.server.classifier.classes)}",
            )
        return int(value)

    def read_body(self) -> bytes:
        """The request body, refused (413) before it is read if it is larger than max_bytes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_continue()
            return self.read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(
                411, f"no Content-Length header; send the image as the body: {HOW_TO_SEND}"
            )
        if not length.strip().isdigit():
            raise HTTPError(400, f"Content-Length {length!r} is not a number of bytes")
        size = int(length)
        if size == 0:
            raise HTTPError(400, f"the request has no body; send the image: {HOW_TO_SEND}")
        self.check_size(size)
        self.send_continue()
        return self.read_exactly(size)

    def read_chunked(self) -> bytes:
        chunks, size = [], 0
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                chunk_size = int(line, 16)
            except ValueError:
                chunk_size = -1
            if chunk_size < 0:
                raise HTTPError(400, f"malformed chunked body (chunk size {line[:20]!r})")
            if chunk_size == 0:
                break
            size += chunk_size
            self.check_size(size)
            chunks.append(self.read_exactly(chunk_size))
            self.rfile.readline(1024)  # the CRLF after each chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailer fields
            pass
        if not size:
            raise HTTPError(400, f"the request has no body; send the image: {HOW_TO_SEND}")
        return b"".join(chunks)

    def check_size(self, size: int) -> None:
        if size > self.server.max_bytes:
            raise HTTPError(
                413,
                f"the body is {size} bytes, more than this server takes "
                f"(max_bytes={self.server.max_bytes}); send a smaller image or start the "
                "server with a larger task.max_bytes",
            )

    def read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise HTTPError(400, f"the body ended after {len(data)} of {size} bytes")
        return data

    def read_input(self, data: bytes) -> torch.Tensor:
        """The model's input for an uploaded image file: its size checked from the header, then
        decoded and preprocessed in one of the server's decode slots (the full-size pixels are
        dropped before the slot is given back)."""
        try:
            image = Image.open(io.BytesIO(data))  # reads the header: no pixel is decoded yet
        except Exception as err:
            raise self.not_an_image(data, err) from err
        with image:
            self.check_pixels(*image.size)
            with self.server.decode_slot():
                try:
                    picture = decoded(image)
                # any failure to decode untrusted bytes is the upload's fault, whatever PIL raises
                except Exception as err:
                    raise self.not_an_image(data, err) from err
                return self.server.classifier.to_input(picture)

    def check_pixels(self, width: int, height: int) -> None:
        if width * height > self.server.max_pixels:
            raise HTTPError(
                413,
                f"the image is {width} x {height} = {width * height:,} pixels, more than this "
                f"server decodes (task.max_pixels={self.server.max_pixels}); send a smaller "
                "image (the model sees it resized anyway) or start the server with a larger "
                "task.max_pixels",
            )

    def not_an_image(self, data: bytes, err: Exception) -> HTTPError:
        """The reply to bytes PIL could not open or decode."""
        if isinstance(err, Image.DecompressionBombError):  # PIL's own limit, above max_pixels
            return HTTPError(413, f"{err}; send a smaller image")
        hint = ""
        if self.headers.get_content_type() == "application/x-www-form-urlencoded":
            hint = " (with curl, send files with --data-binary @file: -d drops newlines)"
        reason = "" if isinstance(err, Image.UnidentifiedImageError) else f" ({err})"
        return HTTPError(
            415,
            f"the body ({len(data)} bytes, starting {data[:16]!r}) is not an image file "
            f"PIL can read{reason}; send a JPEG, PNG, WebP, ... file{hint}: {HOW_TO_SEND}",
        )

    def send_continue(self) -> None:
        # deferred from handle_expect_100: a client that asked is told to send its body only
        # once the request has passed every check that needs no body (route, topk, size)
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()

    def handle_expect_100(self) -> bool:
        return True

    def reply(self, status: int, payload, headers: dict | None = None) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:
            # the request body may be unread: what follows on this connection is not a request
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        """http.server's own refusals (malformed request line, headers too long) as JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # a method no endpoint takes
            message = f"{message}; POST or PUT an image to /predict, GET /health"
        self.reply(code, {"error": message or explain or HTTPStatus(code).phrase})

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def make_server(
    classifier, host: str = "127.0.0.1", port: int = 8000, **limits
) -> PredictionServer:
    """A server bound to host:port (0: a free port, see `.server_address`), not yet serving.

    `limits`: PredictionServer's topk, max_bytes, max_pixels, max_decodes, decode_wait_s.
    Call `.serve_forever()` (in a thread, for use in-process), then `.shutdown()` and
    `.server_close()`.
    """
    return PredictionServer((host, port), classifier, **limits)


def serve(
    classifier,
    host: str = "127.0.0.1",
    port: int = 8000,
    topk: int = 5,
    max_bytes: int = 20_000_000,
    max_pixels: int = 64_000_000,
    max_decodes: int = 2,
    decode_wait_s: float = 10.0,
) -> None:
    """Answer HTTP requests with `classifier` (an engine.predict.Classifier, loaded once by the
    caller) until SIGINT or SIGTERM, then finish the requests under way and return.

    Call from the main thread (signal handlers can only be set there).
    """
    limits = {"max_pixels": max_pixels, "max_decodes": max_decodes, "decode_wait_s": decode_wait_s}
    server = make_server(classifier, host, port, topk=topk, max_bytes=max_bytes, **limits)

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so it cannot run in this thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        name, count = classifier.trained.model_name, len(classifier.classes)
        print(f"serving {name} ({count} classes) on {server.url}", flush=True)
        server.serve_forever()
        if not server.wait_idle(timeout=10):
            log.warning("stopping with requests still being answered after 10 s")
        print(f"stopped serving on {server.url}", flush=True)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
