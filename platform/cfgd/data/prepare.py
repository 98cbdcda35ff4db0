"""prepare: a labelled source → train/test Parquet shards (cfgd.data.shards), with the
condition columns asked for: captions (measured from the pixels, or an image folder's
caption file) and conditioning images (cfgd.data.image_condition).
"""

from __future__ import annotations

import os

import numpy as np

from cfgd.data.image_condition import COND_IMAGE, make_cond_images
from cfgd.data.shards import MAX_CAPTION_CHARS, DatasetMeta, read_split_meta, validate_labels, write_shards
from cfgd.data.sources import SPLITS, load_image_folder, load_images, load_source, probe_images
from cfgd.io.access import check_access
from cfgd.io.storage import StorageOptions, fsspec_fs


def image_condition_of(d) -> dict | None:
    """The ``image_condition`` argument of :func:`prepare` from a DataConfig's keys (None: none)."""
    return {"low_res": {"transform": "low_res", "factor": d.low_res_factor},
            "masked": {"transform": "masked", "keep": d.mask_keep},
            "paired": {"transform": "paired", "source": d.cond_source_path}}.get(d.image_condition)


def _same_image_condition(meta: DatasetMeta, image_condition: dict | None) -> bool:
    """Whether existing shards carry the conditioning images asked for (the same transform)."""
    have = meta.conditions.get(COND_IMAGE)
    if not image_condition:
        return have is None
    return have is not None and all(have.get(k) == v for k, v in image_condition.items())


def _same_captions(meta: DatasetMeta, captions: str, holdout) -> bool:
    """Whether existing shards carry the captions asked for (none, or the same source and holdout)."""
    have = meta.conditions.get("caption")
    if not captions:
        return have is None
    return have is not None and have.get("source") == captions and have.get("holdout") == list(holdout)


def prepare(source: str, source_path: str | None, root: str, rows_per_shard: int = 10000,
            test_fraction: float = 0.1, overwrite: bool = False,
            storage: StorageOptions | None = None, captions: str = "",
            caption_holdout: list[str] = (), image_condition: dict | None = None) -> dict[str, DatasetMeta]:
    """Convert a source into train/test Parquet shards under ``root``; returns each split's meta.

    ``captions="attributes"`` adds a caption per image written from its measured
    attributes (:func:`cfgd.data.captions.attribute_captions`), never the
    ``caption_holdout`` combinations. ``image_condition`` ({"transform": "low_res", "factor": 4}
    or {"transform": "masked", "keep": "top"}) adds a ``cond_image`` column made from each
    image (cfgd.data.image_condition); {"transform": "paired", "source": folder} reads each
    image's conditioning image from a second folder at the same relative path.

    ``root`` is a local path or an ``s3://`` URI (reached with ``storage``, a
    StorageOptions). Splits that already exist and read back cleanly
    are kept unless ``overwrite``, so running the job twice is cheap.
    """
    check_access(root, storage, write=True)  # a bad endpoint or bucket fails here, in seconds
    fs = fsspec_fs(root, storage)
    if not overwrite:
        try:
            metas = {s: read_split_meta(root, s, fs) for s in SPLITS}
            if all(_same_captions(m, captions, caption_holdout) and _same_image_condition(m, image_condition)
                   for m in metas.values()):
                return metas
        except (ValueError, FileNotFoundError):
            pass  # missing or damaged (or captioned otherwise than asked): (re)write below
    paths: dict[str, list[str]] = {}
    paired = bool(image_condition) and image_condition.get("transform") == "paired"
    for needs, what in ((captions == "file", "data.captions=file reads an image folder's caption file"),
                        (paired, "data.image_condition=paired reads a second image folder named like the first")):
        if needs and source != "folder":
            raise ValueError(f"{what}; data.source is {source!r} (use data.source=folder)")
    if source == "folder":
        splits, names = load_image_folder(source_path or "", test_fraction=test_fraction, paths_out=paths)
    else:
        splits, names = load_source(source, source_path)
    texts, conditions = ({}, None)
    if captions == "file":
        from cfgd.data.caption_files import captions_for, read_caption_file

        by_path, file = read_caption_file(source_path or "", MAX_CAPTION_CHARS)
        texts = captions_for(paths, source_path or "", by_path, file)
        conditions = {"caption": {"source": "file", "file": file, "holdout": []}}
    elif captions:
        from cfgd.data.captions import attribute_captions
        texts, conditions = attribute_captions(splits, names, list(caption_holdout))
    metas = {}
    for split, (images, labels) in splits.items():
        cond, declared = None, dict(conditions or {})
        if paired:
            cond, declared[COND_IMAGE] = paired_images(paths[split], source_path or "", image_condition["source"])
        elif image_condition:
            cond, declared[COND_IMAGE] = make_cond_images(images, **image_condition)
        write_shards(root, split, images, labels, names, rows_per_shard=rows_per_shard, filesystem=fs,
                     captions=texts.get(split), conditions=declared, cond_images=cond)
        metas[split] = read_split_meta(root, split, fs)
        validate_labels(root, split, metas[split], fs)
    return metas


def paired_images(paths: list[str], root: str, cond_root: str) -> tuple[np.ndarray, dict]:
    """The conditioning images of a folder's images (``paths`` under ``root``): the files at the
    same relative paths under ``cond_root``, one size and mode for all; ValueError naming a
    missing one."""
    cond_paths = []
    for p in paths:
        q = os.path.join(cond_root, os.path.relpath(p, root))
        if not os.path.isfile(q):
            raise ValueError(f"{cond_root}: no conditioning image {os.path.relpath(p, root)!r} for {p}")
        cond_paths.append(q)
    images = load_images(cond_paths, probe_images(cond_paths))
    _, h, w, c = images.shape
    return images, {"transform": "paired", "source": cond_root, "height": int(h), "width": int(w), "channels": int(c)}
