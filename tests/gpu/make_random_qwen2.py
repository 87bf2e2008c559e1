#!/usr/bin/env python3
"""Random-weight Qwen2-Audio and Qwen2-VL model directories, for timing xkd at a size that
means something (tests/gpu/check.sh, part 3). Needs torch and safetensors only (no
transformers, no network): the tensor names and shapes come from the rules below, which follow
transformers 4.51's layout of the two architectures (what the published checkpoints use).

    make_random_qwen2.py OUT        writes OUT/qwen2-audio and OUT/qwen2-vl: the tiny fixture
                                    directories' tokenizer and special-token ids, scaled up to
                                    the sizes in MEDIUM (about 0.65 and 0.5 billion parameters),
                                    weights in bf16 (normal(0, 0.02) matrices, unit norms, zero
                                    biases), the audio window the real 30 s
    make_random_qwen2.py OUT --layers N
                                    the same with N layers in every stack (a quick run on a CPU)
    make_random_qwen2.py OUT --cpu  writes OUT/qwen2-audio and OUT/qwen2-vl at the sizes in CPU
                                    (Qwen2's whole 151,936-token vocabulary on 4 layers of width
                                    256: about 82 million parameters each, most of them the
                                    embeddings and the head), with the Python standard library
                                    alone: the bf16 weights are one block of normal(0, 0.02)
                                    values drawn once from a seeded generator and repeated.
                                    What tests/plan.rs checks `xkd plan` against on a CPU.
    make_random_qwen2.py --check    checks the rules against the tiny fixtures that transformers
                                    itself wrote (tests/reference/make_qwen2_fixtures.py): every
                                    name and shape must agree. Needs neither torch nor safetensors.
"""
import copy
import json
import shutil
import struct
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "reference" / "fixtures"

