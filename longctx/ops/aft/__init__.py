"""AFT's biased weighted means: `reference` (the formula for one query), `blocked` (the blocked
torch engine of aft_full, aft_local and aft_conv)."""
