"""Sampling with per-prompt seeds, model sources, and the render_compare tool on tiny random Wan models."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port

from video_branch.engine.sampling import generate, latent_shape_for, load_source, resolve_source
from video_branch.models import PromptEncoder, build_tiny_wan, decode_to_frames, load_wan
from video_branch.models.lora import merge_lora_state

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left", "a blue square moving up"]
SIZE = {"num_frames": 5, "height": 32, "width": 32}


def _tool(name):
    """The tool script as a module (tools/ is not a package); registered so its dataclasses resolve."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    build_tiny_wan(root / "base", seed=0)
    build_tiny_wan(root / "other", seed=7)
    run = root / "runs" / "trained"
    run.mkdir(parents=True)
    shutil.copytree(root / "other", run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "reward_mean": 0.5}) + "\n")
    (run / "config.yaml").write_text(f"model:\n  path: {root / 'base'}\nvideo:\n  num_frames: 5\n  height: 32\n"
                                     "  width: 32\n  fps: 4\n")
    return {"root": root, "base": root / "base", "other": root / "other", "run": run}


def _euler_reference(m, prompt, seed, steps, shift, guidance):
    """Plain Euler ODE from the seed's noise, written out from the schedule's formula (no rollout, no tree)."""
    shape = latent_shape_for(m.vae, **SIZE)
    enc = PromptEncoder(m.text_encoder, m.tokenizer)
    cond, uncond = enc.encode([prompt]), enc.encode([""])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None]
    u = 1 - np.arange(steps + 1) / steps
    sig = shift * u / (1 + (shift - 1) * u)
    m.transformer.eval()
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * sig[i]], dtype=torch.float32)
            v_c = m.transformer(x, t, cond, return_dict=False)[0].float()
            v_u = m.transformer(x, t, uncond, return_dict=False)[0].float()
            v = v_u + guidance * (v_c - v_u)
            x = x + (sig[i + 1] - sig[i]) * v
    m.transformer.train()
    return decode_to_frames(m.vae, x)[0]


def test_generate_matches_a_hand_written_euler_sampler_and_depends_only_on_prompt_and_seed(models):
    m = load_wan(models["base"])
    frames = generate(m, PROMPTS, [11, 12], num_steps=2, guidance_scale=2.5, shift=3.0, frontier_batch=1, **SIZE)
    assert frames.dtype == torch.uint8 and frames.shape == (2, 5, 32, 32, 3)
    for i, (p, s) in enumerate(zip(PROMPTS, [11, 12])):
        ref = _euler_reference(m, p, s, 2, 3.0, 2.5)
        assert (frames[i].int() - ref.int()).abs().max() <= 1
    # The same (prompt, seed) in another batch, order and micro-batch size gives the same clip.
    alone = generate(m, [PROMPTS[1], PROMPTS[0]], [12, 99], num_steps=2, guidance_scale=2.5, frontier_batch=8, **SIZE)
    assert torch.equal(alone[0], frames[1])
    assert not torch.equal(alone[1], frames[0])  # another seed, another clip
    assert m.transformer.training  # the mode is restored after sampling


def test_size_and_seed_errors_name_the_option(models):
    m = load_wan(models["base"])
    with pytest.raises(ValueError, match="num_frames=6"):
        generate(m, PROMPTS, [0, 1], num_steps=2, num_frames=6, height=32, width=32)
    with pytest.raises(ValueError, match="width=40"):
        generate(m, PROMPTS, [0, 1], num_steps=2, num_frames=5, height=32, width=40)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(m, PROMPTS, [0], num_steps=2, **SIZE)


def test_latent_shape_follows_the_vae_compression_factors():
    from types import SimpleNamespace

    wan21 = SimpleNamespace(config=SimpleNamespace(z_dim=16, temperal_downsample=[False, True, True]))
    assert latent_shape_for(wan21, 81, 480, 832) == (16, 21, 60, 104)
    # scale_factor_* (what WanPipeline reads) wins, e.g. a VAE compressing 16x in space.
    wide = SimpleNamespace(config=SimpleNamespace(z_dim=48, scale_factor_temporal=4, scale_factor_spatial=16))
    assert latent_shape_for(wide, 9, 64, 96) == (48, 3, 4, 6)
    with pytest.raises(ValueError, match="width=48: must be a multiple of 32"):
        latent_shape_for(wide, 9, 64, 48)


