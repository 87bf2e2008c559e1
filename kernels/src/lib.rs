//! Fused ops of xkd: the distillation loss.
//!
//! [`fused_distill_loss`] (module [`fused`], CUDA twin in `cuda` under the `cuda` feature) is the
//! loss the training loop calls. [`distill_loss`] composes the same loss from differentiable
//! candle ops; it stays as the oracle the fused op is tested against and as the bench baseline.

use candle_core::{DType, Result, Tensor, D};

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fused;
pub use fused::{fused_distill_loss, FusedLoss};

/// Loss and its parts (each already weighted and averaged over rows).
#[derive(Debug, Clone)]
pub struct LossParts {
    pub total: Tensor,
    pub kl: Tensor,
    pub ce: Tensor,
}

/// Per-row weighted distillation loss over logits `[N, V]`:
///
/// `sum_r (kl_weight[r] * T^2 * KL(softmax(t_r/T) || softmax(s_r/T)) + ce_weight[r] * CE(s_r, target_r)) / N`
///
/// With `kl_weight = alpha` and `ce_weight = 1 - alpha` on every row this is the usual
/// `alpha * T^2 * KL + (1 - alpha) * CE`. Rows with both weights 0 contribute nothing; the
/// teacher gets no gradient. Dividing by N (not by the weight sum) keeps the data-parallel
/// average of per-rank losses equal to the loss of the whole batch.
pub fn distill_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    kl_weight: &Tensor,
    ce_weight: &Tensor,
    temperature: f64,
) -> Result<LossParts> {
    let (n, v) = student.dims2()?;
    if teacher.dims2()? != (n, v) {
        candle_core::bail!(
            "teacher logits {:?} do not match student logits {:?}",
            teacher.dims(),
            student.dims()
        );
    }
    let student = student.to_dtype(DType::F32)?;
    let teacher = teacher.detach().to_dtype(DType::F32)?;
    let log_ps = candle_nn_free::log_softmax(&(&student / temperature)?)?;
    let log_pt = candle_nn_free::log_softmax(&(&teacher / temperature)?)?;
    let kl_rows = (log_pt.exp()? * (&log_pt - &log_ps)?)?.sum(D::Minus1)?;
    let kl = ((kl_rows * kl_weight)?.sum_all()? * (temperature * temperature / n as f64))?;
    let log_p = candle_nn_free::log_softmax(&student)?;
    let picked = log_p.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let ce = ((picked.neg()? * ce_weight)?.sum_all()? / n as f64)?;
    Ok(LossParts {
        total: (&kl + &ce)?,
        kl,
        ce,
    })
}

mod candle_nn_free {
    use candle_core::{Result, Tensor, D};
    /// log-softmax over the last dim from differentiable ops, max-subtracted for stability.
    pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let shifted = x.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        shifted.broadcast_sub(&lse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn scalar(x: &Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    // Expected values in float64, from the definition (the committed PyTorch fixtures of the
    // fused op replace this case):
    //   python3 -c "import math
    //   lsm=lambda r:[x-max(r)-math.log(sum(math.exp(y-max(r)) for y in r)) for x in r]
    //   s=[[1,2,3],[0,-1,4]]; t=[[3,2,1],[0,0,0]]; T=2
    //   print(sum(sum(math.exp(q)*(q-p) for p,q in zip(lsm([x/T for x in a]),lsm([x/T for x in b])))
    //             for a,b in zip(s,t))/2*T*T, -(lsm(s[0])[2]+lsm(s[1])[0])/2)"
    //   -> 1.8365569521626273 2.2161754272916014
    #[test]
    fn matches_the_definition_on_a_small_case() {
        let s = t(&[1., 2., 3., 0., -1., 4.], (2, 3));
        let te = t(&[3., 2., 1., 0., 0., 0.], (2, 3));
        let targets = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let ones = Tensor::new(&[1f32, 1.], &Device::Cpu).unwrap();
        let parts = distill_loss(&s, &te, &targets, &ones, &ones, 2.0).unwrap();
        assert!(
            (scalar(&parts.kl) - 1.836_557).abs() < 1e-5,
            "{}",
            scalar(&parts.kl)
        );
        assert!(
            (scalar(&parts.ce) - 2.216_175_4).abs() < 1e-5,
            "{}",
            scalar(&parts.ce)
        );
    }

    #[test]
    fn masked_rows_contribute_nothing_and_teacher_gets_no_gradient() {
        let s = Var::from_tensor(&t(&[1., 2., 3., 1e4, -1e4, 0.], (2, 3))).unwrap();
        let te = Var::from_tensor(&t(&[3., 2., 1., 0., 0., 0.], (2, 3))).unwrap();
        let targets = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 0.], &Device::Cpu).unwrap();
        let parts = distill_loss(s.as_tensor(), te.as_tensor(), &targets, &w, &w, 1.0).unwrap();
        let grads = parts.total.backward().unwrap();
        let gs = grads.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gs[1], vec![0.0, 0.0, 0.0]);
        assert!(gs[0].iter().all(|g| g.is_finite()) && gs[0].iter().any(|g| *g != 0.0));
        assert!(grads.get(te.as_tensor()).is_none());
        assert!(scalar(&parts.total).is_finite());
    }

    #[test]
    fn all_masked_is_zero_not_nan() {
        let s = t(&[1., 2., 3.], (1, 3));
        let targets = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        let zero = Tensor::new(&[0f32], &Device::Cpu).unwrap();
        let parts = distill_loss(&s, &s, &targets, &zero, &zero, 4.0).unwrap();
        assert_eq!(scalar(&parts.total), 0.0);
    }
}
