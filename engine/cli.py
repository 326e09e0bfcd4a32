"""`trident` command line: one dispatcher, thin subcommands. User errors print one line, exit 2."""
from __future__ import annotations

import os
import sys

USAGE = """usage: trident <command> [args]

commands:
  convert    hf-to-native | native-to-hf checkpoint conversion
  check-hf   compare engine and transformers logits on an HF model
  train      pretraining / SFT (multi-rank: torchrun --nproc-per-node N -m engine.cli train ...)
  rm         reward-model training (Bradley-Terry pairs)
  dpo        Direct Preference Optimization on the same pairs (frozen reference)
  ppo        PPO for RLHF (actor, critic, reference, reward; vLLM or native rollout)
  bench      benchmarks: bench train | ppo | pipeline | precision | memory | checkpoint
  plan       layout planner: predicted step time, TFLOP/s, memory per GPU for a cluster

Run `trident <command> --help` for a command's options."""


def _commands():
    def convert(argv):
        from tools.convert import main
        return main(argv)

    def check_hf(argv):
        from tools.convert import check_main
        return check_main(argv)

    def train(argv):
        from engine.train import main
        return main(argv)

    def ppo(argv):
        from engine.ppo import main
        return main(argv)

    def rm(argv):
        from engine.rm import main
        return main(argv)

    def dpo(argv):
        from engine.dpo import main
        return main(argv)

    def bench(argv):
        from tools.bench import main
        return main(argv)

    def plan(argv):
        from tools.plan import main
        return main(argv)

    return {"plan": plan, "convert": convert, "check-hf": check_hf, "train": train, "ppo": ppo, "rm": rm, "dpo": dpo, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    from engine.errors import TridentError

    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:]) or 0
    except TridentError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
