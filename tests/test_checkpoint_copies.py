"""Checkpoints keep the full policy copies an objective holds beside the engine (DiffusionNFT's EMA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import sys, copy, torch, deepspeed
from pathlib import Path
from video_branch.engine import checkpoint as ckpt
from video_branch.parallel.groups import init_distributed

out = Path(sys.argv[1])
init_distributed()
torch.manual_seed(0)
net = torch.nn.Linear(4, 3)
ema = copy.deepcopy(net).requires_grad_(False)
with torch.no_grad():
    ema.weight.mul_(0.5)  # a copy that differs from the engine's weights
saved = {k: v.clone() for k, v in ema.state_dict().items()}
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3), config=cfg,
                                  dist_init_required=False)
ckpt.save(engine, out, 1, {"iteration": 1}, 0, copies={"ema": ema})
assert (out / "iter_000001" / "copies.pt").is_file()
with torch.no_grad():
    ema.weight.zero_(); ema.bias.fill_(7.0)
state = ckpt.load(engine, out, "iter_000001", 0, copies={"ema": ema})
assert state["iteration"] == 1
for k, v in ema.state_dict().items():
    assert torch.equal(v, saved[k]), k
# A checkpoint written without the copies cannot silently restart them.
ckpt.save(engine, out, 2, {"iteration": 2}, 0)
try:
    ckpt.load(engine, out, "iter_000002", 0, copies={"ema": ema})
except FileNotFoundError as e:
    assert "copies.pt" in str(e) and "ema" in str(e), e
else:
    raise AssertionError("loading copies from a checkpoint without them did not fail")
print("OK")
"""


def test_checkpoint_saves_and_restores_kept_copies(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env, check=False)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
