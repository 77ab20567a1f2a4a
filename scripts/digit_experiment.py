"""The digit question, measured: does a tokenizer that splits digits make arithmetic easier to learn?

For each way of tokenizing numbers (GPT-2's regex, which lets BPE merge runs of digits, and one token per
digit), in one run with everything else equal:

1. train an 8192-token BPE on the Brown training documents and measure its compression on Brown;
2. fine-tune the same randomly initialised tiny GPT (same seed, same steps, same data order by sample
   index) on addition conversations: `picochat sft` on addition2 + addition (1-3 digits);
3. score exact match on the held-out questions (`picochat eval`'s rule) that training never saw.

No pretraining, so nothing but the tokenizer differs and the run takes minutes:

    python scripts/digit_experiment.py --steps 400          # make digits; README "The digit question"

Prints one JSON line per tokenizer and a summary line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picochat.chat_template import pick_template  # noqa: E402
from picochat.checkpoints.io import load_model, save_model  # noqa: E402
from picochat.data.corpus import load_documents  # noqa: E402
from picochat.data.prepare import split_documents  # noqa: E402
from picochat.eval.chat_eval import eval_tasks  # noqa: E402
from picochat.model.config import preset  # noqa: E402
from picochat.model.gpt import GPT  # noqa: E402
from picochat.tokenizer import Tokenizer  # noqa: E402
from picochat.train.sft import SFTConfig, sft  # noqa: E402


def run_one(split_digits: bool, args, work: Path) -> dict:
    docs = list(load_documents(None))
    train_docs, val_docs = split_documents(docs, 0.05, 0)
    tok = Tokenizer.train(train_docs, 8192, split_digits=split_digits)
    val_bytes = sum(len(d.encode()) for d in val_docs)
    val_tokens = sum(map(len, tok.encode_batch(val_docs)))
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=tok.vocab_size))
    base = save_model(model, work / f"base-{split_digits}", tok)
    out = work / f"sft-{split_digits}"
    t0 = time.time()
    rows = sft(SFTConfig(base=str(base), data=f"addition2:{args.n_train},addition:{args.n_train}",
                         out_dir=str(out), seq_len=128, batch_size=16, lr=args.lr, max_steps=args.steps,
                         warmup_steps=20, eval_every=args.steps, ckpt_every=args.steps, seed=0))
    train_s = time.time() - t0
    model, tok, _ = load_model(out)
    model.eval()
    with torch.inference_mode():
        res = eval_tasks(model, tok, pick_template(tok), ["addition2", "addition"], n=args.n_eval, progress=False)
    val = [r for r in rows if "val_loss" in r]
    return {"split_digits": split_digits, "brown_bytes_per_token": round(val_bytes / val_tokens, 3),
            "example": [tok.decode([i]) for i in tok.encode("23 + 45 = 68")],
            "steps": args.steps, "train_seconds": round(train_s, 1),
            "val_loss": round(val[-1]["val_loss"], 4) if val else None,
            "val_bpb": round(val[-1]["val_bpb"], 4) if val else None,
            "addition2": res["addition2"]["accuracy"], "addition": res["addition"]["accuracy"],
            "n_eval": args.n_eval}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="SFT steps per tokenizer")
    p.add_argument("--n-train", type=int, default=3000, help="training conversations per addition set")
    p.add_argument("--which", choices=("both", "merged", "split"), default="both",
                   help="run one arm only (e.g. the two arms in two processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="SFT peak learning rate")
    p.add_argument("--n-eval", type=int, default=200, help="held-out questions per task")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"both": (False, True), "merged": (False,), "split": (True,)}[args.which]
        for split_digits in arms:
            r = run_one(split_digits, args, Path(tmp))
            results.append(r)
            print(json.dumps(r), flush=True)
    if len(results) < 2:
        return
    merged, split = results
    print(json.dumps({"summary": "digit tokenization", "addition2_merged": merged["addition2"],
                      "addition2_split": split["addition2"], "addition_merged": merged["addition"],
                      "addition_split": split["addition"],
                      "bytes_per_token_merged": merged["brown_bytes_per_token"],
                      "bytes_per_token_split": split["brown_bytes_per_token"]}))


if __name__ == "__main__":
    main()
