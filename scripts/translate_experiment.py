"""The translator, measured: the 2017 encoder-decoder Transformer learns English -> French number words.

1. `picochat translate train` on the numbers 0..9999 minus the held-out ones (a fixed-seed 10% test set and
   5% validation set, never trained on in any form), teacher forcing, word-level vocabularies;
2. exact match on the 1,000 held-out test numbers with greedy decoding and with beam search;
3. the cross-attention map of the held-out number with the longest French, copied to docs/translate_attention.png.

    python scripts/translate_experiment.py                  # make translate; README "The translator"

Prints one JSON line: exact match (greedy, beam), wall time of training (data, training steps and the
in-training evaluations), of the final evaluation, the machine's load, and the first errors if any.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picochat.translate.train import TranslateTrainConfig, translate_train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/translate", help="run directory (starts over unless --resume)")
    p.add_argument("--steps", type=int, default=TranslateTrainConfig.max_steps, help="optimizer steps")
    p.add_argument("--beam", type=int, default=4, help="beam width for the beam-search measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = one per core; 1 is faster when another process holds a core)")
    p.add_argument("--seed", type=int, default=1337, help="initialisation and data-order seed")
    p.add_argument("--resume", action="store_true", help="continue the run in --out instead of starting over")
    p.add_argument("--figure", default=str(ROOT / "docs" / "translate_attention.png"),
                   help="where to copy the cross-attention map ('' = do not copy)")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    t0 = time.time()
    res = translate_train(TranslateTrainConfig(out_dir=args.out, max_steps=args.steps, beam=args.beam,
                                               threads=args.threads, seed=args.seed, resume=args.resume))
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(args.out) / "attention.png", args.figure)
    print(json.dumps({"experiment": "translate en->fr number words", "test_numbers": res["test_numbers"],
                      "greedy_exact_match": res["greedy_exact_match"],
                      f"beam{args.beam}_exact_match": res[f"beam{args.beam}_exact_match"],
                      "length_penalty": res["length_penalty"], "steps": res["steps"], "params": res["params"],
                      "train_seconds": res["train_seconds"], "eval_seconds": res["eval_seconds"],
                      "total_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
                      "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
                      "greedy_errors": res["greedy_errors"][:3], "beam_errors": res["beam_errors"][:3]},
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
