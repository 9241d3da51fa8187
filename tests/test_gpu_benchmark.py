"""benchmarks/gpu.py, the GPU check, run end to end on CPU in its --cpu-smoke mode."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two compiled tiny models and their norm layers: ~1-3 min on 2 cores
def test_gpu_check_cpu_smoke_writes_its_table(tmp_path):
    out = tmp_path / "gpu.md"
    cmd = [sys.executable, "gpu.py", "--cpu-smoke", "--norms", "layernorm,bln", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT / "benchmarks", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("## GPU: GPT-2 124M training, bf16, compiled (benchmarks/gpu.py)")
    rows = [line for line in text.splitlines() if line.startswith("| layernorm") or
            line.startswith("| bln")]  # fmt: skip
    # two model rows per norm (seq 32, 64) with tokens/s and the ratio, then the norm-layer rows
    assert len(rows) == 6, text
    assert "| layernorm | 32 |" in text and "| bln | 64 |" in text and "1.00×" in text
    assert "skipped" not in text
