"""The random real-config Wan 2.1 builder: real widths with few layers, saved in diffusers format, loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from video_branch.models.real_shapes import build_real_wan, parameter_count, transformer_config


def _hand_count(layers: int, heads: int, ffn: int, text: int = 4096, freq: int = 256) -> int:
    d = heads * 128
    attn = 4 * (d * d + d) + 2 * d  # q, k, v, out and the q/k RMSNorm weights
    block = 2 * attn + 2 * d + 2 * d * ffn + ffn + d + 6 * d
    embed = 16 * 4 * d + d  # patch conv
    cond = freq * d + d + d * d + d + 6 * d * d + 6 * d + text * d + d + d * d + d
    out = d * 64 + 64 + 2 * d
    return layers * block + embed + cond + out


@pytest.mark.parametrize("size,layers,heads,ffn", [("1.3b", 30, 12, 8960), ("14b", 40, 40, 13824)])
def test_real_configs_are_the_released_shapes(size, layers, heads, ffn):
    cfg = transformer_config(size)
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"]) == (
        layers, heads, 128, ffn)
    assert (cfg["text_dim"], cfg["freq_dim"], cfg["in_channels"]) == (4096, 256, 16)
    assert parameter_count(cfg) == _hand_count(layers, heads, ffn)
    assert transformer_config(size, 2)["num_layers"] == 2


def test_bad_size_and_depth_name_the_argument():
    with pytest.raises(ValueError, match="size: unknown Wan 2.1 size '7b'"):
        transformer_config("7b")
    with pytest.raises(ValueError, match="num_layers: expected a positive integer"):
        transformer_config("1.3b", 0)
    with pytest.raises(ValueError, match="vae: expected 'real' or 'tiny'"):
        build_real_wan("/nonexistent", "1.3b", num_layers=1, vae="big")


@pytest.mark.slow
def test_real_width_1p3b_builds_loads_and_trains_a_lora_step(tmp_path):
    from video_branch.models.lora import apply_lora
    from video_branch.models.wan import load_wan, velocity

    build_real_wan(tmp_path / "m", "1.3b", num_layers=1, vae="tiny", dtype="bfloat16")
    saved = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["ffn_dim"], saved["text_dim"], saved["num_layers"]) == (
        12, 8960, 4096, 1)
    m = load_wan(tmp_path / "m", dtype="bfloat16")
    assert m.text_encoder.config.d_model == 4096
    assert m.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert m.transformer.blocks[0].scale_shift_table.dtype == torch.float32  # Wan's float32 modules stay float32
    ids = m.tokenizer(["a red circle moving left"], return_tensors="pt", padding="max_length", max_length=8)
    emb = m.text_encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert emb.shape == (1, 8, 4096)

    class Lora:
        rank, alpha, dropout, target_modules = 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"]

    policy = apply_lora(m.transformer, Lora)
    x = torch.randn(1, 16, 2, 4, 4)
    v = velocity(policy, x, torch.tensor([500.0]), emb.detach())
    assert v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_real_width_14b_block_runs(tmp_path):
    from video_branch.models.wan import load_wan, velocity

    build_real_wan(tmp_path / "m", "14b", num_layers=1, vae="tiny", dtype="bfloat16")
    m = load_wan(tmp_path / "m", dtype="bfloat16", components=("transformer",))
    assert m.transformer.blocks[0].ffn.net[0].proj.weight.shape == (13824, 5120)
    with torch.no_grad():
        v = velocity(m.transformer, torch.randn(1, 16, 1, 4, 4), torch.tensor([900.0]), torch.randn(1, 4, 4096))
    assert v.shape == (1, 16, 1, 4, 4) and torch.isfinite(v).all()


def test_cli_refuses_bad_arguments(tmp_path, capsys):
    """The tool's own ``main`` (what ``python tools/build_real_wan.py`` runs), called in-process: argparse's usage
    error exits with status 2 and names the bad argument on stderr."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "build_real_wan.py"
    spec = importlib.util.spec_from_file_location("build_real_wan_tool", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for args, msg in ((["--size", "1.3b", "--out", str(tmp_path / "a"), "--layers", "0"], "--layers: expected"),
                      (["--size", "1.3b", "--out", str(tmp_path / "full")], "exists and is not empty"),
                      (["--size", "7b", "--out", str(tmp_path / "b")], "invalid choice: '7b'")):
        with pytest.raises(SystemExit) as exc:
            mod.main(args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and msg in err, err
        assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before building anything
