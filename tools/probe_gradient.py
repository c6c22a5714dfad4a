"""How much reward signal does one iteration's policy gradient carry? A diagnostic for choosing RL settings.

    python tools/probe_gradient.py --config configs/tiny/demo.yaml --batches 8 --out runs/probe/gradient.json
    python tools/probe_gradient.py --config configs/tiny/demo.yaml --set tree.sde_form=flow --step-sizes 3e-4,1e-3

A single process (world size 1) builds the trainer from the config, then for ``--batches`` independent iterations
(different prompts and seeds) rolls out, scores, assigns credit and prunes exactly as training does, and computes the
gradient of the objective at ratio 1 (``sum_e A_e log p_e / n_edges``, the direction of the first update) on a plain
copy of the weights, separately for the trained edges of every denoising step. It never updates the weights.

For independent batch gradients g_1..g_K of a true gradient G, E[g_i . g_j] = |G|^2 (i != j) and E|g_i|^2 = |G|^2 +
noise. Reported per step and in total:

- ``signal``: the mean of g_i . g_j over pairs i != j, an unbiased estimate of |G|^2, with a jackknife standard error;
- ``power``: the mean of |g_i|^2;
- ``share``: signal / power, the fraction of one batch's gradient that is signal. Adam's update follows
  sign(momentum), so a run needs roughly 1 / share batches before its steps point uphill more than at random.

With ``--step-sizes`` the held-out reward (``eval`` settings, paired on the same seeds) is also measured after moving
every weight by ``c * sign(mean of the K gradients)``, Adam's first-step direction, for each size c.

Every gradient is kept in memory (batches x trained steps x parameters x 4 bytes): meant for the tiny models.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from video_branch.config import add_config_args, config_from_args


def gram_statistics(gram: np.ndarray) -> Dict[str, float]:
    """Signal statistics of K gradient vectors from their Gram matrix ``gram`` [K, K] (K >= 3).

    signal: mean off-diagonal entry (unbiased |G|^2); power: mean diagonal entry; share: signal / power; signal_se:
    jackknife standard error of signal (leave one batch out).
    """
    k = gram.shape[0]
    if gram.shape != (k, k) or k < 3:
        raise ValueError(f"gram_statistics needs a square Gram matrix of at least 3 gradients, got {gram.shape}")
    off = ~np.eye(k, dtype=bool)
    signal = float(gram[off].mean())
    power = float(np.diag(gram).mean())
    total_off = gram[off].sum()
    loo = np.array([(total_off - 2 * (gram[i].sum() - gram[i, i])) / ((k - 1) * (k - 2)) for i in range(k)])
    se = float(np.sqrt((k - 1) / k * ((loo - loo.mean()) ** 2).sum()))
    return {"signal": signal, "signal_se": se, "power": power, "share": signal / power if power > 0 else float("nan")}


def step_gradients(trainer, model, batch) -> Dict[int, torch.Tensor]:
    """{denoising step: flat gradient of sum_e A_e log p_e / n_edges over that step's trained edges} at ``model``."""
    res, adv = batch.res, batch.adv
    edges = np.nonzero(batch.trained)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for step in np.unique(res.tree.step[edges]):
        sel = edges[res.tree.step[edges] == step]
        acc = [torch.zeros_like(p) for p in params]
        for ids in np.array_split(sel, max(1, int(np.ceil(len(sel) / trainer.cfg.optim.micro_batch)))):
            e = trainer.policy.edge_log_probs(model, res, ids)
            a = torch.as_tensor(adv[ids], dtype=torch.float32, device=e.logp.device)
            grads = torch.autograd.grad((a * e.logp).sum() / len(edges), params, allow_unused=True)
            for g_acc, g in zip(acc, grads):
                if g is not None:
                    g_acc += g
        out[int(step)] = torch.cat([g.flatten() for g in acc]).cpu()
    return out


def shifted_heldout(trainer, base_model, direction: torch.Tensor, size: float) -> Dict[str, np.ndarray]:
    """Held-out scores (trainer.evaluate's clips and seeds) of ``base_model`` moved by ``size * direction``."""
    from video_branch.engine.evaluation import heldout_scores

    moved = copy.deepcopy(base_model).requires_grad_(False).eval()
    with torch.no_grad():
        off = 0
        for p in moved.parameters():
            p.add_(size * direction[off:off + p.numel()].view_as(p).to(p))
            off += p.numel()
    scores = heldout_scores(trainer.cfg, trainer.dist, trainer.eval_prompts, trainer.models, trainer.encoder, moved,
                            trainer.reward)
    return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}


