"""Captions measured from pixels (cfgd.data.attributes, cfgd.data.captions) and the shards'
caption column: the attribute judge on images whose attributes are known by construction,
held-out combinations never written, the column and its metadata round-tripped, bad
captions refused naming the row."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cfgd.config import ConfigError, load_config
from cfgd.data.attributes import ATTRIBUTES, fit_thresholds, levels, measure
from cfgd.data.captions import SYNONYMS, class_word, parse_holdout, write_captions
from cfgd.data.prepare import prepare
from cfgd.data.shards import MAX_CAPTION_CHARS, read_split_meta, write_shards
from builders import digits_uint8

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["T-shirt/top", "Dress", "Ankle boot"]


def _square(size: int, value: int, stripes: bool = False) -> np.ndarray:
    """A 28×28×1 uint8 image: a centred size×size object of intensity value (striped: every other row at 60 %)."""
    img = np.zeros((28, 28, 1), np.uint8)
    lo = (28 - size) // 2
    img[lo:lo + size, lo:lo + size] = value
    if stripes:
        img[lo:lo + size:2, lo:lo + size] = int(value * 0.6)
    return img


def test_measure_reads_brightness_size_and_texture_off_the_pixels():
    imgs = np.stack([_square(10, 100), _square(10, 250), _square(20, 100), _square(20, 250, stripes=True)])
    m = measure(imgs)
    np.testing.assert_allclose(m["size"], [100 / 784, 100 / 784, 400 / 784, 400 / 784])
    np.testing.assert_allclose(m["brightness"][:3], [100 / 255, 250 / 255, 100 / 255])
    np.testing.assert_allclose(m["texture"][:3], 0, atol=1e-12)  # one intensity: no spread
    assert m["texture"][3] > 0.1  # stripes


def test_levels_use_per_class_terciles_fitted_on_training_images():
    # Class 0: brightness 60..240; class 1: brightness 200..250 (a "dark" dress is still bright).
    imgs = np.stack([_square(12, v) for v in np.linspace(60, 240, 30).astype(int)]
                    + [_square(12, v) for v in np.linspace(200, 250, 30).astype(int)])
    labels = np.repeat([0, 1], 30)
    th = fit_thresholds(imgs, labels, 2)
    lv = levels(imgs, labels, th)["brightness"]
    assert np.bincount(lv[:30]).tolist() == [10, 10, 10] and np.bincount(lv[30:]).tolist() == [10, 10, 10]
    probe = levels(np.stack([_square(12, 210)] * 2), np.array([0, 1]), th)["brightness"]
    assert probe.tolist() == [2, 0]  # light for class 0, dark for class 1
    with pytest.raises(ValueError, match="class 2 has no training images"):
        fit_thresholds(imgs, labels, 3)


def test_captions_name_the_class_and_measured_levels_and_never_a_held_out_combination():
    n = 600
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    lv = {a: rng.integers(0, 3, n) for a in ATTRIBUTES}
    held = parse_holdout(["Dress:dark", "ankle boot:patterned"], NAMES)
    assert held == {(1, "brightness", 0), (2, "texture", 2)}
    caps = write_captions(labels, lv, NAMES, held, seed=3)
    assert caps == write_captions(labels, lv, NAMES, held, seed=3)  # seeded
    words = {lvl: set(SYNONYMS[lvl]) for lvl in SYNONYMS}
    named_any = 0
    for c, cap, i in zip(labels, caps, range(n)):
        assert class_word(NAMES[c]) in cap
        tokens = set(cap.replace(",", " ").split())
        for attr, names in ATTRIBUTES.items():
            for j, lvl in enumerate(names):
                if lvl in words and tokens & words[lvl]:
                    assert lv[attr][i] == j, (cap, attr, lv[attr][i])  # only the measured level is named
                    named_any += 1
        if c == 1:
            assert not tokens & words["dark"], cap
        if c == 2:
            assert not tokens & words["patterned"], cap
    assert named_any > n  # most captions name something; "medium" is never named
    # The held-out levels still occur among the images, just never in words:
    assert np.sum((labels == 1) & (lv["brightness"] == 0)) > 0
    with pytest.raises(ValueError, match=r"'Dress:purple' is not 'class:level'"):
        parse_holdout(["Dress:purple"], NAMES)


def _digit_caps(n: int) -> list[str]:
    return [f"a digit {i % 10}" for i in range(n)]


def test_caption_column_round_trips_with_its_metadata(tmp_path):
    images, labels = digits_uint8()
    names = [str(i) for i in range(10)]
    conditions = {"caption": {"source": "test"}}
    write_shards(str(tmp_path), "train", images[:50], labels[:50], names, rows_per_shard=20,
                 captions=_digit_caps(50), conditions=conditions)
    meta = read_split_meta(str(tmp_path), "train")
    assert meta.conditions == conditions and meta.num_rows == 50 and len(meta.files) == 3
    got = [c for f in meta.files for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist()]
    assert got == _digit_caps(50)
    # Label-only data sets have no conditions and no caption column.
    write_shards(str(tmp_path), "test", images[:5], labels[:5], names)
    plain = read_split_meta(str(tmp_path), "test")
    assert plain.conditions == {} and "caption" not in pq.read_schema(plain.files[0]).names


@pytest.mark.parametrize("bad,message", [
    ("", r"row 3: caption is empty; the empty caption is the null condition"),
    (7, r"row 3: caption 7 is int, not str"),
    ("x" * (MAX_CAPTION_CHARS + 1), rf"row 3: caption has {MAX_CAPTION_CHARS + 1} characters, at most"),
])
def test_bad_captions_are_refused_naming_the_row_and_nothing_is_written(tmp_path, bad, message):
    images, labels = digits_uint8()
    caps = _digit_caps(6)
    caps[3] = bad
    with pytest.raises(ValueError, match=message):
        write_shards(str(tmp_path), "train", images[:6], labels[:6], [str(i) for i in range(10)], captions=caps)
    assert not (tmp_path / "train").exists()


def test_a_declared_condition_without_its_column_is_refused(tmp_path):
    import pyarrow as pa

    images, labels = digits_uint8()
    write_shards(str(tmp_path), "train", images[:4], labels[:4], [str(i) for i in range(10)], captions=_digit_caps(4))
    path = read_split_meta(str(tmp_path), "train").files[0]
    table = pq.read_table(path)
    pq.write_table(table.drop(["caption"]).replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(ValueError, match=r"declares condition 'caption' but the column is missing"):
        read_split_meta(str(tmp_path), "train")
    with pytest.raises(ValueError, match=r"conditions must map condition columns"):
        from cfgd.data.shards import _parse_cfgd_metadata

        meta = b'{"class_names": ["a"], "height": 1, "width": 1, "channels": 1, "format_version": 1, ' \
               b'"conditions": {"smell": {}}}'
        _parse_cfgd_metadata(pa.schema([], metadata={b"cfgd": meta}), "x.parquet")


def test_prepare_writes_attribute_captions_and_rewrites_when_asked_otherwise(tmp_path):
    images, labels = digits_uint8()
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=images[:400, ..., 0], y_train=labels[:400], x_test=images[400:500, ..., 0],
             y_test=labels[400:500])
    root = str(tmp_path / "shards")
    metas = prepare("npz", str(npz), root, captions="attributes", caption_holdout=["3:light"])
    cap = metas["train"].conditions["caption"]
    assert cap["source"] == "attributes" and cap["holdout"] == ["3:light"]
    assert len(cap["thresholds"]["brightness"]) == 10
    train = pq.read_table(metas["train"].files[0]).to_pydict()
    lv = levels(images[:400], labels[:400], cap["thresholds"])
    assert all(c.split()[-1] == str(y) or f"{y}," in c for c, y in zip(train["caption"], train["label"]))
    light3 = [c for c, y, b in zip(train["caption"], train["label"], lv["brightness"]) if y == 3 and b == 2]
    assert light3 and not any(set(c.replace(",", " ").split()) & set(SYNONYMS["light"]) for c in light3)
    # Asked without captions, the captioned shards are rewritten (not silently kept).
    plain = prepare("npz", str(npz), root)
    assert plain["train"].conditions == {}


def test_caption_settings_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"data\.captions='pixels' is not valid; it must be one of \['', 'attributes', 'file'\]"):
        load_config(None, ["data.captions=pixels"])
    with pytest.raises(ConfigError, match=r"data\.caption_holdout=\['Dress:dark'\] is not valid"):
        load_config(None, ["data.caption_holdout=[Dress:dark]"])
    load_config(None, ["data.captions=attributes", "data.caption_holdout=[Dress:dark]"])


def test_prepare_job_reports_the_caption_condition(tmp_path):
    images, labels = digits_uint8()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=images[:100, ..., 0], y_train=labels[:100], x_test=images[100:130, ..., 0],
             y_test=labels[100:130])
    proc = subprocess.run([sys.executable, "jobs/prepare_data.py", "data.source=npz", f"data.source_path={npz}",
                           f"data.root={tmp_path / 'out'}", "data.captions=attributes", "data.caption_holdout=[7:dark]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: 100 rows of 8x8x1, 10 classes, conditions ['caption'], 1 shard(s)" in proc.stdout
    bad = subprocess.run([sys.executable, "jobs/prepare_data.py", "data.source=npz", f"data.source_path={npz}",
                          f"data.root={tmp_path / 'out2'}", "data.captions=attributes",
                          "data.caption_holdout=[7:purple]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "'7:purple' is not 'class:level'" in (bad.stdout + bad.stderr)


# ---------------------------------------------------------------- the tokenizer


def test_tokenizer_round_trips_through_json_and_states_its_rules():
    from cfgd.data.tokenizer import CaptionTokenizer, build

    tok = build(["a light dress", "dress, pale, large", "a dark patterned bag"], max_tokens=6)
    again = CaptionTokenizer.from_json(tok.to_json())
    texts = ["A Light DRESS", "", "a purple dress", "bag, dark"]
    a, b = tok.encode(texts), again.encode(texts)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.lengths.tolist() == [3, 0, 3, 3] and a.unknown.tolist() == [0, 0, 1, 0]
    assert (a.ids[1] == 0).all()  # "" is ∅: all padding
    np.testing.assert_array_equal(a.ids[0], tok.encode(["a light dress"]).ids[0])  # NFKC + lower case
    with pytest.raises(ValueError, match=r"prompt\[0\] has 7 tokens \(words and punctuation\), at most 6"):
        tok.encode(["a light dress , pale , large"])
    with pytest.raises(ValueError, match=r"negative_prompt\[1\] must be a string, got int"):
        tok.encode(["a", 3], field="negative_prompt")
    with pytest.raises(ValueError, match="not a cfgd caption tokenizer"):
        CaptionTokenizer.from_json('{"vocab": {}}')


def test_prepare_job_writes_the_tokenizer_of_the_training_captions(tmp_path):
    from cfgd.data.shards import read_captions
    from cfgd.data.tokenizer import CaptionTokenizer

    images, labels = digits_uint8()
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=images[:200, ..., 0], y_train=labels[:200], x_test=images[200:230, ..., 0],
             y_test=labels[200:230])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/prepare_data.py", "data.source=npz", f"data.source_path={npz}",
                           f"data.root={out}", "data.captions=attributes"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = CaptionTokenizer.from_json((out / "tokenizer.json").read_text())
    assert f"tokenizer: {tok.vocab_size} tokens, at most 32 per caption: {out}/tokenizer.json" in proc.stdout
    enc = tok.encode(read_captions(str(out), "train"))
    assert enc.unknown.sum() == 0 and (enc.lengths > 0).all()  # every training word is in the vocabulary
    assert tok.encode(read_captions(str(out), "test")).unknown.sum() == 0  # same templates and classes


def _folder(root: Path, n_per_class: int = 3) -> list[str]:
    """An image folder of two classes, 8x8 grayscale PNGs; returns the images' relative paths."""
    from PIL import Image

    rels = []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((8, 8), 40 * c + 10 * i, np.uint8), mode="L").save(root / name / f"{i}.png")
            rels.append(f"{name}/{i}.png")
    return rels


