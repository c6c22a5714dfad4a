"""VideoAlign on a tiny random Qwen2-VL saved in the released VideoReward layout (no downloads)."""

import json
import os
import shutil

import pytest
import torch

import reward_models
from reward_models.videoalign import (
    REWARD_TOKENS,
    VisionSpec,
    build_prompt,
    frame_count,
    patchify,
    smart_resize,
    video_pixels,
)

pytestmark = pytest.mark.filterwarnings("ignore")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
INFERENCE = {"VQ_mean": 0.3, "VQ_std": 2.0, "MQ_mean": -0.1, "MQ_std": 0.5, "TA_mean": 0.0, "TA_std": 1.5}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([build_prompt("a red circle moving left", "detailed_special")] * 2, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                              unk_token=None, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _to_v445(key):
    """A transformers-5 key as transformers 4.45 (the released checkpoint's writer) named it."""
    return (key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1))


def _write_model_config(root, lora_r, lora_alpha):
    cfg = {
        "data_config": {"meta_data": "/x.csv", "data_dir": "/x", "max_frame_pixels": 200704, "num_frames": None,
                        "fps": 2.0, "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                        "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                         "use_special_tokens": True, "reward_token": "special", "torch_dtype": "bfloat16"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": lora_r, "lora_alpha": lora_alpha,
                             "lora_dropout": 0.05, "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens",
                                                                              "visual"],
                             "lora_task_type": "CAUSAL_LM", "use_rslora": False, "num_lora_modules": -1},
        "inference_config": INFERENCE,
    }
    with open(os.path.join(root, "model_config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("videoalign")
    base = root / "Qwen2-VL-tiny"
    tok = _tokenizer()
    tok.save_pretrained(base)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(base)
    with open(base / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "image_mean": MEAN, "image_std": STD,
                   "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136,
                   "max_pixels": 12845056, "rescale_factor": 1 / 255}, f)

    # "Training": the released recipe adds the reward tokens, a head, and LoRA on the language model.
    trained = Qwen2VLForConditionalGeneration.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    trained.resize_token_embeddings(len(tok))
    trained.rm_head = torch.nn.Linear(32, 1, bias=False)
    with torch.no_grad():
        trained.model.language_model.embed_tokens.weight[-3:].normal_(0, 1.0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|up_proj)",
                      lora_dropout=0.05, bias="none")
    peft_model = get_peft_model(trained, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.eval()

    lora_root = root / "VideoReward"
    ckpt = lora_root / "checkpoint-120"
    ckpt.mkdir(parents=True)
    (lora_root / "checkpoint-40").mkdir()  # an older step, ignored in favour of the latest
    _write_model_config(lora_root, 4, 8)
    adapter = {_to_v445(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert any(k.startswith("base_model.model.model.layers.0.") and "lora_A" in k for k in adapter)
    save_file(adapter, ckpt / "adapter_model.safetensors")
    with open(ckpt / "adapter_config.json", "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "use_rslora": False, "peft_type": "LORA"}, f)
    non_lora = {"base_model.model.model.embed_tokens.weight": trained.model.language_model.embed_tokens.weight,
                "base_model.model.rm_head.weight": trained.rm_head.weight}
    torch.save({k: v.detach().clone() for k, v in non_lora.items()}, ckpt / "non_lora_state_dict.pth")

    full_root = root / "VideoRewardFull"
    (full_root / "checkpoint-7").mkdir(parents=True)
    _write_model_config(full_root, 4, 8)
    full = {_to_v445(k): v.detach().clone() for k, v in peft_model.state_dict().items()}
    assert "base_model.model.visual.patch_embed.proj.weight" in full
    torch.save(full, full_root / "checkpoint-7" / "model.pth")
    return {"root": root, "base": str(base), "lora": str(lora_root), "full": str(full_root), "peft": peft_model,
            "tok": tok}


@pytest.fixture(scope="module")
def rm_lora(released):
    return reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136,
                               dtype="float32")


def _clips(n=2, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, 64, 64, 3), generator=g, dtype=torch.uint8)


def test_lora_release_loads_and_scores(released, rm_lora):
    # Agreement with a reference forward of the trained model: test_videoalign_parity.py.
    rm = rm_lora
    assert rm.files["adapter"].endswith(os.path.join("checkpoint-120", "adapter_model.safetensors"))
    frames, prompts = _clips(), ["a red circle moving left", "a blue square moving up"]
    out = rm(frames, prompts)
    assert set(out) == {"VQ", "MQ", "TA", "Overall"}
    for v in out.values():
        assert v.shape == (2,) and torch.isfinite(v).all()
    torch.testing.assert_close(out["Overall"], out["VQ"] + out["MQ"] + out["TA"])
    # The two clips differ, so a working model tells them apart.
    assert not torch.equal(out["VQ"][0], out["VQ"][1])


def test_full_model_pth_loads_to_the_same_scores(released, rm_lora):
    rm_full = reward_models.build("videoalign", path=released["full"], base_model=released["base"], min_pixels=3136,
                                  dtype="float32")
    frames, prompts = _clips(seed=1), ["x", "y"]
    a, b = rm_full(frames, prompts), rm_lora(frames, prompts)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


def test_same_clip_twice_gives_the_same_scores(rm_lora):
    rm = rm_lora
    clip = _clips(1, seed=2)
    out = rm(torch.cat([clip, clip]), ["a green triangle", "a green triangle"])
    for v in out.values():  # equal up to the last bit of a float32 matrix product over the batch
        assert abs(float(v[0]) - float(v[1])) <= 1e-6


def test_default_pixel_floor_upscales_and_still_scores(released):
    rm = reward_models.build("videoalign", path=released["lora"], base_model=released["base"], num_frames=6,
                             dtype="float32")
    inputs = rm.preprocess(_clips(1, t=7), ["p"])
    # 64x64 is below 128*28*28 pixels: upscaled to 336x336 (24x24 patches); 6 frames -> 3 temporal patches.
    assert inputs["video_grid_thw"].tolist() == [[3, 24, 24]]
    assert torch.isfinite(rm(_clips(1, t=7), ["p"])["Overall"]).all()


def test_missing_files_are_named(released, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(released["lora"], broken)
    os.remove(broken / "checkpoint-120" / "non_lora_state_dict.pth")
    with pytest.raises(FileNotFoundError, match="non_lora_state_dict.pth"):
        reward_models.build("videoalign", path=str(broken), base_model=released["base"])
    os.remove(broken / "model_config.json")
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        reward_models.build("videoalign", path=str(broken), base_model=released["base"])
    # The config names a hub id; nothing is downloaded, the error says how to point at a local copy.
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2-VL-2B-Instruct.*base_model"):
        reward_models.build("videoalign", path=released["lora"])
    with pytest.raises(FileNotFoundError, match="checkpoint-5"):
        reward_models.build("videoalign", path=released["lora"], base_model=released["base"], checkpoint_step=5)
    nopre = tmp_path / "base_without_preprocessor"
    shutil.copytree(released["base"], nopre)
    os.remove(nopre / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        reward_models.build("videoalign", path=released["lora"], base_model=str(nopre))


def test_patch_layout_matches_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    g = torch.Generator().manual_seed(3)
    f0, f1 = (torch.randint(0, 256, (56, 84, 3), generator=g, dtype=torch.uint8) for _ in range(2))
    # A clip whose frames come in equal pairs is what the image processor produces for two stills.
    clip = torch.stack([f0, f0, f1, f1])
    spec = VisionSpec(tuple(MEAN), tuple(STD), 14, 2, 2, 1 / 255)
    ours, grid = video_pixels(clip, torch.arange(4), (56, 84), spec)
    proc = Qwen2VLImageProcessorPil(image_mean=MEAN, image_std=STD)
    theirs = [proc.preprocess([f.numpy()], do_resize=False, return_tensors="pt") for f in (f0, f1)]
    assert grid == (2, 4, 6)
    torch.testing.assert_close(ours, torch.cat([t["pixel_values"] for t in theirs]).float(), atol=1e-5, rtol=1e-5)


def test_patchify_brute_force():
    video = torch.randn(4, 3, 56, 28)
    flat, (gt, gh, gw) = patchify(video, patch=14, temporal=2, merge=2)
    row = 0
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        expect = video[t * 2:t * 2 + 2, :, y:y + 14, x:x + 14].permute(1, 0, 2, 3).reshape(-1)
                        assert torch.equal(flat[row], expect)
                        row += 1
    assert row == flat.shape[0]


def test_frame_sampling_and_resizing_rules():
    assert frame_count(81, 16.0, 2.0, None) == 10  # 81 / 16 * 2 = 10.1 -> 10
    assert frame_count(9, 16.0, 2.0, None) == 4  # at least 4
    assert frame_count(200, 8.0, 2.0, None) == 50
    assert frame_count(9, 16.0, 2.0, 7) == 8 and frame_count(12, 16.0, 2.0, 12) == 12
    # More edge cases (short clips, num_frames beyond the clip): test_videoalign_edge_cases.py.
    # Wan 480x832 frames under the released 200704-pixel cap: beta = sqrt(399360 / 200704).
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)
    assert smart_resize(64, 64, 28, 3136, 200704) == (56, 56)


def test_prompt_template_has_each_reward_token_once():
    text = build_prompt("a cat", "detailed_special")
    for token in REWARD_TOKENS:
        assert text.count(token) == 1
    assert "Textual prompt - a cat\n" in text
    with pytest.raises(ValueError, match="prompt_template_type"):
        build_prompt("a cat", "simple")


def test_frames_are_checked(rm_lora):
    rm = rm_lora
    with pytest.raises(ValueError, match="uint8"):
        rm(torch.zeros(1, 4, 64, 64, 3), ["p"])
    with pytest.raises(ValueError, match="prompts"):
        rm(_clips(2), ["only one"])
