"""Poisoning of online fine-tuning: clean-device forecast error before and after an attack, guards on and off.

Usage: ``.venv/bin/python benchmarks/poisoning.py [--quick] [--seed N] [--ablation] [--device cpu|cuda]``

The scenario is :mod:`liquidstream.pipeline.eval.poisoning` (50 clean devices with sinusoids at irregular gaps, 5
attackers sending 4x as many crafted readings): a small forecaster is pretrained on the clean fleet, then the attacked
stream goes through an :class:`~liquidstream.operators.online.learner.OnlineLearner` for a few rounds (observe, learn,
adopt when accepted, roll back when told), once with every guard on and once with every guard off.  The figure is the
clean devices' one-step forecast MSE (normalised units) on a clean evaluation stream the learner never sees.
``--ablation`` also runs each guard alone.  ``--quick`` runs fewer rounds.  Prints a table and, last, one JSON line
whose last three keys are ``clean_before``, ``clean_after_guarded``, ``clean_after_unguarded``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from liquidstream.operators.online.config import GUARDS  # noqa: E402
from liquidstream.pipeline.eval.poisoning import PoisoningRun, Scenario  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds instead of 5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true", help="also run each guard alone")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny tensors: 1 is fastest)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sc = Scenario(seed=args.seed)
    if args.quick:
        sc = replace(sc, rounds=3)
    start = time.perf_counter()
    run = PoisoningRun(sc, device=args.device)
    rows: list[tuple[str, float, int, int, float]] = []
    results: dict[str, float] = {}
    configs = [("guarded", sc.settings(guarded=True)), ("unguarded", sc.settings(guarded=False))]
    if args.ablation:
        configs += [(f"only_{g.removeprefix('guard_')}", sc.settings(guarded=False, **{g: True})) for g in GUARDS]
    for name, settings in configs:
        t = time.perf_counter()
        out = run.stream(settings)
        rows.append((name, out.clean_after, out.accepted, out.rollbacks, time.perf_counter() - t))
        results[name] = out.clean_after
    before = run.clean_before
    print(f"scenario: {sc.clean_devices} clean devices, {sc.attackers} attackers x{sc.attack_rate} rate "
          f"({sc.attack}), {sc.rounds} rounds, seed {sc.seed}, device {args.device}")
    print(f"{'learner':22s} {'clean MSE':>10s} {'vs before':>10s} {'accepted':>9s} {'rollbacks':>9s} {'seconds':>8s}")
    print(f"{'before (pretrained)':22s} {before:10.4f} {1.0:10.3f}")
    for name, after, acc, rb, secs in rows:
        print(f"{name:22s} {after:10.4f} {after / before:10.3f} {acc:9d} {rb:9d} {secs:8.1f}")
    doc: dict[str, object] = {"seed": sc.seed, "rounds": sc.rounds, "clean_devices": sc.clean_devices,
                              "attackers": sc.attackers, "attack_rate": sc.attack_rate, "attack": sc.attack,
                              "device": args.device, "seconds": round(time.perf_counter() - start, 1)}
    doc.update({f"clean_after_{k}": round(v, 5) for k, v in results.items() if k.startswith("only_")})
    doc["guarded_ratio"] = round(results["guarded"] / before, 4)
    doc["unguarded_ratio"] = round(results["unguarded"] / before, 4)
    doc["clean_before"] = round(before, 5)
    doc["clean_after_guarded"] = round(results["guarded"], 5)
    doc["clean_after_unguarded"] = round(results["unguarded"], 5)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
