use super::*;

/// The part of `phase` whose description starts with `prefix`.
fn part_of<'a>(phase: &'a Phase, prefix: &str) -> &'a Part {
    phase
        .parts
        .iter()
        .find(|r| r.what.starts_with(prefix))
        .unwrap_or_else(|| panic!("no part `{prefix}...` in {}", phase.name))
}

fn config(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::resolve(None, &sets).unwrap()
}

/// The rows a worker takes are the coordinator's split of the global batch.
#[test]
fn rows_follow_the_batch_split() {
    let c = config(&[
        "control.workers=8",
        "distill.batch=32",
        "distill.replay_fraction=0.5",
    ]);
    let p = plan(&c, &Options::default()).unwrap();
    assert_eq!((p.taught_rows, p.replay_rows), (2, 2));
    let c = config(&[
        "control.workers=8",
        "distill.batch=32",
        "distill.replay_fraction=0.0",
    ]);
    let p = plan(&c, &Options::default()).unwrap();
    assert_eq!((p.taught_rows, p.replay_rows), (4, 0));
}

/// A stand-in student whose replay rows are anchored to its own answers keeps a frozen copy
/// of itself; without replay rows, or with replay rows trained to their labels (the default),
/// none; a Qwen2 student's anchor is its own base (checked on the 7B pair below).
#[test]
fn a_stand_in_anchor_is_a_copy_only_with_anchored_replay_rows() {
    let anchor = |sets: &[&str]| {
        let p = plan(&config(sets), &Options::default()).unwrap();
        (
            p.models[0].parameters,
            part_of(&p.phases[0], "replay anchor").bytes,
        )
    };
    let (params, bytes) = anchor(&["distill.replay_target=\"student\""]);
    assert_eq!(bytes, params * 4);
    assert_eq!(anchor(&[]).1, 0);
    assert_eq!(
        anchor(&[
            "distill.replay_target=\"student\"",
            "distill.replay_fraction=0.0"
        ])
        .1,
        0
    );
}

fn paper_pair(sets: &[&str]) -> Plan {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/qwen2vl-to-qwen2audio.toml"
    ))
    .unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let c = Config::resolve_text(Some((&text, "qwen2vl-to-qwen2audio.toml")), &sets).unwrap();
    plan(&c, &Options::default()).unwrap()
}

/// The 7B architectures come from the committed Hub configs when the directories are not
/// here, with the sizes the model cards give.
#[test]
fn the_paper_pair_is_planned_from_the_known_architectures() {
    let p = paper_pair(&[]);
    let (student, teacher) = (&p.models[0], &p.models[1]);
    assert!(
        student.architecture.contains("Qwen2-Audio-7B-Instruct"),
        "{}",
        student.architecture
    );
    // Qwen2-Audio-7B: 8.4 B; Qwen2-VL-7B: 8.3 B.
    assert!(
        (8.35e9..8.45e9).contains(&(student.parameters as f64)),
        "{}",
        student.parameters
    );
    assert!(
        (8.25e9..8.35e9).contains(&(teacher.parameters as f64)),
        "{}",
        teacher.parameters
    );
    // 10 s of audio: 1000 mel frames, 500 after the stride-2 convolution, 250 pooled.
    assert_eq!(student.clip_tokens, 250);
    // 20 frames of 360 x 640, kept at 364 x 644: 10 x 26 x 46 patches, 4 to a token.
    assert_eq!(teacher.clip_tokens, 2990);
    assert_eq!(p.device, "cuda");
    assert_eq!(part_of(&p.phases[0], "replay anchor").bytes, 0);
}

/// What the cached teacher saves is the teacher's weights at least.
#[test]
fn the_distillation_step_without_the_teacher_saves_its_weights() {
    let p = paper_pair(&["distill.teacher=online"]);
    assert!(p.teacher_resident);
    let teacher = part_of(&p.phases[0], "teacher weights");
    assert!(p.phases[0].device_bytes - p.distill_without_teacher_bytes >= teacher.bytes);
}

/// The paper config caches its teacher: distillation holds no teacher, and the caching stage
/// holds the teacher alone with the taught rows' forward.
#[test]
fn a_cached_teacher_is_planned_in_its_own_stage() {
    let p = paper_pair(&[]);
    assert!(!p.teacher_resident);
    assert_eq!(p.phases[0].device_bytes, p.distill_without_teacher_bytes);
    assert!(p.phases[0]
        .parts
        .iter()
        .all(|r| !r.what.starts_with("teacher")));
    let caching = p
        .phases
        .iter()
        .find(|ph| ph.name == "caching the teacher's answers")
        .expect("a caching phase");
    let online = paper_pair(&["distill.teacher=online"]);
    let weights = |ph: &Phase| part_of(ph, "teacher weights").bytes;
    assert_eq!(weights(caching), weights(&online.phases[0]));
    // The cache holds the replay rows' anchors too: the caching stage loads the pretrained
    // student, and distillation runs no anchor forward.
    let student = part_of(caching, "the pretrained student's weights");
    assert_eq!(student.bytes, p.models[0].parameters * 2);
    let anchor = |p: &Plan| part_of(&p.phases[0], "replay anchor").what.clone();
    assert!(
        anchor(&p).contains("from the teacher cache"),
        "{}",
        anchor(&p)
    );
    assert!(
        anchor(&online).contains("adapters off"),
        "{}",
        anchor(&online)
    );
}

/// The paper config's 4 clips a GPU (2 taught, 2 replay) go through the student one at a
/// time: its distillation step fits 80 GiB, which all four at once do not; only the student's
/// step shrinks, by its activations and frozen-operand gradients, less the running sum.
#[test]
fn the_paper_pair_fits_80_gib_with_one_clip_at_a_time() {
    let p = paper_pair(&[]);
    assert_eq!((p.taught_rows, p.replay_rows), (2, 2));
    assert_eq!(p.capacity_bytes, 80 << 30);
    assert!(p.fits, "{} bytes in {}", p.peak_bytes, p.peak_phase);
    let whole = paper_pair(&["distill.micro_batch=0"]);
    assert!(!whole.fits, "{} bytes", whole.peak_bytes);
    let step = |p: &Plan| part_of(&p.phases[0], "largest of a step's forwards: student").bytes;
    assert!(
        step(&p) * 3 < step(&whole),
        "{} against {}",
        step(&p),
        step(&whole)
    );
}

/// A model directory that is not here and has no known name is refused naming its key.
#[test]
fn an_unknown_absent_model_directory_names_its_key() {
    let text = "[audio_model]\nfamily = \"qwen2\"\ndir = \"/nowhere/Some-Model\"\n\
                [visual_model]\nfamily = \"qwen2\"\ndir = \"/nowhere/Qwen2-VL-7B-Instruct\"\n\
                [lora]\nr = 4\n[distill]\ncaption_weight = 0.0\n";
    let c = Config::resolve_text(Some((text, "test.toml")), &[]).unwrap();
    let err = plan(&c, &Options::default()).unwrap_err();
    assert!(err.to_string().contains("audio_model.dir"), "{err}");
}
