//! The crate's error type and the transient/permanent split used by [`crate::retry`].

use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_storage_blob::StorageError;

/// Result alias for this crate.
pub type Result<T, E = AzureError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to Azure Blob Storage.
///
/// Each variant names the operation and the blob (or container) it was for, so a message read
/// in a log says what failed without more context. [`AzureError::is_permanent`] tells the retry
/// helper whether another attempt can help.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// The store URL is not `azure://ACCOUNT/CONTAINER`.
    #[error("invalid Azure store URL {url:?}: {reason} (expected azure://ACCOUNT/CONTAINER)")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Credentials or endpoint settings are missing or malformed.
    #[error("Azure configuration: {0}")]
    Config(String),

    /// The account in the store URL differs from the account the credentials are for.
    #[error(
        "Azure account mismatch: the store URL names account {url_account:?} but the credentials \
         ({source_name}) are for account {credential_account:?}; fix the URL or the credentials"
    )]
    AccountMismatch {
        /// Account named by `azure://ACCOUNT/...`.
        url_account: String,
        /// Account named by the credential source.
        credential_account: String,
        /// Where the credentials came from (an environment variable name).
        source_name: &'static str,
    },

    /// The caller passed arguments the service would reject (alignment, size, overlap).
    #[error("{op} {blob}: invalid argument: {reason}")]
    InvalidArgument {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// What is wrong.
        reason: String,
    },

    /// The service refused the credentials (HTTP 401/403).
    #[error(
        "{op} {blob}: Azure refused the request (HTTP {status}{code}): {detail}. Check the storage \
         account key (AZURE_STORAGE_KEY or AccountKey in the connection string), the SAS token \
         (expiry, permissions, allowed IPs), the Entra ID role assignment (Storage Blob Data \
         Contributor), and this machine's clock (requests more than 15 minutes off are refused)"
    )]
    Auth {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// HTTP status.
        status: u16,
        /// `: ErrorCode` or empty.
        code: String,
        /// The service's message, if any.
        detail: String,
    },

    /// The blob, snapshot or container does not exist (HTTP 404).
    #[error("{op} {blob}: not found ({code})")]
    NotFound {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// The service's error code, e.g. `BlobNotFound`.
        code: String,
    },

    /// The service answered with an error status other than 401/403/404.
    #[error("{op} {blob}: HTTP {status}{code}: {detail}")]
    Http {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// HTTP status.
        status: u16,
        /// `: ErrorCode` or empty.
        code: String,
        /// The service's message, if any.
        detail: String,
        /// Whether another attempt can succeed (408, 429, 5xx, `ServerBusy`, ...).
        transient: bool,
    },

    /// The request did not get an HTTP answer: connection refused or reset, timeout, DNS.
    #[error("{op} {blob}: network error: {detail}")]
    Transport {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// The transport's message.
        detail: String,
    },

    /// An Entra ID token could not be obtained.
    #[error(
        "{op} {blob}: could not get an Entra ID token: {detail}. Check `az login` (developer \
         tools) or the VM's managed identity and its role on the storage account"
    )]
    Credential {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// The credential's message.
        detail: String,
    },

    /// The service's answer could not be understood.
    #[error("{op} {blob}: unexpected response: {detail}")]
    Protocol {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// What was unexpected.
        detail: String,
    },

    /// A page blob exists with a different size than the one asked for.
    #[error(
        "create_page_blob {blob}: the blob exists with size {existing} bytes, not {wanted}; \
         delete it or use the existing size"
    )]
    SizeMismatch {
        /// Blob name.
        blob: String,
        /// Size found.
        existing: u64,
        /// Size asked for.
        wanted: u64,
    },

    /// A server-side copy ended in a state other than success.
    #[error("copy {src}@{snapshot} -> {dst}: copy status {status}: {description}")]
    CopyFailed {
        /// Source blob.
        src: String,
        /// Source snapshot.
        snapshot: String,
        /// Destination blob.
        dst: String,
        /// Final copy status.
        status: String,
        /// The service's description.
        description: String,
    },

    /// Transient errors kept happening until the retry budget ran out.
    #[error("{op} {blob}: gave up after {attempts} attempts in {elapsed:?}: {last}")]
    RetriesExhausted {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last error.
        last: Box<AzureError>,
    },

    /// The operation was cancelled through its cancel token.
    #[error("{op} {blob}: cancelled")]
    Cancelled {
        /// Operation name.
        op: &'static str,
        /// Blob or container name.
        blob: String,
    },

    /// The client's internal runtime could not run the operation.
    #[error("Azure client runtime: {0}")]
    Runtime(String),
}

