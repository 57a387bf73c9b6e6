//! Request authorization policies for the `azure_core` pipeline.
//!
//! `azure_storage_blob` 1.x only knows Entra ID tokens, so Shared Key and SAS live here:
//! - [`SharedKeyPolicy`] signs every try (fresh `x-ms-date`) per "Authorize with Shared Key"
//!   (Blob service, version 2009-09-19 and later): HMAC-SHA256 over the string-to-sign, keyed
//!   with the base64-decoded account key.
//! - [`SasPolicy`] appends the SAS token to every request's query string.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use azure_core::http::headers::{HeaderName, Headers};
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request, Url};
use azure_core::time::{to_rfc7231, OffsetDateTime};

/// Per-try policy that adds `x-ms-date` and `Authorization: SharedKey account:signature`.
pub(crate) struct SharedKeyPolicy {
    account: String,
    key: ring::hmac::Key,
}

impl fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("SharedKeyPolicy")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl SharedKeyPolicy {
    /// `key_b64` is the account key as the portal shows it (base64).
    pub(crate) fn new(account: &str, key_b64: &str) -> Result<Self, String> {
        let key = decode_key(key_b64)?;
        Ok(SharedKeyPolicy {
            account: account.to_string(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        })
    }

    fn sign(&self, request: &mut Request) {
        let date = to_rfc7231(&OffsetDateTime::now_utc());
        request.insert_header("x-ms-date", date);
        let body_len = request.body().len().unwrap_or(0);
        let to_sign = string_to_sign(
            &self.account,
            request.method().as_ref(),
            request.url(),
            request.headers(),
            body_len,
        );
        let tag = ring::hmac::sign(&self.key, to_sign.as_bytes());
        let sig = azure_core::base64::encode(tag.as_ref());
        request.insert_header("authorization", format!("SharedKey {}:{sig}", self.account));
    }
}

/// Decode a base64 account key, with an error message that says what to fix.
pub(crate) fn decode_key(key_b64: &str) -> Result<Vec<u8>, String> {
    match azure_core::base64::decode(key_b64.trim()) {
        Ok(k) if !k.is_empty() => Ok(k),
        Ok(_) => Err("the storage account key is empty".to_string()),
        Err(e) => Err(format!(
            "the storage account key is not valid base64 ({e}); copy it again from the portal \
             (Access keys) or `az storage account keys list`"
        )),
    }
}

#[async_trait::async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.sign(request);
        forward(ctx, request, next).await
    }
}

/// Per-try policy that appends a SAS token to the query string.
pub(crate) struct SasPolicy {
    token: String,
}

impl fmt::Debug for SasPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasPolicy").finish_non_exhaustive()
    }
}

impl SasPolicy {
    pub(crate) fn new(token: &str) -> Self {
        SasPolicy {
            token: normalize_sas(token),
        }
    }
}

/// Strip a leading `?` and surrounding whitespace from a SAS token.
pub(crate) fn normalize_sas(token: &str) -> String {
    token.trim().trim_start_matches('?').to_string()
}

/// Append an (already percent-encoded) SAS token to `url`'s query, unless it already has a `sig`.
pub(crate) fn append_sas(url: &mut Url, token: &str) {
    if url.query_pairs().any(|(k, _)| k == "sig") {
        return;
    }
    // Appended verbatim: decoding and re-encoding would risk changing the signature's bytes.
    let query = match url.query() {
        Some(q) if !q.is_empty() => format!("{q}&{token}"),
        _ => token.to_string(),
    };
    url.set_query(Some(&query));
}

#[async_trait::async_trait]
impl Policy for SasPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        append_sas(request.url_mut(), &self.token);
        forward(ctx, request, next).await
    }
}

/// Pass the request to the next policy (the transport is always last, so there is one).
pub(crate) async fn forward(
    ctx: &Context<'_>,
    request: &mut Request,
    next: &[Arc<dyn Policy>],
) -> PolicyResult {
    match next.split_first() {
        Some((first, rest)) => first.send(ctx, request, rest).await,
        None => Err(azure_core::Error::with_message(
            azure_core::error::ErrorKind::Other,
            "a Ferry policy must not be the last policy in the pipeline",
        )),
    }
}

/// The Shared Key string-to-sign for the Blob service.
///
/// ```text
/// VERB\nContent-Encoding\nContent-Language\nContent-Length\nContent-MD5\nContent-Type\nDate\n
/// If-Modified-Since\nIf-Match\nIf-None-Match\nIf-Unmodified-Since\nRange\n
/// CanonicalizedHeaders CanonicalizedResource
/// ```
/// Content-Length is empty when zero; Date is empty because `x-ms-date` is sent.
pub(crate) fn string_to_sign(
    account: &str,
    method: &str,
    url: &Url,
    headers: &Headers,
    body_len: u64,
) -> String {
    let h = |name: &'static str| -> String {
        headers
            .get_optional_str(&HeaderName::from_static(name))
            .unwrap_or("")
            .to_string()
    };
    let content_length = {
        let v = h("content-length");
        let v = if v.is_empty() && body_len > 0 {
            body_len.to_string()
        } else {
            v
        };
        if v == "0" {
            String::new()
        } else {
            v
        }
    };
    let mut s = String::with_capacity(256);
    s.push_str(&method.to_ascii_uppercase());
    s.push('\n');
    for v in [
        h("content-encoding"),
        h("content-language"),
        content_length,
        h("content-md5"),
        h("content-type"),
        String::new(), // Date: x-ms-date is used instead.
        h("if-modified-since"),
        h("if-match"),
        h("if-none-match"),
        h("if-unmodified-since"),
        h("range"),
    ] {
        s.push_str(&v);
        s.push('\n');
    }
    s.push_str(&canonicalized_headers(headers));
    s.push_str(&canonicalized_resource(account, url));
    s
}

