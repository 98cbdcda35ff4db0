"""Convert a labelled image source into train/test Parquet shards (PNG bytes + label).

    python jobs/prepare_data.py --config jobs/configs/fashion_mnist.yaml
    python jobs/prepare_data.py data.source=folder data.source_path=/data/pets data.root=outputs/data/pets

Sources: fashion_mnist (Debian package dataset-fashion-mnist), idx (a directory of
MNIST-format files), folder (one subfolder per class), npz (x_train, y_train,
x_test, y_test). Existing shards are kept unless data.overwrite=true. data.captions=attributes
adds captions, data.image_condition=low_res|masked a conditioning image made from each image.
"""

import time

from cfgd.cli import fail, job
from cfgd.data.prepare import image_condition_of, prepare
from cfgd.data.shards import read_captions

if __name__ == "__main__":
    with job(__doc__, "prepare_data", sections=("data", "storage")) as cfg:
        d = cfg.data
        t0 = time.perf_counter()
        try:
            metas = prepare(d.source, d.source_path or None, d.root, d.rows_per_shard, d.test_fraction,
                            d.overwrite, storage=cfg.storage, captions=d.captions,
                            caption_holdout=d.caption_holdout, image_condition=image_condition_of(d))
        except (ValueError, FileNotFoundError) as err:
            fail(err)
        for split, m in metas.items():
            extra = f", conditions {sorted(m.conditions)}" if m.conditions else ""
            print(f"{split}: {m.num_rows} rows of {m.height}x{m.width}x{m.channels}, {m.num_classes} classes"
                  f"{extra}, {len(m.files)} shard(s) under {d.root}/{split}")
        if "caption" in metas["train"].conditions:  # the tokenizer text-conditioned models will carry
            from cfgd.data.tokenizer import write_for_dataset

            tok, uri = write_for_dataset(d.root, read_captions(d.root, "train", cfg.storage), cfg.storage)
            print(f"tokenizer: {tok.vocab_size} tokens, at most {tok.max_tokens} per caption: {uri}")
        print(f"done in {time.perf_counter() - t0:.1f} s")