/// Service error codes that mean "try again later" even when the status alone would not.
const TRANSIENT_CODES: &[&str] = &[
    "ServerBusy",
    "OperationTimedOut",
    "InternalError",
    "ContainerBeingDeleted",
];

/// HTTP statuses that are worth retrying.
pub(crate) fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

impl AzureError {
    /// `true` when retrying cannot help: bad input, bad credentials, not found, gave up, cancelled.
    pub fn is_permanent(&self) -> bool {
        match self {
            AzureError::Transport { .. } => false,
            AzureError::Http { transient, .. } => !transient,
            _ => true,
        }
    }

    /// `true` for HTTP 404 (blob, snapshot or container missing).
    pub fn is_not_found(&self) -> bool {
        match self {
            AzureError::NotFound { .. } => true,
            AzureError::RetriesExhausted { last, .. } => last.is_not_found(),
            _ => false,
        }
    }

    /// `true` when the service refused the credentials.
    pub fn is_auth(&self) -> bool {
        matches!(self, AzureError::Auth { .. })
    }

    /// The service's error code (`BlobNotFound`, `ServerBusy`, ...), if the error carries one.
    pub fn service_code(&self) -> Option<&str> {
        let code = match self {
            AzureError::Auth { code, .. } | AzureError::Http { code, .. } => {
                code.trim_start_matches(": ")
            }
            AzureError::NotFound { code, .. } => code.as_str(),
            _ => return None,
        };
        (!code.is_empty()).then_some(code)
    }

