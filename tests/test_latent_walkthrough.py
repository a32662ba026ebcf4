"""The README's latent-space walk-through runs as written (in a scratch folder, on loopback)."""
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- latent-walkthrough -->\n```bash\n(.*?)```\n<!-- /latent-walkthrough -->", text, re.S)
    assert block, "README.md lost its latent walk-through"
    return [line.split("  #")[0].strip() for line in block.group(1).strip().splitlines()]


def test_readme_latent_walkthrough_runs_as_written(tmp_path):
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "latent-tiny.yaml", tmp_path / "configs")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "latent_demo_assets.py", tmp_path / "scripts")
    port = str(free_port())
    bin_dir = Path(sys.executable).parent
    server = None
    try:
        for line in walkthrough():
            line = line.replace("8000", port)
            argv = line.rstrip("&").split()
            argv[0] = sys.executable if argv[0] == "python" else str(bin_dir / argv[0])
            if line.endswith("&"):
                server = subprocess.Popen(argv, cwd=tmp_path, stdout=open(tmp_path / "serve.log", "w"),
                                          stderr=subprocess.STDOUT)
                deadline = time.time() + 120
                while time.time() < deadline:
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.3)
                continue
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    pictures = sorted((tmp_path / "out" / "latent-pictures").glob("*.png"))
    latents = sorted((tmp_path / "out" / "latent-latents").glob("*.npy"))
    assert len(pictures) == 2 and len(latents) == 2
    with Image.open(pictures[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    assert np.load(latents[0]).shape == (4, 8, 8)
    assert (tmp_path / "out" / "latent-tiny" / "checkpoint" / "vae" / "config.json").is_file()
