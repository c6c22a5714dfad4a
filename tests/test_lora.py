"""LoRA on the Wan transformer: apply, the reference as the disabled adapter, merged export, diffusers' LoRA format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from video_branch.config import LoraConfig
from video_branch.models.lora import (
    AdapterDisabled,
    adapter_metadata,
    apply_lora,
    diffusers_lora_state,
    lora_scale,
    merged_transformer,
    save_diffusers_lora,
)
from video_branch.models.wan import velocity


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from video_branch.models.tiny import build_tiny_wan

    d = tmp_path_factory.mktemp("tiny_lora") / "model"
    build_tiny_wan(d, seed=0)
    return d


def _transformer(path):
    from video_branch.models.wan import load_wan

    return load_wan(path, components=("transformer",)).transformer


def _inputs(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = module.config
    x = torch.randn(2, c.in_channels, 2, 4, 4, generator=g)
    emb = torch.randn(2, 6, c.text_dim, generator=g)
    return x, torch.tensor([900.0, 300.0]), emb


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(tiny_dir):
    base = _transformer(tiny_dir)
    x, t, emb = _inputs(base)
    v0 = velocity(base, x, t, emb)
    model = apply_lora(_transformer(tiny_dir), LoraConfig(rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert torch.allclose(velocity(model, x, t, emb), v0, atol=1e-6)  # lora_B starts at zero
    _perturb(model)
    v1 = velocity(model, x, t, emb)
    assert (v1 - v0).abs().max() > 1e-3
    ref = AdapterDisabled(model)
    assert torch.allclose(velocity(ref, x, t, emb), v0, atol=1e-6)
    assert torch.allclose(velocity(model, x, t, emb), v1)  # the adapter is back on after the reference call
    # Merged weights reproduce the adapted model: W + (alpha / r) B A.
    merged = merged_transformer(model, model.state_dict(), lora_scale(LoraConfig(rank=4, alpha=8.0)))
    assert torch.allclose(velocity(merged, x, t, emb), v1, atol=1e-5)


def test_bad_target_modules_name_the_key(tiny_dir):
    with pytest.raises(ValueError, match="model.lora.target_modules.*to_qq"):
        apply_lora(_transformer(tiny_dir), LoraConfig(rank=2, target_modules=["to_qq"]))


def test_exported_lora_loads_into_a_wan_pipeline_and_changes_its_output(tiny_dir, tmp_path):
    import diffusers

    model = apply_lora(_transformer(tiny_dir), LoraConfig(rank=4, alpha=8.0))
    _perturb(model)
    save_diffusers_lora(diffusers_lora_state(model), adapter_metadata(model), tmp_path / "lora")

    def frames(pipe):
        return np.asarray(pipe("a red circle moving left", num_frames=5, height=32, width=32, num_inference_steps=2,
                               guidance_scale=1.0, output_type="np",
                               generator=torch.Generator().manual_seed(0)).frames)

    pipe = diffusers.WanPipeline.from_pretrained(str(tiny_dir))
    before = frames(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = frames(pipe)
    assert np.abs(with_lora - before).max() > 1e-4
    # The same as the pipeline with the merged transformer (alpha read back from the stored metadata).
    merged = diffusers.WanPipeline.from_pretrained(str(tiny_dir),
                                                   transformer=merged_transformer(model, model.state_dict(), 2.0))
    assert np.allclose(frames(merged), with_lora, atol=1e-4)


def test_kl_reference_copy_loads_the_base_outside_the_policy_and_matches_the_disabled_adapter(tiny_dir):
    from video_branch.config import load_config
    from video_branch.engine.setup import build_models

    sets = [f"model.path={tiny_dir}", "model.lora.rank=4", "model.lora.alpha=8", "objective.kl_coef=0.1",
            "video.height=32", "video.width=32", "video.num_frames=5"]
    default = build_models(load_config(None, sets), "cpu")
    assert default.needs_reference and default.reference is None  # the policy's disabled adapter, built later
    copy = build_models(load_config(None, sets + ["objective.kl_reference=copy"]), "cpu")
    ref = copy.reference
    assert copy.needs_reference and ref is not None
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    assert not any("lora" in n for n, _ in ref.named_parameters())  # a plain transformer, not the peft policy
    policy = copy.wan.transformer
    _perturb(policy)
    x, t, emb = _inputs(ref)
    v_copy = velocity(ref, x, t, emb)
    assert torch.allclose(v_copy, velocity(AdapterDisabled(policy), x, t, emb), atol=1e-6)
    assert (velocity(policy, x, t, emb) - v_copy).abs().max() > 1e-3  # the copy does not follow the adapter
