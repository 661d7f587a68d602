"""The shared test table: one entry per registered backend, with small settings.

Every backend must appear here (a test checks it), so the common tests in
test_backends_common.py cover it without new code. Keys:
- options: attention options small enough for short sequences (N >= 4x the largest window/block)
- seq_len: a length that is not a multiple of any block/chunk/window size
- state: "grows" | "bounded" | "constant" (ATTENTION_SPEC.md, "Streaming state")
- chunks: chunk sizes used to stream the sequence through step() (default: mixed sizes)
- model: extra config overrides (e.g. model.n_head=4)
"""

CASES: dict[str, dict] = {
    "full": {"options": {}, "seq_len": 37, "state": "grows"},
}
