//! `Store`: a checkpoint store behind one URL. It writes objects, commits a checkpoint by putting
//! its manifest last and create-only, lists and reads committed checkpoints, and prunes old
//! ones. It knows bytes, names and hashes; what the bytes mean is the caller's business (except
//! for the parameter digest, which reads `student.safetensors`' tensor table).

use crate::client::{build, Env, Retry};
use crate::error::BadManifest;
use crate::location::{parse_step_dir, Location, Scheme};
use crate::manifest::{check_object_name, check_run_id, check_step, Manifest, ObjectEntry};
use crate::{Error, Result, CKPT_DIR, MANIFEST, RUN_DIR};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How a store is opened and how it uploads.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Where endpoint, region and credentials come from.
    pub env: Env,
    /// Objects of at least this many bytes go up as multipart uploads.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads (S3 wants at least 5 MiB, except for the last part).
    pub part_size: usize,
    /// Parts in flight at once.
    pub upload_concurrency: usize,
    /// Back-off and timeouts for HTTP stores.
    pub retry: Retry,
    /// Bulk downloads (`download_prefix`) fetch objects in ranges of this many bytes, so a
    /// model shard of any size takes many short requests, each within `retry.request_timeout`.
    pub download_range: u64,
    /// Ranges in flight at once in a bulk download (memory: this many ranges).
    pub download_concurrency: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            env: Env::Process,
            multipart_threshold: 8 << 20,
            part_size: 8 << 20,
            upload_concurrency: 4,
            retry: Retry::default(),
            download_range: 16 << 20,
            download_concurrency: 8,
        }
    }
}

/// One checkpoint store: `<store>/<run_id>/ckpt/<step, 10 digits>/<object>`, and the run-level
/// objects `<store>/<run_id>/run/<object>`. Cheap to clone; clones share the client.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: Location,
    prefix: Path,
    options: StoreOptions,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

/// A committed checkpoint as `list` finds it: its step and its manifest, or why the manifest
/// cannot be trusted.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The training step.
    pub step: u64,
    /// Where the checkpoint lives, as a URL `verify`/`digest` accept.
    pub url: String,
    /// The manifest, or why it was refused.
    pub manifest: Result<Manifest, BadManifest>,
}

/// What `prune` deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Steps of committed checkpoints removed (manifest first, then objects).
    pub removed: Vec<u64>,
    /// Steps of uncommitted leftovers (no manifest, older than the newest commit) removed.
    pub cleaned: Vec<u64>,
}

impl Store {
    /// Opens the store at `url` with credentials and endpoint from the process environment.
    /// `url` is `file:///abs/path`, a plain local path, `s3://bucket[/prefix]`,
    /// `gs://bucket[/prefix]` or `az://container[/prefix]`. Nothing is read or written yet.
    pub fn open(url: &str) -> Result<Store> {
        Store::open_with(url, StoreOptions::default())
    }

    /// Opens the store at `url` with explicit options (variables, multipart and retry
    /// settings).
    pub fn open_with(url: &str, options: StoreOptions) -> Result<Store> {
        Store::at(Location::parse(url)?, options)
    }

    pub(crate) fn at(root: Location, options: StoreOptions) -> Result<Store> {
        let inner = build(&root, &options)?;
        let prefix = Path::from_iter(root.segments.iter().map(String::as_str));
        Ok(Store {
            inner,
            root,
            prefix,
            options,
        })
    }

    /// The store's URL, without credentials.
    pub fn url(&self) -> String {
        self.root.display()
    }

    /// The URL of one checkpoint, as `xkd checkpoint verify` accepts it.
    pub fn checkpoint_url(&self, run_id: &str, step: u64) -> String {
        self.root
            .child(run_id)
            .child(CKPT_DIR)
            .child(&step_dir(step))
            .display()
    }

