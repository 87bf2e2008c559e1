//! Messages between the coordinator and its workers. Only this module says what crosses the
//! wire; `frame` says how. Every frame carries `PROTOCOL_VERSION`; a change to any type here
//! that alters its bincode encoding must bump it.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use xkd_config::Modality;

/// Bumped whenever the encoding of any message changes.
pub const PROTOCOL_VERSION: u16 = 9;

/// What a worker sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerMsg {
    Join(Join),
    /// "Alive", from the control link's own task every `control.heartbeat_ms`, with what the
    /// compute thread has done: the coordinator's progress watchdog (`control.stall_timeout_ms`)
    /// reads `progress`, not the heartbeat's arrival.
    Heartbeat {
        seq: u64,
        /// Units of work the compute thread has finished in this process (steps, evaluation
        /// batches, models loaded, ...): it only grows while the thread works.
        progress: u64,
        /// The compute thread waits on something with a deadline of its own (a collective's
        /// timeout, the checkpoint store's retries): a stall there is not the thread's, and
        /// that deadline covers it.
        waiting: bool,
    },
    Step(StepReport),
    /// Rank 0 has put a checkpoint's tensors into the store; the coordinator adds
    /// `state.json` and commits. Sent before the task's `Done`.
    Saved(SavedCheckpoint),
    /// Rank 0 could not put a checkpoint's tensors; training goes on and the next save
    /// retries.
    SaveFailed {
        task: u64,
        step: u64,
        error: String,
    },
    Done {
        task: u64,
        result: TaskResult,
    },
    Failed {
        task: u64,
        error: String,
        /// Whether restarting the workers can mend it.
        kind: FailureKind,
    },
    /// Rank 0's NCCL unique id (`NCCL_UNIQUE_ID_BYTES` opaque bytes), sent once after an
    /// `Assignment` with `CollectiveKind::Nccl`; the coordinator hands it to every rank.
    CollectiveId {
        id: Vec<u8>,
    },
}

/// What a failed task's error says about retrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The same inputs would fail the same way (a bad model directory, a shape the recipe
    /// makes, a diverged loss, a panic): the coordinator ends the run with it.
    Permanent,
    /// Something outside the task went away (a peer, the store, the network): the coordinator
    /// restarts the workers and resumes.
    Transient,
}

impl WorkerMsg {
    /// A heartbeat from a process whose compute thread has done nothing yet.
    pub fn heartbeat(seq: u64) -> WorkerMsg {
        WorkerMsg::Heartbeat {
            seq,
            progress: 0,
            waiting: false,
        }
    }
}

/// Length of an NCCL unique id (`ncclUniqueId`): the coordinator refuses any other length
/// rather than hand on bytes no rank could build a communicator from.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// Which gradient collective the ranks of a generation form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectiveKind {
    /// The CPU ring all-reduce over TCP, between the `collective_addr`s of the `Join`s.
    TcpRing,
    /// NCCL on the ranks' GPUs: rank 0 creates the unique id and sends it as
    /// `WorkerMsg::CollectiveId`; every rank (rank 0 too) waits for
    /// `CoordinatorMsg::CollectiveId` before building its communicator.
    Nccl,
}

/// What the coordinator sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMsg {
    Assignment(Assignment),
    Reject(Reject),
    Task(Task),
    /// Preemption: end the running training task early. Ranks agree on the step through the
    /// gradient all-reduce, rank 0 checkpoints it, and every rank answers `Done` with
    /// `TrainSummary::stopped` set.
    Stop {
        task: u64,
    },
    Shutdown {
        reason: String,
    },
    /// This generation of workers is over (another was lost or failed): exit with
    /// `EXIT_RESTART` so the launcher starts the worker again and it rejoins.
    Restart {
        reason: String,
    },
    /// Rank 0's NCCL unique id, to every rank of the generation (see `CollectiveKind::Nccl`).
    CollectiveId {
        id: Vec<u8>,
    },
}

/// Exit status of a worker told to `Restart` (EX_TEMPFAIL): launchers start it again.
pub const EXIT_RESTART: u8 = 75;

