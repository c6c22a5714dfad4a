"""Wan loading, prompt encoding, latent/frame conversion, attention backends and the tiny builder."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from video_branch.models import (
    PromptEncoder,
    build_tiny_wan,
    decode_to_frames,
    encode_frames,
    load_wan,
    set_attention_backend,
    tiny_text_vocab,
    velocity,
)

PROMPTS = ["a red circle moving left", "a blue square moving up"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_wan")
    build_tiny_wan(out, seed=0)
    return out


@pytest.fixture(scope="module")
def comps(tiny_dir):
    return load_wan(tiny_dir)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return WanPipeline.from_pretrained(tiny_dir, local_files_only=True)


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_load_wan_loads_saved_weights_with_frozen_encoder_and_vae(tiny_dir, pipe):
    c = load_wan(tiny_dir)
    for name in ("transformer", "vae", "text_encoder"):
        ours, ref = getattr(c, name).state_dict(), getattr(pipe, name).state_dict()
        assert ours.keys() == ref.keys()
        assert all(torch.equal(ours[k], ref[k]) for k in ours), name
    assert c.transformer.training and all(p.requires_grad for p in c.transformer.parameters())
    for frozen in (c.vae, c.text_encoder):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert c.tokenizer("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids
    assert c.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert c.scheduler_config["shift"] == 3.0
    assert c.path == tiny_dir


def test_load_wan_only_requested_components(tiny_dir):
    c = load_wan(tiny_dir, components=("vae",))
    assert c.vae is not None and c.transformer is None and c.text_encoder is None and c.tokenizer is None
    with pytest.raises(ValueError, match="accepted: transformer, vae, text_encoder, tokenizer"):
        load_wan(tiny_dir, components=("unet",))


def test_pipeline_generates_and_decode_to_frames_matches_it(comps, pipe):
    def run(output_type):
        return pipe(PROMPTS[0], num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    output_type=output_type, generator=torch.Generator().manual_seed(0)).frames

    latents = run("latent")
    video = run("np")
    assert latents.shape == (1, 16, 2, 4, 4)
    assert video.shape == (1, 5, 32, 32, 3)
    expected = torch.from_numpy(np.round(video * 255).astype(np.uint8))
    frames = decode_to_frames(comps.vae, latents)
    assert frames.dtype == torch.uint8 and frames.shape == (1, 5, 32, 32, 3)
    assert torch.equal(frames, expected)


def test_decode_in_chunks_equals_decode_at_once(comps):
    latents = torch.randn(3, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_to_frames(comps.vae, latents, batch_size=2), decode_to_frames(comps.vae, latents))


def test_encode_frames_normalises_the_latent_mode(comps):
    frames = torch.randint(0, 256, (2, 5, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    z = encode_frames(comps.vae, frames, batch_size=1)
    x = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    raw = comps.vae.encode(x).latent_dist.mean
    mean = torch.tensor(comps.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(comps.vae.config.latents_std).view(1, 16, 1, 1, 1)
    assert z.shape == (2, 16, 2, 4, 4) and z.dtype == torch.float32
    torch.testing.assert_close(z, (raw - mean) / std, rtol=1e-5, atol=1e-5)


class _PixelVAE(torch.nn.Module):
    """A VAE with Wan's interface whose latent is the pixels themselves (plus a constant channel)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(z_dim=4, latents_mean=[0.5, -1.0, 2.0, 3.0], latents_std=[2.0, 0.5, 4.0, 1.0])

    def encode(self, x):
        z = torch.cat([x * self.scale, torch.full_like(x[:, :1], 3.0)], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))  # no mode(): the mean is used

    def decode(self, z):
        return SimpleNamespace(sample=z[:, :3] / self.scale)


