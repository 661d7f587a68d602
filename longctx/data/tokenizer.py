"""Tokenizers: raw UTF-8 bytes, byte-level BPE trained offline, or a user's tokenizer.json.

All three expose the same small surface (`encode`, `encode_batch`, `decode`,
`vocab_size`, `eos_id`, `name`, `identity`, and `to_state` / `save_pretrained` /
`from_pretrained` to travel with a checkpoint or an exported model); `identity` names the exact
vocabulary so token caches never mix tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers import decoders, models, pre_tokenizers, trainers

from longctx.core.files import atomic_write_text
from longctx.data.config import to_plain_dict
from longctx.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """Token id = byte value (0..255); id 256 is EOS. Needs no training and no files."""

    name = "byte"
    vocab_size = 257
    eos_id = 256
    identity = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = np.asarray(list(ids), dtype=np.int64)
        # EOS is not text; a window cut mid-character decodes with replacement marks.
        return data[data < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_state(self) -> dict[str, str]:
        return {"kind": "byte"}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """tokenizer_config.json alone: the byte tokenizer has no vocabulary file."""
        _write_tokenizer_config(directory, self.to_state())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ByteTokenizer:
        return _expect(cls, tokenizer_from_pretrained(directory), directory)


class HFTokenizer:
    """A `tokenizers.Tokenizer` with a designated EOS token (used for `bpe` and `file`)."""

    def __init__(self, model: HFTokenizerModel, name: str, eos_token: str):
        if model.token_to_id(eos_token) is None:
            warnings.warn(
                f"tokenizer {name!r} has no {eos_token!r}; adding it as a new special token",
                stacklevel=2,
            )
            model.add_special_tokens([eos_token])
        self.model = model
        self.name = name
        self.eos_id = model.token_to_id(eos_token)
        self.vocab_size = model.get_vocab_size(with_added_tokens=True)
        self.identity = f"{name}-{hashlib.sha256(model.to_str().encode('utf-8')).hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS/EOS): document separators are placed by the packer.
        return self.model.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [
            encoding.ids for encoding in self.model.encode_batch(texts, add_special_tokens=False)
        ]

    def decode(self, ids: Iterable[int]) -> str:
        return self.model.decode(list(ids), skip_special_tokens=True)

    def to_state(self) -> dict[str, str]:
        return {
            "kind": "tokenizers",
            "name": self.name,
            "eos_token": self.model.id_to_token(self.eos_id),
            "tokenizer_json": self.model.to_str(),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """tokenizer.json (the `tokenizers` library's file, as Hugging Face names it) and
        tokenizer_config.json (which tokenizer, its EOS token)."""
        state = self.to_state()
        atomic_write_text(Path(directory) / TOKENIZER_FILE, state.pop("tokenizer_json"))
        _write_tokenizer_config(directory, state)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> HFTokenizer:
        return _expect(cls, tokenizer_from_pretrained(directory), directory)


Tokenizer = ByteTokenizer | HFTokenizer
TextSource = Iterable[str] | Callable[[], Iterable[str]]

# A tokenizer saved with a model (Hugging Face's file names).
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_from_state(state: dict[str, str]) -> Tokenizer:
    """The tokenizer `to_state()` described (as stored in a checkpoint): plain strings, no
    training and no files needed."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tokenizers":
        model = HFTokenizerModel.from_str(state["tokenizer_json"])
        return HFTokenizer(model, name=state["name"], eos_token=state["eos_token"])
    raise ConfigError(f"unknown stored tokenizer kind {kind!r}; expected byte or tokenizers")


def tokenizer_from_pretrained(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer `save_pretrained` wrote into `directory`."""
    config_path = Path(directory) / TOKENIZER_CONFIG
    if not config_path.is_file():
        raise ConfigError(
            f"{directory} holds no {TOKENIZER_CONFIG}; export the checkpoint again with "
            "`python export.py`, which saves the tokenizer beside the weights"
        )
    state = json.loads(config_path.read_text())
    if state.get("kind") == "tokenizers":
        state["tokenizer_json"] = (Path(directory) / TOKENIZER_FILE).read_text()
    return tokenizer_from_state(state)


def _expect(cls: type, tokenizer: Tokenizer, directory: str | os.PathLike) -> Tokenizer:
    if not isinstance(tokenizer, cls):
        raise ConfigError(
            f"{directory} holds a {type(tokenizer).__name__}, not a {cls.__name__}; load it "
            "with tokenizer_from_pretrained, which reads either"
        )
    return tokenizer


def _write_tokenizer_config(directory: str | os.PathLike, state: dict[str, str]) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(directory) / TOKENIZER_CONFIG, json.dumps(state, indent=2) + "\n")


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int, max_train_bytes: int | None
) -> HFTokenizerModel:
    model = HFTokenizerModel(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s exactly.
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(_take_bytes(texts, max_train_bytes), trainer=trainer)
    return model


def _take_bytes(texts: Iterable[str], max_bytes: int | None) -> Iterable[str]:
    """Stop once max_bytes of text were yielded: merges settle long before a 10 GB corpus ends."""
    if max_bytes is None:
        yield from texts
        return
    seen = 0
    for text in texts:
        yield text
        seen += len(text.encode("utf-8"))
        if seen >= max_bytes:
            return


def build_tokenizer(
    tok_cfg,
    train_texts: TextSource | None = None,
    cache_dir: str | os.PathLike | None = None,
    corpus_fingerprint: str | None = None,
) -> Tokenizer:
    """Build the tokenizer named by `tok_cfg.name` (byte | bpe | file).

    For `bpe`, `train_texts` is the train split's texts (an iterable, or a
    zero-argument callable returning one so that a cache hit never loads the
    corpus). The trained tokenizer is cached as
    `<cache_dir>/tokenizers/bpe-<vocab_size>-<corpus_fingerprint>.json` and reused;
    without a fingerprint or cache_dir it is trained in memory every time.
    """
    cfg = to_plain_dict(tok_cfg)
    kind = cfg["name"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "file":
        path = Path(cfg["path"]).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"tokenizer.path={path} does not exist; give the path of a tokenizer.json"
            )
        return HFTokenizer(
            HFTokenizerModel.from_file(str(path)),
            name=f"file:{path.stem}",
            eos_token=cfg.get("eos_token") or EOS_TOKEN,
        )
    if kind == "bpe":
        vocab_size = int(cfg["vocab_size"])
        cached = None
        if cache_dir is not None and corpus_fingerprint is not None:
            cached = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{corpus_fingerprint}.json"
            if cached.is_file():
                return HFTokenizer(
                    HFTokenizerModel.from_file(str(cached)), name="bpe", eos_token=EOS_TOKEN
                )
        if train_texts is None:
            raise ValueError("training a bpe tokenizer needs train_texts (the train split's texts)")
        texts = train_texts() if callable(train_texts) else train_texts
        model = train_byte_level_bpe(texts, vocab_size, cfg.get("max_train_bytes"))
        if cached is not None:
            atomic_write_text(cached, model.to_str())
        return HFTokenizer(model, name="bpe", eos_token=EOS_TOKEN)
    raise ConfigError(f"unknown tokenizer name {kind!r}; expected byte, bpe or file")
