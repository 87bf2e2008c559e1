//! `MANIFEST.json`: the record that makes a checkpoint exist. It lists every object of the
//! checkpoint with its size and sha256, carries a format version, and is checked against the
//! directory it was found in, so a manifest copied into the wrong place is not trusted.

use crate::error::BadManifest;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Version of the manifest format this crate writes and reads. A reader refuses other versions
/// rather than guess what their fields mean.
pub const FORMAT_VERSION: u32 = 1;

/// Longest run id or object name accepted (one path segment in every backend).
const MAX_NAME_LEN: usize = 128;

/// One object of a checkpoint as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// File name inside the checkpoint directory, e.g. `student.safetensors`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
}

impl ObjectEntry {
    /// The entry for `bytes` stored under `name`: size and sha256 computed here.
    pub fn of(name: &str, bytes: &[u8]) -> ObjectEntry {
        ObjectEntry {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }
}

/// The contents of `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] for manifests this crate accepts.
    pub format_version: u32,
    /// The run the checkpoint belongs to (must match its directory).
    pub run_id: String,
    /// The training step (must match its directory).
    pub step: u64,
    /// When the commit was made, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Every object of the checkpoint, sorted by name.
    pub objects: Vec<ObjectEntry>,
}

impl Manifest {
    /// A manifest for `objects` of `run_id` at `step`, stamped now. Checks the names and that no
    /// object appears twice; sorts the objects by name so equal contents give equal manifests.
    pub fn new(run_id: &str, step: u64, objects: &[ObjectEntry]) -> Result<Manifest> {
        check_run_id(run_id)?;
        check_step(step)?;
        let mut objects = objects.to_vec();
        objects.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in objects.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(Error::BadObjectName {
                    name: pair[0].name.clone(),
                    reason: "listed twice".into(),
                });
            }
        }
        for o in &objects {
            check_object_name(&o.name)?;
            if !is_sha256_hex(&o.sha256) {
                return Err(Error::BadObjectName {
                    name: o.name.clone(),
                    reason: format!("sha256 {:?} is not 64 lowercase hex digits", o.sha256),
                });
            }
        }
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Manifest {
            format_version: FORMAT_VERSION,
            run_id: run_id.to_string(),
            step,
            created_unix_ms,
            objects,
        })
    }

    /// Total bytes of the listed objects (the manifest itself not counted).
    pub fn total_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    /// When the checkpoint was committed.
    pub fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_unix_ms)
    }

    /// Time since the commit (zero if the clock says it is in the future).
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.created())
            .unwrap_or_default()
    }

    /// The entry for `name`, if the manifest lists it.
    pub fn object(&self, name: &str) -> Option<&ObjectEntry> {
        self.objects.iter().find(|o| o.name == name)
    }

    /// The manifest as written to the store: pretty JSON with a trailing newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_string_pretty(self).expect("a manifest always serializes");
        text.push('\n');
        text.into_bytes()
    }

    /// Parses a manifest read from `path` and checks it describes `run_id` at `step`.
    pub fn parse(
        bytes: &[u8],
        path: &str,
        run_id: &str,
        step: u64,
    ) -> Result<Manifest, BadManifest> {
        let bad = |reason: String| BadManifest {
            path: path.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} (this build reads {FORMAT_VERSION})",
                m.format_version
            )));
        }
        if m.run_id != run_id || m.step != step {
            return Err(bad(format!(
                "describes run {} step {}, found under run {run_id} step {step}",
                m.run_id, m.step
            )));
        }
        let again = Manifest::new(&m.run_id, m.step, &m.objects).map_err(|e| bad(e.to_string()))?;
        if again.objects != m.objects {
            return Err(bad("objects are not sorted by name".into()));
        }
        Ok(m)
    }
}

/// Checks that a run id is one safe path segment: 1 to 128 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot.
pub fn check_run_id(run_id: &str) -> Result<()> {
    check_segment(run_id).map_err(|reason| Error::BadRunId {
        run_id: run_id.to_string(),
        reason,
    })
}

/// Checks that an object name is one safe path segment and not the reserved `MANIFEST.json`.
pub fn check_object_name(name: &str) -> Result<()> {
    let reason = if name == crate::MANIFEST {
        Err("MANIFEST.json is written by commit, not as an object".to_string())
    } else {
        check_segment(name)
    };
    reason.map_err(|reason| Error::BadObjectName {
        name: name.to_string(),
        reason,
    })
}

/// Checks that a step fits the 10-digit directory name.
pub fn check_step(step: u64) -> Result<()> {
    if step > 9_999_999_999 {
        return Err(Error::BadStep { step });
    }
    Ok(())
}

fn check_segment(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if s.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("character {c:?} not allowed (A-Z a-z 0-9 . _ -)"));
    }
    Ok(())
}

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_is_checked_against_its_place() {
        let objects = [
            ObjectEntry::of("b.bin", b"bb"),
            ObjectEntry::of("a.bin", b"a"),
        ];
        let m = Manifest::new("run-1", 400, &objects).unwrap();
        assert_eq!(m.objects[0].name, "a.bin");
        assert_eq!(m.total_size(), 3);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::parse(&bytes, "p", "run-1", 400).unwrap(), m);
        let e = Manifest::parse(&bytes, "p", "run-1", 500).unwrap_err();
        assert!(e.reason.contains("step 400"), "{e}");
        let future = String::from_utf8(bytes)
            .unwrap()
            .replace("\"format_version\": 1", "\"format_version\": 9");
        let e = Manifest::parse(future.as_bytes(), "p", "run-1", 400).unwrap_err();
        assert!(e.reason.contains("format_version 9"), "{e}");
        assert!(Manifest::parse(b"{", "p", "run-1", 400).is_err());
    }

    #[test]
    fn names_are_single_safe_segments() {
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "MANIFEST.json",
            &"x".repeat(129),
        ] {
            assert!(check_object_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_run_id("run-1700000000-42").is_ok());
        assert!(check_run_id("../up").is_err());
        assert!(check_step(10_000_000_000).is_err());
        let dup = [ObjectEntry::of("a", b""), ObjectEntry::of("a", b"x")];
        assert!(Manifest::new("r", 1, &dup).is_err());
    }
}