def test_frame_conversion_works_for_any_vae_with_the_wan_interface():
    vae = _PixelVAE()
    frames = torch.randint(0, 256, (2, 3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    z = encode_frames(vae, frames)
    # Constant channel 3.0 normalised with mean 3, std 1 is exactly zero; pixel channel 0 is (x - 0.5) / 2.
    assert torch.equal(z[:, 3], torch.zeros_like(z[:, 3]))
    torch.testing.assert_close(z[:, 0], (frames[..., 0].float() / 127.5 - 1 - 0.5) / 2.0)
    assert torch.equal(decode_to_frames(vae, z), frames)


def test_missing_component_folder_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    shutil.rmtree(d / "vae")
    with pytest.raises(FileNotFoundError, match=r"component 'vae': subfolder vae/ is missing") as err:
        load_wan(d)
    assert str(d) in str(err.value)
    # Not asking for the VAE makes the same directory loadable.
    assert load_wan(d, components=("tokenizer",)).tokenizer is not None


def test_missing_weights_are_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "text_encoder" / "model.safetensors").unlink()
    (d / "transformer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_wan(d)
    msg = str(err.value)
    assert "component 'text_encoder': missing text_encoder/weights" in msg
    assert "component 'transformer': missing transformer/config.json" in msg
    assert "'vae'" not in msg and str(d) in msg


def test_missing_directory_or_model_index(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_wan(tmp_path / "nowhere")
    d = _copy(tiny_dir, tmp_path)
    (d / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_wan(d)


def test_component_class_is_imported_from_model_index(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    index = json.loads((d / "model_index.json").read_text())
    # A full module path (as diffusers writes for classes outside its own library) is imported as named.
    index["vae"] = ["diffusers.models.autoencoders.autoencoder_kl_wan", "AutoencoderKLWan"]
    (d / "model_index.json").write_text(json.dumps(index))
    assert type(load_wan(d, components=("vae",)).vae).__name__ == "AutoencoderKLWan"
    index["vae"] = ["video_branch.no_such_module", "ToyVAE"]
    (d / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ImportError, match="component 'vae': cannot import ToyVAE from video_branch.no_such_module"):
        load_wan(d)


def test_bfloat16_loads_bf16_transformer_and_text_encoder(tiny_dir):
    c = load_wan(tiny_dir, dtype="bfloat16")
    # diffusers keeps Wan's norms, rope and time embedder in float32 on purpose.
    keep = c.transformer._keep_in_fp32_modules
    for name, p in c.transformer.named_parameters():
        assert p.dtype == (torch.float32 if any(k in name for k in keep) else torch.bfloat16), name
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
    n_bf16 = sum(p.numel() for p in c.transformer.parameters() if p.dtype == torch.bfloat16)
    assert n_bf16 > 0.9 * sum(p.numel() for p in c.transformer.parameters())
    assert {p.dtype for p in c.vae.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="model.dtype: unknown dtype 'fp8'; accepted: float32, bfloat16, float16"):
        load_wan(tiny_dir, dtype="fp8")


def test_prompt_cache_encodes_a_repeated_prompt_once(comps):
    enc = PromptEncoder(comps.text_encoder, comps.tokenizer, max_sequence_length=32)
    first = enc.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert enc.encoder_calls == 1 and len(enc) == 2
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])
    first[0].fill_(7.0)  # the caller owns its tensor; the cache must not change
    again = enc.encode([PROMPTS[1], PROMPTS[0]])
    assert enc.encoder_calls == 1
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[2])


def test_prompt_encoder_matches_wan_pipeline(comps, pipe):
    L = 512
    enc = PromptEncoder(comps.text_encoder, comps.tokenizer, max_sequence_length=L)
    with torch.no_grad():  # as in WanPipeline.__call__ (autograd mode picks other kernels: 1e-6 differences)
        ref_pos, ref_neg = pipe.encode_prompt(PROMPTS, negative_prompt="", do_classifier_free_guidance=True,
                                              max_sequence_length=L, device=torch.device("cpu"))
    pos = enc.encode(PROMPTS)
    assert pos.shape == (2, L, 32)
    assert torch.equal(pos, ref_pos)
    # The pipeline encodes the negative as a batch of two; a batch of one differs only by float rounding.
    torch.testing.assert_close(enc.negative("", batch_size=2), ref_neg, rtol=0, atol=1e-6)
    # Each row is zero after its real tokens ("a red circle moving left" = 5 words + </s>).
    n = len(comps.tokenizer(PROMPTS[0]).input_ids)
    assert n == 6
    assert pos[0, n:].abs().sum() == 0 and pos[0, n - 1].abs().sum() > 0


def test_toy_words_tokenize_to_distinct_single_ids(comps):
    tok = comps.tokenizer
    assert [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2]
    words = ["a", "red", "green", "blue", "circle", "square", "triangle", "moving", "left", "right", "up", "down"]
    ids = [tok(w, add_special_tokens=False).input_ids for w in words]
    assert all(len(i) == 1 for i in ids), ids
    assert len({i[0] for i in ids}) == len(words)
    assert set(words) <= set(tiny_text_vocab())
    # An unknown word is spelled out in letters, not collapsed to <unk>.
    assert tok.unk_token_id not in tok("zebra", add_special_tokens=False).input_ids


def test_velocity_shape_dtype_and_value(comps):
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 2, 4, 4, generator=g)
    t = torch.tensor([1000.0, 250.0])
    emb = torch.randn(2, 7, 32, generator=g)
    v = velocity(comps.transformer, latents, t, emb)
    assert v.shape == latents.shape and v.dtype == torch.float32
    with torch.no_grad():
        direct = comps.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
    torch.testing.assert_close(v, direct)
    with pytest.raises(ValueError, match="timesteps must be"):
        velocity(comps.transformer, latents, torch.ones(3), emb)


def test_velocity_of_bf16_transformer_returns_float32(tiny_dir):
    c = load_wan(tiny_dir, dtype="bfloat16", components=("transformer",))
    v = velocity(c.transformer, torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert v.dtype == torch.float32 and v.shape == (1, 16, 2, 4, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_gpu_attention_backends_on_cpu_raise_a_clear_error(comps, tiny_dir):
    for name in ("xformers", "flash"):
        with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*model.attention_backend: native"):
            set_attention_backend(comps.transformer, name)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_wan(tiny_dir, attention_backend="xformers", components=("transformer",))


def test_attention_backend_unknown_name_and_native(comps):
    with pytest.raises(ValueError, match="unknown backend 'sdpa'; accepted: native, xformers, flash"):
        set_attention_backend(comps.transformer, "sdpa")
    # Each block has one self- and one cross-attention processor.
    assert set_attention_backend(comps.transformer, "native") == 2 * comps.transformer.config.num_layers


def test_gradient_checkpointing_enabled_and_gradients_unchanged(tiny_dir):
    g = torch.Generator().manual_seed(5)
    inputs = (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([600.0]), torch.randn(1, 5, 32, generator=g))
    grads = {}
    for ckpt in (False, True):
        c = load_wan(tiny_dir, gradient_checkpointing=ckpt, components=("transformer",))
        assert c.transformer.is_gradient_checkpointing is ckpt
        velocity(c.transformer, *inputs).square().sum().backward()
        grads[ckpt] = [p.grad.clone() for p in c.transformer.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)


def test_build_tiny_wan_is_seeded_and_overridable():
    a, b = build_tiny_wan(seed=3), build_tiny_wan(seed=3)
    c = build_tiny_wan(seed=4, transformer_kwargs={"num_layers": 1}, text_kwargs={"d_model": 16, "d_kv": 4})
    sa, sb = a.transformer.state_dict(), b.transformer.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert c.transformer.config.num_layers == 1
    assert c.transformer.config.text_dim == 16 == c.text_encoder.config.d_model
    assert c.text_encoder.config.vocab_size == len(c.tokenizer)
    assert not torch.equal(a.vae.decoder.conv_out.weight, c.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="text_dim"):
        build_tiny_wan(transformer_kwargs={"text_dim": 64})
    with pytest.raises(ValueError, match="z_dim"):
        build_tiny_wan(vae_kwargs={"z_dim": 8})
