"""The exploration loop behind the calibration table in README.md (not part of the package).

A plain AdamW loop over the project's own model (`longctx.build_model`) and MQAR generator
(`longctx.data.mqar`), so that many small settings could be tried without a Hydra run each:
the same optimizer settings as train.py (AdamW, betas 0.9/0.95, weight decay 0.1 on matrices,
gradient clipping at 1.0, linear warmup), batches drawn at random from the generated training
examples, one setting per batch, and greedy accuracy on the answers of fresh validation examples
every `--every` steps. It stops once every validation setting passes `--stop`.

    PYTHONPATH=. python docs/results/mqar_cpu/calibration_loop.py --d 32 --heads 2 \\
        --mlp_hidden 32 --vocab 16 --mix 16:2 --batch 128 --seed 1 --stop 0.95
"""

import argparse
import json
import math

import torch
from torch.nn import functional as F

from longctx.data.mqar import IGNORE_INDEX, MQARTask, generate_mqar
from longctx.model import build_model


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--attention", default="full")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--position", default="rope")
    p.add_argument("--mlp_hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--mix", default="64:4", help="training settings seq_len:pairs, comma-separated")
    p.add_argument("--test", default="", help="validation settings; default: --mix")
    p.add_argument("--power", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--cosine", type=int, default=0, help="1: cosine to 0.1 lr over --steps")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--examples", type=int, default=100000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--stop", type=float, default=0.95)
    return p.parse_args()


def settings(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def main() -> None:
    a = arguments()
    torch.manual_seed(a.seed)
    cfg = {
        "model": {
            "n_layer": a.layers,
            "n_head": a.heads,
            "d_model": a.d,
            "mlp": "gelu",
            "mlp_hidden": a.mlp_hidden,
            "norm": "layernorm",
            "position": a.position,
            "rope_base": 10000.0,
            "tie_embeddings": True,
            "bias": False,
            "dropout": 0.0,
        },
        "attention": {"name": a.attention, "kernel": "auto"},
        "context_length": 1024,
    }
    model = build_model(cfg, a.vocab)
    mix = settings(a.mix)
    tasks = {s: MQARTask(a.vocab, s[0], s[1], power_a=a.power) for s in mix + settings(a.test)}
    # Training examples depend on the seed; validation examples on the length only.
    train = [generate_mqar(tasks[s], a.examples, a.seed + 100 + s[0]) for s in mix]
    held_out = {s: generate_mqar(tasks[s], 500, 999 + s[0]) for s in settings(a.test) or mix}
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=a.lr,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < a.warmup:
            return (step + 1) / a.warmup
        if not a.cosine:
            return 1.0
        t = (step - a.warmup) / max(1, a.steps - a.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @torch.no_grad()
    def accuracy(examples) -> float:
        model.eval()
        correct = answered = 0
        for first in range(0, len(examples), 250):
            inputs = examples.inputs[first : first + 250]
            targets = examples.targets[first : first + 250]
            answers = targets != IGNORE_INDEX
            correct += int((model(inputs).argmax(-1)[answers] == targets[answers]).sum())
            answered += int(answers.sum())
        model.train()
        return correct / answered

    generator = torch.Generator().manual_seed(a.seed)
    history = []
    for step in range(a.steps):
        examples = train[step % len(train)]
        rows = torch.randint(0, len(examples), (a.batch,), generator=generator)
        logits = model(examples.inputs[rows])
        loss = F.cross_entropy(logits.flatten(0, 1), examples.targets[rows].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % a.every == 0:
            scores = {f"{n}:{p}": round(accuracy(e), 3) for (n, p), e in held_out.items()}
            history.append((step + 1, scores))
            print(f"step {step + 1} loss {loss.item():.3f} accuracy {scores}", flush=True)
            if min(scores.values()) > a.stop:
                break
    print("RESULT", json.dumps({"args": vars(a), "last": history[-1]}))


if __name__ == "__main__":
    main()
