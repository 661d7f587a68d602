"""Evaluation: what a trained model does with context, and the comparison of many runs.

perplexity.py       perplexity and bits per byte by context length, windows spread over the split
position_loss.py    loss by token position in log-spaced bins
prefix_ablation.py  fixed targets with growing visible prefixes
passkey.py          passkey retrieval by likelihood over length x depth
fact_recall.py      recall of planted facts (synthetic corpus) by distance
streaming.py        perplexity with state carried over segments (ordered-stream backends)
scoring.py          the model-facing primitives (NLL of a batch, continuation log-likelihood)
token_bytes.py      UTF-8 bytes of scored tokens (bits per byte)
documents.py        which test document each scored token belongs to; per-document sums
stats.py            intervals: documents (or trials) as units, bootstrap + Student t, Wilson
settings.py         the `eval:` config section
sections.py         the sections an evaluation runs, and how a new one registers
progress.py         one log line per section start, tenth of its work and end
run.py              evaluate_model / evaluate_checkpoint / eval.py's dispatch
outputs.py plots.py results.json, units.json, CSVs, PNGs and wandb for one run
compare.py          arms over seeds, paired differences, noise floor, equal-compute points
report.py costs.py  report mode: many runs, one line per mechanism, with training cost
"""
