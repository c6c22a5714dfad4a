"""Short text with the padding bias gives the same transformer output as the full zero-padded sequence."""

import copy

import torch

from video_branch.models.text_padding import enable_padded_text, padding_bias
from video_branch.models.tiny import build_tiny_wan


def test_bias_values_by_hand():
    e = torch.zeros(2, 5, 3)
    e[0, :2] = 1.0  # 2 real tokens, 3 pads
    e[1, :4] = 1.0  # 4 real tokens, 1 pad
    b = padding_bias(e, 512)[:, 0, 0]
    assert torch.allclose(b[0], torch.tensor([0, 0, *[torch.log(torch.tensor(510 / 3.0))] * 3]))
    assert torch.allclose(b[1], torch.tensor([0, 0, 0, 0, torch.log(torch.tensor(508.0))]))


def test_short_padded_text_equals_full_padding():
    torch.manual_seed(0)
    pipe = build_tiny_wan(None, seed=0)
    full = pipe.transformer.eval()
    short = copy.deepcopy(full)
    enable_padded_text(short, 64)
    twin = copy.deepcopy(short)  # the hook must follow the copy
    x = torch.randn(2, 16, 2, 4, 4)
    t = torch.tensor([900.0, 300.0])
    text = torch.zeros(2, 64, 32)
    text[0, :3] = torch.randn(3, 32)
    text[1, :6] = torch.randn(6, 32)
    with torch.no_grad():
        ref = full(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        out = short(hidden_states=x, timestep=t, encoder_hidden_states=text[:, :8], return_dict=False)[0]
        out2 = twin(hidden_states=x, timestep=t, encoder_hidden_states=text[:, :8], return_dict=False)[0]
        plain = full(hidden_states=x, timestep=t, encoder_hidden_states=text[:, :8], return_dict=False)[0]
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(out2, ref, atol=1e-5)
    assert not torch.allclose(plain, ref, atol=1e-3)  # without the bias the short sequence differs
