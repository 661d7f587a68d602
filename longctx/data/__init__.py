"""Data layer: corpora, tokenizers, token caches, packed and ordered sampling, the DataModule."""

from longctx.data.corpus import corpus_fingerprint, load_corpus
from longctx.data.datamodule import LongDocDataModule, build_datamodule
from longctx.data.packing import OrderedStream, PackedWindows
from longctx.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "LongDocDataModule",
    "OrderedStream",
    "PackedWindows",
    "build_datamodule",
    "build_tokenizer",
    "corpus_fingerprint",
    "load_corpus",
]
