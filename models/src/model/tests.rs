use super::*;
use candle_nn::VarMap;

fn tiny() -> ModelConfig {
    ModelConfig {
        family: xkd_config::ModelFamily::Standin,
        dir: String::new(),
        encoder_hidden: 16,
        encoder_layers: 1,
        encoder_heads: 2,
        lm_hidden: 16,
        lm_layers: 1,
        lm_heads: 4,
        lm_kv_heads: 2,
        lm_intermediate: 32,
        rope_theta: 10000.0,
        modality_tokens: 4,
        patch: 4,
        tie_embeddings: false,
    }
}

const SHAPE: InputShape = InputShape {
    n_mels: 8,
    frames: 2,
    frame_size: 8,
};

fn build(modality: Modality) -> (VarMap, Model) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Model::new(modality, &tiny(), SHAPE, Vocab::new(12), vb).unwrap();
    init_params(&varmap, 3).unwrap();
    (varmap, model)
}

fn inputs(model: &Model, b: usize) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let feats = match model.modality {
        Modality::Audio => Tensor::randn(0f32, 1.0, (b, 17, 8), &dev).unwrap(),
        Modality::Visual => Tensor::randn(0f32, 1.0, (b, 2, 3, 8, 8), &dev).unwrap(),
    };
    let prompts: Vec<u32> = (0..b as u32)
        .flat_map(|i| {
            let q = question(1, i, 0, i % 12, 12);
            model.vocab.prompt(&q.options, model.mm_tokens)
        })
        .collect();
    let seq = prompts.len() / b;
    (feats, Tensor::from_vec(prompts, (b, seq), &dev).unwrap())
}

/// A frozen model loaded in bf16 (as the teacher is on a GPU) gives f32 logits close to the
/// f32 model's: every op runs in bf16 except the norms' and softmax's statistics.
#[test]
fn a_bf16_copy_gives_the_f32_models_logits_within_bf16_precision() {
    for modality in [Modality::Audio, Modality::Visual] {
        let (varmap, model) = build(modality);
        let tensors: std::collections::HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu);
        let half = Model::new(modality, &tiny(), SHAPE, Vocab::new(12), vb).unwrap();
        let (f, p) = inputs(&model, 3);
        let want = model.forward(&f, &p).unwrap();
        let got = half.forward(&f, &p).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // bf16 keeps 8 significant bits (2^-8 = 0.4%); a few layers of rounding stay
        // well under 5% of the largest logit, and a dtype bug is far outside it.
        assert!(diff <= 0.05 * scale, "{modality:?}: {diff} vs {scale}");
        assert!(diff > 0.0, "{modality:?}: the bf16 model is not in bf16");
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    for modality in [Modality::Audio, Modality::Visual] {
        let (varmap, model) = build(modality);
        let (f, p) = inputs(&model, 3);
        let logits = model.forward(&f, &p).unwrap();
        assert_eq!(logits.dims(), &[3, model.vocab.size()]);
        let loss = candle_nn::loss::cross_entropy(
            &logits,
            &Tensor::new(&[12u32, 13, 14], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if is_frozen(name) {
                continue;
            }
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{modality:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{modality:?}: zero gradient for {name}");
        }
    }
}

#[test]
fn init_is_deterministic_and_seeded() {
    let digest = |seed| {
        let (varmap, _) = build(Modality::Visual);
        init_params(&varmap, seed).unwrap();
        let data = varmap.data().lock().unwrap();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        names
            .iter()
            .map(|n| data[n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(digest(5), digest(5));
    assert_ne!(digest(5), digest(6));
}

#[test]
fn questions_are_pure_and_contain_the_answer() {
    for clip in 0..50 {
        let q = question(9, clip, 0, clip % 24, 24);
        assert_eq!(q, question(9, clip, 0, clip % 24, 24));
        assert_ne!(q.options, question(9, clip, 1, clip % 24, 24).options);
        assert_eq!(q.options[q.answer], clip % 24);
        let mut o = q.options.to_vec();
        o.sort();
        o.dedup();
        assert_eq!(o.len(), OPTIONS);
    }
    let answers: std::collections::HashSet<usize> =
        (0..50).map(|c| question(9, c, 0, 0, 24).answer).collect();
    assert!(answers.len() > 5, "answer position must vary");
}
