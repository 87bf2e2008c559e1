#!/usr/bin/env python3
"""The tiny Qwen2 models' config.json as transformers 5 writes it (issue 15, item 5).

transformers 5 writes a model directory's config.json in another layout than 4.x: Qwen2-VL's
text settings nested under `text_config` (4.x: at the top level), and for both families the rope
settings in one `rope_parameters` map holding `rope_theta` (and Qwen2-VL's `mrope_section`)
where 4.x wrote a flat `rope_theta` and Qwen2-VL's `rope_scaling`. The weights' names on disk
are the same as 4.51's (checked below), so only the configs are stored:

    fixtures/qwen2-audio-tiny-tf5/config.json
    fixtures/qwen2-vl-tiny-tf5/config.json

Each is built from the same hyper-parameters as the 4.x fixture (make_qwen2_fixtures.py's
`audio_config` and `vl_config`, run here under transformers 5), then checked before it is
written: transformers 5 builds a model from it, loads the 4.x fixture's weights into it, and
must reproduce the 4.x case's stored logits (1e-4 relative, the Rust tests' tolerance); saving
that model must write the 4.x fixture's parameter names. The Rust side
(models/tests/qwen2_reference.rs) then builds each model from the tf5 config with the 4.x
directory's weights and checks it against the same logits.

Run (CPU only):
    python3 -m venv .venv-tf5
    .venv-tf5/bin/pip install -r tests/reference/requirements-tf5.txt
    .venv-tf5/bin/python tests/reference/make_tf5_configs.py
"""

import json
import os
import shutil
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Qwen2AudioForConditionalGeneration, Qwen2VLForConditionalGeneration

import make_qwen2_fixtures as fx

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def audio_logits(model, case):
    return model(input_ids=case["input_ids"], input_features=case["input_features"],
                 feature_attention_mask=case["feature_attention_mask"]).logits


def vl_logits(model, case):
    # transformers 5's Qwen2-VL takes the tokens' modalities (0 text, 1 image, 2 video) from
    # the processor to place M-RoPE's positions; 4.51 found them from the ids. Same positions.
    ids = case["input_ids"]
    types = (ids == fx.IMAGE_TOKEN).long() + 2 * (ids == fx.VIDEO_TOKEN).long()
    return model(input_ids=ids, mm_token_type_ids=types, pixel_values=case["pixel_values"],
                 image_grid_thw=case["image_grid_thw"],
                 pixel_values_videos=case["pixel_values_videos"],
                 video_grid_thw=case["video_grid_thw"]).logits


FAMILIES = [
    # (4.x directory, case file, config builder, model class, forward)
    ("qwen2-audio-tiny", "qwen2_audio_case.safetensors", fx.audio_config,
     Qwen2AudioForConditionalGeneration, audio_logits),
    ("qwen2-vl-tiny", "qwen2_vl_case.safetensors", fx.vl_config,
     Qwen2VLForConditionalGeneration, vl_logits),
]


def parameter_names(path):
    """The tensor names of a saved model directory, sharded or not."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(json.load(f)["weight_map"])
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def relative_error(got, want):
    """Largest |got - want| over the largest |want|, at the worst position."""
    diff = (got - want).abs().amax(dim=-1)
    return (diff / want.abs().amax(dim=-1)).max().item()


def write_config(name, case_file, make_config, cls, forward):
    old_dir = os.path.join(FIXTURES, name)
    case = load_file(os.path.join(FIXTURES, case_file))
    model = cls.from_pretrained(old_dir, config=make_config(), dtype=torch.float32,
                                attn_implementation="eager").eval()
    with torch.no_grad():
        err = relative_error(forward(model, case), case["logits"])
    print(f"{name}: transformers {transformers.__version__} on the tf5 config and the 4.x "
          f"weights: logits relative error {err:.3e}")
    assert err <= 1e-4, err

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        assert parameter_names(tmp) == parameter_names(old_dir), "parameter names differ"
        out_dir = os.path.join(FIXTURES, f"{name}-tf5")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        shutil.copy(os.path.join(tmp, "config.json"), out_dir)
    print(f"wrote {out_dir}/config.json")


def main():
    assert transformers.__version__.split(".")[0] == "5", transformers.__version__
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for family in FAMILIES:
        write_config(*family)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
