"""Sandboxed Python for rollouts: `Sandbox` (client.py) drives a fork server (server.py), whose
processes (child.py) run each execution under the kernel's isolation layers (isolation.py)."""
from minir1ci.env.sandbox.client import DEFAULT_PRELOAD, ExecResult, Limits, Sandbox

__all__ = ["DEFAULT_PRELOAD", "ExecResult", "Limits", "Sandbox"]
