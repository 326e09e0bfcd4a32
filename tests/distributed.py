"""Multi-rank test helper: N gloo ranks on free ports (see parallel/launch.py)."""
from parallel.launch import free_port, run_ranks  # noqa: F401
