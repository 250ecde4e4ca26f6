import torch

from pcpp_core import model_version
from pcpp_testmodels import tiny_comfy_unet


def test_version_follows_weights_and_the_callers_key():
    m = tiny_comfy_unet()
    v = model_version(m)
    assert model_version(m) == v  # stable while nothing changes
    with torch.no_grad():
        m.out[2].weight.add_(1.0)  # in place: the version counter moves
    v2 = model_version(m)
    assert v2 != v
    m.out[2].weight = torch.nn.Parameter(m.out[2].weight.detach().clone())  # replaced
    assert model_version(m) != v2
    assert model_version(m, "lora-a") != model_version(m, "lora-b")
    assert model_version(m, "lora-a") == model_version(m, "lora-a")


def test_inference_tensors_have_a_version_too():
    with torch.inference_mode():
        m = tiny_comfy_unet()  # weights created as inference tensors: no version counter
    assert model_version(m, 1) != model_version(m, 2)
