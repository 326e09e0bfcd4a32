"""Greedy answers of an exported HF model on a held-out prompt set: `python -m tools.sample --hf DIR --eval F`.

Uses transformers' generate on the exported directory, so it also proves the export loads.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def evaluate(hf_dir: str, eval_path: str, limit: int, max_new_tokens: int = 8) -> dict:
    import transformers

    from engine.data import read_jsonl
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    records = read_jsonl(eval_path, ("prompt", "answer"))[:limit]
    correct, samples = 0, []
    for r in records:
        ids = torch.tensor([tok.encode(r["prompt"], add_bos=True)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        text = tok.decode(out[0, ids.shape[1]:].tolist()).strip()
        correct += text == str(r["answer"])
        if len(samples) < 3:
            samples.append(f"{r['prompt']!r} -> {text!r}")
    return {"accuracy": correct / len(records), "n": len(records), "samples": samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__)
    p.add_argument("--hf", required=True, help="exported HF directory (with tokenizer.model)")
    p.add_argument("--eval", required=True, help="JSONL with prompt and answer fields")
    p.add_argument("--limit", type=int, default=100)
    args = p.parse_args(argv)
    print(json.dumps(evaluate(args.hf, args.eval, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
