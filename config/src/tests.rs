use super::*;

#[test]
fn embedded_default_resolves_and_round_trips() {
    let c = Config::embedded();
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
}

#[test]
fn override_changes_one_key() {
    let c = Config::resolve(None, &["distill.alpha=1.0".into()]).unwrap();
    assert_eq!(c.distill.alpha, 1.0);
    let c = Config::resolve(None, &["distill.direction=audio_to_visual".into()]).unwrap();
    assert_eq!(c.distill.direction, Direction::AudioToVisual);
    let c = Config::resolve(None, &["distill.alpha=1".into()]).unwrap();
    assert_eq!(c.distill.alpha, 1.0);
}

#[test]
fn unknown_key_is_named() {
    let e = Config::resolve(None, &["no.such.key=1".into()]).unwrap_err();
    assert!(e.to_string().contains("no.such.key"), "{e}");
    let e = Config::resolve(None, &["distill.nope=1".into()]).unwrap_err();
    assert!(e.to_string().contains("distill.nope"), "{e}");
}

#[test]
fn keep_last_zero_is_refused_by_name() {
    let e = Config::resolve(None, &["checkpoint.keep_last=0".into()]).unwrap_err();
    assert!(e.to_string().contains("checkpoint.keep_last"), "{e}");
    let c = Config::resolve(None, &["checkpoint.url=s3://b/p".into()]).unwrap();
    assert_eq!(c.checkpoint.url, "s3://b/p");
}

#[test]
fn bad_value_is_named() {
    let e = Config::resolve(None, &["distill.alpha=lots".into()]).unwrap_err();
    assert!(e.to_string().contains("distill.alpha"), "{e}");
    let e = Config::resolve(None, &["distill.direction=sideways".into()]).unwrap_err();
    assert!(e.to_string().contains("direction"), "{e}");
    let e = Config::resolve(None, &["distill.alpha=2.0".into()]).unwrap_err();
    assert!(e.to_string().contains("distill.alpha"), "{e}");
}

#[test]
fn a_bad_choice_is_refused_naming_the_key_and_the_choices() {
    for (set, key, choice) in [
        ("data.source=\"s3\"", "data.source", "manifest"),
        ("distill.target=\"truth\"", "distill.target", "teacher"),
        ("distill.kl_over=\"all\"", "distill.kl_over", "options"),
        (
            "visual_model.family=\"llama\"",
            "visual_model.family",
            "qwen2",
        ),
    ] {
        let e = Config::resolve(None, &[set.into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(key) && e.contains(choice), "{set}: {e}");
    }
    let c = Config::resolve(None, &["distill.kl_over=vocab".into()]).unwrap();
    assert_eq!(c.distill.kl_over, KlOver::Vocab);
}

#[test]
fn device_parses_its_three_forms_and_refuses_the_rest() {
    assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
    assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(None)));
    assert_eq!("cuda:0".parse(), Ok(DeviceChoice::Cuda(Some(0))));
    assert_eq!("cuda:12".parse(), Ok(DeviceChoice::Cuda(Some(12))));
    for form in ["cpu", "cuda", "cuda:3"] {
        assert_eq!(form.parse::<DeviceChoice>().unwrap().to_string(), form);
    }
    for bad in [
        "gpu", "", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda:1 ", "cuda0",
    ] {
        let e = bad.parse::<DeviceChoice>().unwrap_err();
        assert!(e.contains("cuda:N"), "{bad}: {e}");
    }
    let c = Config::resolve(None, &["run.device=cuda:1".into()]).unwrap();
    assert_eq!(c.run.device_choice(), DeviceChoice::Cuda(Some(1)));
    let e = Config::resolve(None, &["run.device=gpu".into()]).unwrap_err();
    assert!(e.to_string().contains("run.device"), "{e}");
    assert!(e.to_string().contains("cuda:N"), "{e}");
}

#[test]
fn bucket_size_must_be_positive() {
    assert_eq!(Config::embedded().collective.bucket_bytes(), 25 << 20);
    for bad in ["0", "-1", "nan"] {
        let e = Config::resolve(None, &[format!("collective.bucket_mb={bad}")]).unwrap_err();
        assert!(e.to_string().contains("collective.bucket_mb"), "{bad}: {e}");
    }
    let c = Config::resolve(None, &["collective.bucket_mb=1".into()]).unwrap();
    assert_eq!(c.collective.bucket_bytes(), 1 << 20);
}

#[test]
fn unknown_key_in_file_is_named() {
    let dir = std::env::temp_dir().join(format!("xkd-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        "[distill]\nalpha = 0.25\n[pretrain]\nsteps_typo = 3\n",
    )
    .unwrap();
    let e = Config::resolve(Some(&path), &[]).unwrap_err();
    assert!(e.to_string().contains("pretrain.steps_typo"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_qwen2_model_needs_its_dir_letter_kl_and_a_lora_student() {
    let qwen2 = |extra: &[&str]| {
        let mut sets: Vec<String> = [
            "audio_model.family=\"qwen2\"",
            "audio_model.dir=\"/models/qwen2-audio\"",
            "distill.caption_weight=0",
            "lora.r=8",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        sets.dedup();
        Config::resolve(None, &sets)
    };
    let c = qwen2(&[]).unwrap();
    assert_eq!(c.lora.r, 8);
    let refused = |extra: &[&str], key: &str| {
        let e = qwen2(extra).unwrap_err().to_string();
        assert!(e.contains(key), "{extra:?}: {e}");
    };
    refused(&["audio_model.dir=\"\""], "audio_model.dir");
    refused(&["audio_model.family=\"llama\""], "audio_model.family");
    refused(&["distill.caption_weight=1"], "distill.caption_weight");
    refused(&["distill.kl_over=\"vocab\""], "distill.kl_over");
    refused(&["lora.r=0"], "lora.r");
    refused(&["lora.target_modules=[]"], "lora.target_modules");
    refused(&["lora.target_modules=[\"fc1\"]"], "lora.target_modules");
    refused(&["lora.dropout=1.0"], "lora.dropout");
    // LoRA needs a qwen2 student: the audio_to_visual student here is a stand-in.
    refused(&["distill.direction=\"audio_to_visual\""], "lora.r");
    let e = Config::resolve(None, &["lora.r=4".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("lora.r") && e.contains("standin"), "{e}");
}

#[test]
fn every_shipped_config_resolves() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::resolve(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 4, "{n} configs in {}", dir.display());
}
