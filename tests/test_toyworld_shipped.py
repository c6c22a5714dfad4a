"""The shipped toy model's VAE keeps shapes apart: the reward's shape term, calibrated on decoded ground truth,
recognises circle, square and triangle after a round trip through assets/toy_wan's VAE."""

from pathlib import Path

import pytest
import torch

from video_branch.toyworld.grammar import SHAPES, all_prompts
from video_branch.toyworld.render import render_batch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "assets" / "toy_wan"
pytestmark = pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="assets/toy_wan not built")


@pytest.fixture(scope="module")
def decoded():
    from video_branch.toyworld.evaluate import native_clip
    from video_branch.toyworld.vae import ToyVAE

    frames, size = native_clip(str(SHIPPED))
    vae = ToyVAE.from_pretrained(SHIPPED / "vae").eval()
    prompts = [p for p in all_prompts() for _ in range(2)]
    gt = torch.from_numpy(render_batch(prompts, list(range(20_000, 20_000 + len(prompts))), frames, size))
    with torch.no_grad():
        x = gt.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec = ((y / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    return rec, prompts


def test_shape_term_separates_shapes_on_decoded_ground_truth(decoded):
    from reward_models.toyworld import ToyWorldReward

    rec, prompts = decoded
    rm = ToyWorldReward(calibration=str(SHIPPED / "toyworld_reward.json"), temporal=False)
    by_claim = {}
    for claimed in SHAPES:
        texts = [f"a {p.colour} {claimed} moving {p.direction}" for p in prompts]
        by_claim[claimed] = rm(rec, texts)["shape"]
    truth = torch.stack([by_claim[p.shape][i] for i, p in enumerate(prompts)])
    assert truth.mean() >= 0.85, float(truth.mean())  # measured 0.89 on the shipped model (docs/TOYWORLD.md)
    for true in SHAPES:
        idx = [i for i, p in enumerate(prompts) if p.shape == true]
        right = by_claim[true][idx].mean()
        assert right >= 0.8, (true, float(right))
        for other in SHAPES:
            if other != true:  # not a constant: the same clips claimed as another shape score low
                assert by_claim[other][idx].mean() < 0.2, (true, other, float(by_claim[other][idx].mean()))


def test_decoded_ground_truth_scores_high_on_every_term(decoded):
    from reward_models.toyworld import ToyWorldReward

    rec, prompts = decoded
    out = ToyWorldReward(calibration=str(SHIPPED / "toyworld_reward.json"))(rec, [p.text for p in prompts])
    # Decoding smears the object within each group of four frames (its centroid moves up to 2.4 px toward the
    # group's middle), which costs direction and temporal consistency some credit even on ground truth.
    for term, low in (("colour", 0.9), ("direction", 0.75), ("temporal_consistency", 0.6), ("overall", 0.75)):
        assert out[term].mean() > low, (term, float(out[term].mean()))
