"""HPS-v2.1, PickScore and CLIP score on tiny random CLIP models saved to tmp dirs (no downloads)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import reward_models
from reward_models.image import OPENAI_MEAN, OPENAI_STD, clip_pixels, open_clip_to_hf

pytestmark = pytest.mark.filterwarnings("ignore")

CTX = 16


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    # As in CLIP's vocabulary, end-of-text has the largest id (open_clip pools at argmax of the ids).
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _write_pixels(d, side=32, crop=32):
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side},
                   "crop_size": {"height": crop, "width": crop}, "image_mean": list(OPENAI_MEAN),
                   "image_std": list(OPENAI_STD), "do_center_crop": True, "resample": 3}, f)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clip")
    tok = _tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CTX, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=2.0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    _write_pixels(d)
    return str(d)


def _clips(b=2, t=1, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)


def _reference_cos(model_dir, images, prompts):
    """Cosine similarities from CLIPModel's own forward (logits_per_image / logit_scale)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompts, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt")["input_ids"]
    px = clip_pixels(images, 32, (32, 32), OPENAI_MEAN, OPENAI_STD)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
    return out.logits_per_image.diagonal() / model.logit_scale.exp(), model.logit_scale.exp().item()


def test_pixels_match_transformers_clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
    exact = _clips(1, 1, 32, 44, seed=5)[:, 0]  # no resize: only crop and normalise
    theirs = proc.preprocess([exact[0].numpy()], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(clip_pixels(exact, 32, (32, 32), OPENAI_MEAN, OPENAI_STD), theirs, atol=1e-5, rtol=0)
    smooth = F.interpolate(_clips(1, 1, 12, 16, seed=6)[:, 0].permute(0, 3, 1, 2).float(), size=(64, 80),
                           mode="bilinear").round().to(torch.uint8).permute(0, 2, 3, 1)
    theirs = proc.preprocess([smooth[0].numpy()], return_tensors="pt")["pixel_values"]
    ours = clip_pixels(smooth, 32, (32, 32), OPENAI_MEAN, OPENAI_STD)
    # PIL and torch bicubic differ by rounding: at most a couple of grey levels.
    assert (ours - theirs).abs().max() < 3 / 255 / min(OPENAI_STD)


@pytest.mark.parametrize("t", [1, 3])
def test_pickscore_and_clip_score_on_frame_zero(clip_dir, t):
    frames = _clips(2, t)
    prompts = ["a red cat", "blue dog"]
    cos, scale = _reference_cos(clip_dir, frames[:, 0], prompts)
    pick = reward_models.build("pickscore", path=clip_dir)(frames, prompts)["pickscore"]
    clip = reward_models.build("clip_score", path=clip_dir)(frames, prompts)["clip_score"]
    torch.testing.assert_close(pick, scale * cos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(clip, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=1e-4)


def test_mean_over_frames_is_the_mean_of_per_frame_scores(clip_dir):
    frames = _clips(2, 3, seed=1)
    prompts = ["green", "yellow sun"]
    rm = reward_models.build("pickscore", path=clip_dir, frames="mean", batch_size=4)
    single = reward_models.build("pickscore", path=clip_dir)
    per_frame = torch.stack([single(frames[:, i:i + 1], prompts)["pickscore"] for i in range(3)], dim=1)
    torch.testing.assert_close(rm(frames, prompts)["pickscore"], per_frame.mean(dim=1), atol=1e-4, rtol=1e-4)
    # Averaging really uses the later frames.
    assert not torch.allclose(per_frame[:, 0], per_frame.mean(dim=1))


def _open_clip_state(tw=32, vw=48, layers=2, patch=8, grid=4, vocab=54, proj=16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"token_embedding.weight": r(vocab, tw), "positional_embedding": r(CTX, tw), "text_projection": r(tw, proj),
          "ln_final.weight": 1 + r(tw), "ln_final.bias": r(tw), "logit_scale": torch.tensor(4.6),
          "visual.conv1.weight": r(vw, 3, patch, patch), "visual.class_embedding": r(vw),
          "visual.positional_embedding": r(grid * grid + 1, vw), "visual.proj": r(vw, proj),
          "visual.ln_pre.weight": 1 + r(vw), "visual.ln_pre.bias": r(vw),
          "visual.ln_post.weight": 1 + r(vw), "visual.ln_post.bias": r(vw)}
    for prefix, w in (("transformer", tw), ("visual.transformer", vw)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            sd.update({f"{p}.ln_1.weight": 1 + r(w), f"{p}.ln_1.bias": r(w), f"{p}.ln_2.weight": 1 + r(w),
                       f"{p}.ln_2.bias": r(w), f"{p}.attn.in_proj_weight": r(3 * w, w),
                       f"{p}.attn.in_proj_bias": r(3 * w), f"{p}.attn.out_proj.weight": r(w, w),
                       f"{p}.attn.out_proj.bias": r(w), f"{p}.mlp.c_fc.weight": r(4 * w, w),
                       f"{p}.mlp.c_fc.bias": r(4 * w), f"{p}.mlp.c_proj.weight": r(w, 4 * w),
                       f"{p}.mlp.c_proj.bias": r(w)})
    return sd


def _oc_blocks(x, sd, prefix, heads, mask=None):
    """open_clip's residual attention blocks, with torch's MultiheadAttention (as open_clip uses)."""
    w = x.shape[-1]
    i = 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}.resblocks.{i}"
        mha = torch.nn.MultiheadAttention(w, heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": sd[f"{p}.attn.in_proj_weight"],
                             "in_proj_bias": sd[f"{p}.attn.in_proj_bias"],
                             "out_proj.weight": sd[f"{p}.attn.out_proj.weight"],
                             "out_proj.bias": sd[f"{p}.attn.out_proj.bias"]})
        h = F.layer_norm(x, (w,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        x = x + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = F.layer_norm(x, (w,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])),
                         sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])
        i += 1
    return x


