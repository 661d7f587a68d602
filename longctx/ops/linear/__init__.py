"""Causal linear attention: `reference` (the per-token recurrence), `chunk` (the chunk-parallel
torch kernel), `fla` (flash-linear-attention's chunked Triton kernel)."""
