"""RWKV-4's WKV operator: `reference` (the stable recurrence and its state), `chunk` (the
chunk-parallel torch kernel), `fla` (flash-linear-attention's fused recurrent Triton kernel)."""
