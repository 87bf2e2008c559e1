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

/// Every `section.key` of the resolved config, as `xkd config show` prints it.
fn every_key() -> Vec<String> {
    let table: toml::Table = Config::embedded().to_toml().parse().unwrap();
    let mut keys = Vec::new();
    for (section, value) in &table {
        for key in value.as_table().expect("a section").keys() {
            keys.push(format!("{section}.{key}"));
        }
    }
    keys
}

/// What makes a qwen2 audio student valid, for the keys only such a run reads.
const QWEN2_STUDENT: &[&str] = &[
    "audio_model.family=\"qwen2\"",
    "audio_model.dir=\"/models/qwen2-audio\"",
    "distill.caption_weight=0",
    "lora.r=8",
];

/// For every key: a value validation refuses (over the default, or over the settings given
/// with it), or `None` where every value of the key's type is a valid one.
fn bad_values() -> Vec<(String, Option<&'static str>, &'static [&'static str])> {
    let mut table: Vec<(String, Option<&str>, &[&str])> = [
        ("run.seed", None),
        ("run.run_id", Some("\"../elsewhere\"")),
        ("run.cache_dir", Some("\"\"")),
        ("run.device", Some("\"gpu\"")),
        ("run.threads_per_worker", Some("1025")),
        ("run.feature_cache_mb", Some("2000000")),
        ("run.loader_threads", Some("0")),
        ("data.source", Some("\"s3\"")),
        ("data.dir", Some("\"s3://bucket/set\"")),
        ("data.seed", None),
        ("data.sample_rate", Some("10")),
        ("data.clip_seconds", Some("nan")),
        ("data.frames", Some("0")),
        ("data.frame_size", Some("4")),
        ("data.pretrain_clips", Some("0")),
        ("data.pretrain_scarce_clips", Some("1000")),
        ("data.probe_clips", Some("0")),
        ("data.distill_clips", Some("0")),
        ("data.eval_clips", Some("0")),
        ("features.n_fft", Some("0")),
        ("features.hop", Some("0")),
        ("features.n_mels", Some("0")),
        ("pretrain.steps", None),
        ("pretrain.batch", Some("3")),
        ("pretrain.lr", Some("0")),
        ("pretrain.weight_decay", Some("-1")),
        ("pretrain.warmup_steps", None),
        ("pretrain.caption_weight", Some("nan")),
        ("pretrain.grad_clip", Some("-1")),
        ("heuristic.threshold", Some("2")),
        ("heuristic.top_k", None),
        ("heuristic.teacher_floor", Some("-0.5")),
        ("heuristic.fit", None),
        ("heuristic.coefficients", Some("[1.0]")),
        ("heuristic.prior_csv", None),
        ("distill.direction", Some("\"sideways\"")),
        ("distill.classes", Some("\"some\"")),
        ("distill.alpha", Some("2")),
        ("distill.temperature", Some("nan")),
        ("distill.target", Some("\"truth\"")),
        ("distill.kl_over", Some("\"all\"")),
        ("distill.replay_fraction", Some("1")),
        ("distill.replay_target", Some("\"teacher\"")),
        ("distill.replay_pretrain", None),
        ("distill.caption_weight", Some("-1")),
        ("distill.steps", None),
        ("distill.batch", Some("0")),
        ("distill.lr", Some("nan")),
        ("distill.weight_decay", Some("inf")),
        ("distill.warmup_steps", None),
        ("distill.grad_clip", Some("nan")),
        ("distill.teacher", Some("\"sometimes\"")),
        ("distill.cache_shard_steps", Some("0")),
        ("distill.micro_batch", Some("100000")),
        ("lora.r", Some("4")),
        ("checkpoint.url", None),
        ("checkpoint.every_steps", None),
        ("checkpoint.keep_last", Some("0")),
        ("collective.bucket_mb", Some("0")),
        ("control.listen", Some("\"nowhere\"")),
        ("control.metrics_listen", Some("\"localhost\"")),
        ("control.workers", Some("0")),
        ("control.heartbeat_ms", Some("0")),
        ("control.heartbeat_timeout_ms", Some("1")),
        ("control.join_timeout_ms", Some("0")),
        ("control.collective_timeout_ms", Some("0")),
        ("control.stall_timeout_ms", Some("1000")),
        ("control.max_restarts", None),
        ("control.restart_window_s", Some("0")),
        ("log.every", None),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v, &[][..]))
    .collect();
    for model in ["audio_model", "visual_model"] {
        for (field, bad) in [
            ("family", Some("\"llama\"")),
            ("dir", None),
            ("encoder_hidden", Some("0")),
            ("encoder_layers", Some("1000")),
            ("encoder_heads", Some("0")),
            ("lm_hidden", Some("0")),
            ("lm_layers", Some("1000")),
            ("lm_heads", Some("0")),
            ("lm_kv_heads", Some("3")),
            ("lm_intermediate", Some("0")),
            ("rope_theta", Some("inf")),
            ("tie_embeddings", None),
        ] {
            table.push((format!("{model}.{field}"), bad, &[]));
        }
    }
    // Only the audio stand-in pools into modality tokens; only the visual one has patches.
    table.push(("audio_model.modality_tokens".into(), Some("100000"), &[]));
    table.push(("visual_model.modality_tokens".into(), None, &[]));
    table.push(("audio_model.patch".into(), None, &[]));
    table.push(("visual_model.patch".into(), Some("5"), &[]));
    // LoRA's settings are read only with a qwen2 student.
    table.push(("lora.alpha".into(), Some("nan"), QWEN2_STUDENT));
    table.push(("lora.dropout".into(), Some("1.5"), QWEN2_STUDENT));
    table.push((
        "lora.target_modules".into(),
        Some("[\"fc1\"]"),
        QWEN2_STUDENT,
    ));
    table
}

