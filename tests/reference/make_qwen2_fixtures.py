#!/usr/bin/env python3
"""Reference fixtures for the Qwen2-Audio and Qwen2-VL models of `xkd-models` (issue 4).

Builds two tiny, randomly initialised models with transformers (fixed seed, float32), saves them
as Hugging Face model directories, runs them on real inputs and stores what the Rust side must
reproduce. Checked by models/tests/qwen2_reference.rs.

    fixtures/qwen2-audio-tiny/   config.json, model.safetensors, preprocessor_config.json
    fixtures/qwen2-vl-tiny/      config.json, model-0000{1,2}-of-00002.safetensors,
                                 model.safetensors.index.json (sharded on purpose, so the
                                 sharded loader is exercised), preprocessor_config.json
    fixtures/qwen2_audio_case.safetensors, fixtures/qwen2_vl_case.safetensors

The tiny models keep the real structure: grouped-query attention (fewer KV heads than heads),
q/k/v biases, RMSNorm, SwiGLU, the config's rope theta and RMS epsilon; Qwen2-Audio's Whisper-style
encoder over 128 mel bins (its 30 s window shrunk to 2 s: max_source_positions 100), average pool
and projector, untied LM head (as Qwen2-Audio-7B); Qwen2-VL's ViT with 14x14 patches, temporal
patch 2, 2-D rotary, 2x2 merger, M-RoPE with an mrope_section, tied LM head (as Qwen2-VL-2B).
Placeholder token ids are set inside the small vocabulary. Every parameter is perturbed away
from its initial value (norm weights away from one, biases away from zero), so a missing
weight or bias shows in the logits; the audio position table holds Whisper's sinusoids, as the
real checkpoint does.

Inputs are real: sounds and pictures from Debian's package tuxpaint-stamps-default
(2022.06.04-1), fetched and unpacked with

    apt-get download tuxpaint-stamps-default
    dpkg-deb -x tuxpaint-stamps-default_*_all.deb /tmp/tux

and passed as --stamps /tmp/tux/usr/share/tuxpaint/stamps. The decoded inputs are stored in
the case files (16 kHz float32 waveforms; uint8 RGB frames), so the Rust tests need nothing else.
Preparing them (resampling 44.1 kHz to 16 kHz by FFT, compositing RGBA over white, scaling the
pictures to sizes that are multiples of 28) is input preparation, not part of what is checked:
the processors then run exactly as transformers runs them (Qwen2VLImageProcessor's resize is
the identity at these sizes; the script asserts it).

Stored per case: the processor outputs (log-mel input_features [n, 128, 200] and the frame
mask from WhisperFeatureExtractor; pixel_values patches and grid_thw from Qwen2VLImageProcessor
for one image and one 4-frame video), the input_ids with every placeholder expanded, the
position ids (3-D M-RoPE ids for Qwen2-VL), the modality embeddings that replace the
placeholders, the processor's output for two crops it must resize (up and down), the logits
at every position, and the gradient of the scalar loss
sum(logits * loss_weights) (loss_weights: fixed standard-normal tensor, stored) with respect to
q_proj.weight and v_proj.weight of LM layers 0 and 1.

Run (CPU only, deterministic):
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install -r tests/reference/requirements-qwen2.txt
    .venv-ref/bin/python tests/reference/make_qwen2_fixtures.py --stamps /tmp/tux/usr/share/tuxpaint/stamps
"""

import argparse
import json
import os
import platform
import shutil

import numpy as np
import soundfile
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers import (
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    WhisperFeatureExtractor,
)

SEED = 20240604
VOCAB = 1000
SAMPLE_RATE = 16000
CHUNK_SECONDS = 2  # Qwen2-Audio pads every clip to 30 s; the tiny model to 2 s.

# Placeholder ids inside the tiny vocabulary (the real ones are 151646 and 151652..151656).
AUDIO_TOKEN = 997
AUDIO_BOS, AUDIO_EOS = 995, 996
VISION_START, VISION_END, VISION_PAD = 990, 991, 992
IMAGE_TOKEN, VIDEO_TOKEN = 993, 994

