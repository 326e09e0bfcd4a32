"""Generate a small, verifiable arithmetic task and its tokenizer.

    python -m tools.make_data --out data --seed 0

Writes to --out:
  arith_sft.jsonl      {"prompt": "12+35=", "response": "47"}          supervised fine-tuning
  arith_eval.jsonl     {"prompt", "response", "answer"}                held-out problems
  arith_prompts.jsonl  {"prompt", "answer"}                            prompts for RL
  pretrain.jsonl       {"text": "12 plus 35 is 47. ..."}               arithmetic facts as prose
  tokenizer.model      sentencepiece BPE trained on all of the above

Problems are a+b and a-b (a >= b) with a, b in 0..99. The demonstrations are imperfect, as human
ones are: a share ROUNDED_SFT of SFT responses give the answer rounded to the nearest ten (an
estimate, like "about 60"). A model fine-tuned on them mostly answers with estimates; the verifiable
reward accepts only the exact answer, which is what RL then has to teach. Eval and RL problems are disjoint from each
other and from every problem in the SFT and pretraining data (same numbers in another format
would leak the answer). "answer" is the bare integer; responses may start with a space.
"""

import argparse
import json
import random
from pathlib import Path

from engine.tokenizer import load_tokenizer, train_sentencepiece

N_SFT, N_EVAL, N_PROMPTS, N_PRETRAIN = 12000, 200, 1000, 2000
ROUNDED_SFT = 0.5
VOCAB_SIZE = 512

Problem = tuple[int, str, int]  # (a, "+" or "-", b)

PROMPT_FORMATS = [  # (prompt, response); response formats put a space after a spaced prompt
    ("{a}{op}{b}=", "{c}"),
    ("{a} {op} {b} =", " {c}"),
    ("What is {a} {word} {b}?", " {c}"),
]
FACT_FORMATS = [
    "{a} {word} {b} is {c}.",
    "{a} {op} {b} = {c}",
    "{a}{op}{b}={c}",
    "The {noun} of {a} and {b} is {c}.",
]
WORDS = {"+": ("plus", "sum"), "-": ("minus", "difference")}


def solve(p: Problem) -> int:
    a, op, b = p
    return a + b if op == "+" else a - b


def fill(fmt: str, p: Problem, rounded: bool = False) -> str:
    a, op, b = p
    word, noun = WORDS[op]
    c = solve(p)
    return fmt.format(a=a, op=op, b=b, c=(c + 5) // 10 * 10 if rounded else c, word=word, noun=noun)


def all_problems() -> list[Problem]:
    adds = [(a, "+", b) for a in range(100) for b in range(100)]
    subs = [(a, "-", b) for a in range(100) for b in range(a + 1)]  # non-negative results only
    return adds + subs


def make(seed: int) -> dict[str, list[dict]]:
    """All four datasets as lists of records; depends only on seed."""
    rng = random.Random(seed)
    problems = all_problems()
    rng.shuffle(problems)
    held_eval = problems[:N_EVAL]
    held_rl = problems[N_EVAL:N_EVAL + N_PROMPTS]
    pool = problems[N_EVAL + N_PROMPTS:]  # everything the model may see with its answer

    def qa(p: Problem, rounded: bool = False) -> dict:
        prompt_fmt, response_fmt = rng.choice(PROMPT_FORMATS)
        return {"prompt": fill(prompt_fmt, p), "response": fill(response_fmt, p, rounded)}

    sloppy = random.Random(seed + 2)  # its own stream: every other record stays as it was
    sft = [qa(p, sloppy.random() < ROUNDED_SFT) for p in pool[:N_SFT]]
    evals = [{**qa(p), "answer": str(solve(p))} for p in held_eval]
    prompts = [{"prompt": qa(p)["prompt"], "answer": str(solve(p))} for p in held_rl]
    pretrain = []
    for _ in range(N_PRETRAIN):
        facts = rng.sample(pool, rng.randint(1, 3))
        pretrain.append({"text": " ".join(fill(rng.choice(FACT_FORMATS), p) for p in facts)})
    return {"arith_sft": sft, "arith_eval": evals, "arith_prompts": prompts, "pretrain": pretrain}


N_PREF_TRAIN, N_PREF_EVAL = 4000, 400


def wrong_answer(rng: random.Random, c: int) -> int:
    """Another problem's answer: wrong, usually by a lot (what a reward model can learn quickly)."""
    while True:
        w = solve(rng.choice(all_problems()))
        if w != c:
            return w


def make_preferences(seed: int) -> dict[str, list[dict]]:
    """Pairs for reward-model training: the right answer is chosen, another problem's answer rejected.
    Eval pairs use the RL prompts' problems, which the reward model never sees."""
    rng = random.Random(seed + 1)  # its own stream: the other files stay as they were
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    pool, held_rl = problems[N_EVAL + N_PROMPTS:], problems[N_EVAL:N_EVAL + N_PROMPTS]

    def pair(p: Problem) -> dict:
        prompt_fmt, response_fmt = rng.choice(PROMPT_FORMATS)
        c = solve(p)
        right = response_fmt.replace("{c}", str(c))
        wrong = response_fmt.replace("{c}", str(wrong_answer(rng, c)))
        return {"prompt": fill(prompt_fmt, p), "chosen": right, "rejected": wrong}

    return {"prefs_train": [pair(p) for p in rng.sample(pool, N_PREF_TRAIN)],
            "prefs_eval": [pair(p) for p in rng.sample(held_rl, N_PREF_EVAL)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = make(args.seed)
    texts = []
    for name, records in datasets.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        texts += [r["text"] if "text" in r else r["prompt"] + r.get("response", "") for r in records]
        print(f"{out / name}.jsonl: {len(records)} records")

    for name, records in make_preferences(args.seed).items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{out / name}.jsonl: {len(records)} records")

    model = train_sentencepiece(texts, str(out / "tokenizer"), VOCAB_SIZE)
    tok = load_tokenizer(model)
    print(f"{model}: {tok}")


if __name__ == "__main__":
    main()
