#!/usr/bin/env python3
"""Writes the architecture part of the paper pair's config.json files, for `xkd plan` on a
machine that does not hold the 7B model directories (the configs' `dir`s):

    configs/arch/Qwen2-Audio-7B-Instruct/config.json
    configs/arch/Qwen2-VL-7B-Instruct/config.json

Why not transformers' class defaults: `Qwen2VLConfig()` builds a 72B-sized text model (8192
wide, 80 layers), and `Qwen2AudioConfig()`'s text model has `Qwen2Config`'s 22016-wide MLP, not
the checkpoint's 11008. So the keys below are the ones the Hub repositories' own config.json
files set (transformers 4.x layout, as published), read on the Hub's pages through the
project's documentation search (no download of the models):

- Qwen/Qwen2-Audio-7B-Instruct, config.json at commit 9fffe918 (the same architecture keys as
  Qwen/Qwen2-Audio-7B): audio_config 128 mel bins, 32 encoder layers, 20 heads, FFN 5120,
  d_model 1280 (Whisper-large-v3's encoder), 1500 source positions; text_config sets only the
  MLP width 11008, rms_norm_eps 1e-5, rope_theta 10000 and the 156,032 vocabulary, leaving
  hidden size 4096, 32 layers, 32 heads and 32 key/value heads to Qwen2Config's defaults.
- Qwen/Qwen2-VL-7B-Instruct (its config.json as copies of the snapshot a7a06a1c carry it, and
  Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int8): hidden 3584, MLP 18944, 28 layers, 28 heads, 4
  key/value heads, vocabulary 152,064, untied head, rope_theta 1e6, M-RoPE sections
  [16, 24, 24]; vision_config sets only `in_chans` and `spatial_patch_size`, the rest are
  Qwen2VLVisionConfig's defaults (depth 32, embed_dim 1280, 16 heads, mlp_ratio 4, merger to
  3584, patch 14, temporal patch 2, 2x2 merge).

xkd reads these with models/src/qwen/config.rs, exactly as it reads a model directory.
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

CONFIGS = {
    "Qwen2-Audio-7B-Instruct": {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "audio_config": {
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
            "d_model": 1280,
            "activation_function": "gelu",
            "scale_embedding": False,
            "max_source_positions": 1500,
        },
        "audio_token_index": 151646,
        "model_type": "qwen2_audio",
        "text_config": {
            "intermediate_size": 11008,
            "max_position_embeddings": 8192,
            "model_type": "qwen2",
            "rope_theta": 10000,
            "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16",
            "vocab_size": 156032,
        },
        "vocab_size": 156032,
    },
    "Qwen2-VL-7B-Instruct": {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_act": "silu",
        "hidden_size": 3584,
        "image_token_id": 151655,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "model_type": "qwen2_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [16, 24, 24], "type": "mrope"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "video_token_id": 151656,
        "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14},
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
        "vocab_size": 152064,
    },
}

for name, config in CONFIGS.items():
    d = HERE / name
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(d / "config.json")
