"""UTF-8 bytes of scored tokens, for bits per byte.

Bits per byte divides the summed NLL (in bits) by the UTF-8 byte count of the scored text.
Counting bytes per token (rather than decoding each window) keeps the count exact and
additive when a window starts inside a multi-byte character: the byte tokenizer holds one
byte per id, and a byte-level BPE token stands for one byte per character of its vocabulary
string. Other tokenizers are counted by decoding the scored ids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tokenizers import decoders

from longctx.data.tokenizer import ByteTokenizer, HFTokenizer

ByteCounter = Callable[[torch.Tensor], int]


def byte_counter(tokenizer) -> ByteCounter:
    """A function: LongTensor of token ids -> UTF-8 bytes of the text they stand for."""
    table = _bytes_per_token(tokenizer)
    if table is None:
        return lambda ids: len(tokenizer.decode(ids.reshape(-1).tolist()).encode("utf-8"))
    lengths = torch.as_tensor(table, dtype=torch.long)
    return lambda ids: int(lengths[ids.reshape(-1).cpu()].sum())


def _bytes_per_token(tokenizer) -> np.ndarray | None:
    if isinstance(tokenizer, ByteTokenizer):
        table = np.ones(tokenizer.vocab_size, dtype=np.int64)
        table[tokenizer.eos_id] = 0  # EOS separates documents; it is not text
        return table
    if isinstance(tokenizer, HFTokenizer) and isinstance(
        tokenizer.model.decoder, decoders.ByteLevel
    ):
        table = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        added = tokenizer.model.get_added_tokens_decoder()  # plain strings, not byte-level symbols
        for token, index in tokenizer.model.get_vocab(with_added_tokens=True).items():
            if index in added:
                table[index] = (
                    0 if added[index].special else len(added[index].content.encode("utf-8"))
                )
            else:
                table[index] = len(token)  # one byte per symbol of the byte-level alphabet
        return table
    return None