def _open_clip_hps(sd, pixels, ids, heads=2):
    """HPS score, open_clip's way: normalised encode_image . encode_text."""
    vw = sd["visual.conv1.weight"].shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (vw,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _oc_blocks(x, sd, "visual.transformer", heads)
    img = F.layer_norm(x, (vw,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])[:, 0] @ sd["visual.proj"]
    tw = sd["token_embedding.weight"].shape[1]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = _oc_blocks(t, sd, "transformer", heads, mask)
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    tok = _tokenizer()
    tok.save_pretrained(d / "tokenizer")
    sd = _open_clip_state(vocab=len(tok))
    # The HPS release stores {"state_dict": ...}; a DDP-trained one may prefix "module.".
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "HPS_v2.1_compressed.pt")
    return {"ckpt": str(d / "HPS_v2.1_compressed.pt"), "tok": str(d / "tokenizer"), "sd": sd, "tok_obj": tok}


@pytest.mark.parametrize("t", [1, 4])
def test_hps_matches_an_open_clip_forward(hps_files, t):
    frames = _clips(3, t, 36, 30, seed=2)
    prompts = ["a cat on a mat", "dog", "zebra crossing the street at night"]
    rm = reward_models.build("hps", checkpoint=hps_files["ckpt"], tokenizer=hps_files["tok"], text_heads=2,
                             vision_heads=2)
    out = rm(frames, prompts)["hps"]
    ids = hps_files["tok_obj"](prompts, padding="max_length", max_length=CTX, truncation=True,
                               return_tensors="pt")["input_ids"]
    px = clip_pixels(frames[:, 0], 32, (32, 32), OPENAI_MEAN, OPENAI_STD)
    with torch.no_grad():
        ref = _open_clip_hps(hps_files["sd"], px, ids)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert out.shape == (3,) and torch.all(out.abs() <= 1)


def test_open_clip_conversion_reads_dimensions():
    cfg, hf = open_clip_to_hf(_open_clip_state(tw=32, vw=48, layers=3, patch=4, grid=5), text_heads=4,
                              vision_heads=4, eos_token_id=53)
    assert cfg.vision_config.image_size == 20 and cfg.vision_config.patch_size == 4
    assert cfg.text_config.num_hidden_layers == 3 and cfg.vision_config.num_hidden_layers == 3
    assert cfg.vision_config.hidden_size == 48 and cfg.projection_dim == 16
    assert hf["visual_projection.weight"].shape == (16, 48)
    with pytest.raises(KeyError, match="open_clip"):
        open_clip_to_hf({"token_embedding.weight": torch.zeros(3, 4)})


def test_missing_paths_and_bad_options_are_named(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        reward_models.build("pickscore", path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        reward_models.build("hps", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"), tokenizer=clip_dir)
    with pytest.raises(ValueError, match="frames"):
        reward_models.build("clip_score", path=clip_dir, frames="last")
    with pytest.raises(TypeError, match="'pickscore'.*unknown option 'processer'"):
        reward_models.build("pickscore", path=clip_dir, processer=clip_dir)