    pub(crate) fn invalid(op: &'static str, blob: &str, reason: impl Into<String>) -> Self {
        AzureError::InvalidArgument {
            op,
            blob: blob.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn protocol(op: &'static str, blob: &str, detail: impl Into<String>) -> Self {
        AzureError::Protocol {
            op,
            blob: blob.to_string(),
            detail: detail.into(),
        }
    }

    /// Classify an SDK error for operation `op` on `blob`.
    pub(crate) fn from_sdk(op: &'static str, blob: &str, err: azure_core::Error) -> Self {
        let blob = blob.to_string();
        match err.kind() {
            ErrorKind::HttpResponse { .. } => {}
            ErrorKind::Connection | ErrorKind::Io => {
                return AzureError::Transport {
                    op,
                    blob,
                    detail: error_chain(&err),
                }
            }
            ErrorKind::Credential => {
                return AzureError::Credential {
                    op,
                    blob,
                    detail: error_chain(&err),
                }
            }
            ErrorKind::DataConversion | ErrorKind::Other => {
                return AzureError::Protocol {
                    op,
                    blob,
                    detail: error_chain(&err),
                }
            }
        }
        let status = err.http_status().map(u16::from).unwrap_or(0);
        let fallback_code = match err.kind() {
            ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
            _ => None,
        };
        // StorageError parses the XML error body (Code, Message, AuthenticationErrorDetail).
        let (code, detail) = match StorageError::try_from(err) {
            Ok(se) => {
                let code = se
                    .error_code
                    .as_ref()
                    .map(|c| c.to_string())
                    .or(fallback_code);
                let mut detail = se
                    .message
                    .as_deref()
                    .map(first_line)
                    .unwrap_or_default()
                    .to_string();
                if let Some(auth) = se.authentication_error_detail.as_deref() {
                    detail = format!("{detail} ({})", first_line(auth));
                }
                (code, redact(&detail))
            }
            Err(e) => (fallback_code, error_chain(&e)),
        };
        let code_str = code.clone().unwrap_or_default();
        let code_fmt = if code_str.is_empty() {
            String::new()
        } else {
            format!(": {code_str}")
        };
        match status {
            401 | 403 => AzureError::Auth {
                op,
                blob,
                status,
                code: code_fmt,
                detail,
            },
            404 => AzureError::NotFound {
                op,
                blob,
                code: if code_str.is_empty() {
                    "HTTP 404".to_string()
                } else {
                    code_str
                },
            },
            _ => AzureError::Http {
                op,
                blob,
                status,
                transient: is_transient_status(status)
                    || TRANSIENT_CODES.contains(&code_str.as_str()),
                code: code_fmt,
                detail,
            },
        }
    }
}

/// First line of a service message, without the trailing period (messages are embedded).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim().trim_end_matches('.')
}

/// `s` with the value of every `sig=` parameter (a SAS signature: whoever holds it has the
/// SAS's access) replaced by `REDACTED`. Error texts from the HTTP stack carry the request URL,
/// which carries the SAS; they reach logs on every retry.
pub fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let lower = rest.to_ascii_lowercase();
        // `sig=`, or `sig%3d` where a SAS URL sits percent-encoded inside another one.
        let found = [("sig=", 4), ("sig%3d", 6)]
            .iter()
            .filter_map(|(k, n)| lower.find(k).map(|i| (i, *n)))
            .min();
        let Some((i, n)) = found else {
            out.push_str(rest);
            return out;
        };
        let at = i + n;
        out.push_str(&rest[..at]);
        let mut end = rest[at..]
            .find(|c: char| {
                c == '&' || c == ')' || c == '"' || c == '\'' || c == '>' || c.is_whitespace()
            })
            .map_or(rest.len(), |e| at + e);
        if n == 6 {
            // Encoded: the value ends at an encoded '&' too.
            if let Some(e) = lower[at..end].find("%26") {
                end = at + e;
            }
        }
        if end > at {
            out.push_str("REDACTED");
        }
        rest = &rest[end..];
    }
}

/// The error and its sources on one line, so "connection refused" is not hidden behind
/// "failed to execute request"; SAS signatures redacted.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    redact(&error_chain_raw(err))
}

fn error_chain_raw(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_signatures_are_redacted_wherever_they_appear() {
        let t = "error sending request for url (http://127.0.0.1:1/c/b?sv=2024&SIG=abc%2Fdef&se=1): connection refused; sig=xyz";
        let r = redact(t);
        assert!(!r.contains("abc") && !r.contains("xyz"), "{r}");
        assert!(
            r.contains("SIG=REDACTED&se=1") && r.ends_with("sig=REDACTED"),
            "{r}"
        );
        assert_eq!(redact("no secrets here"), "no secrets here");
        assert_eq!(redact("sig="), "sig=");
        assert_eq!(
            redact("copy source=https%3A%2F%2Fa%2Fb%3Fsv%3D1%26sig%3DSECRET%26se%3D2"),
            "copy source=https%3A%2F%2Fa%2Fb%3Fsv%3D1%26sig%3DREDACTED%26se%3D2"
        );
    }

    #[test]
    fn transient_split() {
        let t = AzureError::Transport {
            op: "put_pages",
            blob: "b".into(),
            detail: "connection refused".into(),
        };
        assert!(!t.is_permanent());
        let busy = AzureError::Http {
            op: "put_pages",
            blob: "b".into(),
            status: 503,
            code: ": ServerBusy".into(),
            detail: String::new(),
            transient: true,
        };
        assert!(!busy.is_permanent());
        assert_eq!(busy.service_code(), Some("ServerBusy"));
        let auth = AzureError::Auth {
            op: "get_blob",
            blob: "b".into(),
            status: 403,
            code: ": AuthenticationFailed".into(),
            detail: "sig".into(),
        };
        assert!(auth.is_permanent());
        assert!(auth.to_string().contains("account key"));
        assert!(auth.to_string().contains("clock"));
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 412, 416] {
            assert!(!is_transient_status(s), "{s}");
        }
    }
}
