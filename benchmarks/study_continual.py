"""DATA continual learning vs its baselines, on one frozen backbone and one task sequence.

Learners (same tasks, same head protocol, same optimisation settings per task unless overridden):

* ``data``: DATA adapters + decomposed attention weighting (backbone frozen); both deployable forms
  (``exact`` per-sample scales, ``merged`` calibrated mean scales folded into the weights) are measured.
* ``lora``: sequential LoRA on qkv/proj/fc1/fc2 (backbone frozen, adapters keep training).
* ``finetune``: sequential full fine-tuning (the lower bound).
* ``head``: frozen backbone, only the task heads train (a control: features never drift).
* ``joint``: full fine-tuning on every task's data at once (the upper bound; no forgetting by design).

Prints the accuracy matrices and a table of final average accuracy / average forgetting.

Example (class-incremental on digits 5-9, backbone trained on 0-4)::

    edgevit train baseline --data digits --classes 0,1,2,3,4 -o runs/base04
    OMP_NUM_THREADS=1 python benchmarks/study_continual.py --model runs/base04 --protocol class --epochs 10
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgevit.data import calibration_batch
from edgevit.methods.continual import (
    FINETUNE_LR,
    ContinualConfig,
    ContinualLearner,
    data_adapters,
    deployable_forms,
    finetune,
    frozen,
    joint_task,
    make_tasks,
    run_tasks,
    task_classes,
)
from edgevit.train import TrainConfig, evaluate
from edgevit.vit import load_bundle
from edgevit.vit.adapters import inject_adapters
from edgevit.vit.model import num_blocks

LEARNERS = ("data", "lora", "finetune", "head", "joint")
Adapt = Callable[[VisionTransformer, ContinualConfig], None]


def lora(rank: int) -> Adapt:
    """Sequential LoRA of ``rank`` on every qkv/proj/fc1/fc2 (no routing: every path at scale 1)."""

    def adapt(vit: VisionTransformer, cfg: ContinualConfig) -> None:
        for linear in inject_adapters(vit, (rank,), cfg.group_size, None):
            nn.init.kaiming_uniform_(linear.down, a=math.sqrt(5))  # PEFT's LoRA init (U = 0)

    return adapt


def adapter(name: str, lora_rank: int) -> Adapt:
    return {"data": data_adapters, "lora": lora(lora_rank), "finetune": finetune, "joint": finetune,
            "head": frozen}[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="backbone bundle (not trained on the task classes)")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--protocol", default="class", choices=("class", "domain"))
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    parser.add_argument("--lr", type=float, default=ContinualConfig.training["lr"],
                        help="adapter/LoRA/head learning rate")
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                        help="learning rate of finetune and joint")
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--align", type=int, default=1024,
                        help="features sampled per class for classifier alignment (0: the naive heads)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the lora learner")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)

    vit, meta = load_bundle(args.model)
    classes = task_classes(meta, args.data, None)
    base = ContinualConfig(protocol=args.protocol, tasks=args.tasks, ranks=tuple(int(r) for r in args.ranks.split(",")),
                           components=args.components, align=args.align)
    base = base.resolved(len(classes), num_blocks(vit), vit.embed_dim)
    tasks = make_tasks(args.data, classes, meta.preprocessing, base, TrainConfig().augment)
    print(f"backbone {args.model} (classes {meta.data.classes}), protocol {args.protocol}, tasks "
          f"{[t.name for t in tasks]}, {args.epochs} epochs/task")

    results = {}
    for name in args.learners.split(","):
        lr = args.finetune_lr if name in ("finetune", "joint") else args.lr
        train_cfg = TrainConfig(epochs=args.epochs, lr=lr, batch_size=64, warmup_epochs=1, seed=args.seed)
        learner = ContinualLearner(copy.deepcopy(vit), base, args.seed, adapter(name, args.lora_rank))
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            if name == "joint":
                measured, _ = run_tasks(learner, [joint_task(tasks)], train_cfg, tmp, evaluate_on=tasks)
                measured["average_forgetting"] = None
            else:
                measured, _ = run_tasks(learner, tasks, train_cfg, tmp)
        measured["seconds"] = round(time.perf_counter() - start, 1)
        measured["trainable"] = sum(p.numel() for n, p in learner.named_parameters()
                                    if p.requires_grad or n.startswith("heads"))
        results[name] = measured
        if name == "data":
            learner.eval()
            calibration = torch.cat([calibration_batch(t.splits["val"], min(64, len(t.splits["val"])), args.seed)
                                     for t in tasks])
            for form, (model, _) in deployable_forms(learner, meta, calibration).items():
                row = [round(evaluate(model, t.splits["test"]), 5) for t in tasks]
                results[f"data-{form}"] = {"accuracy": [row], "final_average_accuracy": round(sum(row) / len(row), 5),
                                           "average_forgetting": None}
        print(f"{name}: accuracy after each task {measured['accuracy']}")

    print("\n| learner | final avg acc | avg forgetting | params trained | seconds |\n|---|---|---|---|---|")
    for name, r in results.items():
        forgetting = "-" if r["average_forgetting"] is None else f"{r['average_forgetting']:.4f}"
        print(f"| {name} | {r['final_average_accuracy']:.4f} | {forgetting} | {r.get('trainable', '-')} | "
              f"{r.get('seconds', '-')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "tasks": [t.name for t in tasks], "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
