//! Audio features: a Whisper-style log-mel spectrogram.
//!
//! The recipe follows what Whisper's feature extractor computes, so a real audio model's
//! front end and ours agree: periodic Hann window, centred STFT with reflect padding, power
//! spectrum without the last frame, a Slaney mel filterbank (librosa's defaults), then
//! `log10`, a dynamic-range clamp of 8 decades below the maximum and the `(x + 4) / 4` scaling.

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

/// Power below this counts as silence; `log10` of it is the floor of the spectrogram.
const POWER_FLOOR: f32 = 1e-10;
/// Whisper keeps 8 decades of dynamic range below the loudest bin of the clip.
const DYNAMIC_RANGE: f32 = 8.0;

/// A planned log-mel transform for one (sample rate, n_fft, hop, n_mels). Clones share the
/// FFT plan.
#[derive(Clone)]
pub struct LogMel {
    n_fft: usize,
    hop: usize,
    n_mels: usize,
    window: Vec<f32>,
    /// `[n_mels, n_fft / 2 + 1]` row-major.
    filters: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl LogMel {
    /// Plans the FFT and builds the window and filterbank once; `compute` only reuses them.
    pub fn new(sample_rate: u32, n_fft: usize, hop: usize, n_mels: usize) -> LogMel {
        assert!(n_fft >= 2, "n_fft must be at least 2, got {n_fft}");
        assert!(hop >= 1, "hop must be at least 1");
        assert!(n_mels >= 1, "n_mels must be at least 1");
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(n_fft);
        LogMel {
            n_fft,
            hop,
            n_mels,
            window: periodic_hann(n_fft),
            filters: slaney_filterbank(sample_rate, n_fft, n_mels),
            fft,
        }
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Frames `compute` returns for `samples` input samples: the centred STFT's frame count
    /// minus the last frame, which Whisper drops.
    pub fn frames(&self, samples: usize) -> usize {
        let padded = samples + 2 * (self.n_fft / 2);
        if padded < self.n_fft {
            return 0;
        }
        (padded - self.n_fft) / self.hop
    }

    /// The filterbank, `[n_mels, n_fft / 2 + 1]` row-major.
    pub fn filters(&self) -> &[f32] {
        &self.filters
    }

    /// `[frames, n_mels]` row-major log-mel spectrogram of a mono clip.
    pub fn compute(&self, wav: &[f32]) -> Vec<f32> {
        let mels = self.mel_power(wav);
        log_compress(mels)
    }

    /// Whisper's fixed window: the clip cut or zero-padded to `window` samples, its
    /// `[frames(window), n_mels]` log-mel, and how many frames hold the clip (the feature
    /// extractor's attention mask, `ceil(len / hop)`), as WhisperFeatureExtractor gives them
    /// with `padding="max_length"`. The clamp to 8 decades below the maximum sees the padding
    /// too, as there.
    pub fn compute_window(&self, wav: &[f32], window: usize) -> (Vec<f32>, usize) {
        let len = wav.len().min(window);
        let mut padded = wav[..len].to_vec();
        padded.resize(window, 0.0);
        (self.compute(&padded), len.div_ceil(self.hop))
    }

    /// Linear mel power, `[frames, n_mels]`.
    fn mel_power(&self, wav: &[f32]) -> Vec<f32> {
        let frames = self.frames(wav.len());
        let bins = self.n_fft / 2 + 1;
        let padded = reflect_pad(wav, self.n_fft / 2);
        let mut input = self.fft.make_input_vec();
        let mut spectrum: Vec<Complex<f32>> = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; bins];
        let mut out = vec![0f32; frames * self.n_mels];
        for t in 0..frames {
            let start = t * self.hop;
            for (i, x) in input.iter_mut().enumerate() {
                *x = padded[start + i] * self.window[i];
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .expect("buffers come from the plan, so their lengths match");
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.norm_sqr();
            }
            let row = &mut out[t * self.n_mels..(t + 1) * self.n_mels];
            for (m, value) in row.iter_mut().enumerate() {
                let weights = &self.filters[m * bins..(m + 1) * bins];
                *value = weights.iter().zip(&power).map(|(w, p)| w * p).sum();
            }
        }
        out
    }
}

/// `log10`, clamp to 8 decades below the clip's maximum, then Whisper's `(x + 4) / 4`.
fn log_compress(mut mels: Vec<f32>) -> Vec<f32> {
    for v in mels.iter_mut() {
        *v = v.max(POWER_FLOOR).log10();
    }
    let max = mels.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let floor = max - DYNAMIC_RANGE;
    for v in mels.iter_mut() {
        *v = (v.max(floor) + 4.0) / 4.0;
    }
    mels
}

/// The value every bin of a silent clip takes: `(log10(1e-10) + 4) / 4`.
pub fn silence_value() -> f32 {
    (POWER_FLOOR.log10() + 4.0) / 4.0
}

/// Periodic Hann window (as `torch.hann_window(n)`): `0.5 - 0.5 cos(2 pi i / n)`.
pub fn periodic_hann(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let phase = 2.0 * std::f64::consts::PI * i as f64 / n as f64;
            (0.5 - 0.5 * phase.cos()) as f32
        })
        .collect()
}

