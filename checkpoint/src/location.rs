//! Store URLs: which backend, which bucket, which prefix. Parsing is kept apart from opening so
//! that a bad URL is reported before any client is built, and so that a URL naming a run or one
//! checkpoint (`xkd checkpoint ls|verify|digest URL`) can be split into store, run and step.

use crate::{Error, Result};

/// The backends a URL can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Local,
    S3,
    Gcs,
    Azure,
}

/// A parsed store URL: the backend, its root (`s3://bucket`; empty for local) and the path
/// segments below it, percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Location {
    pub scheme: Scheme,
    pub base: String,
    pub segments: Vec<String>,
}

impl Location {
    /// Parses `file:///abs/path`, a plain local path, `s3://bucket/prefix`, `gs://...` or
    /// `az://...`. Credentials never come from the URL: user info other than an Azure container
    /// name, and query strings, are refused.
    pub fn parse(url: &str) -> Result<Location> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(bad(url, "empty"));
        }
        if !trimmed.contains("://") {
            return local(url, std::path::Path::new(trimmed));
        }
        let parsed = url::Url::parse(trimmed).map_err(|e| bad(url, &e.to_string()))?;
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad(
                url,
                "query strings and fragments are not supported; settings come from the environment",
            ));
        }
        if parsed.password().is_some() {
            return Err(bad(
                url,
                "credentials in the URL are refused; use the environment",
            ));
        }
        let scheme = match parsed.scheme() {
            "file" => return file_url(url, &parsed),
            "s3" | "s3a" => Scheme::S3,
            "gs" => Scheme::Gcs,
            "az" | "azure" | "abfs" | "abfss" => Scheme::Azure,
            other => {
                return Err(bad(
                    url,
                    &format!("unsupported scheme {other:?} (file, s3, gs, az)"),
                ))
            }
        };
        if scheme != Scheme::Azure && !parsed.username().is_empty() {
            return Err(bad(
                url,
                "credentials in the URL are refused; use the environment",
            ));
        }
        let host = parsed.host_str().unwrap_or("");
        if host.is_empty() {
            return Err(bad(url, "no bucket or container"));
        }
        let authority = &parsed[url::Position::BeforeUsername..url::Position::AfterPort];
        Ok(Location {
            scheme,
            base: format!("{}://{authority}", parsed.scheme()),
            segments: segments(url, &parsed)?,
        })
    }

    /// The location one segment deeper.
    pub fn child(&self, segment: &str) -> Location {
        let mut out = self.clone();
        out.segments.push(segment.to_string());
        out
    }

    /// The URL as a person would write it (no credentials: none are ever parsed in).
    pub fn display(&self) -> String {
        let path = self.segments.join("/");
        match self.scheme {
            Scheme::Local => format!("/{path}"),
            _ if path.is_empty() => self.base.clone(),
            _ => format!("{}/{path}", self.base),
        }
    }
}

