"""16 streaming clients at once against SmolLM2 (benchmarks/serve_load.py, short): no errors, every stream
ends with [DONE]. The throughput ratio is the benchmark's business, not asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_sixteen_concurrent_streams_all_complete():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--clients", "16",
                          "--duration", "6", "--max-tokens", "24", "--fast", "compile"],  # (serve's default path)
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    (level,) = result["paths"]["compile"]
    assert level["clients"] == 16 and level["errors"] == 0, level["error_samples"]
    assert level["requests"] >= 16  # every client finished at least one full stream
    assert level["ttft_p50_s"] is not None
