"""Two-rank training runs of the presets added on top of the tree engine (Expand-and-Prune, LoRA, ...).

All runs share one distributed launch (``tests/dist_workers/train_presets.py``); each test reads its run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from video_branch.config import load_config
from video_branch.config.specs import config_accounting

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "tests"))
from conftest import shared_jobs
from test_train_e2e import metrics

SAMPLE_SHRINK = ["train.iterations=2", "train.checkpoint_every=0", "eval.num_prompts=1", "eval.clips_per_prompt=1",
                 "eval.num_steps=2", "logging.plot_every=0", "logging.tensorboard=false", "tree.roots=4",
                 "tree.num_steps=4", "optim.micro_batch=8", "optim.updates_per_iteration=2"]
SAMPLE_EXTRA = {"vgrpo": ["objective.kl_coef=0.1"], "nft": []}  # V-GRPO's KL is to the old policy's x0 predictions


def _jobs(cfg: Path):
    return {
        "pro_grpo": (cfg, ["method=pro_grpo", "train.dump_trees=true"]),
        "branchgrpo_ovf": (cfg, ["method=branchgrpo_ovf", "train.dump_trees=true"]),
        # Flow-GRPO's KL to the reference runs through the disabled adapter.
        "lora": (cfg, ["method=flowgrpo", "tree.roots=4", "tree.num_steps=4", "model.lora.rank=4",
                       "model.lora.alpha=8", "optim.lr=1.0e-2"]),
        "guard": (cfg, ["method=dancegrpo", "tree.roots=4", "tree.num_steps=4", "objective.ratio_norm=true",
                        "optim.updates_per_iteration=2", "optim.micro_batch=4"]),
        **{m: (ROOT / "configs" / "tiny" / f"{m}.yaml", SAMPLE_SHRINK + SAMPLE_EXTRA[m]) for m in ("vgrpo", "nft")},
    }


@shared_jobs
def _shared(d: Path) -> list[str]:
    """The tiny model, prompts and base config in ``d``; the jobs run in the session's shared 2-rank launch."""
    from video_branch.models.tiny import build_tiny_wan

    build_tiny_wan(d / "model", seed=0)
    (d / "train.txt").write_text("a red circle moving left\na blue square moving right\n")
    (d / "heldout.txt").write_text("a red square moving down\n")
    cfg = d / "c.yaml"
    cfg.write_text(
        f"""model: {{path: {d / 'model'}, max_sequence_length: 16}}
video: {{num_frames: 5, height: 32, width: 32}}
reward: {{components: {{temporal_consistency: {{weight: 1.0}}}}}}
optim: {{micro_batch: 64, lr: 1.0e-4}}
train: {{iterations: 2, prompt_file: {d / 'train.txt'}, checkpoint_every: 0}}
eval: {{prompt_file: {d / 'heldout.txt'}, clips_per_prompt: 1, num_steps: 2}}
logging: {{plot_every: 0, tensorboard: false}}
"""
    )
    return ["@".join([f"{name}={path}", *over]) for name, (path, over) in _jobs(cfg).items()]


@pytest.fixture(scope="module")
def tiny(shared_runs):
    d, out = shared_runs[__name__]
    return d, d / "c.yaml", out


@pytest.mark.parametrize("method", ["pro_grpo", "branchgrpo_ovf"])
def test_expand_and_prune_presets_train_two_iterations_on_two_ranks(tiny, method):
    _, cfg, runs = tiny
    run = runs / method
    acc = config_accounting(load_config(cfg, [f"method={method}"]))
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["forward_passes"] == acc["forward_passes"] and r["trained_edges"] == acc["trained_edges"]
        assert r["ratio_max_dev"] < 1e-5 and np.isfinite(r["loss"])
    for rank in (0, 1):
        z = np.load(run / "trees" / f"iter_000001_rank{rank}.npz")
        scored = np.isfinite(z["leaf_reward"])
        assert int(scored.sum()) == acc["leaves"]  # only the survivors are scored
        assert int(z["trained"].sum()) == acc["trained_edges"]
        assert (z["advantage"][~np.isfinite(z["value"])] == 0).all()  # pruned nodes carry no signal
    assert json.loads((run / "eval_after.json").read_text())["n"] == 1


def test_lora_run_exports_weights_that_change_a_wan_pipeline(tiny):
    import diffusers
    import torch

    d, _, runs = tiny
    run = runs / "lora"
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[1]["kl"] > 0  # the adapted policy has moved away from the base after one update

    def frames(pipe):
        return np.asarray(pipe("a red circle moving left", num_frames=5, height=32, width=32, num_inference_steps=2,
                               guidance_scale=1.0, output_type="np",
                               generator=torch.Generator().manual_seed(0)).frames)

    pipe = diffusers.WanPipeline.from_pretrained(str(d / "model"))
    base = frames(pipe)
    pipe.load_lora_weights(str(run / "final" / "lora"))
    adapted = frames(pipe)
    assert np.abs(adapted - base).max() > 1e-5
    merged = frames(diffusers.WanPipeline.from_pretrained(str(run / "final")))
    assert np.allclose(merged, adapted, atol=1e-4)


def test_grpo_guard_option_runs_with_several_updates_per_rollout(tiny):
    run = tiny[2] / "guard"
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["ratio_max_dev"] < 1e-5  # normalised ratio is exactly 1 on-policy (mean_new == mean_old)
        assert r["ratio_max_dev_all"] > 0 and np.isfinite(r["loss"])  # the second update sees moved weights


def _max_weight_change(final: Path, base: Path) -> float:
    from safetensors.torch import load_file

    name = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(final / name)), load_file(str(base / name))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


@pytest.mark.parametrize("method", ["vgrpo", "nft"])
def test_sample_level_presets_train_two_iterations_on_two_ranks_of_the_embedded_default(tiny, method):
    """V-GRPO and DiffusionNFT train on final ODE samples: no edge is trained, every leaf is (the accounting's
    trained samples), and the weights move. Two updates per rollout show V-GRPO's ratio and KL leaving 1 and 0 after
    an update."""
    config = ROOT / "configs" / "tiny" / f"{method}.yaml"
    shrink = SAMPLE_SHRINK + SAMPLE_EXTRA[method]
    run = tiny[2] / method
    acc = config_accounting(load_config(config, shrink))
    assert acc["trained_edges"] == 0 and acc["trained_samples"] == acc["leaves"] == 4
    rows = metrics(run)
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["forward_passes"] == acc["forward_passes"] == 16
        assert r["trained_edges"] == 0 and r["trained_samples"] == acc["trained_samples"]
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["skipped_updates"] == 0
        if method == "vgrpo":
            assert r["ratio_max_dev"] < 1e-5  # L_old and L_theta agree before the first update
            assert r["ratio_max_dev_all"] > 0  # the second update sees moved weights
            assert r["kl"] > 0  # zero in the first update (theta == old), positive in the second
        else:
            assert r["ratio_max_dev"] is None  # DiffusionNFT has no likelihood ratio
    assert _max_weight_change(run / "final", ROOT / "assets" / "toy_wan") > 0
