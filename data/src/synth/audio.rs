//! One clip's sound: a class signature (harmonic partials with amplitude modulation) over
//! pink and white noise with a rumble cut, and background events, at band SNRs per cue.

use super::Cue;
use super::{normals, CLASSES};
use crate::features::{hz_to_mel, mel_to_hz};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use xkd_config::DataConfig;

/// Lowest and highest partial of any class.
pub(super) const PARTIAL_LOW_HZ: f64 = 150.0;
pub(super) const PARTIAL_HIGH_HZ: f64 = 6000.0;
/// Per-frame signature-to-noise ratio inside the partial's own mel band, in dB, drawn per clip.
/// Clear signatures tower over everything; Subtle ones sit at the level of the background
/// sound events, so only their consistency across many clips gives them away.
const CLEAR_BAND_SNR_DB: (f64, f64) = (10.0, 16.0);
const SUBTLE_BAND_SNR_DB: (f64, f64) = (7.0, 11.0);
/// Background sound events in every clip: partials at random frequencies and times.
const INTERFERERS: usize = 3;
const INTERFERER_BAND_SNR_DB: (f64, f64) = (-4.0, 2.0);
/// How much more noise the whole spectrum holds than one band of a 40-band, n_fft 400 mel
/// spectrogram at 16 kHz (measured). Converts band SNRs into waveform amplitudes; bands are
/// equally wide in Hz below 1 kHz, and `band_equaliser` covers the widening above it.
const FULL_BAND_OVER_MEL_BAND_DB: f64 = 18.7;
/// Amplitude-modulation rates; each class takes one, the partial pair tells classes apart.
const AM_RATES_HZ: [f64; 6] = [2.0, 3.5, 5.0, 7.0, 9.5, 12.0];
const AM_DEPTH: f64 = 0.7;

/// What identifies a class by ear: a loud and a soft partial, and a tremolo rate.
#[derive(Clone, Copy, Debug)]
pub(super) struct AudioSignature {
    pub(super) primary_hz: f64,
    pub(super) secondary_hz: f64,
    pub(super) am_hz: f64,
}

/// Partials sit on a grid uniform in Slaney mels between 150 Hz and 6 kHz (logarithmic above
/// 1 kHz), so adjacent classes stay at least a mel band apart in a 40-band spectrogram. Primary
/// partials take the even grid points, one per class; secondary partials the odd points, so no
/// class's soft partial coincides with another's loud one.
pub(super) fn audio_signature(label: usize) -> AudioSignature {
    let n = CLASSES.len();
    let slot = (label * 7) % n; // 7 is coprime with 24: a permutation that scatters neighbours
    let partner = (slot + 9) % n;
    AudioSignature {
        primary_hz: partial_grid(2 * slot, 2 * n),
        secondary_hz: partial_grid(2 * partner + 1, 2 * n),
        am_hz: AM_RATES_HZ[label % AM_RATES_HZ.len()],
    }
}

fn partial_grid(i: usize, points: usize) -> f64 {
    let lo = hz_to_mel(PARTIAL_LOW_HZ);
    let hi = hz_to_mel(PARTIAL_HIGH_HZ);
    mel_to_hz(lo + (hi - lo) * i as f64 / (points - 1) as f64)
}

/// Mel bands widen in proportion to frequency above 1 kHz; scaling a partial's amplitude with
/// the square root of its band's width keeps every class equally prominent in the mel domain.
fn band_equaliser(hz: f64) -> f64 {
    (hz.max(1000.0) / 1000.0).sqrt()
}

/// Peak amplitude of a sine at `hz` whose power in its mel band is `band_snr_db` above the
/// noise's power in that band.
pub(super) fn partial_amplitude(noise_rms: f64, band_snr_db: f64, hz: f64) -> f64 {
    let full_band_snr_db = band_snr_db - FULL_BAND_OVER_MEL_BAND_DB;
    noise_rms * 10f64.powf(full_band_snr_db / 20.0) * std::f64::consts::SQRT_2 * band_equaliser(hz)
}

