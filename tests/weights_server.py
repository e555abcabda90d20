"""A stand-in for the weight hosts on 127.0.0.1, for the model manager's tests (no test touches the internet).

It serves torchvision checkpoint files at /torchvision/<file> and hub models at
/<repo>/resolve/main/<file> the way huggingface_hub expects (HEAD with the repository commit, an
ETag and the size; GET, with Range for a resumed file; 404 with the hub's error code for a file a
repository does not have). `truncate` names paths whose body stops half-way (a network that drops
mid-file); `delay` slows every chunk down so a test (or a browser) can watch or cancel a download.
"""
from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class WeightsServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_):
                pass

            def _headers(self, body: bytes, status: int = 200, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                self.send_header("X-Repo-Commit", COMMIT)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def _find(self) -> bytes | None:
                server.requests.append((self.command, self.path))
                body = server.files.get(self.path.split("?")[0])
                if body is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Error-Message", "Entry not found")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return body

            def do_HEAD(self):
                body = self._find()
                if body is not None:
                    self._headers(body)

            def do_GET(self):
                body = self._find()
                if body is None:
                    return
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0] or 0)
                    part = body[start:]
                    self.send_response(206)
                    self.send_header("Content-Length", str(len(part)))
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
                    self.end_headers()
                else:
                    self._headers(body)
                part = body[start:]
                end = len(part) // 2 if self.path in server.truncate else len(part)
                for i in range(0, end, 64 * 1024):
                    if server.delay:
                        time.sleep(server.delay)
                    try:
                        self.wfile.write(part[i:min(i + 64 * 1024, end)])
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if end < len(part):
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_vision(self, filename: str, data: bytes) -> str:
        self.files[f"/torchvision/{filename}"] = data
        return f"/torchvision/{filename}"

    def add_hub_folder(self, repo: str, folder: Path) -> None:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                self.files[f"/{repo}/resolve/main/{f.name}"] = f.read_bytes()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