/// Debug is written by hand so the token never reaches a log line or a panic message, whoever
/// prints the join (or a `WorkerMsg` holding one).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub protocol_version: u16,
    /// The run's join token (from `XKD_JOIN_TOKEN`); never logged.
    pub token: String,
    /// Address this worker's collective listens on, for its ring neighbours.
    pub collective_addr: String,
    pub hostname: String,
    pub pid: u32,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = if self.token.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        };
        f.debug_struct("Join")
            .field("protocol_version", &self.protocol_version)
            .field("token", &format_args!("{token}"))
            .field("collective_addr", &self.collective_addr)
            .field("hostname", &self.hostname)
            .field("pid", &self.pid)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub run_id: String,
    pub rank: u32,
    pub world_size: u32,
    /// Collective addresses of every rank, indexed by rank (used by `CollectiveKind::TcpRing`).
    pub peers: Vec<String>,
    pub collective: CollectiveKind,
    /// The resolved config as TOML; workers parse it, never re-resolve it.
    pub config_toml: String,
    pub config_digest: String,
    /// Directory for the run's outputs (models, per-rank logs).
    pub out_dir: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reject {
    BadToken,
    VersionMismatch { expected: u16, got: u16 },
    Malformed { detail: String },
    Oversized { limit: u32, got: u32 },
    NotExpectingWorkers,
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::BadToken => write!(f, "join token does not match this run"),
            Reject::VersionMismatch { expected, got } => {
                write!(
                    f,
                    "protocol version {got} not supported (coordinator speaks {expected})"
                )
            }
            Reject::Malformed { detail } => write!(f, "malformed frame: {detail}"),
            Reject::Oversized { limit, got } => {
                write!(f, "frame of {got} bytes exceeds the limit of {limit}")
            }
            Reject::NotExpectingWorkers => write!(f, "the run has all the workers it needs"),
        }
    }
}

/// A unit of work the coordinator orders; every rank of the world runs the same task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: u64,
    pub kind: TaskKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskKind {
    /// Generate (or check) the dataset. Only rank 0 writes; the others wait for the result.
    PrepareData,
    /// Data-parallel training of one model (boxed: it is much larger than the others).
    Train(Box<TrainTask>),
    /// Predict every clip of the plan's list and report per-clip outcomes.
    Evaluate(EvalTask),
    /// Run the frozen teacher once over every question the distillation task will ask and put
    /// its answers into the run's store, one shard of `cache.shard_steps` steps at a time;
    /// rank r makes the shards `i` with `i % world == r` that the store lacks or holds damaged.
    CacheTeacher(Box<CacheTask>),
}

/// The teacher cache stage's order: the distillation task whose questions it answers, and
/// where the answers go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheTask {
    /// The distillation task as it will be ordered (its plan from the first step, its store).
    pub train: TrainTask,
    pub cache: TeacherCache,
}

/// Where a run's cached teacher answers are and how they are cut. The rows of global sample
/// `g` of the main plan (the plan's `g`-th draw, whatever the world) are row
/// `g % (shard_steps * rows_per_step)` of shard `g / (shard_steps * rows_per_step)`, so any
/// world size with the same global batch reads the same cache. The replay rows' anchors (the
/// frozen pre-distillation student's answers) are cut the same way by the replay plan's
/// global index and `replay_rows_per_step`, in the same shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherCache {
    /// Names the cache: a digest of everything its answers depend on (recipe, teacher, plan,
    /// global batch); objects are `<store>/<run_id>/run/teacher-<key>...`.
    pub key: String,
    pub shard_steps: u64,
    /// Global taught-class rows per step (batch per rank x world).
    pub rows_per_step: u64,
    /// Global anchored replay rows per step (`TrainTask::anchored_replay_rows`); 0 = no
    /// replay rows or rows trained to their labels, and no anchors in the shards.
    pub replay_rows_per_step: u64,
    /// Steps the cache answers, from the plan's first sample.
    pub steps: u64,
}