SOUNDS = ["animals/mammals/elephant.ogg", "animals/mammals/bovines/cow.ogg"]
IMAGE = ("animals/mammals/elephant.png", (112, 84))  # (width, height), multiples of 28
VIDEO = ("animals/mammals/bovines/cow.png", 56, 4)  # frame side, frames
# Crops of IMAGE at its own size (left, upper, right, lower) that the processor must resize:
# 70x45 -> 56x56 (up; 70 / 28 = 2.5 rounds to even) and 120x40 -> 112x28 (down both ways).
RESIZE_CROPS = {"resize_up": (50, 40, 120, 85), "resize_down": (20, 60, 140, 100)}

GRAD_LAYERS = (0, 1)
PERTURB = 0.05


def text_config():
    return dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
    )


def audio_config():
    """The tiny Qwen2-Audio's config (also built under transformers 5 by make_tf5_configs.py)."""
    return Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=128,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=64,
            d_model=32,
            max_source_positions=CHUNK_SECONDS * SAMPLE_RATE // 160 // 2,
            activation_function="gelu",
            scale_embedding=False,
            init_std=0.1,
        ),
        text_config=dict(
            model_type="qwen2",
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            **text_config(),
        ),
        audio_token_index=AUDIO_TOKEN,
        tie_word_embeddings=False,
    )


def audio_model():
    cfg = audio_config()
    cfg.audio_config._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    perturb(model, skip={"audio_tower.embed_positions.weight"})
    with torch.no_grad():
        pos = model.audio_tower.embed_positions.weight
        pos.copy_(sinusoids(pos.shape[0], pos.shape[1]))
    assert model.language_model.lm_head.weight.data_ptr() != \
        model.language_model.model.embed_tokens.weight.data_ptr()
    return model


def vl_config():
    """The tiny Qwen2-VL's config (also built under transformers 5 by make_tf5_configs.py)."""
    return Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            hidden_act="quick_gelu",
            mlp_ratio=4,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        vision_token_id=VISION_PAD,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        attn_implementation="eager",
        **text_config(),
    )


def vl_model():
    cfg = vl_config()
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(SEED + 1)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    perturb(model, skip=set())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def perturb(model, skip):
    """Moves every parameter off its initial value, in name order, from the global seed."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name not in skip:
                p.add_(torch.randn(p.shape) * PERTURB)


def sinusoids(length, channels, max_timescale=10000):
    """Whisper's fixed position table: sines then cosines over geometric timescales."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def resample(x, sr_in, sr_out):
    """Band-limited resampling by truncating the spectrum (input preparation only)."""
    n_out = int(round(len(x) * sr_out / sr_in))
    spectrum = np.fft.rfft(x.astype(np.float64))
    keep = np.zeros(n_out // 2 + 1, dtype=np.complex128)
    k = min(len(keep), len(spectrum))
    keep[:k] = spectrum[:k]
    return (np.fft.irfft(keep, n_out) * (n_out / len(x))).astype(np.float32)


def load_sound(stamps, rel):
    x, sr = soundfile.read(os.path.join(stamps, rel), dtype="float32", always_2d=True)
    x = resample(x.mean(axis=1), sr, SAMPLE_RATE)
    assert len(x) <= CHUNK_SECONDS * SAMPLE_RATE, rel
    return x


def load_rgb(stamps, rel, size, offset=0):
    """RGBA over white, then scaled to `size` (w, h); `offset` shifts the crop box (video)."""
    im = Image.open(os.path.join(stamps, rel)).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im).convert("RGB")
    if offset:
        w, h = im.size
        im = im.crop((offset, offset // 2, w - offset, h))
    return np.asarray(im.resize(size, Image.BICUBIC), dtype=np.uint8)


def crop_rgb(stamps, rel, box):
    im = Image.open(os.path.join(stamps, rel)).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, im).convert("RGB").crop(box), dtype=np.uint8)