# The LM of both: 12 layers of width 1024 (16 query heads, 4 key/value heads of 64), Qwen2's
# 151,936-token vocabulary. Audio encoder and vision tower: 12 layers of width 1024.
TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
MEDIUM = {
    "qwen2-audio": {
        "config": {
            "text_config": TEXT,
            "audio_config": {
                "d_model": 1024,
                "encoder_layers": 12,
                "num_hidden_layers": 12,
                "encoder_attention_heads": 16,
                "encoder_ffn_dim": 4096,
                "max_source_positions": 1500,
            },
            "torch_dtype": "bfloat16",
        },
        # Whisper's 30-s window, as Qwen2-Audio's checkpoints have it.
        "preprocessor": {"chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000},
    },
    "qwen2-vl": {
        "config": {
            **TEXT,
            "rope_scaling": {"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
            "vision_config": {"embed_dim": 1024, "depth": 12, "num_heads": 16, "hidden_size": 1024},
        },
        "preprocessor": {},
    },
}


# A pair a CPU runs a few distillation steps of in seconds, whose memory is mostly weights: a
# 6-second audio window (150 audio tokens for a 6-s clip), a small vision tower.
CPU_TEXT = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}
CPU = {
    "qwen2-audio": {
        "config": {
            "text_config": CPU_TEXT,
            "audio_config": {
                "d_model": 256,
                "encoder_layers": 2,
                "num_hidden_layers": 2,
                "encoder_attention_heads": 4,
                "encoder_ffn_dim": 1024,
                "max_source_positions": 300,
            },
            "torch_dtype": "bfloat16",
        },
        "preprocessor": {"chunk_length": 6, "n_samples": 96000, "nb_max_frames": 600},
    },
    "qwen2-vl": {
        "config": {
            **CPU_TEXT,
            "rope_scaling": {"mrope_section": [8, 12, 12], "rope_type": "default", "type": "default"},
            "vision_config": {"embed_dim": 128, "depth": 2, "num_heads": 2, "hidden_size": 256},
        },
        "preprocessor": {},
    },
}


def merge(base, over):
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def text_shapes(c, prefix, lm_head):
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    s = {f"{prefix}embed_tokens.weight": [v, h], f"{prefix}norm.weight": [h]}
    for n in range(c["num_hidden_layers"]):
        p = f"{prefix}layers.{n}."
        s |= {
            p + "input_layernorm.weight": [h],
            p + "post_attention_layernorm.weight": [h],
            p + "self_attn.q_proj.weight": [heads * d, h],
            p + "self_attn.q_proj.bias": [heads * d],
            p + "self_attn.k_proj.weight": [kv * d, h],
            p + "self_attn.k_proj.bias": [kv * d],
            p + "self_attn.v_proj.weight": [kv * d, h],
            p + "self_attn.v_proj.bias": [kv * d],
            p + "self_attn.o_proj.weight": [h, heads * d],
            p + "mlp.gate_proj.weight": [i, h],
            p + "mlp.up_proj.weight": [i, h],
            p + "mlp.down_proj.weight": [h, i],
        }
    if lm_head:
        s[lm_head] = [v, h]
    return s


def audio_shapes(c):
    a, t = c["audio_config"], c["text_config"]
    d, f = a["d_model"], a["encoder_ffn_dim"]
    s = {
        "audio_tower.conv1.weight": [d, a["num_mel_bins"], 3],
        "audio_tower.conv1.bias": [d],
        "audio_tower.conv2.weight": [d, d, 3],
        "audio_tower.conv2.bias": [d],
        "audio_tower.embed_positions.weight": [a["max_source_positions"], d],
        "audio_tower.layer_norm.weight": [d],
        "audio_tower.layer_norm.bias": [d],
        "multi_modal_projector.linear.weight": [t["hidden_size"], d],
        "multi_modal_projector.linear.bias": [t["hidden_size"]],
    }
    for n in range(a["encoder_layers"]):
        p = f"audio_tower.layers.{n}."
        for proj in ("q_proj", "v_proj", "out_proj"):
            s |= {p + f"self_attn.{proj}.weight": [d, d], p + f"self_attn.{proj}.bias": [d]}
        s |= {
            p + "self_attn.k_proj.weight": [d, d],
            p + "self_attn_layer_norm.weight": [d],
            p + "self_attn_layer_norm.bias": [d],
            p + "fc1.weight": [f, d],
            p + "fc1.bias": [f],
            p + "fc2.weight": [d, f],
            p + "fc2.bias": [d],
            p + "final_layer_norm.weight": [d],
            p + "final_layer_norm.bias": [d],
        }
    tied = c.get("tie_word_embeddings", False)
    return s | text_shapes(t, "language_model.model.", None if tied else "language_model.lm_head.weight")


def vl_shapes(c):
    v = c["vision_config"]
    e, m = v["embed_dim"], v["spatial_merge_size"] ** 2
    mlp = int(e * v["mlp_ratio"])
    patch = [e, v["in_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"]]
    s = {
        "visual.patch_embed.proj.weight": patch,
        "visual.merger.ln_q.weight": [e],
        "visual.merger.ln_q.bias": [e],
        "visual.merger.mlp.0.weight": [e * m, e * m],
        "visual.merger.mlp.0.bias": [e * m],
        "visual.merger.mlp.2.weight": [v["hidden_size"], e * m],
        "visual.merger.mlp.2.bias": [v["hidden_size"]],
    }
    for n in range(v["depth"]):
        p = f"visual.blocks.{n}."
        s |= {
            p + "norm1.weight": [e],
            p + "norm1.bias": [e],
            p + "norm2.weight": [e],
            p + "norm2.bias": [e],
            p + "attn.qkv.weight": [3 * e, e],
            p + "attn.qkv.bias": [3 * e],
            p + "attn.proj.weight": [e, e],
            p + "attn.proj.bias": [e],
            p + "mlp.fc1.weight": [mlp, e],
            p + "mlp.fc1.bias": [mlp],
            p + "mlp.fc2.weight": [e, mlp],
            p + "mlp.fc2.bias": [e],
        }
    tied = c.get("tie_word_embeddings", False)
    return s | text_shapes(c, "model.", None if tied else "lm_head.weight")


SHAPES = {"qwen2-audio": audio_shapes, "qwen2-vl": vl_shapes}


def stored_shapes(d):
    """Name -> shape of every tensor in the safetensors files of directory d (headers only)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        out |= {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return out


def check():
    bad = 0
    for name, shapes in SHAPES.items():
        d = FIXTURES / f"{name}-tiny"
        want = stored_shapes(d)
        got = shapes(json.loads((d / "config.json").read_text()))
        for k in sorted(want.keys() | got.keys()):
            if want.get(k) != got.get(k):
                print(f"{name}: {k}: fixture {want.get(k)}, rules {got.get(k)}")
                bad += 1
        print(f"{name}: {len(want)} fixture tensors, {len(got)} from the rules")
    print("rules match the fixtures" if bad == 0 else f"{bad} mismatches")
    return 1 if bad else 0


def with_layers(over, n):
    """`over` with every stack's depth set to n."""
    out = copy.deepcopy(over)
    for c in (out["config"], out["config"].get("text_config"), out["config"].get("audio_config"),
              out["config"].get("vision_config")):
        for k in ("num_hidden_layers", "encoder_layers", "depth"):
            if c is not None and k in c:
                c[k] = n
    return out


def write(out, layers=None):
    import torch
    from safetensors.torch import save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, over in MEDIUM.items():
        over = with_layers(over, layers) if layers else over
        tiny, d = FIXTURES / f"{name}-tiny", Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "generation_config.json"):
            shutil.copy(tiny / f, d / f)
        config = merge(json.loads((tiny / "config.json").read_text()), over["config"])
        pre = merge(json.loads((tiny / "preprocessor_config.json").read_text()), over["preprocessor"])
        (d / "config.json").write_text(json.dumps(config, indent=2))
        (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        tensors = {}
        for k, shape in SHAPES[name](config).items():
            if len(shape) == 1:
                norm = "norm" in k and k.endswith(".weight") or k.endswith("ln_q.weight")
                t = (torch.ones if norm else torch.zeros)(shape, device=dev)
            else:
                t = torch.randn(shape, generator=gen, device=dev) * 0.02
            tensors[k] = t.to(torch.bfloat16).cpu().contiguous()
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        count = sum(t.numel() for t in tensors.values())
        print(f"{d}: {len(tensors)} tensors, {count / 1e6:.0f}M parameters")


def write_stdlib(out, sizes):
    """`write` without torch: safetensors written by hand (an 8-byte header length, the JSON
    header, the bytes), bf16 values cut from one seeded block."""
    import random

    rng = random.Random(0)
    block = bytearray()
    for _ in range(1 << 16):
        # bf16 is the upper half of an f32.
        block += struct.pack("<f", rng.gauss(0.0, 0.02))[2:]
    one, zero = struct.pack("<f", 1.0)[2:], b"\0\0"
    for name, over in sizes.items():
        tiny, d = FIXTURES / f"{name}-tiny", Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "generation_config.json"):
            shutil.copy(tiny / f, d / f)
        config = merge(json.loads((tiny / "config.json").read_text()), over["config"])
        pre = merge(json.loads((tiny / "preprocessor_config.json").read_text()), over["preprocessor"])
        (d / "config.json").write_text(json.dumps(config, indent=2))
        (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        shapes = SHAPES[name](config)
        header, offset = {}, 0
        for k, shape in shapes.items():
            n = 2
            for x in shape:
                n *= x
            header[k] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        count = 0
        with open(d / "model.safetensors", "wb") as fh:
            fh.write(struct.pack("<Q", len(text)) + text)
            for i, (k, shape) in enumerate(shapes.items()):
                n = header[k]["data_offsets"][1] - header[k]["data_offsets"][0]
                count += n // 2
                if len(shape) == 1:
                    norm = "norm" in k and k.endswith(".weight") or k.endswith("ln_q.weight")
                    fh.write((one if norm else zero) * (n // 2))
                    continue
                start = (i * 4099 * 2) % len(block)
                rolled = block[start:] + block[:start]
                fh.write(rolled * (n // len(rolled)) + rolled[: n % len(rolled)])
        print(f"{d}: {len(shapes)} tensors, {count / 1e6:.0f}M parameters")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    args = sys.argv[1:]
    if len(args) == 3 and args[1] == "--layers" and args[2].isdigit() and int(args[2]) > 0:
        write(args[0], int(args[2]))
    elif len(args) == 2 and args[1] == "--cpu":
        write_stdlib(args[0], CPU)
    elif len(args) == 1 and not args[0].startswith("-"):
        write(args[0])
    else:
        sys.exit(__doc__)