    /// Uploads one object of the checkpoint `run_id`/`step` (multipart at or above the
    /// threshold) and returns its manifest entry. Overwrites an uncommitted object of the same
    /// name, so a failed save can simply be repeated.
    pub async fn put_object(
        &self,
        run_id: &str,
        step: u64,
        name: &str,
        bytes: Bytes,
    ) -> Result<ObjectEntry> {
        check_run_id(run_id)?;
        check_step(step)?;
        check_object_name(name)?;
        let path = self.object_path(run_id, step, name);
        let entry = hash(name, bytes.clone()).await?;
        if bytes.len() >= self.options.multipart_threshold {
            self.put_multipart(&path, bytes).await?;
        } else {
            self.inner
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| self.err("writing", &path, e))?;
        }
        tracing::debug!(object = %self.show(&path), size = entry.size, "object written");
        Ok(entry)
    }

    /// Uploads the local file `file` as object `name` of `run_id`/`step` and returns its
    /// manifest entry, hashing as it reads: a large file is streamed in parts and never held
    /// whole (at most `part_size × upload_concurrency` bytes in memory).
    pub async fn put_file(
        &self,
        run_id: &str,
        step: u64,
        name: &str,
        file: &std::path::Path,
    ) -> Result<ObjectEntry> {
        use tokio::io::AsyncReadExt;
        let io = |source| Error::Io {
            path: file.display().to_string(),
            source,
        };
        let mut f = tokio::fs::File::open(file).await.map_err(io)?;
        let len = f.metadata().await.map_err(io)?.len();
        if len < self.options.multipart_threshold as u64 {
            let mut bytes = Vec::with_capacity(len as usize);
            f.read_to_end(&mut bytes).await.map_err(io)?;
            return self.put_object(run_id, step, name, bytes.into()).await;
        }
        check_run_id(run_id)?;
        check_step(step)?;
        check_object_name(name)?;
        let path = self.object_path(run_id, step, name);
        let (size, sha256) = self.stream_file(&path, f).await.map_err(|e| match e {
            StreamError::Io(source) => io(source),
            StreamError::Store(e) => e,
        })?;
        Ok(ObjectEntry {
            name: name.to_string(),
            size,
            sha256,
        })
    }

    /// Streams an open file to the object `path` in multipart parts, hashing as it reads;
    /// returns its size and SHA-256 (hex).
    async fn stream_file(
        &self,
        path: &Path,
        mut f: tokio::fs::File,
    ) -> std::result::Result<(u64, String), StreamError> {
        use tokio::io::AsyncReadExt;
        let err = |e| StreamError::Store(self.err("uploading (multipart)", path, e));
        let upload = self.inner.put_multipart(path).await.map_err(err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
        let (mut hasher, mut size) = (Sha256::new(), 0u64);
        loop {
            let mut part = Vec::with_capacity(self.options.part_size.max(1));
            let n = (&mut f)
                .take(self.options.part_size.max(1) as u64)
                .read_to_end(&mut part)
                .await;
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(StreamError::Io(e));
                }
            };
            if n == 0 {
                break;
            }
            hasher.update(&part);
            size += n as u64;
            if let Err(e) = writer
                .wait_for_capacity(self.options.upload_concurrency.max(1))
                .await
            {
                let _ = writer.abort().await;
                return Err(err(e));
            }
            writer.put(Bytes::from(part));
        }
        writer.finish().await.map_err(err)?;
        Ok((size, crate::manifest::hex(&hasher.finalize())))
    }

    /// Uploads every file under the local directory `dir` to the same relative names under the
    /// store's URL (a prepared dataset), the inverse of `download_prefix`; files named in
    /// `last` go after all others, in that order (a dataset's manifest, so that a reader never
    /// finds a manifest whose clips are not there yet). An object already in the store with
    /// the file's size is kept unless it is in `last` (finished clips never change, so an
    /// interrupted upload resumes). Returns (files uploaded, files kept).
    pub async fn upload_prefix(
        &self,
        dir: &std::path::Path,
        last: &[&str],
    ) -> Result<(usize, usize)> {
        self.upload_files(dir, last, true).await
    }

    /// Uploads every file under the local directory `dir` to the same relative names under
    /// the store's URL, each replacing the object of its name (a distilled student, whose
    /// files keep their sizes from one run to the next). Returns the files uploaded.
    pub async fn replace_prefix(&self, dir: &std::path::Path) -> Result<usize> {
        Ok(self.upload_files(dir, &[], false).await?.0)
    }

    /// Every object under the store's URL.
    async fn list_prefix(&self) -> Result<Vec<object_store::ObjectMeta>> {
        self.inner
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| self.err("listing", &self.prefix, e))
    }

    async fn upload_files(
        &self,
        dir: &std::path::Path,
        last: &[&str],
        keep_same_size: bool,
    ) -> Result<(usize, usize)> {
        // What is there matters only to keep it; a replacing upload need not list.
        let metas = if keep_same_size {
            self.list_prefix().await?
        } else {
            Vec::new()
        };
        let there: std::collections::HashMap<String, u64> = metas
            .into_iter()
            .filter_map(|m| {
                let rel: Vec<String> = m
                    .location
                    .prefix_match(&self.prefix)?
                    .map(|p| p.as_ref().to_string())
                    .collect();
                Some((rel.join("/"), m.size))
            })
            .collect();
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let io = |source| Error::Io {
                path: d.display().to_string(),
                source,
            };
            for entry in std::fs::read_dir(&d).map_err(io)? {
                let path = entry.map_err(io)?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(dir) {
                    let rel: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    files.push((rel.join("/"), path));
                }
            }
        }
        files.sort_by_key(|(rel, _)| {
            let rank = last.iter().position(|l| l == rel);
            (rank.is_some(), rank, rel.clone())
        });
        let (mut uploaded, mut kept) = (0, 0);
        for (rel, file) in files {
            let io = |source| Error::Io {
                path: file.display().to_string(),
                source,
            };
            let f = tokio::fs::File::open(&file).await.map_err(io)?;
            let len = f.metadata().await.map_err(io)?.len();
            if keep_same_size && !last.contains(&rel.as_str()) && there.get(&rel) == Some(&len) {
                kept += 1;
                continue;
            }
            let parts = self.prefix.parts().map(|p| p.as_ref().to_string());
            let path = Path::from_iter(parts.chain(rel.split('/').map(str::to_string)));
            self.stream_file(&path, f).await.map_err(|e| match e {
                StreamError::Io(source) => io(source),
                StreamError::Store(e) => e,
            })?;
            uploaded += 1;
        }
        Ok((uploaded, kept))
    }

    async fn put_multipart(&self, path: &Path, bytes: Bytes) -> Result<()> {
        let err = |e| self.err("uploading (multipart)", path, e);
        let upload = self.inner.put_multipart(path).await.map_err(err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.options.part_size);
        let part = self.options.part_size.max(1);
        let mut offset = 0;
        while offset < bytes.len() {
            let end = (offset + part).min(bytes.len());
            if let Err(e) = writer
                .wait_for_capacity(self.options.upload_concurrency.max(1))
                .await
            {
                let _ = writer.abort().await;
                return Err(err(e));
            }
            writer.put(bytes.slice(offset..end));
            offset = end;
        }
        writer.finish().await.map_err(err)?;
        Ok(())
    }

    /// Commits the checkpoint `run_id`/`step`: checks every listed object is in the store with
    /// its size, then writes `MANIFEST.json` with a create-only put. Only when that put
    /// succeeds does the checkpoint exist. A manifest already in place is never overwritten:
    /// if it lists the same objects (a retried commit whose first answer was lost) it is
    /// returned, otherwise the commit fails with [`Error::AlreadyCommitted`].
    pub async fn commit(
        &self,
        run_id: &str,
        step: u64,
        objects: &[ObjectEntry],
    ) -> Result<Manifest> {
        let manifest = Manifest::new(run_id, step, objects)?;
        let dir = self.checkpoint_url(run_id, step);
        for o in &manifest.objects {
            let path = self.object_path(run_id, step, &o.name);
            let found = match self.inner.head(&path).await {
                Ok(meta) => meta.size,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(mismatch(&dir, &o.name, "not in the store".into()))
                }
                Err(e) => return Err(self.err("checking", &path, e)),
            };
            if found != o.size {
                let reason = format!("{found} bytes in the store, {} listed", o.size);
                return Err(mismatch(&dir, &o.name, reason));
            }
        }
        let path = self.object_path(run_id, step, MANIFEST);
        let put = self
            .inner
            .put_opts(&path, manifest.to_bytes().into(), PutMode::Create.into())
            .await;
        match put {
            Ok(_) => {
                tracing::info!(checkpoint = %dir, objects = manifest.objects.len(), "committed");
                Ok(manifest)
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.manifest(run_id, step).await?;
                if existing.objects == manifest.objects {
                    Ok(existing)
                } else {
                    Err(Error::AlreadyCommitted { path: dir })
                }
            }
            Err(e) => Err(self.err("committing", &path, e)),
        }
    }

    /// The manifest of `run_id`/`step`: [`Error::NotCommitted`] when there is none,
    /// [`Error::BadManifest`] when it cannot be trusted.
    pub async fn manifest(&self, run_id: &str, step: u64) -> Result<Manifest> {
        check_run_id(run_id)?;
        check_step(step)?;
        let path = self.object_path(run_id, step, MANIFEST);
        let bytes = match self.get(&path).await {
            Ok(bytes) => bytes,
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {
                return Err(Error::NotCommitted {
                    path: self.checkpoint_url(run_id, step),
                })
            }
            Err(e) => return Err(e),
        };
        Ok(Manifest::parse(&bytes, &self.show(&path), run_id, step)?)
    }

    /// The committed checkpoints of `run_id` (those with a manifest), newest step first.
    /// A manifest that cannot be trusted is listed with the reason, not dropped.
    pub async fn list(&self, run_id: &str) -> Result<Vec<Listed>> {
        let scan = self.scan(run_id).await?;
        let mut out = Vec::new();
        for (&step, dir) in scan.iter().rev() {
            if !dir.committed {
                continue;
            }
            let manifest = match self.manifest(run_id, step).await {
                Ok(m) => Ok(m),
                Err(Error::BadManifest(bad)) => Err(bad),
                Err(Error::NotCommitted { .. }) => continue, // pruned since the scan
                Err(e) => return Err(e),
            };
            out.push(Listed {
                step,
                url: self.checkpoint_url(run_id, step),
                manifest,
            });
        }
        Ok(out)
    }

    /// The bytes of one object, as stored (unchecked; see [`Store::read_verified`]).
    pub async fn get_object(&self, run_id: &str, step: u64, name: &str) -> Result<Bytes> {
        check_run_id(run_id)?;
        check_step(step)?;
        check_object_name(name)?;
        self.get(&self.object_path(run_id, step, name)).await
    }

    /// The bytes of object `name` of the checkpoint `manifest` describes, checked against the
    /// manifest's size and sha256: what a resume should read.
    pub async fn read_verified(&self, manifest: &Manifest, name: &str) -> Result<Bytes> {
        let (run_id, step) = (&manifest.run_id, manifest.step);
        let path = self.object_path(run_id, step, name);
        let entry = manifest.object(name).ok_or_else(|| Error::NotInManifest {
            path: self.checkpoint_url(run_id, step),
            name: name.to_string(),
        })?;
        let bytes = self.get_object(run_id, step, name).await?;
        let found = hash(name, bytes.clone()).await?;
        if let Some(problem) = crate::verify::compare(entry, found.size, &found.sha256) {
            return Err(Error::Corrupt {
                path: self.show(&path),
                problem: problem.to_string(),
            });
        }
        Ok(bytes)
    }

    /// The URL of the run-level object `name` of `run_id`: `<store>/<run_id>/run/<name>`.
    pub fn run_object_url(&self, run_id: &str, name: &str) -> String {
        self.root.child(run_id).child(RUN_DIR).child(name).display()
    }

    /// Puts the run-level object `name` of `run_id`, replacing one of the same name, and
    /// returns its size and sha256. One put request whatever the size (never multipart), so a
    /// reader finds the object whole or not at all. Meaning and integrity of the bytes are the
    /// caller's: no manifest lists run-level objects.
    pub async fn put_run_object(
        &self,
        run_id: &str,
        name: &str,
        bytes: Bytes,
    ) -> Result<ObjectEntry> {
        let path = self.run_object_path(run_id, name)?;
        let entry = hash(name, bytes.clone()).await?;
        self.inner
            .put(&path, PutPayload::from(bytes))
            .await
            .map_err(|e| self.err("writing", &path, e))?;
        tracing::debug!(object = %self.show(&path), size = entry.size, "run object written");
        Ok(entry)
    }

    /// The bytes of the run-level object `name` of `run_id`, or `None` when the store has no
    /// such object. An unreachable store is an error, never `None`.
    pub async fn get_run_object(&self, run_id: &str, name: &str) -> Result<Option<Bytes>> {
        let path = self.run_object_path(run_id, name)?;
        match self.get(&path).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes all but the newest `keep` committed checkpoints of `run_id`, and uncommitted
    /// leftovers older than the newest commit. Each checkpoint loses its manifest first, so
    /// at every moment a manifest in the store still lists only objects that are there.
    /// Uncommitted directories newer than the newest commit are left alone: a save may be
    /// writing them.
    pub async fn prune(&self, run_id: &str, keep: usize) -> Result<Pruned> {
        if keep == 0 {
            return Err(Error::KeepNothing);
        }
        let scan = self.scan(run_id).await?;
        let committed: Vec<u64> = scan
            .iter()
            .rev()
            .filter(|(_, d)| d.committed)
            .map(|(s, _)| *s)
            .collect();
        let Some(&newest) = committed.first() else {
            return Ok(Pruned::default());
        };
        let mut pruned = Pruned::default();
        for (&step, dir) in &scan {
            if dir.committed && !committed[..keep.min(committed.len())].contains(&step) {
                self.delete_dir(run_id, step, dir).await?;
                pruned.removed.push(step);
            } else if !dir.committed && step < newest {
                self.delete_dir(run_id, step, dir).await?;
                pruned.cleaned.push(step);
            }
        }
        if !pruned.removed.is_empty() || !pruned.cleaned.is_empty() {
            tracing::info!(run_id, removed = ?pruned.removed, cleaned = ?pruned.cleaned, "pruned");
        }
        Ok(pruned)
    }

    /// Deletes checkpoint `step` of `run_id`, manifest first: what a resume does with a
    /// checkpoint that failed verification, so the run can commit that step again.
    pub async fn discard(&self, run_id: &str, step: u64) -> Result<()> {
        check_step(step)?;
        let scan = self.scan(run_id).await?;
        match scan.get(&step) {
            Some(dir) => self.delete_dir(run_id, step, dir).await,
            None => Ok(()),
        }
    }

    async fn delete_dir(&self, run_id: &str, step: u64, dir: &StepDir) -> Result<()> {
        if dir.committed {
            self.delete(&self.object_path(run_id, step, MANIFEST))
                .await?;
        }
        for path in &dir.objects {
            self.delete(path).await?;
        }
        if self.root.scheme == Scheme::Local {
            // Object stores have no directories; on a local disk the empty one is left behind.
            let dir = format!("/{}", self.step_path(run_id, step));
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    async fn delete(&self, path: &Path) -> Result<()> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", path, e)),
        }
    }

    /// Every step directory of `run_id` with its objects (manifest apart), oldest first.
    async fn scan(&self, run_id: &str) -> Result<BTreeMap<u64, StepDir>> {
        check_run_id(run_id)?;
        let root = self.prefix.clone().join(run_id).join(CKPT_DIR);
        let metas: Vec<_> = self
            .inner
            .list(Some(&root))
            .try_collect()
            .await
            .map_err(|e| self.err("listing", &root, e))?;
        let mut dirs: BTreeMap<u64, StepDir> = BTreeMap::new();
        for meta in metas {
            let Some(mut parts) = meta.location.prefix_match(&root) else {
                continue;
            };
            let Some(step) = parts.next().and_then(|p| parse_step_dir(p.as_ref())) else {
                continue;
            };
            let rest: Vec<_> = parts.collect();
            let dir = dirs.entry(step).or_default();
            if rest.len() == 1 && rest[0].as_ref() == MANIFEST {
                dir.committed = true;
            } else {
                dir.objects.push(meta.location);
            }
        }
        Ok(dirs)
    }

    /// Copies every object under the store's URL into the local directory `dir`, under the
    /// same relative names (a Hugging Face model directory kept in an object store); returns
    /// the names, sorted. Each object is fetched in ranges of `download_range` bytes,
    /// `download_concurrency` at once, written in place into a file sized first: no single
    /// request carries a whole multi-gigabyte shard, so the per-request timeout bounds a range,
    /// not a file. Nothing under the URL is an error. `dir` may be left partly written on
    /// error; callers download into a temporary directory and rename it (`local_model_dir`).
    pub async fn download_prefix(&self, dir: &std::path::Path) -> Result<Vec<String>> {
        use futures::StreamExt as _;
        use std::os::unix::fs::FileExt as _;
        let metas = self.list_prefix().await?;
        let mut names = Vec::with_capacity(metas.len());
        // (file, object, range) of every range to fetch.
        let mut files = Vec::with_capacity(metas.len());
        let mut ranges = Vec::new();
        let step = self.options.download_range.max(1);
        for meta in metas {
            let Some(parts) = meta.location.prefix_match(&self.prefix) else {
                continue;
            };
            let rel: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            if rel.is_empty() {
                continue;
            }
            let path = rel.iter().fold(dir.to_path_buf(), |p, s| p.join(s));
            let write_err = |source| Error::Write {
                path: path.display().to_string(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(write_err)?;
            }
            let file = std::fs::File::create(&path).map_err(write_err)?;
            file.set_len(meta.size).map_err(write_err)?;
            let index = files.len();
            let mut at = 0;
            while at < meta.size {
                let end = (at + step).min(meta.size);
                ranges.push((index, meta.location.clone(), at..end));
                at = end;
            }
            files.push((file, path));
            names.push(rel.join("/"));
        }
        if names.is_empty() {
            return Err(Error::Corrupt {
                path: self.url(),
                problem: "no objects under this URL".into(),
            });
        }
        let files = &files;
        let mut fetches = futures::stream::iter(ranges)
            .map(|(index, location, range)| async move {
                let bytes = self
                    .inner
                    .get_range(&location, range.clone())
                    .await
                    .map_err(|e| self.err("reading", &location, e))?;
                let (file, path) = &files[index];
                if bytes.len() as u64 != range.end - range.start {
                    return Err(Error::Corrupt {
                        path: location.to_string(),
                        problem: format!(
                            "bytes {}..{} came back as {} bytes",
                            range.start,
                            range.end,
                            bytes.len()
                        ),
                    });
                }
                file.write_all_at(&bytes, range.start)
                    .map_err(|source| Error::Write {
                        path: path.display().to_string(),
                        source,
                    })
            })
            .buffer_unordered(self.options.download_concurrency.max(1));
        while let Some(done) = fetches.next().await {
            done?;
        }
        for (file, path) in files {
            file.sync_all().map_err(|source| Error::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        names.sort();
        Ok(names)
    }

    pub(crate) async fn get(&self, path: &Path) -> Result<Bytes> {
        let err = |e| self.err("reading", path, e);
        self.inner
            .get(path)
            .await
            .map_err(err)?
            .bytes()
            .await
            .map_err(err)
    }

    pub(crate) fn inner(&self) -> &dyn ObjectStore {
        self.inner.as_ref()
    }

    fn step_path(&self, run_id: &str, step: u64) -> Path {
        self.prefix
            .clone()
            .join(run_id)
            .join(CKPT_DIR)
            .join(step_dir(step))
    }

    fn run_object_path(&self, run_id: &str, name: &str) -> Result<Path> {
        check_run_id(run_id)?;
        check_object_name(name)?;
        Ok(self.prefix.clone().join(run_id).join(RUN_DIR).join(name))
    }

    pub(crate) fn object_path(&self, run_id: &str, step: u64, name: &str) -> Path {
        self.step_path(run_id, step).join(name)
    }

    /// A path as a URL for messages.
    pub(crate) fn show(&self, path: &Path) -> String {
        match self.root.scheme {
            Scheme::Local => format!("/{path}"),
            _ => format!("{}/{path}", self.root.base),
        }
    }

    pub(crate) fn err(&self, op: &'static str, path: &Path, source: object_store::Error) -> Error {
        Error::Store {
            op,
            path: self.show(path),
            source,
        }
    }
}

/// One step directory found by a scan.
#[derive(Debug, Default)]
struct StepDir {
    committed: bool,
    objects: Vec<Path>,
}

/// `0000000400` for step 400.
pub(crate) fn step_dir(step: u64) -> String {
    format!("{step:010}")
}

fn mismatch(dir: &str, name: &str, reason: String) -> Error {
    Error::CommitMismatch {
        path: dir.to_string(),
        name: name.to_string(),
        reason,
    }
}

/// Size and sha256 of `bytes`, hashed off the async threads when large.
async fn hash(name: &str, bytes: Bytes) -> Result<ObjectEntry> {
    if bytes.len() < 1 << 20 {
        return Ok(ObjectEntry::of(name, &bytes));
    }
    let (owned, shown) = (name.to_string(), name.to_string());
    tokio::task::spawn_blocking(move || ObjectEntry::of(&owned, &bytes))
        .await
        .map_err(|e| Error::Store {
            op: "hashing",
            path: shown,
            source: object_store::Error::JoinError { source: e },
        })
}

/// Why streaming a file up failed: reading it, or the store.
enum StreamError {
    Io(std::io::Error),
    Store(Error),
}

/// How `local_copy` came by its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// This call downloaded it.
    Downloaded,
    /// A complete copy was there (another process made it, perhaps while this one waited).
    Cached,
}

/// One local copy of everything under the store URL `url`, in the directory `local` (a model
/// directory or a prepared dataset kept in an object store), shared by the processes of a node:
/// the first takes an exclusive lock on `<local>.lock` (the kernel releases it if the process
/// dies), downloads into `<local>.partial` (`download_prefix`: ranged, parallel GETs) and
/// renames it into place; the others wait on the lock and find the copy. A directory is under
/// its final name only complete, so a half-downloaded one is never used; a leftover
/// `.partial` is removed by the next download. Blocking: it runs the download on a thread and
/// runtime of its own, so it works from any caller.
pub fn local_copy(url: &str, local: &std::path::Path) -> Result<Fetched> {
    let io = |what: &'static str, path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| Error::Write {
            path: format!("{what} {path}"),
            source,
        }
    };
    if local.is_dir() {
        return Ok(Fetched::Cached);
    }
    if let Some(parent) = local.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    }
    let lock_path = local.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(io("creating the lock", &lock_path))?;
    lock.lock().map_err(io("locking", &lock_path))?;
    if local.is_dir() {
        return Ok(Fetched::Cached);
    }
    let tmp = local.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("removing the interrupted download", &tmp))?;
    }
    tracing::info!(url, to = %local.display(), "downloading into the node's cache");
    let started = std::time::Instant::now();
    let names = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<String>> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io("starting a runtime for", local))?;
                let store = Store::open(url)?;
                runtime.block_on(store.download_prefix(&tmp))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Corrupt {
                    path: url.to_string(),
                    problem: "the download thread panicked".into(),
                })
            })
    })?;
    std::fs::rename(&tmp, local).map_err(io("renaming into", local))?;
    let bytes: u64 = names
        .iter()
        .filter_map(|n| std::fs::metadata(local.join(n)).ok())
        .map(|m| m.len())
        .sum();
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        url,
        files = names.len(),
        bytes,
        mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / seconds.max(1e-9)),
        "downloaded into the node's cache"
    );
    drop(lock);
    Ok(Fetched::Downloaded)
}