def probe(trainer, batches: int, first_iteration: int, step_sizes: List[float], max_memory_gb: float,
          log=print) -> Dict:
    from video_branch.core.stats import mean_ci
    from video_branch.engine.scoring import weighted_total
    from video_branch.engine.trainer import IterationStats

    if batches < 3:
        raise ValueError(f"--batches must be at least 3 (pairs of independent batches), got {batches}")
    base = trainer.policy.rollout_module()
    model = copy.deepcopy(base).requires_grad_(True).train()
    n_params = sum(p.numel() for p in model.parameters())
    need = batches * trainer.cfg.tree.num_steps * n_params * 4 / 2**30
    if need > max_memory_gb:
        raise SystemExit(f"probe_gradient: keeping {batches} batches x up to {trainer.cfg.tree.num_steps} steps x "
                         f"{n_params} parameters needs up to {need:.1f} GiB (--max-memory-gb {max_memory_gb}); use "
                         "fewer --batches or a smaller model")
    per_batch: List[Dict[int, torch.Tensor]] = []
    spread, leaves_per_batch, edges_per_batch = [], 0, 0
    for k in range(batches):
        trainer._stats = IterationStats()
        b = trainer.prepare_batch(first_iteration + k)
        leaves = b.res.tree.leaves()
        total = weighted_total(b.weights, b.rewards, leaves)
        trees = b.res.tree.tree[leaves]
        spread.append(float(np.nanmean([np.nanstd(total[trees == t]) for t in np.unique(trees)])))
        leaves_per_batch, edges_per_batch = len(leaves), int(b.trained.sum())
        per_batch.append(step_gradients(trainer, model, b))
        log(f"batch {k + 1}/{batches}: {len(leaves)} leaves, reward {np.nanmean(total):.4f}, within-tree sd "
            f"{spread[-1]:.4f}, {edges_per_batch} trained edges")
    steps = sorted(per_batch[0])
    result = {"batches": batches, "leaves_per_batch": leaves_per_batch, "trained_edges_per_batch": edges_per_batch,
              "within_tree_reward_sd": float(np.mean(spread)), "steps": {}}
    total_grads = torch.stack([sum(g[s] for s in steps) for g in per_batch]).double()
    for s in steps:
        g = torch.stack([b[s] for b in per_batch]).double()
        result["steps"][s] = gram_statistics((g @ g.T).numpy())
    result["total"] = gram_statistics((total_grads @ total_grads.T).numpy())
    log(f"{'step':>6} {'signal':>11} {'+-se':>9} {'power':>10} {'share':>8}")
    for s, st in list(result["steps"].items()) + [("total", result["total"])]:
        log(f"{s:>6} {st['signal']:11.3e} {st['signal_se']:9.1e} {st['power']:10.3e} {st['share']:+8.4f}")
    if step_sizes:
        direction = total_grads.mean(0).sign().float()
        before = shifted_heldout(trainer, base, direction, 0.0)
        result["heldout"] = {"before": {k: float(v.mean()) for k, v in before.items()}, "moved": {}}
        for c in step_sizes:
            after = shifted_heldout(trainer, base, direction, c)
            change = {}
            for key in before:
                m, ci = mean_ci(after[key] - before[key])
                change[key] = {"change": m, "ci95": ci}
            result["heldout"]["moved"][str(c)] = change
            log(f"held-out after a sign step of {c:g}: " + ", ".join(
                f"{key} {v['change']:+.4f} +- {v['ci95']:.4f}" for key, v in change.items()))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, require_config=True)
    p.add_argument("--batches", type=int, default=8, help="independent batches (iterations) to compare")
    p.add_argument("--first-iteration", type=int, default=10_000,
                   help="iteration index of the first batch (prompts and seeds follow the training schedule)")
    p.add_argument("--step-sizes", default="", help="comma-separated sign-step sizes for the held-out check")
    p.add_argument("--max-memory-gb", type=float, default=4.0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.batches < 3:  # before the model is built
        p.error(f"--batches must be at least 3 (pairs of independent batches), got {args.batches}")
    args.overrides = list(args.overrides or []) + ["logging.tensorboard=false", "logging.progress=false"]
    cfg = config_from_args(args)
    sizes = [float(x) for x in args.step_sizes.split(",") if x.strip()]
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("probe_gradient runs in a single process (python tools/probe_gradient.py ...)")
    from video_branch.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg)
        result = probe(trainer, args.batches, args.first_iteration, sizes, args.max_memory_gb)
    result["config"] = cfg.to_dict()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