def resize_cases(stamps, processor):
    """The processor on pictures it has to resize (bicubic, as PIL does it)."""
    out = {}
    for name, box in RESIZE_CROPS.items():
        rgb = crop_rgb(stamps, IMAGE[0], box)
        res = processor(images=[rgb], return_tensors="pt")
        out[f"{name}_rgb"] = rgb
        out[f"{name}_pixel_values"] = res["pixel_values"]
        out[f"{name}_grid_thw"] = res["image_grid_thw"]
    return out


def random_ids(rng, n):
    return list(rng.integers(0, 980, size=n))


def loss_and_grads(model, logits, names, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(logits.shape, generator=gen)
    loss = (logits * weights).sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return weights, {f"grad.{n}": g for n, g in zip(names, grads)}


def audio_case(stamps, out_dir):
    model = audio_model()
    extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400,
        chunk_length=CHUNK_SECONDS, padding_value=0.0, return_attention_mask=True)
    wavs = [load_sound(stamps, s) for s in SOUNDS]
    feats = extractor(wavs, sampling_rate=SAMPLE_RATE, padding="max_length",
                      return_attention_mask=True, return_tensors="pt")
    features, mask = feats["input_features"], feats["attention_mask"]
    assert features.shape == (2, 128, CHUNK_SECONDS * 100), features.shape

    _, tokens = model.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
    rng = np.random.default_rng(SEED)
    ids = random_ids(rng, 5)
    for i, n in enumerate(tokens.tolist()):
        ids += [AUDIO_BOS] + [AUDIO_TOKEN] * n + [AUDIO_EOS] + random_ids(rng, 4 + 4 * i)
    input_ids = torch.tensor([ids])

    embeds = audio_embeds(model, features, mask)
    logits = model(input_ids=input_ids, input_features=features,
                   feature_attention_mask=mask).logits
    names = [f"language_model.model.layers.{i}.self_attn.{p}.weight"
             for i in GRAD_LAYERS for p in ("q_proj", "v_proj")]
    weights, grads = loss_and_grads(model, logits, names, SEED + 2)

    save_model(model, os.path.join(out_dir, "qwen2-audio-tiny"), shards=1)
    extractor.save_pretrained(os.path.join(out_dir, "qwen2-audio-tiny"))
    tensors = {
        "wav.0": wavs[0], "wav.1": wavs[1],
        "input_features": features, "feature_attention_mask": mask.to(torch.int64),
        "input_ids": input_ids, "audio_embeds": embeds,
        "logits": logits, "loss_weights": weights, **grads,
    }
    write_case(os.path.join(out_dir, "qwen2_audio_case.safetensors"), tensors, {
        "sounds": ",".join(SOUNDS), "audio_tokens": ",".join(map(str, tokens.tolist())),
    })
    return logits


def audio_embeds(model, features, mask):
    """The projected audio tokens that replace the placeholders, as the model's forward makes
    them (same mask, same selection), for localising a mismatch."""
    captured = []
    hook = model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: captured.append(out))
    n = features.shape[0]
    dummy = torch.tensor([[AUDIO_TOKEN, AUDIO_TOKEN]])  # not legacy: consecutive tokens
    try:
        model(input_ids=dummy, input_features=features, feature_attention_mask=mask)
    except ValueError:
        pass  # the token count does not match on purpose; the projector ran before that
    hook.remove()
    _, tokens = model.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
    return torch.cat([captured[0][i, :tokens[i]] for i in range(n)])


