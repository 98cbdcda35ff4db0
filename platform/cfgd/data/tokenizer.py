"""The caption tokenizer: word-level, built from the training captions, stored as JSON.

Built once at prepare time (:func:`build`, with Hugging Face ``tokenizers``; nothing is
downloaded) and kept with the shards as ``tokenizer.json``; a text-conditioned
checkpoint carries the same JSON, so it samples without the training data. Rules a
prompt meets at sampling time (and that a request's error names):

- text is NFKC-normalised and lower-cased, then split on whitespace and punctuation;
- a word not seen in training becomes ``[UNK]`` (counted, so an edge can refuse or warn);
- at most ``max_tokens`` tokens; a longer prompt is an error, never silently cut;
- the empty caption "" is the null condition ∅: all ``[PAD]``, length 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import numpy as np

PAD, UNK = "[PAD]", "[UNK]"
MAX_TOKENS = 32  # default sequence length of a caption


@dataclass(frozen=True)
class Encoded:
    """Token ids (N, L) int64 padded with 0, lengths (N,), and unknown words per caption (N,)."""

    ids: np.ndarray
    lengths: np.ndarray
    unknown: np.ndarray


class CaptionTokenizer:
    """A word-level tokenizer with a fixed sequence length; ``to_json``/``from_json`` round trip."""

    def __init__(self, tokenizer, max_tokens: int = MAX_TOKENS):
        self._tok = tokenizer
        self.max_tokens = int(max_tokens)
        vocab = tokenizer.get_vocab()
        if vocab.get(PAD) != 0 or UNK not in vocab:
            raise ValueError(f"a caption tokenizer needs {PAD} at id 0 and {UNK}; got {PAD}={vocab.get(PAD)}")
        self.unk_id = vocab[UNK]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: Iterable[str], field: str = "prompt") -> Encoded:
        """Token ids of each text. ValueError naming ``field`` and the row for a non-str or too long text."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{field}[{i}] must be a string, got {type(t).__name__}")
        encs = self._tok.encode_batch(texts) if texts else []
        ids = np.zeros((len(texts), self.max_tokens), np.int64)
        lengths = np.zeros(len(texts), np.int64)
        unknown = np.zeros(len(texts), np.int64)
        for i, e in enumerate(encs):
            if len(e.ids) > self.max_tokens:
                raise ValueError(f"{field}[{i}] has {len(e.ids)} tokens (words and punctuation), "
                                 f"at most {self.max_tokens}: {texts[i][:80]!r}")
            ids[i, :len(e.ids)] = e.ids
            lengths[i] = len(e.ids)
            unknown[i] = sum(1 for j in e.ids if j == self.unk_id)
        return Encoded(ids, lengths, unknown)

    def to_json(self) -> str:
        import json

        return json.dumps({"max_tokens": self.max_tokens, "tokenizer": json.loads(self._tok.to_str())})

    @classmethod
    def from_json(cls, text: str) -> "CaptionTokenizer":
        import json

        from tokenizers import Tokenizer

        doc = json.loads(text)
        if not isinstance(doc, dict) or "tokenizer" not in doc or not isinstance(doc.get("max_tokens"), int):
            raise ValueError("not a cfgd caption tokenizer (expected {'max_tokens': int, 'tokenizer': {...}})")
        return cls(Tokenizer.from_str(json.dumps(doc["tokenizer"])), doc["max_tokens"])


@functools.lru_cache(maxsize=16)
def cached(text: str) -> CaptionTokenizer:
    """``CaptionTokenizer.from_json(text)``, parsed once per process for each tokenizer (decode
    tasks and samplers see the same JSON on every batch)."""
    return CaptionTokenizer.from_json(text)


TOKENIZER_FILE = "tokenizer.json"  # next to a captioned data set's splits, and in its checkpoints


def write_for_dataset(root: str, captions: Iterable[str], storage=None) -> tuple[CaptionTokenizer, str]:
    """Build the tokenizer of a data set from its training captions and store it as
    ``<root>/tokenizer.json`` (atomically: a reader sees the old file or the new one)."""
    from cfgd.io import transfers

    tok = build(captions)
    uri = f"{root.rstrip('/')}/{TOKENIZER_FILE}"
    transfers.write_bytes_atomic(uri, tok.to_json().encode(), storage)
    return tok, uri


def build(captions: Iterable[str], max_tokens: int = MAX_TOKENS) -> CaptionTokenizer:
    """A tokenizer whose vocabulary is every word of ``captions`` (plus [PAD] = 0 and [UNK])."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=[PAD, UNK], min_frequency=1,
                                                                show_progress=False))
    return CaptionTokenizer(tok, max_tokens)
