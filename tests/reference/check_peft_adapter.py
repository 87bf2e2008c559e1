"""Checks a LoRA adapter the Rust side wrote against PEFT (issue 4, phase 2a).

Loads the tiny fixture model of one family (tests/reference/fixtures/qwen2-{audio,vl}-tiny),
puts the adapter directory on it with PeftModel.from_pretrained (adapter_model.safetensors and
adapter_config.json, PEFT's own format), runs the family's fixture inputs and compares the
logits with those the Rust side computed with the same adapter (logits.safetensors in the
adapter directory, key "logits").

The error is measured as in models/tests/qwen2_reference.rs: at every position, the largest
difference over the vocabulary divided by the largest reference logit there; the worst position
is printed. Exits non-zero above 1e-4, or if PEFT put adapters on no module or on a module
outside the language model, or if the adapter leaves the logits unchanged (a check that could
not fail).

    cargo run --release -p xkd-models --example lora_peft_fixture -- audio /tmp/lora-audio
    python tests/reference/check_peft_adapter.py audio /tmp/lora-audio

The adapter an `xkd run` saved (`<out>/student-lora`, e.g. from configs/tiny-qwen2.toml, whose
student is qwen2-audio-tiny; with distill.direction=audio_to_visual it is qwen2-vl-tiny) is
checked the same way, the example taking it as a third argument instead of training one:

    cargo run --release -p xkd-models --example lora_peft_fixture -- audio /tmp/c runs/X/student-lora
    python tests/reference/check_peft_adapter.py audio /tmp/c

Environment: requirements-qwen2.txt (torch 2.7.0, transformers 4.51.3, peft 0.15.2).
"""

import argparse
import os
import sys

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2AudioForConditionalGeneration, Qwen2VLForConditionalGeneration

TOLERANCE = 1e-4
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FAMILIES = {
    "audio": (Qwen2AudioForConditionalGeneration, "qwen2-audio-tiny",
              "qwen2_audio_case.safetensors", "language_model.model.layers."),
    "vl": (Qwen2VLForConditionalGeneration, "qwen2-vl-tiny",
           "qwen2_vl_case.safetensors", "model.layers."),
}


def inputs(family, case):
    if family == "audio":
        return dict(input_ids=case["input_ids"], input_features=case["input_features"],
                    feature_attention_mask=case["feature_attention_mask"])
    return dict(input_ids=case["input_ids"], pixel_values=case["pixel_values"],
                image_grid_thw=case["image_grid_thw"],
                pixel_values_videos=case["pixel_values_videos"],
                video_grid_thw=case["video_grid_thw"])


def worst_position(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got - want).abs().amax(-1) / want.abs().amax(-1)
    worst = int(diff.flatten().argmax())
    return worst, float(diff.flatten()[worst])


def lora_modules(model):
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A")
                  and "default" in module.lora_A)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("adapter", help="directory the Rust side wrote")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    cls, model_dir, case_file, lm_layers = FAMILIES[args.family]

    base = cls.from_pretrained(os.path.join(FIXTURES, model_dir),
                               torch_dtype=torch.float32).eval()
    case = load_file(os.path.join(FIXTURES, case_file))
    with torch.no_grad():
        base_logits = base(**inputs(args.family, case)).logits
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    modules = lora_modules(model)
    outside = [m for m in modules if lm_layers not in m]
    with torch.no_grad():
        got = model(**inputs(args.family, case)).logits
    want = load_file(os.path.join(args.adapter, "logits.safetensors"))["logits"]

    at, err = worst_position(want, got)
    _, moved = worst_position(got, base_logits)
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    print(f"{args.family}: PEFT put LoRA on {len(modules)} modules "
          f"({len(outside)} outside the language model)")
    print(f"{args.family}: adapter moves the logits by {moved:.3e} relative (worst position)")
    print(f"{args.family}: Rust vs PEFT logits {tuple(got.shape)}: worst position {at}, "
          f"relative error {err:.3e} (tolerance {TOLERANCE:g})")
    failed = not modules or outside or moved < 1e-3 or not err <= TOLERANCE
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
