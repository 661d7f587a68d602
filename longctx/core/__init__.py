"""Pieces every layer of longctx may use: positional schemes, streaming-state helpers, dtype and
device policies, atomic file writes. Nothing here imports any other part of the package."""
