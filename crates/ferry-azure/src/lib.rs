//! Ferry's Azure Blob Storage client.
//!
//! **Job.** Move bytes between Ferry and one Azure Blob Storage container: block blobs for
//! journal segments and manifests, page blobs for disk replicas, blob snapshots for recovery
//! points, server-side copy to materialize a point. [`AzureBlobs`] is a blocking facade over
//! Microsoft's official SDK (`azure_storage_blob` 1.x, `azure_core`) with its own tokio runtime,
//! so callers are plain threads. Authentication: Shared Key (a pipeline policy in `auth`, as
//! the SDK has none), SAS, or Entra ID through `azure_identity` (https only). Configuration
//! comes from `azure://ACCOUNT/CONTAINER` plus the environment ([`AzureConfig::from_url`]).
//!
//! **Invariants.**
//! - Every request goes through [`retry::retry`]: transient failures (timeouts, connection
//!   errors, 408, 429, 500, 502, 503, 504, `ServerBusy`) are retried with jittered exponential
//!   backoff within a total time budget (default 10 min) and a cancel token; permanent ones
//!   (bad credentials, 404, bad arguments) fail at once. The SDK's own retry is off.
//! - Operations are idempotent under retry: deleting a missing blob or snapshot succeeds, an
//!   existing page blob of the right size counts as created, pages are rewritten whole.
//! - Every upload body passes the [`Throttle`] before it is sent (retries included), and every
//!   request and body byte is counted in [`Stats`].
//! - `put_pages_many` returns only after every range is acknowledged by the service.
//! - Page-blob offsets and lengths are checked (512-aligned, 4 MiB per Put Page, no overlaps)
//!   before anything is sent.
//!
//! **Must not.** Log or print keys or SAS tokens; panic or `unwrap` on anything the network
//! returns; depend on what Azurite lacks (page-range diff, Upload Pages From URL, Incremental
//! Copy); know Ferry's formats or blob layout (callers choose names); block the tokio runtime
//! of a caller (operations run on this crate's own runtime).

mod auth;
#[cfg(feature = "azurite")]
pub mod azurite;
mod blocks;
mod client;
pub mod config;
pub mod error;
mod pageblob;
pub mod pages;
pub mod retry;
pub mod stats;
pub mod throttle;

pub use client::AzureBlobs;
pub use config::{AzureConfig, ClientTuning, Credential, EntraSource};
pub use error::{AzureError, Result};
pub use retry::{retry, CancelToken, OpName, RetryPolicy};
pub use stats::Stats;
pub use throttle::{RateLimit, Throttle, TokenBucket};
