"""Captions written from measured attributes (cfgd.data.attributes): a text-conditioned data
set built offline from a labelled one.

Each image gets one caption naming its class and 0–3 of its attribute levels, phrased
through several templates and synonyms ("a light dress", "dress, pale, large", "a dark
patterned bag"), drawn with a seeded generator so the same data set gets the same
captions. Held-out combinations (``"Dress:dark"``: a class and an attribute level) are
never written: an image whose level is held out gets a caption that leaves that attribute
out, so the model sees dark dresses but never the words "dark dress" together, and
evaluation can ask for them (composition).
"""

from __future__ import annotations

import numpy as np

from cfgd.data.attributes import ATTRIBUTES, OBJECT_LEVEL, fit_thresholds, levels

SYNONYMS = {
    "dark": ("dark", "black", "deep-toned"), "light": ("light", "pale", "bright"),
    "small": ("small", "little", "narrow"), "large": ("large", "big", "wide"),
    "plain": ("plain", "solid", "smooth"), "patterned": ("patterned", "textured", "detailed"),
}
# "medium" levels are not named: a caption states only what stands out.
TEMPLATES = ("a {adjs} {cls}", "{cls}, {list}", "a photo of a {adjs} {cls}", "{adjs} {cls}")


def class_word(name: str) -> str:
    """The caption word of a class name: 'T-shirt/top' → 't-shirt', 'Ankle boot' → 'ankle boot'."""
    return name.split("/")[0].strip().lower()


def parse_holdout(entries: list[str], class_names: list[str]) -> set[tuple[int, str, int]]:
    """'Dress:dark' → {(class 3, 'brightness', level 0)}; ValueError naming a bad entry."""
    words = {class_word(n): i for i, n in enumerate(class_names)} | {n.lower(): i for i, n in enumerate(class_names)}
    levels = {lvl: (attr, i) for attr, names in ATTRIBUTES.items() for i, lvl in enumerate(names) if lvl != "medium"}
    out = set()
    for entry in entries:
        cls, _, level = str(entry).partition(":")
        if cls.strip().lower() not in words or level.strip() not in levels:
            raise ValueError(f"caption holdout entry {entry!r} is not 'class:level'; classes are {class_names}, "
                             f"levels {sorted(levels)}")
        attr, i = levels[level.strip()]
        out.add((words[cls.strip().lower()], attr, i))
    return out


def phrase(cls: str, named: list[str], rng: np.random.Generator) -> str:
    """One caption of a class word and attribute level names, template and synonyms drawn from rng."""
    words = [str(rng.choice(SYNONYMS[n])) for n in named]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))] if words else "a {cls}"
    return template.format(adjs=" ".join(words), cls=cls, list=", ".join(words))


def write_captions(labels: np.ndarray, levels: dict[str, np.ndarray], class_names: list[str],
                   holdout: set[tuple[int, str, int]] = frozenset(), seed: int = 0) -> list[str]:
    """A caption per image (N,): its class and a random subset of its non-medium levels,
    leaving out held-out (class, attribute, level) combinations."""
    rng = np.random.default_rng(seed)
    out = []
    for i, c in enumerate(np.asarray(labels, dtype=np.int64)):
        named = []
        for attr in ATTRIBUTES:
            lvl = int(levels[attr][i])
            if ATTRIBUTES[attr][lvl] != "medium" and (int(c), attr, lvl) not in holdout and rng.random() < 0.7:
                named.append(ATTRIBUTES[attr][lvl])
        rng.shuffle(named)
        out.append(phrase(class_word(class_names[c]), named, rng))
    return out


def attribute_captions(splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str],
                       holdout: list[str]) -> tuple[dict[str, list[str]], dict]:
    """Captions for every split from thresholds fitted on ``train``, and the metadata describing them.

    splits: {split: (uint8 (N, H, W, C), labels (N,))}. Returns ({split: [caption] * N},
    {"caption": {"source": "attributes", "thresholds", "holdout", "object_level"}}),
    the second stored with the shards so the judge uses the same cuts.
    """
    held = parse_holdout(holdout, class_names)
    thresholds = fit_thresholds(*splits["train"], len(class_names))
    texts = {split: write_captions(y, levels(x, y, thresholds), class_names, held, seed=i)
             for i, (split, (x, y)) in enumerate(sorted(splits.items()))}
    return texts, {"caption": {"source": "attributes", "thresholds": thresholds, "holdout": list(holdout),
                               "object_level": OBJECT_LEVEL}}