/// Pads `pad` samples at both ends by mirroring around the edge sample (numpy's "reflect",
/// the edge itself not repeated). Signals shorter than the pad bounce back and forth, as
/// numpy does; an empty signal pads with zeros.
fn reflect_pad(wav: &[f32], pad: usize) -> Vec<f32> {
    let n = wav.len();
    let total = n + 2 * pad;
    if n == 0 {
        return vec![0.0; total];
    }
    (0..total)
        .map(|i| wav[reflect_index(i as isize - pad as isize, n)])
        .collect()
}

/// Index into a signal of length `n` after mirroring `i` at both edges.
fn reflect_index(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let j = i.rem_euclid(period);
    if j < n as isize {
        j as usize
    } else {
        (period - j) as usize
    }
}

/// Slaney's mel scale (librosa `htk=False`): linear below 1 kHz, logarithmic above.
pub fn hz_to_mel(hz: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = slaney_constants();
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

pub fn mel_to_hz(mel: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = slaney_constants();
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        mel * f_sp
    }
}

/// (Hz per mel in the linear part, start of the log part in Hz and in mels, log step).
fn slaney_constants() -> (f64, f64, f64, f64) {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    (f_sp, min_log_hz, min_log_hz / f_sp, 6.4f64.ln() / 27.0)
}

