"""tools/probe_gradient.py: the signal statistics and the per-step gradients of one batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import probe_gradient  # noqa: E402


def test_gram_statistics_match_explicit_loops():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6, 40)) + 0.5
    st = probe_gradient.gram_statistics(g @ g.T)
    pairs = [g[i] @ g[j] for i in range(6) for j in range(6) if i != j]
    assert st["signal"] == pytest.approx(np.mean(pairs))
    assert st["power"] == pytest.approx(np.mean([gi @ gi for gi in g]))
    assert st["share"] == pytest.approx(st["signal"] / st["power"])
    # Jackknife by recomputing the pair mean without each gradient.
    loo = []
    for k in range(6):
        rest = [i for i in range(6) if i != k]
        loo.append(np.mean([g[i] @ g[j] for i in rest for j in rest if i != j]))
    loo = np.array(loo)
    assert st["signal_se"] == pytest.approx(np.sqrt(5 / 6 * ((loo - loo.mean()) ** 2).sum()))


def test_gram_statistics_recover_a_known_signal_share():
    rng = np.random.default_rng(1)
    d, k = 400, 300
    true = np.full(d, 0.05)  # |G|^2 = 1.0
    noise_sd = 0.1  # E|noise|^2 = 4.0, so share = 1 / 5
    g = true + noise_sd * rng.standard_normal((k, d))
    st = probe_gradient.gram_statistics(g @ g.T)
    assert st["signal"] == pytest.approx(1.0, abs=4 * st["signal_se"])
    assert st["share"] == pytest.approx(0.2, abs=0.03)
    # Pure noise: the signal estimate is within a few standard errors of zero.
    z = rng.standard_normal((k, d))
    st0 = probe_gradient.gram_statistics(z @ z.T)
    assert abs(st0["signal"]) < 4 * st0["signal_se"]


def test_gram_statistics_rejects_too_few_batches():
    with pytest.raises(ValueError, match="at least 3"):
        probe_gradient.gram_statistics(np.eye(2))


_GRAD_CHECK = r"""
import sys, numpy as np, torch
sys.path.insert(0, sys.argv[2])
import probe_gradient
from video_branch.config import load_config
from video_branch.engine.trainer import IterationStats, Trainer
cfg = load_config(sys.argv[1], ["logging.tensorboard=false", "logging.progress=false", "train.run_dir=" + sys.argv[3]])
tr = Trainer(cfg)
model = __import__("copy").deepcopy(tr.policy.rollout_module()).requires_grad_(True)
tr._stats = IterationStats()
b = tr.prepare_batch(0)
per_step = probe_gradient.step_gradients(tr, model, b)
edges = np.nonzero(b.trained)[0]
assert sorted(per_step) == sorted(set(b.res.tree.step[edges].tolist())), per_step.keys()
# Independent path: the trainer's objective over all trained edges at ratio 1, loss = -mean(A * ratio).
e = tr.policy.edge_log_probs(model, b.res, edges)
out = tr.objective(e.logp, e.logp.detach(), torch.as_tensor(b.adv[edges], dtype=torch.float32),
                   clip_eps=cfg.objective.clip_eps, kl_coef=0.0, mean_new=e.mean, mean_old=None, mean_ref=None,
                   std=e.std.expand(len(edges), *([1] * (e.x.dim() - 1))), ratio_norm=False)
params = [p for p in model.parameters() if p.requires_grad]
ref = torch.cat([g.flatten() for g in torch.autograd.grad(-out.loss, params)])
total = sum(per_step.values())
err = float((total - ref).abs().max() / ref.abs().max())
assert err < 1e-4, err
print("OK", len(per_step), err)
# Then the command line, in the same interpreter: tools/probe_gradient.py's main with the arguments after the third.
del tr, model, b
probe_gradient.main(sys.argv[4:])
"""


@pytest.mark.slow
def test_step_gradients_sum_to_the_objective_gradient_and_the_cli_reports(tmp_path, tiny_setup):
    cfg = tiny_setup(tmp_path, "branchgrpo", ["a green triangle moving up"],
                     extra_yaml="tree: {num_steps: 6, split_steps: [0, 2]}\n", clips_per_prompt=2)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    out = tmp_path / "probe.json"
    cli = ["--config", str(cfg), "--batches", "3", "--step-sizes", "0,1e-3", "--out", str(out)]
    r = subprocess.run([sys.executable, "-c", _GRAD_CHECK, str(cfg), str(ROOT / "tools"), str(tmp_path / "run"), *cli],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0 and "OK 6" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"wrote {out}" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["batches"] == 3 and res["leaves_per_batch"] == 4 and res["trained_edges_per_batch"] == 20
    assert sorted(int(s) for s in res["steps"]) == list(range(6))
    for st in [*res["steps"].values(), res["total"]]:
        assert st["power"] > 0 and st["share"] == pytest.approx(st["signal"] / st["power"])
    # A step of size 0 leaves the weights as they are: the paired held-out change is exactly zero.
    zero = res["heldout"]["moved"]["0.0"]
    assert all(v["change"] == 0.0 and v["ci95"] == 0.0 for v in zero.values())
    assert set(res["heldout"]["moved"]) == {"0.0", "0.001"}