impl TeacherCache {
    /// Format of the shards and of the manifest; part of the key. 2: the replay anchors too.
    pub const FORMAT: u32 = 2;

    pub fn shards(&self) -> u64 {
        self.steps.div_ceil(self.shard_steps.max(1))
    }

    pub fn rows_per_shard(&self) -> u64 {
        self.shard_steps * self.rows_per_step
    }

    pub fn replay_rows_per_shard(&self) -> u64 {
        self.shard_steps * self.replay_rows_per_step
    }

    /// The steps shard `index` answers.
    pub fn shard_steps_of(&self, index: u64) -> std::ops::Range<u64> {
        let first = index * self.shard_steps;
        first..(first + self.shard_steps).min(self.steps)
    }

    /// The run object holding shard `index` (a safetensors file).
    pub fn shard_name(&self, index: u64) -> String {
        format!("teacher-{}-{index:06}.safetensors", self.key)
    }

    /// The run object holding the sha256 (hex) of shard `index`'s bytes, written after it, so a
    /// caching stage started again can tell a whole shard from a damaged or partial one.
    pub fn digest_name(&self, index: u64) -> String {
        format!("teacher-{}-{index:06}.sha256", self.key)
    }

    /// The run object listing every shard with its size and sha256 (`TeacherManifest` as
    /// JSON), written by the coordinator once all shards are there.
    pub fn manifest_name(&self) -> String {
        format!("teacher-{}.json", self.key)
    }
}

/// `teacher-<key>.json`: the cache as the coordinator found it complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherManifest {
    pub format_version: u32,
    pub layout: TeacherCache,
    /// One per shard, by index.
    pub shards: Vec<CachedShard>,
}

/// One shard of the teacher cache as a rank left it in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedShard {
    pub index: u64,
    pub size: u64,
    pub sha256: String,
    /// Found whole in the store (not made again by this stage).
    pub reused: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainTask {
    pub modality: Modality,
    pub objective: Objective,
    /// Model to start from; `None` = fresh initialisation from the run seed.
    pub init: Option<String>,
    /// Where the trained parameters go. A local path: every rank writes its own copy there
    /// (the ranks' parameters are equal, and their hosts may share no filesystem). An
    /// object-store URL: rank 0 uploads them under it, as `student.safetensors` (a stand-in)
    /// or `student-lora/` (LoRA adapters in PEFT's format).
    pub save: String,
    /// `save` is a cache keyed by the recipe (pretraining): when every rank finds a model
    /// there, none trains and the summary says `reused`.
    pub keep_saved: bool,
    pub plan: ShardPlan,
    /// Clips the replay share of each batch is drawn from (distillation only).
    pub replay: Option<ShardPlan>,
    pub steps: u64,
    /// Clips per step per worker, main shard and replay shard.
    pub batch: usize,
    pub replay_batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// Weight of the captioning loss beside the answer loss (supervised training only).
    pub caption_weight: f64,
    /// Clip the global gradient norm to this; 0 = off.
    pub grad_clip: f64,
    /// Seed of initialisation and of the question options.
    pub seed: u64,
    /// Where and how often rank 0 saves checkpoints; `None` = never.
    pub checkpoint: Option<CheckpointOrder>,
    /// Continue from this committed checkpoint of `checkpoint`'s store: every rank loads the
    /// parameters and optimizer state it holds and takes steps `resume_from..steps`; the
    /// plans' cursors already point at the next global sample.
    pub resume_from: Option<u64>,
    /// Distillation reads the teacher's answers from this cache in `checkpoint`'s store
    /// instead of loading the teacher (`distill.teacher = "cached"`).
    pub teacher_cache: Option<TeacherCache>,
}

impl TrainTask {
    /// Replay rows per step, over `world` ranks, whose targets are the frozen pretrained
    /// student's answers (the anchors a teacher cache holds): all of them, unless there are
    /// none or the objective trains them to their labels.
    pub fn anchored_replay_rows(&self, world: usize) -> u64 {
        match (&self.replay, &self.objective) {
            (Some(_), Objective::Distill { replay_labels, .. }) if !replay_labels => {
                (self.replay_batch * world) as u64
            }
            _ => 0,
        }
    }
}

