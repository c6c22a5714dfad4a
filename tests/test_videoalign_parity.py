"""VideoAlign scores against a reference forward written here: the released reward model feeds its language model
plain sequential positions 0..L-1 on all three rotary sections (transformers 4.45 with ``position_ids=None``), runs
LoRA unmerged in the model dtype, and reads the head at the three reward tokens."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import reward_models
from reward_models import videoalign

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_reward_videoalign as checkpoint  # noqa: E402

INFERENCE, MEAN, STD = checkpoint.INFERENCE, checkpoint.MEAN, checkpoint.STD
released = checkpoint.released  # the tiny release fixture

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPTS = ["a red circle moving left", "a small blue square slowly moving up and then down again"]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _clips(n, t, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t, h, w, 3), generator=g, dtype=torch.uint8)


def _patches(clip):
    """uint8 [T, H, W, 3] (T even, H and W multiples of 28) -> Qwen2-VL's flat normalised patches, by loops."""
    x = clip.permute(0, 3, 1, 2).double() / 255
    x = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(
        1, 3, 1, 1)
    t, _, h, w = x.shape
    rows = []
    for ti in range(t // 2):
        for bh in range(h // 28):
            for bw in range(w // 28):
                for mh in range(2):
                    for mw in range(2):
                        y, xx = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        rows.append(x[2 * ti:2 * ti + 2, :, y:y + 14, xx:xx + 14].permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows), (t // 2, h // 14, w // 14)


def reference_raw(released, clip, prompt, dtype=torch.float32):
    """Raw head outputs (VQ, MQ, TA) of one clip whose frames need no resampling nor resizing: the trained PEFT
    model (LoRA unmerged), vision features scattered into the video tokens, then the language model with explicit
    sequential position ids."""
    model = released["peft"].base_model.model
    tok = released["tok"]
    pixels, grid = _patches(clip)
    n_tokens = grid[0] * grid[1] * grid[2] // 4
    text = (SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * n_tokens + "<|vision_end|>"
            + videoalign._DETAILED_SPECIAL.replace("{text_prompt}", prompt) + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    lm = model.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens(ids)
        vis = model.model.visual(pixels.to(dtype), grid_thw=torch.tensor([grid])).pooler_output
        emb[ids == tok.convert_tokens_to_ids("<|video_pad|>")] = vis.to(emb.dtype)
        length = ids.shape[1]
        pos = torch.arange(length).view(1, 1, length).expand(3, 1, length)
        hidden = lm(inputs_embeds=emb, position_ids=pos).last_hidden_state[0]
        raw = []
        for token in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"):
            at = (ids[0] == tok.convert_tokens_to_ids(token)).nonzero()
            assert at.numel() == 1
            raw.append(model.rm_head(hidden[at[0, 0]]).float().item())
    return raw


def reference_scores(released, frames, prompts, dtype=torch.float32):
    raw = torch.tensor([reference_raw(released, c, p, dtype) for c, p in zip(frames, prompts)], dtype=torch.float64)
    out = {d: (raw[:, j] - INFERENCE[f"{d}_mean"]) / INFERENCE[f"{d}_std"] for j, d in enumerate(("VQ", "MQ", "TA"))}
    out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
    return out


@pytest.fixture(scope="module")
def rm32(released):
    # video_fps = fps = 2: a 6-frame clip keeps its 6 frames; 56x84 is already a multiple of 28 within the limits.
    return reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136,
                               video_fps=2.0, dtype="float32")


def test_scores_match_the_sequential_position_reference_in_fp32(released, rm32):
    frames = _clips(2, 6, 56, 84, seed=11)
    ours = rm32(frames, PROMPTS)
    ref = reference_scores(released, frames, PROMPTS)
    for k in ("VQ", "MQ", "TA", "Overall"):
        assert (ours[k].double() - ref[k]).abs().max().item() <= 1e-5, (k, ours[k], ref[k])


def test_batched_and_single_clip_scores_agree(rm32):
    # Right padding of the shorter prompt must not move the reward tokens' positions.
    frames = _clips(2, 6, 56, 84, seed=12)
    both = rm32(frames, PROMPTS)
    for i in range(2):
        one = rm32(frames[i:i + 1], PROMPTS[i:i + 1])
        for k in both:
            assert abs(float(both[k][i]) - float(one[k][0])) <= 1e-5


def test_full_state_dict_release_matches_the_reference(released):
    rm = reward_models.build("videoalign", path=released["full"], base_model=released["base"], min_pixels=3136,
                             video_fps=2.0, dtype="float32")
    frames = _clips(1, 6, 56, 84, seed=13)
    ours = rm(frames, PROMPTS[:1])
    ref = reference_scores(released, frames, PROMPTS[:1])
    for k in ours:
        assert abs(float(ours[k][0]) - float(ref[k][0])) <= 1e-5


def test_bf16_scores_are_the_bf16_reference_and_as_close_to_fp32_as_it(released):
    # bf16 as the released code runs it: every weight, the LoRA factors included, in bf16, LoRA unmerged.
    rm16 = reward_models.build("videoalign", path=released["lora"], base_model=released["base"], min_pixels=3136,
                               video_fps=2.0, dtype="bfloat16")
    frames = _clips(2, 6, 56, 84, seed=14)
    ours = rm16(frames, PROMPTS)
    ref32 = reference_scores(released, frames, PROMPTS)
    peft16 = copy.deepcopy(released["peft"]).to(torch.bfloat16)
    ref16 = reference_scores({**released, "peft": peft16}, frames, PROMPTS, dtype=torch.bfloat16)
    for k in ("VQ", "MQ", "TA", "Overall"):
        assert (ours[k].double() - ref16[k]).abs().max().item() <= 1e-4, k
        ours_err = (ours[k].double() - ref32[k]).abs().max().item()
        ref_err = (ref16[k] - ref32[k]).abs().max().item()
        assert ours_err <= ref_err + 1e-4, (k, ours_err, ref_err)
