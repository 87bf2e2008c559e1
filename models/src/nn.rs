//! Layers built only from differentiable candle ops, shared by the stand-ins (`model`) and the
//! real families (`qwen`).
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `rope` and the LayerNorm fast path have no
//! backward pass, so a gradient through them silently vanishes. Everything here composes plain
//! ops that candle differentiates; statistics are taken in f32 whatever the model's dtype.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm (`(x - mean) / sqrt(var + eps) * weight + bias`, biased variance as PyTorch).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Statistics in f32 whatever the model's dtype (a no-op for f32 models).
        let x32 = x.to_dtype(DType::F32)?;
        let mean = x32.mean_keepdim(D::Minus1)?;
        let centred = x32.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(x.dtype())?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// RMSNorm (`x / sqrt(mean(x^2) + eps) * weight`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        x32.broadcast_div(&(ms + self.eps)?.sqrt()?)?
            .to_dtype(x.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// Softmax over the last dimension, computed in f32 and returned in the input's dtype.
/// `candle_nn::ops::softmax` is composed of exp/sum/div, so it has a backward pass.
pub fn softmax(scores: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(scores.dtype())
}

/// `x * sigmoid(1.702 x)`, the ViT activation of Qwen2-VL (CLIP's "quick GELU").
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let gate = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    x * gate
}

/// An activation named as a Hugging Face config names it (`hidden_act`,
/// `activation_function`). "gelu" is the exact (erf) GELU, as PyTorch's `nn.GELU()`.
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "gelu" => x.gelu_erf(),
        "gelu_pytorch_tanh" | "gelu_new" => x.gelu(),
        "quick_gelu" => quick_gelu(x),
        "silu" | "swish" => x.silu(),
        other => candle_core::bail!("unsupported activation {other:?}"),
    }
}

/// `[s, s]` additive causal mask. A large negative rather than -inf keeps softmax's backward
/// free of NaN; after the max subtraction its exp is exactly zero, as -inf's is.
pub fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..s * s)
        .map(|i| if i % s > i / s { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_vec(v, (s, s), dev)
}

/// Kernel-3, padding-1 convolution over time on `[B, T, C]` (weight `[out, C, 3]`, bias
/// `[out]`), written as unfold + matmul; output `[B, (T - 1) / stride + 1, out]`, PyTorch's
/// length. candle's own conv1d backward gave rank-to-rank and run-to-run differences in the
/// kernel gradient at stride 2 (caught by the data-parallel equivalence test); a matmul is
/// exact enough and deterministic.
pub fn conv1d_k3(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    let (batch, t, c) = x.dims3()?;
    let (out, _, k) = w.dims3()?;
    let t_out = (t + 2 - k) / stride + 1;
    // Zero-pad one step on the left, and enough on the right for the strided reads below.
    let padded = x.pad_with_zeros(1, 1, 1 + stride)?;
    let taps: Vec<Tensor> = (0..k)
        .map(|j| {
            padded
                .narrow(1, j, stride * t_out)?
                .reshape((batch, t_out, stride, c))?
                .narrow(2, 0, 1)?
                .squeeze(2)
        })
        .collect::<Result<_>>()?;
    let unfolded = Tensor::cat(&taps, 2)?; // [B, T', k*C], tap-major
    let kernel = w.permute((0, 2, 1))?.reshape((out, k * c))?;
    unfolded.broadcast_matmul(&kernel.t()?)?.broadcast_add(b)
}

/// `x1, x2 = halves of the last dim; cat(-x2, x1)`: the rotation partner of rotary embeddings.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `x * cos + rotate_half(x) * sin`, tables broadcast against `x`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .broadcast_add(&rotate_half(x)?.broadcast_mul(sin)?)
}

/// Grouped-query attention's key/value heads `[B, H_kv, S, D]` repeated for the query heads
/// that share them: each KV head serves `groups` consecutive query heads.
pub fn repeat_kv(x: Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x);
    }
    let (b, h, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, groups, s, d))?
        .reshape((b, h * groups, s, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grad_of(f: impl Fn(&Tensor) -> Result<Tensor>) -> Vec<f32> {
        let x = candle_core::Var::new(&[-2.0f32, -0.5, 0.0, 0.7, 3.0], &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        g.get(x.as_tensor()).unwrap().to_vec1().unwrap()
    }

    /// The activations have a gradient, and it is the analytic one.
    #[test]
    fn activations_differentiate() {
        let xs = [-2.0f32, -0.5, 0.0, 0.7, 3.0];
        let quick = grad_of(quick_gelu);
        for (x, g) in xs.iter().zip(quick) {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            let want = s + 1.702 * x * s * (1.0 - s);
            assert!(
                (g - want).abs() < 1e-5,
                "quick_gelu'({x}) = {g}, want {want}"
            );
        }
        let erf = grad_of(|x| activation("gelu", x));
        assert!((erf[2] - 0.5).abs() < 1e-6, "gelu'(0) = {}", erf[2]);
        assert!(erf.iter().all(|g| g.is_finite()));
        assert!(activation("relu6", &Tensor::new(&[1f32], &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn rotate_half_swaps_and_negates() {
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
        let r = rotate_half(&x).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, vec![-3.0, -4.0, 1.0, 2.0]);
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let m = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0][1], -1e9);
        assert_eq!(m[1][0], 0.0);
        assert_eq!(m[2][2], 0.0);
    }
}