/// Checkpoints rank 0 saves while it trains: the tensors only; the coordinator commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOrder {
    /// The store (`file://`, `s3://`, ...); credentials come from the worker's environment.
    pub url: String,
    pub run_id: String,
    /// Save after every this many steps (0 = only at the end), and after the last step.
    pub every_steps: u64,
}

impl CheckpointOrder {
    /// Whether a checkpoint is due once `done` of `total` steps are taken.
    pub fn due(&self, done: u64, total: u64) -> bool {
        done == total || (self.every_steps > 0 && done.is_multiple_of(self.every_steps))
    }
}

/// The objects rank 0 wrote for checkpoint `step` of task `task`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedCheckpoint {
    pub task: u64,
    /// Steps taken when the tensors were captured.
    pub step: u64,
    /// Rank 0's loss at that step, so that a run resumed after its last step still reports it.
    pub loss: f64,
    pub objects: Vec<SavedObject>,
}

/// One object in the store, as its manifest will list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedObject {
    pub name: String,
    pub size: u64,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Objective {
    /// Cross-entropy on the true option letter.
    Supervised,
    /// Teacher -> student distillation, with the frozen teacher and (for replay rows) the
    /// frozen pre-distillation student as anchors.
    Distill {
        teacher: String,
        alpha: f64,
        temperature: f64,
        /// Cross-entropy target is the teacher's argmax instead of the label.
        label_free: bool,
        /// KL over the whole vocabulary at the answer position instead of the ten letters.
        full_vocab: bool,
        /// Weight of the KL between teacher and student captions (the next-token
        /// distribution right after each one's modality tokens).
        caption_weight: f64,
        /// The replay rows are trained to their own labels (cross-entropy on the true letter
        /// and, with captions, the class name) instead of the frozen pretrained student's
        /// answers (`distill.replay_target`); no frozen student is run for them.
        replay_labels: bool,
        /// Rows the student runs forward and backward at once (`distill.micro_batch`); the
        /// step's gradients are their sum. 0 = all of the rank's rows of a step at once.
        micro_batch: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalTask {
    pub modality: Modality,
    pub model: String,
    pub plan: ShardPlan,
    pub seed: u64,
}

/// Which clips a rank consumes: a global permutation of `clips` per epoch from (seed, epoch);
/// global sample g >= cursor lands on rank (g - cursor) % world_size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub clips: Vec<u32>,
    pub seed: u64,
    /// Global samples already consumed (the resume point).
    pub cursor: u64,
    /// `false` for evaluation: one pass in the listed order, no permutation.
    pub shuffle: bool,
    /// The last epoch's permutation, so a draw costs O(1) instead of a Fisher-Yates over the
    /// whole list. Never on the wire (`serde(skip)` keeps the encoding of the four fields
    /// above), and ignored by `==`.
    #[serde(skip)]
    order: EpochOrder,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub task: u64,
    pub rank: u32,
    pub step: u64,
    pub loss: f64,
    pub kl: f64,
    pub ce: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    /// Student tokens (prompt with its modality tokens) per second over all ranks.
    pub tokens_per_s: f64,
    /// Phases of the step, in ms (the device is synchronised at their boundaries on a GPU, so
    /// they are device time, not launch time): frozen forwards (with their batches), the
    /// student's forward and backward, the distillation loss, the all-reduce and the update.
    pub ms_teacher: f64,
    pub ms_student: f64,
    pub ms_loss: f64,
    pub ms_allreduce: f64,
    pub ms_optimizer: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskResult {
    Data(DataSummary),
    Trained(TrainSummary),
    Evaluated(Vec<ClipOutcome>),
    /// The teacher cache shards this rank is responsible for.
    Cached(Vec<CachedShard>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    pub dir: String,
    pub classes: Vec<String>,
    /// Clip ids and class indices of every split.
    pub splits: Vec<SplitClips>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitClips {
    /// `pretrain_audio`, `pretrain_visual`, `probe`, `distill`, `eval`.
    pub name: String,
    pub clips: Vec<u32>,
    pub labels: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    /// Steps taken by the end of the task (counted from the first, resumed or not).
    pub steps: u64,
    /// The task was stopped (`CoordinatorMsg::Stop` or SIGTERM) before its last step.
    pub stopped: bool,
    pub final_loss: f64,
    pub wall_seconds: f64,
    /// Parameter digest (`xkd_checkpoint::digest_tensors`) of every tensor of the trained
    /// model: comparable with `xkd checkpoint digest` of its checkpoints.
    pub digest: String,
    /// Every rank found the model already at `save` (`TrainTask::keep_saved`); no step taken.
    pub reused: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipOutcome {
    pub clip: u32,
    pub label: u32,
    pub predicted: u32,
    /// Probability of the true option (softmax over the ten letters).
    pub p_true: f64,
    /// Entropy over the ten letters, in nats.
    pub entropy: f64,
}

impl ShardPlan {
    /// A plan shuffled per epoch from (seed, epoch), from its first sample.
    pub fn shuffled(clips: Vec<u32>, seed: u64) -> ShardPlan {
        ShardPlan {
            clips,
            seed,
            cursor: 0,
            shuffle: true,
            order: EpochOrder::default(),
        }
    }

    /// A plan that goes through `clips` in the listed order (evaluation).
    pub fn in_order(clips: Vec<u32>, seed: u64) -> ShardPlan {
        ShardPlan {
            shuffle: false,
            ..ShardPlan::shuffled(clips, seed)
        }
    }

    pub fn len(&self) -> usize {
        self.clips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The clip at global sample index `g` (epoch = g / len, shuffled per epoch). O(1) while
    /// `g` stays in the epoch of the previous draw; the first draw of an epoch builds its
    /// permutation (O(len)), which replaces the previous epoch's.
    pub fn clip_at(&self, g: u64) -> u32 {
        let n = self.clips.len() as u64;
        let (epoch, pos) = (g / n, (g % n) as usize);
        if !self.shuffle {
            return self.clips[pos];
        }
        let cached = self.order.get(self.clips.len(), self.seed, epoch);
        self.clips[cached.order[pos] as usize]
    }

    /// The `batch` clips rank `rank` of `world` takes at training step `step`.
    pub fn batch(&self, rank: u32, world: u32, step: u64, batch: usize) -> Vec<u32> {
        self.samples(rank, world, step, batch)
            .into_iter()
            .map(|s| s.clip)
            .collect()
    }

    /// Like `batch`, with the epoch each clip is drawn in (a clip's question changes per epoch).
    pub fn samples(&self, rank: u32, world: u32, step: u64, batch: usize) -> Vec<Sample> {
        let per_step = world as u64 * batch as u64;
        let base = self.cursor + step * per_step;
        let n = self.clips.len().max(1) as u64;
        (0..batch as u64)
            .map(|k| {
                let g = base + rank as u64 + k * world as u64;
                Sample {
                    clip: self.clip_at(g),
                    epoch: g / n,
                }
            })
            .collect()
    }

    /// The global sample indices `samples` draws, in the same order (the teacher cache's
    /// row keys).
    pub fn globals(&self, rank: u32, world: u32, step: u64, batch: usize) -> Vec<u64> {
        let base = self.cursor + step * world as u64 * batch as u64;
        (0..batch as u64)
            .map(|k| base + rank as u64 + k * world as u64)
            .collect()
    }

    /// One pass over the list, strided by rank (evaluation).
    pub fn pass(&self, rank: u32, world: u32) -> Vec<u32> {
        self.clips
            .iter()
            .skip(rank as usize)
            .step_by(world as usize)
            .copied()
            .collect()
    }
}

/// One draw of a clip: which clip, in which epoch of its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub clip: u32,
    pub epoch: u64,
}

/// Fisher-Yates over 0..n driven by splitmix64 of (seed, epoch): a pure function, so every
/// rank and every resumed run computes the same order without talking. Indices are `u32`
/// (a plan's clips are `u32` ids, so a list longer than that is not a plan); the draws are
/// those of the `usize` version it replaced, so the order is the same (a test keeps that one).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(
        u32::try_from(n).is_ok(),
        "a plan of {n} clips is longer than u32 indices"
    );
    let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// One plan's permutation of one epoch, kept between draws: memory is one `u32` per clip
/// however many epochs the plan goes through. Keyed by (len, seed, epoch), so a plan whose
/// public fields change (a new cursor, seed or list) never reads a stale order; the clips
/// themselves are looked up at draw time. Clones share the cached order (it is immutable);
/// two caches always compare equal, as the cache is not part of what a plan says.
#[derive(Default)]
struct EpochOrder {
    last: Mutex<Option<Arc<CachedOrder>>>,
    /// Permutations built by this plan (tests count them; a relaxed counter costs nothing).
    builds: AtomicU64,
}

struct CachedOrder {
    key: (usize, u64, u64),
    order: Vec<u32>,
}

impl EpochOrder {
    fn get(&self, n: usize, seed: u64, epoch: u64) -> Arc<CachedOrder> {
        let key = (n, seed, epoch);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some(cached) if cached.key == key => cached.clone(),
            _ => {
                self.builds.fetch_add(1, Ordering::Relaxed);
                let cached = Arc::new(CachedOrder {
                    key,
                    order: permutation(n, seed, epoch),
                });
                *last = Some(cached.clone());
                cached
            }
        }
    }
}

impl Clone for EpochOrder {
    fn clone(&self) -> Self {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        EpochOrder {
            last: Mutex::new(last),
            builds: AtomicU64::new(0),
        }
    }
}

impl PartialEq for EpochOrder {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for EpochOrder {}

impl std::fmt::Debug for EpochOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some(c) => write!(f, "EpochOrder(epoch {})", c.key.2),
            None => f.write_str("EpochOrder(empty)"),
        }
    }
}

pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ShardPlan {
        ShardPlan::shuffled((100..137).collect(), 5)
    }

    /// The permutation as it was before it was cached (`usize` indices, rebuilt per draw):
    /// the reference the cached path must repeat exactly, since the default job's numbers
    /// and the recovery tests' digests depend on this order.
    fn reference_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut state = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }

    fn reference_clip_at(p: &ShardPlan, g: u64) -> u32 {
        let n = p.clips.len() as u64;
        let (epoch, pos) = (g / n, (g % n) as usize);
        if !p.shuffle {
            return p.clips[pos];
        }
        p.clips[reference_permutation(n as usize, p.seed, epoch)[pos]]
    }

    fn builds(p: &ShardPlan) -> u64 {
        p.order.builds.load(Ordering::Relaxed)
    }

    #[test]
    fn cached_order_repeats_the_reference_order() {
        for n in [1usize, 2, 3, 7, 37, 256, 1000] {
            for seed in [0u64, 5, 0xDEAD_BEEF, u64::MAX] {
                let clips: Vec<u32> = (0..n as u32).map(|i| 7 * i + 3).collect();
                let p = ShardPlan::shuffled(clips, seed);
                // Four epochs, then back to the first: a revisited epoch is rebuilt right.
                let draws = (0..4 * n as u64).chain(0..n as u64);
                for g in draws {
                    assert_eq!(
                        p.clip_at(g),
                        reference_clip_at(&p, g),
                        "n {n} seed {seed} g {g}"
                    );
                }
            }
        }
    }

    #[test]
    fn samples_repeat_the_reference_order_for_every_rank() {
        let mut p = ShardPlan::shuffled((0..53).map(|i| i * 11).collect(), 17);
        p.cursor = 40;
        for world in [1u32, 2, 3] {
            for rank in 0..world {
                for step in 0..20 {
                    let got: Vec<u32> = p.batch(rank, world, step, 4);
                    let base = p.cursor + step * world as u64 * 4;
                    let want: Vec<u32> = (0..4)
                        .map(|k| reference_clip_at(&p, base + rank as u64 + k * world as u64))
                        .collect();
                    assert_eq!(got, want, "world {world} rank {rank} step {step}");
                }
            }
        }
        let in_order = ShardPlan::in_order(vec![4, 2, 9], 1);
        let got: Vec<u32> = (0..6).map(|g| in_order.clip_at(g)).collect();
        assert_eq!(got, [4, 2, 9, 4, 2, 9]);
    }

    #[test]
    fn a_permutation_is_built_once_per_epoch_not_per_draw() {
        // 10^5 draws from 2*10^5 clips: one epoch, one permutation (the old code built one
        // per draw: 10^5 Fisher-Yates over 2*10^5 entries).
        let p = ShardPlan::shuffled((0..200_000).collect(), 3);
        let mut drawn = 0;
        for step in 0..(100_000 / 64) {
            drawn += p.samples(0, 1, step, 64).len();
        }
        assert_eq!((drawn, builds(&p)), (100_000 - 100_000 % 64, 1));
        // Across three epochs: three builds, and one epoch held at a time.
        let q = ShardPlan::shuffled((0..1000).collect(), 3);
        for step in 0..(3000 / 50) {
            q.samples(0, 1, step, 50);
        }
        assert_eq!(builds(&q), 3);
        assert_eq!(format!("{:?}", q.order), "EpochOrder(epoch 2)");
    }

    #[test]
    fn the_cache_is_not_on_the_wire_and_not_compared() {
        #[derive(Serialize)]
        struct FourFields {
            clips: Vec<u32>,
            seed: u64,
            cursor: u64,
            shuffle: bool,
        }
        let mut p = plan();
        p.cursor = 9;
        let fresh = p.clone();
        p.clip_at(100); // fills the cache
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&p, config).unwrap();
        let four = FourFields {
            clips: p.clips.clone(),
            seed: p.seed,
            cursor: p.cursor,
            shuffle: p.shuffle,
        };
        assert_eq!(bytes, bincode::serde::encode_to_vec(&four, config).unwrap());
        let (back, _): (ShardPlan, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, p);
        assert_eq!(fresh, p);
        assert_eq!(back.clip_at(100), p.clip_at(100));
    }

    #[test]
    fn debug_of_a_join_hides_the_token() {
        let join = Join {
            protocol_version: PROTOCOL_VERSION,
            token: "s3cret-t0ken".into(),
            collective_addr: "10.0.0.2:4000".into(),
            hostname: "node-7".into(),
            pid: 42,
        };
        for text in [
            format!("{join:?}"),
            format!("{join:#?}"),
            format!("{:?}", WorkerMsg::Join(join.clone())),
        ] {
            assert!(!text.contains("s3cret"), "{text}");
            assert!(
                text.contains("<redacted>") && text.contains("node-7"),
                "{text}"
            );
        }
    }

    #[test]
    fn permutation_is_a_permutation_and_changes_per_epoch() {
        let a = permutation(50, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_ne!(a, permutation(50, 1, 1));
        assert_eq!(a, permutation(50, 1, 0));
    }

    #[test]
    fn ranks_split_a_step_without_overlap() {
        let p = plan();
        for step in 0..3 {
            let mut all: Vec<u32> = (0..2).flat_map(|r| p.batch(r, 2, step, 4)).collect();
            let single = p.batch(0, 1, step, 8);
            all.sort();
            let mut single_sorted = single.clone();
            single_sorted.sort();
            assert_eq!(
                all, single_sorted,
                "2 ranks x 4 == 1 rank x 8 at step {step}"
            );
        }
    }

    #[test]
    fn cursor_reshards_what_remains() {
        let p = plan();
        // 3 steps on 2 workers of 4 consume 24 global samples; 1 worker resuming there
        // takes exactly the samples the 2-worker run would have taken next.
        let resumed = ShardPlan {
            cursor: 24,
            ..p.clone()
        };
        let mut next2: Vec<u32> = (0..2).flat_map(|r| p.batch(r, 2, 3, 4)).collect();
        let mut next1 = resumed.batch(0, 1, 0, 8);
        next2.sort();
        next1.sort();
        assert_eq!(next1, next2);
    }
}
