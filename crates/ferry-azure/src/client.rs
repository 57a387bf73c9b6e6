//! [`AzureBlobs`]: the blocking facade, its internal runtime and the SDK pipeline it builds.
//! Block-blob operations live in `blocks.rs`, page-blob operations in `pageblob.rs`.

use std::future::Future;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::policies::Policy;
use azure_core::http::{ClientOptions, RetryOptions, Transport, Url};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use azure_storage_blob::{
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions, PageBlobClient,
    PageBlobClientOptions,
};
use rustls_platform_verifier::BuilderVerifierExt;

use crate::auth::{SasPolicy, SharedKeyPolicy};
use crate::config::{AzureConfig, ClientTuning, Credential, EntraSource};
use crate::error::{AzureError, Result};
use crate::retry::{retry, CancelToken, OpName};
use crate::stats::{Counters, CountingPolicy, Stats};
use crate::throttle::Throttle;

/// Blocking client for one container. Cheap to clone; clones share the connection pool, the
/// runtime, the throttle, the counters and the cancel token. Callers are plain threads: every
/// method runs on the client's own multi-thread tokio runtime and waits for the result, so it
/// may also be called (blocking that thread) from inside another runtime.
#[derive(Clone)]
pub struct AzureBlobs {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Does not block, so dropping the last clone is fine anywhere, even inside a runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What the async operations need; cloned (as an `Arc`) into each spawned operation.
pub(crate) struct Shared {
    pub(crate) container: String,
    container_url: Url,
    options: ClientOptions,
    credential: Option<Arc<dyn TokenCredential>>,
    sas: Option<String>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) throttle: Arc<Throttle>,
    pub(crate) tuning: ClientTuning,
    pub(crate) cancel: CancelToken,
}

impl std::fmt::Debug for AzureBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureBlobs")
            .field("container_url", &self.inner.shared.container_url.as_str())
            .finish_non_exhaustive()
    }
}

impl AzureBlobs {
    /// A client for `config`, with its own throttle (from `config.tuning.rate_limit`) and
    /// cancel token.
    pub fn new(config: AzureConfig) -> Result<Self> {
        let throttle = Arc::new(Throttle::new(config.tuning.rate_limit));
        Self::with_parts(config, throttle, CancelToken::new())
    }

    /// A client that shares `throttle` (e.g. one global upload limit for several clients) and
    /// stops when `cancel` fires. `config.tuning.rate_limit` is ignored here.
    pub fn with_parts(
        config: AzureConfig,
        throttle: Arc<Throttle>,
        cancel: CancelToken,
    ) -> Result<Self> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.tuning.runtime_threads)
            .thread_name("ferry-azure")
            .enable_all()
            .build()
            .map_err(|e| AzureError::Runtime(format!("cannot start tokio runtime: {e}")))?;
        // Plain http goes only to this machine (`AzureConfig::validate`): never through a proxy,
        // which would see the SAS or the signed requests in clear.
        let transport = http_transport(&config.tuning, config.endpoint.starts_with("http://"))?;
        let counters = Arc::new(Counters::default());
        let mut per_try: Vec<Arc<dyn Policy>> = vec![Arc::new(CountingPolicy {
            counters: counters.clone(),
        })];
        let mut credential = None;
        let mut sas = None;
        match &config.credential {
            Credential::SharedKey { key } => per_try.push(Arc::new(
                SharedKeyPolicy::new(&config.account, key).map_err(AzureError::Config)?,
            )),
            Credential::Sas { token } => {
                per_try.push(Arc::new(SasPolicy::new(token)));
                sas = Some(crate::auth::normalize_sas(token));
            }
            Credential::Entra(source) => credential = Some(entra_credential(source, &transport)?),
        }
        let options = ClientOptions {
            per_try_policies: per_try,
            // Our `retry` decides; the SDK must not retry underneath it.
            retry: RetryOptions::none(),
            transport: Some(transport),
            ..Default::default()
        };
        let container_url = Url::parse(&format!("{}/{}", config.endpoint, config.container))
            .map_err(|e| AzureError::Config(format!("container URL: {e}")))?;
        let shared = Arc::new(Shared {
            container: config.container,
            container_url,
            options,
            credential,
            sas,
            counters,
            throttle,
            tuning: config.tuning,
            cancel,
        });
        let handle = runtime.handle().clone();
        Ok(AzureBlobs {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                handle,
                shared,
            }),
        })
    }

    /// Traffic counters since the client was created.
    pub fn stats(&self) -> Stats {
        self.inner.shared.counters.snapshot()
    }

    /// The upload throttle (change its rate live with [`Throttle::set_rate`]).
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.inner.shared.throttle
    }

    /// The cancel token every operation of this client watches.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.inner.shared.cancel
    }

    /// The container's URL (no credentials in it).
    pub fn container_url(&self) -> &str {
        self.inner.shared.container_url.as_str()
    }

    /// Run `op` on the client's runtime and wait for it.
    pub(crate) fn run<T, F, Fut>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let fut = op(self.inner.shared.clone());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            // The receiver only goes away if the caller's thread died; nothing to do then.
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            AzureError::Runtime(
                "the operation's task ended without a result (runtime shut down or task panicked)"
                    .to_string(),
            )
        })?
    }
}

