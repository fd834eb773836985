"""Every method against its natural references, with the shipped defaults, over seeds.

The data's classes (sorted) split into an upstream half and a downstream half. Per seed, through the same
``train_<name>`` functions as ``edgevit train`` (each method's default config and optimisation settings):

* baseline (all classes) and upstream (the first half) ViTs: the digits architecture (width 96, depth 6, 3 heads)
  at ``--img-size`` px and ``--patch-size``;
* transfer: the attention-distilled student (width 64, depth 4, 2 heads) vs the same student trained from
  scratch with the same recipe, and the teacher (the baseline);
* skip (cosine-pooled, 1/3 of attention) vs the unpruned baseline and ``last`` at the same ratio;
* memory on ``--fraction`` of the data, from the upstream model, vs the plain model fine-tuned on the same
  images with the same settings (``prepare_task`` + ``fit``: same head, epochs, lr, seed);
* prompts (BPT deep, merged) on the downstream half vs its linear probe, VPT and full fine-tuning of the same
  backbone (same epochs, at the fine-tuning lr 5e-4 of ``study_continual.py``);
* continual (DATA, class-incremental on the downstream half) vs its linear probe, the frozen backbone as a
  continual learner, sequential fine-tuning (the lower bound) and joint training on every task at once (the upper
  bound): ``train continual --bounds``.

Runs are kept under ``--work`` (a finished arm is read back, not retrained). Prints test top-1 per arm and seed,
the mean and spread, and DATA's accuracy matrices; ``--json`` writes everything. On digits (16 px) and on a
folder of photographs (``photo_folder.py``; 32 px, patch 8: the same 16 tokens)::

    python benchmarks/study_references.py --data digits --work /tmp/refs-digits --seeds 0,1,2
    python benchmarks/study_references.py --data /tmp/photos --img-size 32 --patch-size 8 --work /tmp/refs-photos
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from edgevit.data import classifier_classes
from edgevit.methods.continual import FINETUNE_LR
from edgevit.methods.memory import prepare_task
from edgevit.methods.registry import discover
from edgevit.train import fit
from edgevit.train.run import split_metrics
from edgevit.vit import read_meta

STUDENT = {"embed_dim": 64, "depth": 4, "heads": 2}


class Study:
    """One seed's arms, trained under ``--work``/seed<N>/<arm>."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.data, self.work, self.seed, self.fraction = args.data, args.work / f"seed{seed}", seed, args.fraction
        self.arch = {"img_size": args.img_size, "patch_size": args.patch_size, "embed_dim": 96, "depth": 6, "heads": 3}
        classes = classifier_classes(self.data, None)
        self.upstream, self.downstream = classes[:len(classes) // 2], classes[len(classes) // 2:]
        self.methods = discover()

    def train(self, arm: str, method: str, source: str | Path, settings: dict | None = None,
              training: dict | None = None) -> dict:
        """The bundle metrics of ``method`` trained as ``arm`` (read back when it exists)."""
        out = self.work / arm
        if not (out / "bundle.json").exists():
            m = self.methods[method]
            m.train(source, self.data, out, m.config(**(settings or {})),
                    m.train_config(**{"seed": self.seed, **(training or {})}), False)
        return read_meta(out).metrics

    def run(self) -> dict[str, dict]:
        base = self.work / "baseline"
        up = self.work / "upstream"
        rows: dict[str, dict] = {"baseline": self.train("baseline", "baseline", "vit_tiny_patch16_224", self.arch)}
        self.train("upstream", "baseline", "vit_tiny_patch16_224", {**self.arch, "classes": self.upstream})
        rows["transfer"] = self.train("transfer", "transfer", base, STUDENT)
        rows["transfer: scratch student"] = self.train("scratch", "baseline", "vit_tiny_patch16_224",
                                                       {**self.arch, **STUDENT})
        rows["skip"] = self.train("skip", "skip", base)
        rows["skip: last"] = self.train("skip-last", "skip", base, {"select": "last"})
        rows.update(self.memory(up))
        rows["prompts"] = self.train("prompts", "prompts", up)
        rows["prompts: VPT"] = self.train("vpt", "prompts", up, {"variant": "vpt"})
        rows["prompts: full fine-tune"] = self.full_finetune(up)
        rows["continual"] = self.train("continual", "continual", up, {"bounds": True})
        return rows

    def memory(self, up: Path) -> dict[str, dict]:
        rows = {"memory": self.train("memory", "memory", up, {"data_fraction": self.fraction})}
        out = self.work / "memory-plain"
        if not (out / "result.json").exists():
            train_cfg = self.methods["memory"].train_config(seed=self.seed)
            task = prepare_task(up, self.data, self.fraction, train_cfg)
            fit(task.model, task.train_set, train_cfg, out, val_set=task.val_set, description="plain")
            out.joinpath("result.json").write_text(json.dumps(split_metrics(task.model.eval(), task.meta)))
        rows["memory: plain"] = json.loads(out.joinpath("result.json").read_text())
        return rows

    def full_finetune(self, up: Path) -> dict:
        pre = read_meta(up).preprocessing
        settings = {**self.arch, "classes": self.downstream, "init": str(up / "model.safetensors"),
                    "mean": pre.mean, "std": pre.std}
        epochs = self.methods["prompts"].train_config().epochs
        return self.train("full-finetune", "baseline", "vit_tiny_patch16_224", settings,
                          {"epochs": epochs, "lr": FINETUNE_LR})


def summary(runs: list[dict[str, dict]]) -> list[tuple[str, list[float]]]:
    """(arm, test top-1 per seed), with the cheap references the methods' bundles record."""
    arms: dict[str, list[float]] = {}
    for rows in runs:
        for arm, metrics in rows.items():
            arms.setdefault(arm, []).append(metrics["test_top1"])
            references = {} if ":" in arm else metrics.get("references", {})  # a reference's are its method's
            for ref, record in references.items():
                arms.setdefault(f"{arm}: {ref}", []).append(record["test_top1"])
    return sorted(arms.items(), key=lambda item: item[0].split(":")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.1, help="memory's share of the training split")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [Study(args, int(s)).run() for s in args.seeds.split(",")]
    print(f"\n{args.data}: test top-1 per seed {args.seeds} (continual: on every task's test images at once)\n")
    print("| arm | mean | spread (max-min) | per seed |\n|---|---|---|---|")
    for arm, values in summary(runs):
        print(f"| {arm} | {statistics.mean(values):.4f} | {max(values) - min(values):.4f} | "
              f"{' '.join(f'{v:.4f}' for v in values)} |")
    print("\nDATA accuracy matrices (rows: after each task; columns: tasks) and average forgetting:")
    for seed, rows in zip(args.seeds.split(","), runs, strict=True):
        data = rows["continual"]
        for arm, c in (("DATA", data["continual"]), *data["references"].items()):
            if "accuracy" in c:
                print(f"  seed {seed} {arm}: {c['accuracy']} final average accuracy {c['final_average_accuracy']} "
                      f"forgetting {c['average_forgetting']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}))

if __name__ == "__main__":
    main()
