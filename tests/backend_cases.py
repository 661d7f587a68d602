"""The shared test table: one entry per registered backend, with small settings.

Every backend must appear here (a test checks it), so the common tests in
test_backends_common.py cover it without new code. Keys:
- options: attention options small enough for short sequences (N >= 4x the largest window/block)
- seq_len: a length that is not a multiple of any block/chunk/window size
- state: "grows" | "bounded" | "constant" (docs/attention.md, "Streaming state")
- chunks: chunk sizes used to stream the sequence through step() (default: mixed sizes)
- model: extra config overrides (e.g. model.n_head=4)
- reference: the naive form of the layer (backend_references.py), held equal to every layer of
  the model, outputs and gradients
"""

from backend_references import REFERENCES

CASES: dict[str, dict] = {
    "full": {"reference": REFERENCES["full"], "options": {}, "seq_len": 37, "state": "grows"},
    # One sliding-window layer, then one linear layer (tiny has two layers).
    "hybrid": {
        "reference": REFERENCES["hybrid"],
        "options": {
            "pattern": ["sliding_window", "linear"],
            "backends": {"sliding_window": {"window": 4}, "linear": {"chunk_size": 8}},
        },
        "seq_len": 37,
        "state": "bounded",
    },
    # Sparse softmax family (tests/test_sparse.py has the pattern-level checks): lengths that are
    # multiples of no window, block, stride or engine tile, and >= 4x the largest reach.
    "sliding_window": {
        "reference": REFERENCES["sliding_window"],
        "options": {"window": 5},
        "seq_len": 37,
        "state": "bounded",
    },
    "local": {
        "reference": REFERENCES["local"],
        "options": {"block_size": 6, "look_back": 1},
        "seq_len": 37,
        "state": "bounded",
    },
    "dilated": {
        "reference": REFERENCES["dilated"],
        "options": {"window": 4, "dilation": 3},
        "seq_len": 53,
        "state": "bounded",
    },
    "longformer": {
        "reference": REFERENCES["longformer"],
        "options": {
            "window": 4,
            "dilation": 2,
            "dilated_heads": 2,
            "global_tokens": 3,
            "layer_windows": [3, 5],
        },
        "seq_len": 43,
        "state": "bounded",
    },
    "sparse_strided": {
        "reference": REFERENCES["sparse_strided"],
        "options": {"stride": 5, "layout": "heads"},
        "seq_len": 37,
        "state": "grows",
    },
    "sparse_fixed": {
        "reference": REFERENCES["sparse_fixed"],
        "options": {"stride": 8, "summary": 3, "layout": "heads"},
        "seq_len": 37,
        "state": "grows",
    },
    "blockwise": {
        "reference": REFERENCES["blockwise"],
        "options": {"block_size": 6, "shifts": [0, 1]},
        "seq_len": 37,
        "state": "bounded",
    },
    # Linear-time family: chunks of 8 so 37 positions span several chunks plus a partial one.
    "linear": {
        "reference": REFERENCES["linear"],
        "options": {"chunk_size": 8},
        "seq_len": 37,
        "state": "constant",
    },
    "rwkv": {"reference": REFERENCES["rwkv"], "options": {}, "seq_len": 37, "state": "constant"},
    "aft_simple": {
        "reference": REFERENCES["aft_simple"],
        "options": {},
        "seq_len": 37,
        "state": "constant",
    },
    "aft_local": {
        "reference": REFERENCES["aft_local"],
        "options": {"window": 5},
        "seq_len": 37,
        "state": "bounded",
    },
    "aft_conv": {
        "reference": REFERENCES["aft_conv"],
        "options": {"kernel": 5},
        "seq_len": 37,
        "state": "bounded",
    },
    "aft_full": {
        "reference": REFERENCES["aft_full"],
        "options": {"max_len": 64},
        "seq_len": 37,
        "state": "grows",
    },
    # Two layers: a local layer (blocks of 8) then a memory-compressed one (slots of 3).
    "memory_compressed": {
        "reference": REFERENCES["memory_compressed"],
        "options": {"compression": 3, "block_size": 8, "alternate": True},
        "seq_len": 37,
        "state": "grows",
    },
    # Blocks of 4, two selected: 37 positions = 9 complete blocks + 1,
    # most queries choose among > 2.
    "moba": {
        "reference": REFERENCES["moba"],
        "options": {"block_size": 4, "top_k": 2},
        "seq_len": 37,
        "state": "grows",
    },
    # Whole segments (the contract), then mixed chunks,
    # which this implementation also streams exactly.
    "transformer_xl": {
        "reference": REFERENCES["transformer_xl"],
        "options": {"segment_length": 8, "mem_len": 11},
        "seq_len": 37,
        "state": "bounded",
        "chunks": [[8, 8, 8, 8, 5], [16, 16, 5], [1] * 37, [5, 1, 13, 37]],
    },
}
