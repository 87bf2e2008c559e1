//! Clip files both ways: 16-bit mono wav for audio, 8-bit RGB png per frame (the synthetic set)
//! or jpeg (`xkd data prepare`), and the loaders that turn them into what the models take (samples in [-1, 1], at the configured rate and mono or
//! refused; frames normalised by CLIP's mean and standard deviation, channels first).

use anyhow::{anyhow, bail, Context};
use std::fs;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

/// CLIP's per-channel pixel mean and standard deviation, as the real visual model expects;
/// written exactly as published so they can be checked against it.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

pub(crate) fn write_wav(path: &Path, sample_rate: u32, wav: &[f32]) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    for &x in wav {
        let sample = (x.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        writer
            .write_sample(sample)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    writer
        .finalize()
        .with_context(|| format!("cannot finish {}", path.display()))
}

pub(crate) fn write_png(path: &Path, size: usize, rgb: &[u8]) -> anyhow::Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), size as u32, size as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // Noisy frames barely compress; the fast deflate keeps generation time down.
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(rgb)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("cannot finish {}", path.display()))
}

// ---------------------------------------------------------------------------------------------

/// Mono samples in [-1, 1] of a wav recorded at `sample_rate` Hz (`data.sample_rate`). Integer
/// wavs are scaled by their bit depth; float wavs are read as they are. A file at another rate
/// or with more than one channel is refused, naming the file: read as it is, 48 kHz audio would
/// pass for 16 kHz three times as long and an interleaved stereo file for mono twice as long,
/// silently. Resampling and downmixing belong to preparing the data, not to loading it.
pub fn load_audio(path: &Path, sample_rate: u32) -> anyhow::Result<Vec<f32>> {
    let reader = hound::WavReader::open(path)
        .with_context(|| format!("cannot open wav {}", path.display()))?;
    let spec = reader.spec();
    if spec.sample_rate != sample_rate {
        bail!(
            "{} is sampled at {} Hz but data.sample_rate is {sample_rate} Hz; \
             prepare the data at {sample_rate} Hz (xkd does not resample when it loads)",
            path.display(),
            spec.sample_rate
        );
    }
    if spec.channels != 1 {
        bail!(
            "{} has {} channels; only mono audio is supported: prepare the data as mono \
             (xkd does not downmix when it loads)",
            path.display(),
            spec.channels
        );
    }
    let samples: Result<Vec<f32>, hound::Error> = match spec.sample_format {
        hound::SampleFormat::Float => reader.into_samples::<f32>().collect(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect()
        }
    };
    samples.with_context(|| format!("cannot read samples of {}", path.display()))
}

/// `[T, 3, H, W]` floats normalised with CLIP's per-channel mean and std. Every frame must have
/// the same size; grey and alpha images are converted to RGB.
pub fn load_frames(paths: &[PathBuf]) -> anyhow::Result<Vec<f32>> {
    let (h, w, frames) = load_frames_rgb(paths)?;
    let mut out = Vec::with_capacity(frames.len() * 3 * h * w);
    for rgb in &frames {
        push_normalised_chw(&mut out, w, h, rgb);
    }
    Ok(out)
}

/// (height, width, one `[H, W, 3]` byte buffer per frame): the frames as decoded, for a model
/// whose own processor resizes and normalises them (Qwen2-VL). Every frame must have the same
/// size; grey and alpha images are converted to RGB. Frames named `.jpg` or `.jpeg` are read
/// as JPEG, others as PNG.
pub fn load_frames_rgb(paths: &[PathBuf]) -> anyhow::Result<(usize, usize, Vec<Vec<u8>>)> {
    let mut out = Vec::with_capacity(paths.len());
    let mut size: Option<(usize, usize)> = None;
    for path in paths {
        let jpeg = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
        let (w, h, rgb) = if jpeg {
            read_jpeg_rgb(path)?
        } else {
            read_png_rgb(path)?
        };
        match size {
            None => size = Some((w, h)),
            Some(first) if first != (w, h) => bail!(
                "{} is {w}x{h} but earlier frames are {}x{}",
                path.display(),
                first.0,
                first.1
            ),
            Some(_) => {}
        }
        out.push(rgb);
    }
    let (w, h) = size.unwrap_or((0, 0));
    Ok((h, w, out))
}

fn push_normalised_chw(out: &mut Vec<f32>, w: usize, h: usize, rgb: &[u8]) {
    for c in 0..3 {
        for i in 0..w * h {
            let value = rgb[i * 3 + c] as f32 / 255.0;
            out.push((value - CLIP_MEAN[c]) / CLIP_STD[c]);
        }
    }
}

/// (width, height, `[H, W, 3]` bytes) of a baseline or progressive JPEG, in any of JPEG's
/// colour spaces, converted to RGB.
pub(crate) fn read_jpeg_rgb(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    use zune_jpeg::zune_core::{
        bytestream::ZCursor, colorspace::ColorSpace, options::DecoderOptions,
    };
    let bytes = fs::read(path).with_context(|| format!("cannot open {}", path.display()))?;
    let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&bytes), options);
    let rgb = decoder
        .decode()
        .map_err(|e| anyhow!("{} is not a readable jpeg: {e:?}", path.display()))?;
    let (w, h) = decoder
        .dimensions()
        .ok_or_else(|| anyhow!("{} has no jpeg header", path.display()))?;
    if rgb.len() != w * h * 3 {
        bail!(
            "{} decoded to {} bytes, not {w}x{h} RGB",
            path.display(),
            rgb.len()
        );
    }
    Ok((w, h, rgb))
}

/// (width, height, `[H, W, 3]` bytes).
pub(crate) fn read_png_rgb(path: &Path) -> anyhow::Result<(usize, usize, Vec<u8>)> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a readable png", path.display()))?;
    let len = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{} is too large to decode", path.display()))?;
    let mut buf = vec![0u8; len];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("cannot decode {}", path.display()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{} stayed indexed after expansion", path.display()),
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = &buf[y * info.line_size..y * info.line_size + w * channels];
        for px in row.chunks_exact(channels) {
            match channels {
                1 | 2 => rgb.extend_from_slice(&[px[0]; 3]),
                _ => rgb.extend_from_slice(&px[..3]),
            }
        }
    }
    Ok((w, h, rgb))
}