def test_model_sources_resolve_and_name_themselves(models, tmp_path):
    assert resolve_source(str(models["base"])).name == "base"
    src = resolve_source(f"mine={models['other']}")
    assert (src.name, src.kind, src.path) == ("mine", "diffusers", models["other"].resolve())
    run = resolve_source(str(models["run"]))
    assert (run.name, run.kind, run.path) == ("trained", "diffusers", (models["run"] / "final").resolve())
    assert resolve_source(str(models["run"] / "final")).name == "trained"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_source(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a diffusers Wan directory"):
        resolve_source(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        resolve_source(str(tmp_path))


def test_lora_state_is_merged_into_plain_weights():
    a, b, w = torch.randn(2, 5), torch.randn(3, 2), torch.randn(3, 5)
    state = {"base_model.model.blocks.0.to_q.base_layer.weight": w, "base_model.model.blocks.0.to_q.bias": w[:, 0],
             "base_model.model.blocks.0.to_q.lora_A.default.weight": a,
             "base_model.model.blocks.0.to_q.lora_B.default.weight": b}
    out = merge_lora_state(state, 0.5)
    assert set(out) == {"blocks.0.to_q.weight", "blocks.0.to_q.bias"}
    torch.testing.assert_close(out["blocks.0.to_q.weight"], w + 0.5 * b @ a)
    plain = {"x.weight": w}
    assert merge_lora_state(plain, 0.5) is plain


@pytest.fixture(scope="module")
def rendered(models):
    rc = _tool("render_compare")
    out = models["root"] / "out" / "cmp.mp4"
    code = rc.main(["--model", f"base={models['base']}", "--model", str(models["run"]), "--prompt", PROMPTS[0],
                    "--prompt", PROMPTS[1], "--seeds", "3", "4", "--steps", "2", "--scale", "2", "--margin", "6",
                    "--reward", "temporal_consistency", "--sheet-frames", "0,-1", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_render_compare_writes_side_by_side_mp4_and_sheet(models, rendered):
    import cv2
    import decord

    reader = decord.VideoReader(str(rendered))
    # Frames, height and width come from the run's config.yaml (5 frames of 32x32, fps 4).
    assert len(reader) == len(PROMPTS) * 5
    frame = reader[0].asnumpy()
    assert frame.shape[1] == 2 * 32 * 2 + 3 * 6  # two columns of 64 px, three margins
    assert abs(reader.get_avg_fps() - 4) < 1e-6
    record = json.loads(rendered.with_suffix(".json").read_text())
    assert [m["name"] for m in record["models"]] == ["base", "trained"]
    assert record["video"]["width"] == frame.shape[1] and record["video"]["height"] == frame.shape[0]

    # The PNG is lossless: its cells are exactly the clips of each model, column by column.
    sheet = cv2.cvtColor(cv2.imread(str(rendered.with_suffix(".png"))), cv2.COLOR_BGR2RGB)
    top = 6 + _tool("render_compare").line_height(0.5)
    gap = 3
    firsts = []
    for col, path in enumerate([models["base"], models["other"]]):
        clips = generate(load_wan(path), PROMPTS, [3, 4], num_steps=2, shift=3.0, **SIZE).numpy()
        firsts.append(clips[0, 0].repeat(2, 0).repeat(2, 1).astype(int))
        x0 = 6 + col * (2 * 64 + gap + 6)
        for j, t in enumerate([0, 4]):
            cell = sheet[top:top + 64, x0 + j * (64 + gap):x0 + j * (64 + gap) + 64]
            np.testing.assert_array_equal(cell, clips[0, t].repeat(2, 0).repeat(2, 1))
        # The reward scores recorded are the reward of exactly those clips.
        import reward_models

        expected = reward_models.build("temporal_consistency")(torch.from_numpy(clips), PROMPTS)
        np.testing.assert_allclose(record["scores"][["base", "trained"][col]]["temporal_consistency"],
                                   expected["temporal_consistency"].numpy(), rtol=1e-6)
    # In the mp4 (lossy), each column of the first frame is its own model's first frame of prompt 0.
    for col, first in enumerate(firsts):
        x0 = 6 + col * (64 + 6)
        err_own = np.abs(frame[top:top + 64, x0:x0 + 64].astype(int) - first).mean()
        err_other = np.abs(frame[top:top + 64, x0:x0 + 64].astype(int) - firsts[1 - col]).mean()
        assert err_own < err_other


def test_cli_errors_name_the_problem_without_a_traceback(models, tmp_path, capsys):
    # The tool's main (what ``python tools/render_compare.py`` runs) in this process: an exception escaping it (the
    # traceback a user would see) fails the test; the errors come back as exit status 2 with a message on stderr.
    rc = _tool("render_compare")
    capsys.readouterr()
    try:
        code = rc.main(["--model", str(tmp_path / "missing_model"), "--model", str(models["base"]), "--prompt", "x"])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "missing_model" in err and "Traceback" not in err, err
    assert rc.main(["--model", str(models["base"]), "--prompt", "x", "--frames", "6", "--steps", "1",
                    "--out", str(tmp_path / "o.mp4"), "--quiet"]) == 2
    assert "error: num_frames=6" in capsys.readouterr().err
    assert rc.main(["--model", f"a={models['base']}", "--model", f"a={models['other']}", "--prompt", "x"]) == 2
    assert rc.main(["--model", str(models["base"]), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert rc.main(["--model", str(models["base"]), "--prompt", "x", "--prompt", "y", "--seeds", "1", "2", "3"]) == 2
    assert rc.main(["--model", str(models["base"]), "--prompt", "x", "--reward", "no_such_reward"]) == 2


_MAKE_CHECKPOINT = r"""
import os, sys, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
import deepspeed, deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", verbose=False)
from video_branch.models import load_wan
model = load_wan(sys.argv[1], components=("transformer",)).transformer
cfg = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
       "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "zero_allow_untested_optimizer": True,
       "steps_per_print": 10**9}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=cfg,
                                  dist_init_required=False)
torch.manual_seed(0)
out = engine(hidden_states=torch.randn(1, 16, 2, 4, 4), timestep=torch.tensor([500.0]),
             encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)[0]
engine.backward(out.pow(2).mean())
engine.step()
engine.save_checkpoint(sys.argv[2], tag="iter_000001")
open(os.path.join(sys.argv[2], "latest"), "w").write("iter_000001\n")
with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, sys.argv[2] + "/expected.pt")
"""


@pytest.mark.slow  # a DeepSpeed process of its own (about 20-30 s on 2 cores)
def test_checkpoint_source_loads_the_trained_transformer(models, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "ckrun"
    run.mkdir()
    (run / "config.yaml").write_text(f"model:\n  path: {models['base']}\n")
    script = tmp_path / "make_ckpt.py"
    script.write_text(_MAKE_CHECKPOINT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, str(script), str(models["base"]), str(run / "checkpoints"), str(free_port())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    if res.returncode != 0 or not (run / "checkpoints" / "expected.pt").is_file():
        pytest.skip(f"could not produce a DeepSpeed checkpoint here: {res.stderr[-500:]}")
    expected = torch.load(run / "checkpoints" / "expected.pt")
    src = resolve_source(str(run))
    assert (src.kind, src.tag, src.name) == ("checkpoint", "iter_000001", "ckrun@iter_000001")
    assert resolve_source(str(run / "checkpoints" / "iter_000001")).tag == "iter_000001"
    loaded = load_source(src)
    base = load_wan(models["base"], components=("transformer",)).transformer.state_dict()
    state = loaded.transformer.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v)
    assert any(not torch.equal(state[k], base[k]) for k in state)  # the step did change the weights
    assert loaded.vae is not None and loaded.text_encoder is not None  # the rest comes from the base model