def vl_case(stamps, out_dir):
    model = vl_model()
    processor = Qwen2VLImageProcessor()
    image = load_rgb(stamps, IMAGE[0], IMAGE[1])
    rel, side, count = VIDEO
    video = np.stack([load_rgb(stamps, rel, (side, side), offset=4 * k) for k in range(count)])

    img = processor(images=[image], return_tensors="pt")
    vid = processor(images=None, videos=[video], return_tensors="pt")
    same = processor(images=[image], do_resize=False, return_tensors="pt")
    assert torch.equal(img["pixel_values"], same["pixel_values"]), "resize is not the identity"

    merge = model.config.vision_config.spatial_merge_size ** 2
    n_img = int(img["image_grid_thw"].prod()) // merge
    n_vid = int(vid["video_grid_thw"].prod()) // merge
    rng = np.random.default_rng(SEED + 3)
    ids = (random_ids(rng, 4) + [VISION_START] + [IMAGE_TOKEN] * n_img + [VISION_END]
           + random_ids(rng, 3) + [VISION_START] + [VIDEO_TOKEN] * n_vid + [VISION_END]
           + random_ids(rng, 6))
    input_ids = torch.tensor([ids])
    position_ids, _ = model.get_rope_index(input_ids, img["image_grid_thw"],
                                           vid["video_grid_thw"], torch.ones_like(input_ids))
    with torch.no_grad():
        image_embeds = model.visual(img["pixel_values"], grid_thw=img["image_grid_thw"])
        video_embeds = model.visual(vid["pixel_values_videos"], grid_thw=vid["video_grid_thw"])
    logits = model(input_ids=input_ids, pixel_values=img["pixel_values"],
                   image_grid_thw=img["image_grid_thw"],
                   pixel_values_videos=vid["pixel_values_videos"],
                   video_grid_thw=vid["video_grid_thw"]).logits
    names = [f"model.layers.{i}.self_attn.{p}.weight"
             for i in GRAD_LAYERS for p in ("q_proj", "v_proj")]
    weights, grads = loss_and_grads(model, logits, names, SEED + 4)

    save_model(model, os.path.join(out_dir, "qwen2-vl-tiny"), shards=2)
    processor.save_pretrained(os.path.join(out_dir, "qwen2-vl-tiny"))
    tensors = {
        "image_rgb": image, "video_rgb": video,
        "pixel_values": img["pixel_values"], "image_grid_thw": img["image_grid_thw"],
        "pixel_values_videos": vid["pixel_values_videos"],
        "video_grid_thw": vid["video_grid_thw"],
        "input_ids": input_ids, "position_ids": position_ids,
        "image_embeds": image_embeds, "video_embeds": video_embeds,
        "logits": logits, "loss_weights": weights, **grads,
        **resize_cases(stamps, processor),
    }
    write_case(os.path.join(out_dir, "qwen2_vl_case.safetensors"), tensors, {
        "image": IMAGE[0], "video": f"{rel} x{count}, crop shifted 4 px per frame",
    })
    return logits


def save_model(model, path, shards):
    """save_pretrained, checked to use the Hugging Face checkpoint names and shard count."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = total if shards == 1 else total * 6 // 10
    model.save_pretrained(path, safe_serialization=True, max_shard_size=size)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) == shards, files
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            names = json.load(f)["weight_map"].keys()
    else:
        from safetensors import safe_open
        with safe_open(os.path.join(path, files[0]), "pt") as f:
            names = list(f.keys())
    roots = {n.split(".")[0] for n in names}
    expected = {"audio_tower", "multi_modal_projector", "language_model"} \
        if "audio_tower" in roots else {"visual", "model"}
    assert roots == expected, roots
    # The reference model loads back from what was written, giving the same parameters.
    back = type(model).from_pretrained(path, torch_dtype=torch.float32)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def write_case(path, tensors, extra):
    arrays = {}
    for k, v in tensors.items():
        v = v.detach().numpy() if isinstance(v, torch.Tensor) else v
        arrays[k] = np.ascontiguousarray(v)
    meta = {
        "about": "written by tests/reference/make_qwen2_fixtures.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "seed": str(SEED), "source": "Debian tuxpaint-stamps-default 2022.06.04-1",
        **extra,
    }
    # One key: safetensors writes a metadata map in no fixed order, a single JSON string in one.
    save_file(arrays, path, metadata={"about": json.dumps(meta, sort_keys=True)})
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stamps", required=True,
                        help="tuxpaint-stamps-default's usr/share/tuxpaint/stamps")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    a = audio_case(args.stamps, out_dir)
    v = vl_case(args.stamps, out_dir)
    for name, logits in (("audio", a), ("vl", v)):
        print(f"{name}: logits {tuple(logits.shape)}, |max| {logits.abs().max().item():.4g}, "
              f"std {logits.std().item():.4g}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
