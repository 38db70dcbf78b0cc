"""The README's quick start, verbatim, in a fresh clone and a fresh virtual environment."""

import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def quick_start_command() -> str:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_quick_start_works_verbatim_from_a_fresh_clone(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "deformcli"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    result = subprocess.run(
        ["bash", "-c", quick_start_command()],
        cwd=clone,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    assert "rel error" in text and "(passed)" in text
    Image.open(clone / "deformcli-demo" / "demo.png").verify()
    assert (clone / ".venv" / "bin" / "deformcli").exists()
