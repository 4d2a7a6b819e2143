"""The `longembed` command in a child process, as a user runs it: its own working directory, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def longembed(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