def test_an_image_folder_brings_its_own_captions_in_csv_or_jsonl(tmp_path):
    import json

    src = tmp_path / "src"
    rels = _folder(src)
    lines = ["path,caption"] + [f'{r},"a {r.split("/")[0]}, number {r[-5]}"' for r in rels]
    (src / "captions.csv").write_text("\n".join(lines) + "\n")
    metas = prepare("folder", str(src), str(tmp_path / "data"), test_fraction=0.34, captions="file")
    assert metas["train"].conditions["caption"] == {"source": "file", "file": "captions.csv", "holdout": []}
    table = pq.read_table(metas["train"].files[0]).to_pylist() + pq.read_table(metas["test"].files[0]).to_pylist()
    names = ["cat", "dog"]
    assert sorted(r["caption"] for r in table) == sorted(f"a {r.split('/')[0]}, number {r[-5]}" for r in rels)
    assert all(r["caption"].startswith(f"a {names[r['label']]}") for r in table)  # each row its own image's

    (src / "captions.csv").unlink()
    rows = [{"path": r, "caption": f"a {r}"} for r in rels]
    bad_cases = [
        (rows[:-1], "no caption for image 'dog/2.png'"),
        (rows + [{"path": "cow/0.png", "caption": "a cow"}], "a caption for 'cow/0.png', which is not an image"),
        (rows[:1] + [{"path": rels[0], "caption": "again"}] + rows[1:], "line 2: a second caption for 'cat/0.png'"),
        ([{**rows[0], "caption": " "}] + rows[1:], "line 1: caption is empty"),
        ([{**rows[0], "caption": 7}] + rows[1:], "line 1: caption 7 is int, not a string"),
        ([{**rows[0], "caption": "x" * (MAX_CAPTION_CHARS + 1)}] + rows[1:], "line 1: caption has 1001 characters"),
    ]
    for content, words in bad_cases:
        (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in content) + "\n")
        with pytest.raises(ValueError, match=re.escape(words)):
            prepare("folder", str(src), str(tmp_path / "bad"), test_fraction=0.34, captions="file", overwrite=True)
    (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"captions.jsonl: line 7: not JSON"):
        prepare("folder", str(src), str(tmp_path / "bad"), test_fraction=0.34, captions="file", overwrite=True)
    (src / "captions.csv").write_text("file,text\n")
    with pytest.raises(ValueError, match=r"exactly one of \['captions.csv', 'captions.jsonl'\]"):
        prepare("folder", str(src), str(tmp_path / "bad"), test_fraction=0.34, captions="file", overwrite=True)
    with pytest.raises(ValueError, match="data.source=folder"):
        prepare("npz", str(src), str(tmp_path / "bad"), captions="file")


