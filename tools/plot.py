"""Render a run's metrics.jsonl to a PNG of its curves (reward, KL, accuracy / loss).

  python -m tools.plot runs/demo_ppo/metrics.jsonl curves.png
"""
import sys

from engine.run_log import plot_metrics

if __name__ == "__main__":
    print(plot_metrics(sys.argv[1], sys.argv[2]))
