"""The prepared GPU check: its CPU mode runs the same steps at a small size, and its wheel folder installs offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_mode_runs_every_step(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["forward_backward"]["ok"]
    presets = report["iterations"]["presets"]
    assert set(presets) == {"branchgrpo", "dancegrpo"}
    # The CPU mode's small trees, counted by hand: BranchGRPO's 6 steps split at 0, 1 and 2 (2 + 4 + 8 x 4 edges, all
    # trained); DanceGRPO's 4 chains of 6 steps train 3 each (timestep_fraction 0.6 of the 5 steps before the last).
    assert presets["branchgrpo"]["trained_edges"] == 2 + 4 + 8 * 4
    assert presets["dancegrpo"]["trained_edges"] == 4 * int(0.6 * 5)
    assert all(p["s_per_iteration"] > 0 and p["rollout_flops_per_s"] > 0 for p in presets.values())
    mem = report["memory"]
    assert mem["measured_peak_mib"] > 0 and mem["planned_peak_mib"] > 0
    assert "planned / measured" in (tmp_path / "gpu_check.txt").read_text()


def test_bad_arguments_are_named():
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--device", "tpu"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "--device must be cuda or cpu, got 'tpu'" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--colour"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument '--colour'" in r.stderr


# What the bare GPU image already has (and so what the wheel folder need not carry).
BARE_IMAGE = {"torch", "transformers", "peft", "accelerate", "einops", "opencv-python-headless", "tensorboard", "tqdm",
              "safetensors", "imageio", "matplotlib", "pytest", "numpy", "packaging", "psutil", "filelock",
              "huggingface-hub", "requests", "pillow", "pyyaml", "httpx", "typing-extensions", "fsspec", "jinja2",
              "sympy", "networkx", "tokenizers"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.mark.skipif(not (ROOT / "wheels").is_dir(), reason="wheels/ not built (tools/gpu_check.sh --build-wheels)")
def test_wheel_folder_installs_offline_for_python_3_12():
    wheels = ROOT / "wheels"
    size = sum(p.stat().st_size for p in wheels.iterdir())
    assert size < 64 * 2**20
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheels),
                        "--ignore-installed", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", "--abi", "cp312", "--platform", "manylinux2014_x86_64",
                        "--target", "/nonexistent-target", "diffusers", "deepspeed", "pydantic", "pydantic-core",
                        "msgpack", "regex", "hjson", "ninja", "py-cpuinfo", "nvidia-ml-py"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # Every requirement of diffusers and deepspeed is in the folder or on the bare image.
    import zipfile

    have = {_norm(p.name.split("-")[0]) for p in wheels.glob("*.whl")} | BARE_IMAGE
    for pkg in ("diffusers", "deepspeed"):
        whl = next(wheels.glob(f"{pkg}-*.whl"))
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        reqs = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
        names = {_norm(q.replace(">", " ").replace("<", " ").replace("=", " ").replace("!", " ").replace(";", " ")
                       .replace("[", " ").split()[0]) for q in reqs}
        assert names <= have, (pkg, sorted(names - have))
