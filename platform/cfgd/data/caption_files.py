"""Captions that come with an image folder: ``captions.csv`` or ``captions.jsonl`` at its root.

``data.captions=file`` with ``data.source=folder`` reads one of::

    captions.csv     path,caption            (a header row; RFC 4180 quoting)
    captions.jsonl   {"path": ..., "caption": ...} per line

``path`` is the image's path relative to the folder (``dress/0001.png``, or
``train/dress/0001.png`` for a folder with train/ and test/). Every image needs exactly one
caption; a row naming no image, a duplicate, an empty or too long caption, or a
non-string is an error naming the file and the row (line), and an image without a
caption is an error naming the image.
"""

from __future__ import annotations

import csv
import json
import os

CAPTION_FILES = ("captions.csv", "captions.jsonl")


def read_caption_file(root: str, max_chars: int) -> tuple[dict[str, str], str]:
    """{relative image path: caption} from the folder's caption file, and that file's name."""
    found = [name for name in CAPTION_FILES if os.path.isfile(os.path.join(root, name))]
    if len(found) != 1:
        raise ValueError(f"{root}: data.captions=file needs exactly one of {list(CAPTION_FILES)} at the folder's "
                         f"root; found {found or 'none'}")
    path = os.path.join(root, found[0])
    rows = _csv_rows(path) if found[0].endswith(".csv") else _jsonl_rows(path)
    out: dict[str, str] = {}
    for line, image, caption in rows:
        where = f"{path}: line {line}"
        if not isinstance(image, str) or not image.strip():
            raise ValueError(f"{where}: path {image!r} is not a relative image path")
        if not isinstance(caption, str):
            raise ValueError(f"{where}: caption {caption!r} is {type(caption).__name__}, not a string")
        if not caption.strip():
            raise ValueError(f"{where}: caption is empty; the empty caption is the null condition ∅")
        if len(caption) > max_chars:
            raise ValueError(f"{where}: caption has {len(caption)} characters, at most {max_chars}")
        key = os.path.normpath(image.strip())
        if key in out:
            raise ValueError(f"{where}: a second caption for {image!r}")
        out[key] = caption
    return out, found[0]


def _csv_rows(path: str):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["path", "caption"] or len(header) != 2:
            raise ValueError(f"{path}: line 1: the header must be 'path,caption', got {header!r}")
        for row in reader:
            if len(row) != 2:
                raise ValueError(f"{path}: line {reader.line_num}: expected 2 fields (path, caption), got {len(row)}")
            yield reader.line_num, row[0], row[1]


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict) or set(obj) != {"path", "caption"}:
                raise ValueError(f"{path}: line {line}: expected an object with 'path' and 'caption', got {text.strip()[:80]!r}")
            yield line, obj["path"], obj["caption"]


def captions_for(paths: dict[str, list[str]], root: str, captions: dict[str, str], file: str) -> dict[str, list[str]]:
    """Each split's captions in its images' order; ValueError naming an image without one."""
    out, used = {}, set()
    for split, files in paths.items():
        texts = []
        for p in files:
            rel = os.path.normpath(os.path.relpath(p, root))
            if rel not in captions:
                raise ValueError(f"{root}/{file}: no caption for image {rel!r}")
            texts.append(captions[rel])
            used.add(rel)
        out[split] = texts
    extra = sorted(set(captions) - used)
    if extra:
        raise ValueError(f"{root}/{file}: a caption for {extra[0]!r}, which is not an image of the folder "
                         f"({len(extra)} such row(s))")
    return out