fn bad(url: &str, reason: &str) -> Error {
    Error::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

fn file_url(url: &str, parsed: &url::Url) -> Result<Location> {
    match parsed.host_str() {
        None | Some("") | Some("localhost") => {}
        Some(host) => {
            return Err(bad(
                url,
                &format!("file URLs name a local path; host {host:?} given"),
            ))
        }
    }
    let path = parsed
        .to_file_path()
        .map_err(|()| bad(url, "not an absolute local path"))?;
    local(url, &path)
}

/// A local path, made absolute against the current directory (without touching the disk, so a
/// store that does not exist yet can be named).
fn local(url: &str, path: &std::path::Path) -> Result<Location> {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        let cwd = std::env::current_dir()
            .map_err(|e| bad(url, &format!("relative path and no current directory: {e}")))?;
        cwd.join(path)
    };
    let mut segments = Vec::new();
    for part in absolute.components() {
        match part {
            Component::Normal(s) => {
                let s = s
                    .to_str()
                    .ok_or_else(|| bad(url, "path is not valid UTF-8"))?;
                segments.push(s.to_string());
            }
            Component::ParentDir => {
                segments.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(Location {
        scheme: Scheme::Local,
        base: String::new(),
        segments,
    })
}

fn segments(url: &str, parsed: &url::Url) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for raw in parsed.path_segments().into_iter().flatten() {
        if raw.is_empty() {
            continue;
        }
        let decoded = percent_decode(raw).ok_or_else(|| bad(url, "bad percent-encoding"))?;
        if decoded == "." || decoded == ".." {
            return Err(bad(url, "path segments '.' and '..' are not allowed"));
        }
        out.push(decoded);
    }
    Ok(out)
}

/// `%XX` escapes decoded; None when an escape is cut short or the result is not UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits a URL naming a run (`<store>/<run_id>`) or one checkpoint
/// (`<store>/<run_id>/ckpt/<step, 10 digits>`) into the store's location, the run id and the
/// step.
pub(crate) fn split_target(url: &str) -> Result<(Location, String, Option<u64>)> {
    let mut loc = Location::parse(url)?;
    let mut step = None;
    let n = loc.segments.len();
    if n >= 3 && loc.segments[n - 2] == crate::CKPT_DIR {
        let dir = &loc.segments[n - 1];
        step = Some(parse_step_dir(dir).ok_or_else(|| {
            bad(
                url,
                &format!("{dir:?} after ckpt/ is not a step of 10 digits"),
            )
        })?);
        loc.segments.truncate(n - 2);
    } else if n >= 2 && loc.segments[n - 1] == crate::CKPT_DIR {
        loc.segments.truncate(n - 1);
    }
    let run_id = loc.segments.pop().ok_or_else(|| {
        bad(
            url,
            "names no run: expected <store>/<run_id> or <store>/<run_id>/ckpt/<step>",
        )
    })?;
    crate::manifest::check_run_id(&run_id)?;
    Ok((loc, run_id, step))
}

/// The step of a directory name of exactly 10 decimal digits.
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    if name.len() == 10 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_supported_schemes() {
        let s3 = Location::parse("s3://bucket/a/b%20c").unwrap();
        assert_eq!(s3.scheme, Scheme::S3);
        assert_eq!(s3.base, "s3://bucket");
        assert_eq!(s3.segments, ["a", "b c"]);
        assert_eq!(s3.display(), "s3://bucket/a/b c");
        let file = Location::parse("file:///tmp/x/y/").unwrap();
        assert_eq!((file.scheme, file.segments.len()), (Scheme::Local, 3));
        assert_eq!(file.display(), "/tmp/x/y");
        assert_eq!(
            Location::parse("/tmp/./x/../z").unwrap().display(),
            "/tmp/z"
        );
        let az = Location::parse("abfss://box@acct.dfs.core.windows.net/p").unwrap();
        assert_eq!(az.base, "abfss://box@acct.dfs.core.windows.net");
        assert_eq!(Location::parse("gs://b").unwrap().segments.len(), 0);
    }

    #[test]
    fn refuses_bad_urls_and_names_them() {
        for url in [
            "",
            "ftp://host/x",
            "s3://",
            "s3://key:secret@bucket/x",
            "s3://bucket/x?region=us",
            "file://otherhost/x",
        ] {
            let e = Location::parse(url).unwrap_err();
            assert!(matches!(e, Error::BadUrl { .. }), "{url}: {e}");
            assert!(e.to_string().contains(&format!("{url:?}")), "{e}");
            assert!(!e.to_string().contains("secret") || url.contains("secret"));
        }
    }

    #[test]
    fn splits_runs_and_checkpoints() {
        let (loc, run, step) = split_target("s3://b/p/run-1").unwrap();
        assert_eq!(
            (loc.display().as_str(), run.as_str(), step),
            ("s3://b/p", "run-1", None)
        );
        let (loc, run, step) = split_target("s3://b/run-1/ckpt/0000000400/").unwrap();
        assert_eq!(
            (loc.display().as_str(), run.as_str(), step),
            ("s3://b", "run-1", Some(400))
        );
        let (_, run, step) = split_target("/tmp/s/r/ckpt").unwrap();
        assert_eq!((run.as_str(), step), ("r", None));
        assert!(split_target("s3://b").is_err());
        assert!(split_target("s3://b/r/ckpt/400").is_err());
    }
}
