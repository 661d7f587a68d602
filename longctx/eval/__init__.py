"""Evaluation: what a trained model does with context, and the comparison of many runs.

perplexity.py       perplexity and bits per byte by context length (windows / sliding windows)
position_loss.py    loss by token position in log-spaced bins
prefix_ablation.py  fixed targets with growing visible prefixes
passkey.py          passkey retrieval by likelihood over length x depth
fact_recall.py      recall of planted facts (synthetic corpus) by distance
streaming.py        perplexity with state carried over segments (ordered-stream backends)
scoring.py          the model-facing primitives (NLL of a batch, continuation log-likelihood)
token_bytes.py      UTF-8 bytes of scored tokens (bits per byte)
settings.py         the `eval:` config section
run.py              evaluate_model / evaluate_checkpoint / eval.py's dispatch
outputs.py plots.py results.json, CSVs, PNGs and wandb for one run
report.py costs.py  report mode: many runs, one line per mechanism, with training cost
"""