/// One sinusoidal component: frequency, amplitude, start phase, active samples, tremolo.
pub(super) struct Partial {
    pub(super) hz: f64,
    pub(super) amplitude: f64,
    pub(super) phase: f64,
    pub(super) start: f64,
    pub(super) end: f64,
    pub(super) am_hz: f64,
    pub(super) am_phase: f64,
}

pub(super) fn synth_audio(
    cfg: &DataConfig,
    label: usize,
    cue: Cue,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let sr = cfg.sample_rate as f64;
    let samples = (cfg.clip_seconds as f64 * sr).round() as usize;
    let noise_rms = rng.random_range(0.02..0.05);
    let pink_share = rng.random_range(0.0..0.3);
    let mut wav = noise(samples, sr, noise_rms, pink_share, rng);
    let mut partials = signature_partials(label, cue, noise_rms, samples, rng);
    partials.extend(interferer_partials(noise_rms, samples, rng));
    for partial in &partials {
        add_partial(&mut wav, partial, sr);
    }
    wav
}

/// The class's two partials, jittered in frequency (+-2%), phase, level and onset.
fn signature_partials(
    label: usize,
    cue: Cue,
    noise_rms: f64,
    samples: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Partial> {
    let signature = audio_signature(label);
    let (lo, hi) = match cue {
        Cue::Clear => CLEAR_BAND_SNR_DB,
        Cue::Subtle => SUBTLE_BAND_SNR_DB,
    };
    let snr_db = rng.random_range(lo..hi);
    let start = rng.random_range(0.0..0.15) * samples as f64;
    let am_phase = rng.random_range(0.0..std::f64::consts::TAU);
    // The soft partial sits 6 dB under the loud one.
    [(signature.primary_hz, 0.0), (signature.secondary_hz, -6.0)]
        .into_iter()
        .map(|(hz, offset_db)| {
            let hz = hz * rng.random_range(0.98..1.02);
            Partial {
                hz,
                amplitude: partial_amplitude(noise_rms, snr_db + offset_db, hz),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                start,
                end: samples as f64,
                am_hz: signature.am_hz,
                am_phase,
            }
        })
        .collect()
}

/// Unrelated background events: partials anywhere in the signature range, for part of the
/// clip, with their own tremolo. They make a weak signature ambiguous in any single clip.
fn interferer_partials(noise_rms: f64, samples: usize, rng: &mut ChaCha8Rng) -> Vec<Partial> {
    let (mel_lo, mel_hi) = (hz_to_mel(PARTIAL_LOW_HZ), hz_to_mel(PARTIAL_HIGH_HZ));
    (0..INTERFERERS)
        .map(|_| {
            let hz = mel_to_hz(rng.random_range(mel_lo..mel_hi));
            let snr_db = rng.random_range(INTERFERER_BAND_SNR_DB.0..INTERFERER_BAND_SNR_DB.1);
            let length = rng.random_range(0.4..1.0) * samples as f64;
            let start = rng.random_range(0.0..=samples as f64 - length);
            Partial {
                hz,
                amplitude: partial_amplitude(noise_rms, snr_db, hz),
                phase: rng.random_range(0.0..std::f64::consts::TAU),
                start,
                end: start + length,
                am_hz: AM_RATES_HZ[rng.random_range(0..AM_RATES_HZ.len())],
                am_phase: rng.random_range(0.0..std::f64::consts::TAU),
            }
        })
        .collect()
}

pub(super) fn add_partial(wav: &mut [f32], p: &Partial, sr: f64) {
    let first = p.start.max(0.0) as usize;
    let last = (p.end.ceil() as usize).min(wav.len());
    // Rotating phasors instead of a sin and a cos per sample: the generator is a hot loop, and
    // in f64 the drift over a clip is far below 16-bit resolution.
    let t0 = first as f64 / sr;
    let mut carrier = Phasor::new(std::f64::consts::TAU * p.hz * t0 + p.phase, p.hz, sr);
    let mut tremolo = Phasor::new(
        std::f64::consts::TAU * p.am_hz * t0 + p.am_phase,
        p.am_hz,
        sr,
    );
    for (i, out) in wav.iter_mut().enumerate().take(last).skip(first) {
        let gate = fade(i as f64 - p.start, sr) * fade(p.end - i as f64, sr);
        let envelope = 1.0 - 0.5 * AM_DEPTH * (1.0 - tremolo.cos());
        *out += (p.amplitude * gate * envelope * carrier.sin()) as f32;
        carrier.advance();
        tremolo.advance();
    }
}

/// `e^(i phase)`, advanced by one sample of a `hz` oscillation per step.
struct Phasor {
    re: f64,
    im: f64,
    step_re: f64,
    step_im: f64,
}

impl Phasor {
    fn new(phase: f64, hz: f64, sr: f64) -> Phasor {
        let (im, re) = phase.sin_cos();
        let (step_im, step_re) = (std::f64::consts::TAU * hz / sr).sin_cos();
        Phasor {
            re,
            im,
            step_re,
            step_im,
        }
    }

    fn sin(&self) -> f64 {
        self.im
    }

    fn cos(&self) -> f64 {
        self.re
    }

    fn advance(&mut self) {
        let re = self.re * self.step_re - self.im * self.step_im;
        self.im = self.re * self.step_im + self.im * self.step_re;
        self.re = re;
    }
}

/// A 10 ms raised-cosine ramp from 0 at the edge, so partials start and stop without clicks.
/// `inside` is the distance from the edge in samples, negative outside the partial.
fn fade(inside: f64, sr: f64) -> f64 {
    let ramp = 0.01 * sr;
    if inside < 0.0 {
        0.0
    } else if inside >= ramp {
        1.0
    } else {
        0.5 - 0.5 * (std::f64::consts::PI * inside / ramp).cos()
    }
}

/// White noise with a share of pink noise mixed in, high-passed like a recorder's rumble filter
/// (so the pink share cannot swamp the lowest bands), at the given RMS.
pub(super) fn noise(
    samples: usize,
    sr: f64,
    rms: f64,
    pink_share: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let white = normals(samples, rng);
    let pink_source = normals(samples, rng);
    let pink = unit_rms(pink_filter(&pink_source));
    let (w, p) = ((1.0 - pink_share).sqrt(), pink_share.sqrt());
    let mixed: Vec<f64> = white
        .iter()
        .zip(&pink)
        .map(|(a, b)| w * a + p * b)
        .collect();
    let filtered = high_pass(
        &high_pass(&mixed, RUMBLE_CUTOFF_HZ, sr),
        RUMBLE_CUTOFF_HZ,
        sr,
    );
    unit_rms(filtered)
        .into_iter()
        .map(|x| (rms * x) as f32)
        .collect()
}

/// Cut-off of the noise's high-pass (applied twice: 12 dB per octave).
const RUMBLE_CUTOFF_HZ: f64 = 100.0;

/// First-order high-pass filter.
fn high_pass(xs: &[f64], cutoff_hz: f64, sr: f64) -> Vec<f64> {
    let rc = 1.0 / (std::f64::consts::TAU * cutoff_hz);
    let a = rc / (rc + 1.0 / sr);
    let mut out = Vec::with_capacity(xs.len());
    let (mut prev_x, mut prev_y) = (0.0, 0.0);
    for &x in xs {
        let y = a * (prev_y + x - prev_x);
        out.push(y);
        prev_x = x;
        prev_y = y;
    }
    out
}

/// Approximately 1/f noise from white noise: a sum of three one-pole low-passes at spread
/// corner frequencies plus a little of the input (a common economical pink-noise filter).
fn pink_filter(white: &[f64]) -> Vec<f64> {
    let (mut b0, mut b1, mut b2) = (0.0, 0.0, 0.0);
    white
        .iter()
        .map(|&x| {
            b0 = 0.99765 * b0 + x * 0.0990460;
            b1 = 0.96300 * b1 + x * 0.2965164;
            b2 = 0.57000 * b2 + x * 1.0526913;
            b0 + b1 + b2 + x * 0.1848
        })
        .collect()
}

fn unit_rms(mut xs: Vec<f64>) -> Vec<f64> {
    let power = xs.iter().map(|x| x * x).sum::<f64>() / xs.len().max(1) as f64;
    if power > 0.0 {
        let scale = power.sqrt().recip();
        xs.iter_mut().for_each(|x| *x *= scale);
    }
    xs
}
