//! Bicubic resizing of 8-bit RGB pictures, reproducing Pillow's `Image.resize(size, BICUBIC)`
//! byte for byte, since Qwen2VLImageProcessor resizes through Pillow and the patches must match.
//!
//! The algorithm (Pillow's libImaging/Resample.c, as documented by its behaviour): a separable
//! filter whose support widens by the scale factor when shrinking (antialiasing), weights
//! normalised to sum to one and then rounded to 22-bit fixed point; the horizontal pass runs
//! first over just the rows the vertical pass will read, and its result is rounded and
//! clamped to bytes before the vertical pass.

/// Fixed-point fraction bits of the 8-bit path: 32 bits less 8 of pixel and 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Support radius of the bicubic kernel, in input pixels at scale 1.
const SUPPORT: f64 = 2.0;

/// Keys' cubic convolution kernel with a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index it reads and its fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = SUPPORT * filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for o in 0..out_size {
        let centre = (o as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; negatives clamp to 0 either way.
        let lo = ((centre - support + 0.5) as i64).max(0) as usize;
        let hi = ((centre + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|i| bicubic((i as f64 - centre + 0.5) / filter_scale))
            .collect();
        let sum: f64 = w.iter().sum();
        let unit = (1u32 << PRECISION_BITS) as f64;
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if sum != 0.0 { k / sum } else { k };
                // Round half away from zero, as the C code's +-0.5 then truncation does.
                if k < 0.0 {
                    (-0.5 + k * unit) as i32
                } else {
                    (0.5 + k * unit) as i32
                }
            })
            .collect();
        first.push(lo);
        weights.push(fixed);
    }
    Taps { first, weights }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One weighted sum per channel, starting from the rounding half.
fn accumulate(pixels: impl Iterator<Item = (usize, i32)>, src: &[u8]) -> [u8; 3] {
    let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
    for (at, k) in pixels {
        for c in 0..3 {
            acc[c] += src[at + c] as i64 * k as i64;
        }
    }
    acc.map(clip8)
}

/// Resizes an `h x w` RGB picture (`h * w * 3` bytes, row-major) to `out_h x out_w`.
pub fn resize_bicubic(src: &[u8], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    assert_eq!(src.len(), h * w * 3, "picture is not {h} x {w} x 3");
    if out_h == h && out_w == w {
        return src.to_vec();
    }
    let vertical = taps(h, out_h);
    // The rows the vertical pass reads: the horizontal pass resizes only these.
    let top = vertical.first.first().copied().unwrap_or(0);
    let bottom = vertical
        .first
        .last()
        .zip(vertical.weights.last())
        .map_or(0, |(first, k)| first + k.len());
    let (band, cols) = if out_w == w {
        (src[top * w * 3..bottom * w * 3].to_vec(), w)
    } else {
        (horizontal_pass(src, w, top..bottom, &taps(w, out_w)), out_w)
    };
    if out_h == h {
        return band;
    }
    vertical_pass(&band, cols, top, &vertical)
}

/// Rows `rows` of a `w`-wide picture, each resized to `taps.first.len()` columns.
fn horizontal_pass(src: &[u8], w: usize, rows: std::ops::Range<usize>, taps: &Taps) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * taps.first.len() * 3);
    for y in rows {
        for (x0, k) in taps.first.iter().zip(&taps.weights) {
            let px = k
                .iter()
                .enumerate()
                .map(|(i, &k)| ((y * w + x0 + i) * 3, k));
            out.extend_from_slice(&accumulate(px, src));
        }
    }
    out
}

/// Each output row from the rows of `band` (which starts at source row `top`).
fn vertical_pass(band: &[u8], cols: usize, top: usize, taps: &Taps) -> Vec<u8> {
    let mut out = Vec::with_capacity(taps.first.len() * cols * 3);
    for (y0, k) in taps.first.iter().zip(&taps.weights) {
        for x in 0..cols {
            let px = k
                .iter()
                .enumerate()
                .map(|(i, &k)| (((y0 - top + i) * cols + x) * 3, k));
            out.extend_from_slice(&accumulate(px, band));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_size_is_a_copy_and_flat_stays_flat() {
        let src: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_bicubic(&src, 5, 7, 5, 7), src);
        let flat = vec![200u8; 9 * 11 * 3];
        for (oh, ow) in [(4, 4), (20, 3), (9, 30)] {
            let out = resize_bicubic(&flat, 9, 11, oh, ow);
            assert_eq!(out.len(), oh * ow * 3);
            assert!(out.iter().all(|&v| v == 200), "{oh}x{ow}");
        }
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 28), (28, 100), (7, 7), (3, 50)] {
            let t = taps(i, o);
            for k in &t.weights {
                let sum: i64 = k.iter().map(|&v| v as i64).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {sum}"
                );
            }
        }
    }
}