/// Triangular mel filters from 0 Hz to Nyquist with Slaney area normalisation, as
/// `librosa.filters.mel(sr, n_fft, n_mels)` builds them. `[n_mels, n_fft / 2 + 1]`.
fn slaney_filterbank(sample_rate: u32, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let bins = n_fft / 2 + 1;
    let nyquist = sample_rate as f64 / 2.0;
    let fft_hz: Vec<f64> = (0..bins)
        .map(|k| k as f64 * sample_rate as f64 / n_fft as f64)
        .collect();
    let mel_max = hz_to_mel(nyquist);
    let edges_hz: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_max * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut filters = vec![0f32; n_mels * bins];
    for m in 0..n_mels {
        let (lo, centre, hi) = (edges_hz[m], edges_hz[m + 1], edges_hz[m + 2]);
        // Slaney normalisation: every filter has the same area, so a flat spectrum maps to a
        // flat mel profile whatever the filter's width.
        let norm = 2.0 / (hi - lo);
        for (k, &f) in fft_hz.iter().enumerate() {
            let rising = (f - lo) / (centre - lo);
            let falling = (hi - f) / (hi - centre);
            let weight = rising.min(falling).max(0.0);
            filters[m * bins + k] = (weight * norm) as f32;
        }
    }
    filters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f32, sample_rate: u32, samples: usize) -> Vec<f32> {
        (0..samples)
            .map(|i| {
                let t = i as f32 / sample_rate as f32;
                0.5 * (2.0 * std::f32::consts::PI * hz * t).sin()
            })
            .collect()
    }

    fn argmax(xs: &[f32]) -> usize {
        let mut best = 0;
        for (i, &x) in xs.iter().enumerate() {
            if x > xs[best] {
                best = i;
            }
        }
        best
    }

    /// The mel band whose triangle peaks closest to `hz`.
    fn band_of(hz: f64, sample_rate: u32, n_mels: usize) -> usize {
        let mel_max = hz_to_mel(sample_rate as f64 / 2.0);
        let position = hz_to_mel(hz) / mel_max * (n_mels + 1) as f64;
        (position.round() as usize).clamp(1, n_mels) - 1
    }

    #[test]
    fn tone_peaks_in_its_band() {
        let lm = LogMel::new(16000, 400, 160, 40);
        for hz in [300.0f32, 700.0, 1500.0, 3000.0, 6000.0] {
            let spec = lm.compute(&tone(hz, 16000, 8000));
            let frames = lm.frames(8000);
            let mut profile = vec![0f32; 40];
            for t in 0..frames {
                for m in 0..40 {
                    profile[m] += spec[t * 40 + m];
                }
            }
            let peak = argmax(&profile);
            let expected = band_of(hz as f64, 16000, 40);
            assert!(
                peak.abs_diff(expected) <= 1,
                "{hz} Hz peaked in band {peak}, expected about {expected}"
            );
        }
    }

    #[test]
    fn frame_count_matches_formula() {
        let lm = LogMel::new(16000, 400, 160, 40);
        for samples in [0usize, 1, 159, 160, 161, 8000, 16000, 480000] {
            // Whisper: 1 + samples / hop centred frames, minus the dropped last one.
            assert_eq!(lm.frames(samples), samples / 160, "samples {samples}");
        }
        let spec = lm.compute(&tone(440.0, 16000, 8000));
        assert_eq!(spec.len(), 50 * 40);
        // An odd n_fft pads one sample less than it spans.
        let odd = LogMel::new(16000, 401, 160, 40);
        assert_eq!(odd.frames(8000), (8000 + 400 - 401) / 160);
        assert_eq!(odd.compute(&vec![0.1; 8000]).len(), odd.frames(8000) * 40);
    }

    #[test]
    fn filterbank_shape_and_sums() {
        let lm = LogMel::new(16000, 400, 160, 40);
        let bins = 201;
        assert_eq!(lm.filters().len(), 40 * bins);
        let mut previous_peak = 0;
        for m in 0..40 {
            let row = &lm.filters()[m * bins..(m + 1) * bins];
            assert!(row.iter().all(|&w| w >= 0.0));
            let sum: f32 = row.iter().sum();
            assert!(sum > 0.0, "band {m} is empty");
            // Area normalisation: sum * bin width (40 Hz) is close to 1 for every band.
            let area = sum * 40.0;
            assert!((0.5..1.5).contains(&area), "band {m} area {area}");
            let peak = argmax(row);
            assert!(peak >= previous_peak, "band {m} peaks below band {}", m - 1);
            previous_peak = peak;
        }
        // The Slaney scale round-trips on both sides of its 1 kHz knee.
        assert!((mel_to_hz(hz_to_mel(3210.0)) - 3210.0).abs() < 1e-6);
        assert!((mel_to_hz(hz_to_mel(420.0)) - 420.0).abs() < 1e-6);
    }

    #[test]
    fn silence_gives_floor() {
        let lm = LogMel::new(16000, 400, 160, 40);
        let spec = lm.compute(&vec![0.0; 4000]);
        assert_eq!(spec.len(), 25 * 40);
        assert!(spec.iter().all(|&v| v == silence_value()));
        assert!((silence_value() + 1.5).abs() < 1e-6);
    }

    #[test]
    fn clamp_keeps_eight_decades() {
        let lm = LogMel::new(16000, 400, 160, 40);
        let spec = lm.compute(&tone(1000.0, 16000, 8000));
        let max = spec.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = spec.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(max - min <= DYNAMIC_RANGE / 4.0 + 1e-5);
    }

    #[test]
    fn deterministic() {
        let lm = LogMel::new(16000, 400, 160, 40);
        let wav: Vec<f32> = (0..8000)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        assert_eq!(lm.compute(&wav), lm.compute(&wav));
        let other = LogMel::new(16000, 400, 160, 40);
        assert_eq!(lm.compute(&wav), other.compute(&wav));
    }

    #[test]
    fn reflect_pad_mirrors_without_repeating_the_edge() {
        let padded = reflect_pad(&[1.0, 2.0, 3.0, 4.0], 2);
        assert_eq!(padded, vec![3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0]);
        assert_eq!(reflect_pad(&[], 2), vec![0.0; 4]);
        assert_eq!(reflect_pad(&[5.0], 1), vec![5.0; 3]);
    }

    #[test]
    fn hann_is_periodic() {
        let w = periodic_hann(4);
        let expected = [0.0, 0.5, 1.0, 0.5];
        for (a, b) in w.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
