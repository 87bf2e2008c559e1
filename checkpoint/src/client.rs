//! How a store is reached: where its endpoint and credentials come from (`Env`), back-off and
//! timeouts (`Retry`), and the object_store client for a URL, with the crypto its HTTP client
//! uses.

use crate::location::{Location, Scheme};
use crate::store::StoreOptions;
use crate::{Error, Result};
use object_store::ObjectStore;
use std::sync::Arc;
use std::time::Duration;

/// Where a store's endpoint, region and credentials come from.
#[derive(Clone, Default)]
pub enum Env {
    /// The process environment (`AWS_*`, `GOOGLE_*` and `SERVICE_ACCOUNT`, `AZURE_*` and
    /// `IDENTITY_ENDPOINT`, as object_store reads them). What production uses.
    #[default]
    Process,
    /// The given variables instead of the process environment, so tests running in parallel
    /// can each point at their own server without mutating global state.
    Explicit(Vec<(String, String)>),
}

impl std::fmt::Debug for Env {
    /// Names only: values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Env::Process => f.write_str("Process"),
            Env::Explicit(vars) => f
                .debug_tuple("Explicit")
                .field(&vars.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
                .finish(),
        }
    }
}

impl Env {
    /// The variables whose names start with `prefix`, or equal one of `extra`.
    fn vars(&self, prefix: &str, extra: &[&str]) -> Vec<(String, String)> {
        let wanted = |k: &str| k.starts_with(prefix) || extra.contains(&k);
        match self {
            Env::Process => std::env::vars().filter(|(k, _)| wanted(k)).collect(),
            Env::Explicit(vars) => vars.iter().filter(|(k, _)| wanted(k)).cloned().collect(),
        }
    }
}

/// Back-off and timeouts for HTTP stores (S3, GCS, Azure). A refused connection or a 5xx is
/// retried with exponential back-off and jitter until `max_retries` or `retry_timeout`; the
/// defaults ride out an outage of about a minute. Local stores do not retry: their errors are
/// not transient.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// First back-off.
    pub init_backoff: Duration,
    /// Longest single back-off.
    pub max_backoff: Duration,
    /// Growth factor of the back-off.
    pub base: f64,
    /// Retries of one request at most.
    pub max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub retry_timeout: Duration,
    /// Limit on one whole request (a hung server costs this much per attempt).
    pub request_timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
            max_retries: 60,
            retry_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Retry {
    fn config(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: self.init_backoff,
                max_backoff: self.max_backoff,
                base: self.base,
            },
            max_retries: self.max_retries,
            retry_timeout: self.retry_timeout,
        }
    }

    fn client(&self) -> object_store::ClientOptions {
        object_store::ClientOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
    }
}

/// reqwest is built without a crypto provider of its own (the workspace's Cargo.toml): its
/// clients take the process default, which must exist before the first is built, or building
/// one panics. Ours is ring, as quinn's.
fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error means another part of the process installed one first; that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The object_store client for `loc`. Settings are laid down in this order, later ones
/// winning: our timeouts and retry, then the environment (or the explicit variables), then
/// what the URL itself names (bucket, container).
pub(crate) fn build(loc: &Location, options: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    use object_store::{aws, azure, gcp};
    install_crypto();
    let (retry, client) = (options.retry.config(), options.retry.client());
    let env = &options.env;
    let built: object_store::Result<Arc<dyn ObjectStore>> = match loc.scheme {
        Scheme::Local => Ok(Arc::new(object_store::local::LocalFileSystem::new())),
        Scheme::S3 => {
            let mut b = aws::AmazonS3Builder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env.vars("AWS_", &[]) {
                if let Ok(key) = k.to_ascii_lowercase().parse::<aws::AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(&loc.base).build().map(|s| Arc::new(s) as _)
        }
        Scheme::Gcs => {
            let mut b = gcp::GoogleCloudStorageBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env.vars("GOOGLE_", &["SERVICE_ACCOUNT"]) {
                let k = if k == "SERVICE_ACCOUNT" {
                    "service_account_path".into()
                } else {
                    k.to_ascii_lowercase()
                };
                if let Ok(key) = k.parse::<gcp::GoogleConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(&loc.base).build().map(|s| Arc::new(s) as _)
        }
        Scheme::Azure => {
            let mut b = azure::MicrosoftAzureBuilder::new()
                .with_client_options(client)
                .with_retry(retry);
            for (k, v) in env.vars("AZURE_", &["IDENTITY_ENDPOINT"]) {
                let k = if k == "IDENTITY_ENDPOINT" {
                    "msi_endpoint".into()
                } else {
                    k.to_ascii_lowercase()
                };
                if let Ok(key) = k.parse::<azure::AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            b.with_url(&loc.base).build().map(|s| Arc::new(s) as _)
        }
    };
    built.map_err(|source| Error::Open {
        url: loc.display(),
        source,
    })
}