impl Shared {
    /// Retry `attempt` under this client's policy, cancel token and counters.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        blob: &str,
        attempt: F,
    ) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        retry(
            OpName { op, blob },
            &self.tuning.retry,
            &self.cancel,
            Some(&self.counters),
            attempt,
        )
        .await
    }

    /// Wait for the throttle to allow `n` upload bytes.
    pub(crate) async fn throttle(&self, op: &'static str, blob: &str, n: u64) -> Result<()> {
        if self.throttle.consume(n, &self.cancel).await {
            Ok(())
        } else {
            Err(AzureError::Cancelled {
                op,
                blob: blob.to_string(),
            })
        }
    }

    /// URL of blob `name`: each `/`-separated part percent-encoded, the `/`s kept (so the
    /// name the service stores is exactly `name`, and Shared Key signs the same path).
    pub(crate) fn blob_url(&self, op: &'static str, name: &str) -> Result<Url> {
        if name.is_empty() || name.len() > 1024 || name.starts_with('/') {
            return Err(AzureError::invalid(
                op,
                name,
                "blob names must be 1-1024 bytes and not start with '/'",
            ));
        }
        let mut s = self.container_url.as_str().to_string();
        s.push('/');
        encode_path(name, &mut s);
        Url::parse(&s).map_err(|e| AzureError::invalid(op, name, format!("bad blob URL: {e}")))
    }

    /// `blob_url` with `?snapshot=` and, for SAS credentials, the SAS token: a URL the service
    /// itself can read from (copy source).
    pub(crate) fn source_url(&self, op: &'static str, name: &str, snapshot: &str) -> Result<Url> {
        let mut url = self.blob_url(op, name)?;
        url.query_pairs_mut().append_pair("snapshot", snapshot);
        if let Some(sas) = &self.sas {
            crate::auth::append_sas(&mut url, sas);
        }
        Ok(url)
    }

    pub(crate) fn container_client(&self) -> Result<BlobContainerClient> {
        BlobContainerClient::new(
            self.container_url.clone(),
            self.credential.clone(),
            Some(BlobContainerClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| AzureError::from_sdk("client", &self.container, e))
    }

    pub(crate) fn blob_client(&self, op: &'static str, name: &str) -> Result<BlobClient> {
        BlobClient::new(
            self.blob_url(op, name)?,
            self.credential.clone(),
            Some(BlobClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| AzureError::from_sdk(op, name, e))
    }

    pub(crate) fn page_client(&self, op: &'static str, name: &str) -> Result<PageBlobClient> {
        PageBlobClient::new(
            self.blob_url(op, name)?,
            self.credential.clone(),
            Some(PageBlobClientOptions {
                client_options: self.options.clone(),
                ..Default::default()
            }),
        )
        .map_err(|e| AzureError::from_sdk(op, name, e))
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters and `/`.
fn encode_path(name: &str, out: &mut String) {
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// reqwest over rustls with the ring provider (no aws-lc C build) and the OS trust store.
fn http_transport(t: &ClientTuning, direct: bool) -> Result<Transport> {
    let tls_err = |e: rustls::Error| AzureError::Config(format!("TLS setup: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_platform_verifier()
        .map_err(tls_err)?
        .with_no_client_auth();
    let mut builder = reqwest::Client::builder();
    if direct {
        builder = builder.no_proxy();
    }
    let client = builder
        .tls_backend_preconfigured(tls)
        .connect_timeout(t.connect_timeout)
        .read_timeout(t.read_timeout)
        .timeout(t.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AzureError::Config(format!("HTTP client setup: {e}")))?;
    Ok(Transport::new(Arc::new(client)))
}

fn entra_credential(
    source: &EntraSource,
    transport: &Transport,
) -> Result<Arc<dyn TokenCredential>> {
    let cred_err = |e: azure_core::Error| AzureError::Config(format!("Entra ID credential: {e}"));
    Ok(match source {
        EntraSource::DeveloperTools => DeveloperToolsCredential::new(None).map_err(cred_err)?,
        EntraSource::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options: ClientOptions {
                    transport: Some(transport.clone()),
                    ..Default::default()
                },
            }))
            .map_err(cred_err)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_names_keep_slashes() {
        let mut s = String::new();
        encode_path("journal/vm 1/disk%/000001.seg", &mut s);
        assert_eq!(s, "journal/vm%201/disk%25/000001.seg");
    }

    #[test]
    fn client_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<AzureBlobs>();
    }
}