/// `x-ms-*` headers, lowercase names, sorted, values with folded whitespace, one per line.
fn canonicalized_headers(headers: &Headers) -> String {
    let mut ms: Vec<(&str, String)> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-ms-"))
        .map(|(k, v)| (k.as_str(), fold_whitespace(v.as_str())))
        .collect();
    ms.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = String::new();
    for (k, v) in ms {
        out.push_str(k);
        out.push(':');
        out.push_str(&v);
        out.push('\n');
    }
    out
}

fn fold_whitespace(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `/account/path` then `\nname:v1,v2` for each query parameter: names lowercased and sorted,
/// values decoded and sorted.
fn canonicalized_resource(account: &str, url: &Url) -> String {
    let mut out = format!("/{account}{}", url.path());
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in url.query_pairs() {
        params
            .entry(k.to_ascii_lowercase())
            .or_default()
            .push(v.into_owned());
    }
    for (k, mut vs) in params {
        vs.sort();
        out.push('\n');
        out.push_str(&k);
        out.push(':');
        out.push_str(&vs.join(","));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_to_sign_put_page() {
        let url = Url::parse(
            "http://127.0.0.1:10000/devstoreaccount1/c/replicas/vm/disk.vhd?comp=page&timeout=30",
        )
        .expect("url");
        let mut headers = Headers::new();
        headers.insert("content-length", "512");
        headers.insert("content-type", "application/octet-stream");
        headers.insert("range", "bytes=0-511");
        headers.insert("x-ms-version", "2026-04-06");
        headers.insert("x-ms-date", "Mon, 01 Jan 2024 00:00:00 GMT");
        headers.insert("x-ms-page-write", "update");
        headers.insert("x-ms-client-request-id", "  a   b ");
        headers.insert("user-agent", "ignored");
        let s = string_to_sign("devstoreaccount1", "put", &url, &headers, 512);
        let want = "PUT\n\n\n512\n\napplication/octet-stream\n\n\n\n\n\nbytes=0-511\n\
                    x-ms-client-request-id:a b\n\
                    x-ms-date:Mon, 01 Jan 2024 00:00:00 GMT\n\
                    x-ms-page-write:update\n\
                    x-ms-version:2026-04-06\n\
                    /devstoreaccount1/devstoreaccount1/c/replicas/vm/disk.vhd\ncomp:page\ntimeout:30";
        assert_eq!(s, want);
    }

    #[test]
    fn zero_length_is_empty_and_query_sorted_decoded() {
        let url = Url::parse(
            "https://acct.blob.core.windows.net/c/b?snapshot=2024-01-01T00%3A00%3A00.0000000Z&COMP=x",
        )
        .expect("url");
        let mut headers = Headers::new();
        headers.insert("content-length", "0");
        let s = string_to_sign("acct", "DELETE", &url, &headers, 0);
        assert!(s.starts_with("DELETE\n\n\n\n"), "{s:?}");
        assert!(
            s.ends_with("/acct/c/b\ncomp:x\nsnapshot:2024-01-01T00:00:00.0000000Z"),
            "{s:?}"
        );
    }

    #[test]
    fn signature_matches_reference_hmac() {
        // Reference computed independently: HMAC-SHA256("StringToSign", base64("key")).
        let policy = SharedKeyPolicy::new("a", "a2V5").expect("key");
        let tag = ring::hmac::sign(&policy.key, b"StringToSign");
        assert_eq!(
            azure_core::base64::encode(tag.as_ref()),
            "0gk+nOr00eNdcZHe9ChYgOzt6mCqnM3dA+VCXA7wdqk="
        );
        assert!(SharedKeyPolicy::new("a", "not base64!").is_err());
        assert!(!format!("{policy:?}").contains("a2V5"));
    }

    #[test]
    fn sas_appended_once() {
        let mut url = Url::parse("https://a.blob.core.windows.net/c/b?comp=page").expect("url");
        append_sas(&mut url, &normalize_sas("?sv=2024&sig=abc%2Bdef"));
        assert_eq!(url.query(), Some("comp=page&sv=2024&sig=abc%2Bdef"));
        append_sas(&mut url, "sv=2024&sig=abc%2Bdef");
        assert_eq!(url.query(), Some("comp=page&sv=2024&sig=abc%2Bdef"));
    }
}