def test_a_paired_folder_gives_each_image_its_conditioning_image(tmp_path):
    from PIL import Image

    src, cond = tmp_path / "src", tmp_path / "cond"
    rels = _folder(src)
    for r in rels:  # the paired image: 4x4, its value tied to the source's
        (cond / r).parent.mkdir(parents=True, exist_ok=True)
        value = int(np.asarray(Image.open(src / r))[0, 0])
        Image.fromarray(np.full((4, 4), 255 - value, np.uint8), mode="L").save(cond / r)
    spec = {"transform": "paired", "source": str(cond)}
    metas = prepare("folder", str(src), str(tmp_path / "data"), test_fraction=0.34, image_condition=spec)
    assert metas["train"].conditions["cond_image"] == {**spec, "height": 4, "width": 4, "channels": 1}
    from cfgd.data.images import decode_png

    for split in ("train", "test"):
        for r in pq.read_table(metas[split].files[0]).to_pylist():
            assert decode_png(r["cond_image"])[0, 0, 0] == 255 - decode_png(r["image"])[0, 0, 0]
    (cond / rels[-1]).unlink()
    with pytest.raises(ValueError, match=re.escape(f"no conditioning image '{rels[-1]}'")):
        prepare("folder", str(src), str(tmp_path / "bad"), test_fraction=0.34, image_condition=spec)
    with pytest.raises(ConfigError, match="data.cond_source_path"):
        load_config(None, ["data.image_condition=paired"])