#[test]
fn every_key_has_a_bad_value_that_is_refused_by_name() {
    let table = bad_values();
    let mut listed: Vec<&str> = table.iter().map(|(k, _, _)| k.as_str()).collect();
    listed.sort();
    let mut keys = every_key();
    keys.sort();
    assert_eq!(
        listed, keys,
        "the table must list every key of `xkd config show` once"
    );
    for (key, bad, context) in &table {
        let Some(bad) = bad else { continue };
        let mut sets: Vec<String> = context.iter().map(|s| s.to_string()).collect();
        Config::resolve(None, &sets).unwrap_or_else(|e| panic!("context of {key}: {e}"));
        sets.push(format!("{key}={bad}"));
        let e = Config::resolve(None, &sets)
            .expect_err(&format!("{key}={bad} was accepted"))
            .to_string();
        assert!(
            e.contains(key.as_str()),
            "{key}={bad}: the error does not name the key: {e}"
        );
    }
}

/// Values of every type and edge, and random ones, for every key: through `--set` and
/// through a TOML file, resolving either accepts or refuses, never panics.
#[test]
fn no_value_of_any_key_panics() {
    let mut literals: Vec<String> = [
        "0",
        "1",
        "-1",
        "2",
        "7",
        "9223372036854775807",
        "-9223372036854775808",
        "4294967296",
        "0.0",
        "-0.0",
        "0.5",
        "1e308",
        "-1e308",
        "1e-320",
        "nan",
        "-nan",
        "inf",
        "-inf",
        "\"\"",
        "\"x\"",
        "\"cuda:99999999999999999999\"",
        "\"é\"",
        "\"a b\"",
        "\"0.0.0.0:0\"",
        "[]",
        "[1]",
        "[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]",
        "[\"q_proj\"]",
        "true",
        "false",
        "{ a = 1 }",
        "x",
        "",
        "=",
        "\"\\u0000\"",
    ]
    .map(String::from)
    .to_vec();
    // A small xorshift: random integers, floats and strings, the same on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..40 {
        let r = next();
        literals.push(match r % 4 {
            0 => ((r >> 8) as i64 >> (r % 60)).to_string(),
            1 => format!("{:e}", f64::from_bits(next())),
            2 => format!("{}", (r >> 16) % 100_000),
            _ => format!(
                "\"{}\"",
                (0..r % 12)
                    .map(|_| char::from(b' ' + (next() % 94) as u8))
                    .filter(|c| *c != '"' && *c != '\\')
                    .collect::<String>()
            ),
        });
    }
    let dir = std::env::temp_dir().join(format!("xkd-cfg-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    for key in every_key() {
        let (section, field) = key.split_once('.').unwrap();
        for value in &literals {
            let set = format!("{key}={value}");
            let by_set =
                std::panic::catch_unwind(|| Config::resolve(None, std::slice::from_ref(&set)));
            assert!(by_set.is_ok(), "--set {set} panicked");
            std::fs::write(&file, format!("[{section}]\n{field} = {value}\n")).unwrap();
            let by_file = std::panic::catch_unwind(|| Config::resolve(Some(&file), &[]));
            assert!(
                by_file.is_ok(),
                "a file with {field} = {value} in [{section}] panicked"
            );
            if let Ok(Ok(config)) = by_file {
                let again =
                    Config::from_toml(&config.to_toml()).expect("an accepted config round-trips");
                assert_eq!(again.digest(), config.digest());
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `resolve_text` (where the config fuzzer enters) is `resolve` after reading the file.
#[test]
fn resolve_text_is_resolve_without_the_read() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny-qwen2.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let sets = ["distill.alpha=0.25".to_string()];
    let by_path = Config::resolve(Some(&path), &sets).unwrap();
    let by_text = Config::resolve_text(Some((&text, "tiny-qwen2.toml")), &sets).unwrap();
    assert_eq!(by_text, by_path);
    let e = Config::resolve_text(Some(("[distill]\nalpha = ", "mine.toml")), &[]).unwrap_err();
    assert!(e.to_string().contains("mine.toml"), "{e}");
}

/// An override sets exactly one key: a value followed by more TOML is refused naming the key,
/// not cut at the first value (it used to set `distill.alpha` and drop `run.seed=3`).
#[test]
fn an_override_holding_more_than_one_value_is_refused() {
    for set in [
        "distill.alpha=0.5\nrun.seed=3",
        "checkpoint.url=\"s3://b/p\"\nrun.seed=3",
        "distill.alpha=0.5\n[run]\nseed=3",
    ] {
        let key = set.split_once('=').unwrap().0;
        let e = Config::resolve(None, &[set.to_string()]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::BadValue { key: k, .. } if k == key),
            "{set:?}: {e}"
        );
    }
    let c = Config::resolve(None, &["distill.alpha=0.5 # a comment".to_string()]).unwrap();
    assert_eq!(c.distill.alpha, 0.5);
}

/// `run.loader_threads` takes 1 to 256: none would put feature work back on the training
/// thread, and each is an OS thread of every worker.
#[test]
fn loader_threads_are_refused_outside_1_to_256_by_name() {
    for ok in ["1", "256"] {
        let c = Config::resolve(None, &[format!("run.loader_threads={ok}")]).unwrap();
        assert_eq!(c.run.loader_threads.to_string(), ok);
    }
    for bad in ["0", "257", "-1"] {
        let e = Config::resolve(None, &[format!("run.loader_threads={bad}")])
            .expect_err(bad)
            .to_string();
        assert!(e.contains("run.loader_threads"), "{bad}: {e}");
    }
}

#[test]
fn a_cached_teacher_needs_the_option_letters_and_leaves_the_recipe_digest_alone() {
    let c = Config::resolve(None, &["distill.teacher=\"cached\"".into()]).unwrap();
    assert_eq!(c.distill.teacher, TeacherSource::Cached);
    let online = Config::resolve(None, &[]).unwrap();
    assert_eq!(online.distill.teacher, TeacherSource::Online);
    // `auto` (the default) caches where a model is a Qwen2 one, and never stays `auto`:
    // configs/tiny-qwen2.toml without its own `teacher` line.
    let tiny = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/tiny-qwen2.toml"
    ))
    .unwrap();
    let tiny: String = tiny
        .lines()
        .filter(|l| !l.starts_with("teacher ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let qwen2 = Config::resolve_text(Some((&tiny, "tiny-qwen2.toml")), &[]).unwrap();
    assert_eq!(qwen2.distill.teacher, TeacherSource::Cached);
    let resolved = Config::from_toml(&qwen2.to_toml()).unwrap();
    assert_eq!(resolved.distill.teacher, TeacherSource::Cached);
    let digest = |c: &Config| section_digest(&c.distill.recipe());
    assert_eq!(digest(&c), digest(&online));
    let shards = Config::resolve(None, &["distill.cache_shard_steps=3".into()]).unwrap();
    assert_eq!(digest(&shards), digest(&online));
    let other = Config::resolve(None, &["distill.steps=3".into()]).unwrap();
    assert_ne!(digest(&other), digest(&online));
    let e = Config::resolve(
        None,
        &[
            "distill.teacher=\"cached\"".into(),
            "distill.kl_over=\"vocab\"".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("distill.teacher") && e.contains("options"),
        "{e}"
    );
}

/// Replay rows trained to their labels need labels: label-free distillation refuses them by
/// the key's name. Anchored replay rows (`student`) keep the recipe digests of configs from
/// before the key; `label` is a recipe of its own.
#[test]
fn replay_rows_trained_to_labels_need_labels_and_the_anchor_keeps_old_digests() {
    let c = Config::resolve(None, &[]).unwrap();
    assert_eq!(c.distill.replay_target, ReplayTarget::Label);
    let e = Config::resolve(None, &["distill.target=\"teacher\"".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("distill.replay_target"), "{e}");
    let free = Config::resolve(
        None,
        &[
            "distill.target=\"teacher\"".into(),
            "distill.replay_target=\"student\"".into(),
        ],
    )
    .unwrap();
    assert_eq!(free.distill.replay_target, ReplayTarget::Student);
    let recipe = |c: &Config| toml::to_string(&c.distill.recipe()).unwrap();
    assert!(
        !recipe(&free).contains("replay_target"),
        "{}",
        recipe(&free)
    );
    assert!(
        recipe(&c).contains("replay_target = \"label\""),
        "{}",
        recipe(&c)
    );
}
