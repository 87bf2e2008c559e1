//! The parameter digest: one sha256 over a set of tensors that depends only on their names,
//! dtypes, shapes and raw bytes, not on the order they were written in or the file's metadata.
//! Two runs that end with the same parameters get the same digest, whatever wrote the file.

use crate::manifest::hex;
use crate::store::Store;
use crate::{Error, Result, STUDENT};
use sha2::{Digest as _, Sha256};

/// Domain tag hashed first, so the digest cannot collide with a sha256 of some other format,
/// and so a future change of the canonical form shows up as a new tag.
const DIGEST_TAG: &[u8] = b"xkd-param-digest-v1\0";

/// One tensor as the digest sees it.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Parameter name.
    pub name: &'a str,
    /// dtype as safetensors spells it (`F32`, `BF16`, ...).
    pub dtype: &'a str,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Raw little-endian bytes, row-major.
    pub data: &'a [u8],
}

/// A parameter digest and what went into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDigest {
    /// sha256, lowercase hex.
    pub sha256: String,
    /// Tensors hashed.
    pub tensors: usize,
    /// Bytes of tensor data hashed.
    pub bytes: u64,
}

/// The canonical digest of `tensors`: sorted by name; for each, the name, dtype, shape and
/// bytes, every field length-prefixed (u64 little-endian) so no two different sets can hash
/// the same stream.
pub fn digest_tensors<'a>(tensors: impl IntoIterator<Item = TensorRef<'a>>) -> ParamDigest {
    let mut tensors: Vec<TensorRef<'a>> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.name.cmp(b.name));
    let mut h = Sha256::new();
    h.update(DIGEST_TAG);
    h.update((tensors.len() as u64).to_le_bytes());
    let mut bytes = 0u64;
    for t in &tensors {
        for field in [t.name.as_bytes(), t.dtype.as_bytes()] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field);
        }
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update((t.data.len() as u64).to_le_bytes());
        h.update(t.data);
        bytes += t.data.len() as u64;
    }
    ParamDigest {
        sha256: hex(&h.finalize()),
        tensors: tensors.len(),
        bytes,
    }
}

/// The digest of the tensors in a safetensors file; `what` names it in errors.
pub fn digest_safetensors(file: &[u8], what: &str) -> Result<ParamDigest> {
    let st = safetensors::SafeTensors::deserialize(file).map_err(|e| Error::BadSafetensors {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    let views: Vec<(String, String, safetensors::tensor::TensorView<'_>)> = st
        .iter()
        .map(|(name, view)| (name.to_string(), view.dtype().to_string(), view))
        .collect();
    Ok(digest_tensors(views.iter().map(|(name, dtype, view)| {
        TensorRef {
            name,
            dtype,
            shape: view.shape(),
            data: view.data(),
        }
    })))
}

impl Store {
    /// The parameter digest of `student.safetensors` in `run_id`/`step`, read through the
    /// manifest (a corrupt file is an error, not a digest).
    pub async fn digest(&self, run_id: &str, step: u64) -> Result<ParamDigest> {
        let manifest = self.manifest(run_id, step).await?;
        let bytes = self.read_verified(&manifest, STUDENT).await?;
        let what = format!("{}/{STUDENT}", self.checkpoint_url(run_id, step));
        digest_safetensors(&bytes, &what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(name: &'a str, data: &'a [u8]) -> TensorRef<'a> {
        TensorRef {
            name,
            dtype: "F32",
            shape: &[1],
            data,
        }
    }

    #[test]
    fn order_does_not_matter_contents_do() {
        let a = digest_tensors([t("a", &[1, 0, 0, 0]), t("b", &[2, 0, 0, 0])]);
        let b = digest_tensors([t("b", &[2, 0, 0, 0]), t("a", &[1, 0, 0, 0])]);
        assert_eq!(a, b);
        assert_eq!((a.tensors, a.bytes), (2, 8));
        let c = digest_tensors([t("a", &[1, 0, 0, 0]), t("b", &[3, 0, 0, 0])]);
        assert_ne!(a.sha256, c.sha256);
        let renamed = digest_tensors([t("ab", &[1, 0, 0, 0]), t("c", &[2, 0, 0, 0])]);
        assert_ne!(a.sha256, renamed.sha256);
        let mut other = t("a", &[1, 0, 0, 0]);
        other.dtype = "I32";
        assert_ne!(
            digest_tensors([other]).sha256,
            digest_tensors([t("a", &[1, 0, 0, 0])]).sha256
        );
    }

    #[test]
    fn refuses_what_is_not_safetensors() {
        let e = digest_safetensors(b"not a file", "x.safetensors").unwrap_err();
        assert!(e.to_string().contains("x.safetensors"), "{e}");
    }
}
