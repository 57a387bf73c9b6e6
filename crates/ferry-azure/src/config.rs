//! Where the store is and how to authenticate: `azure://ACCOUNT/CONTAINER` plus the
//! environment, or explicit values (tests, Azurite).
//!
//! Environment, first match wins:
//! 1. `AZURE_STORAGE_CONNECTION_STRING` (`AccountName`, `AccountKey`, `BlobEndpoint`,
//!    `DefaultEndpointsProtocol`, `EndpointSuffix`, `SharedAccessSignature`,
//!    `UseDevelopmentStorage=true`);
//! 2. `AZURE_STORAGE_ACCOUNT` + `AZURE_STORAGE_KEY`;
//! 3. `AZURE_STORAGE_SAS_TOKEN`;
//! 4. Entra ID (https only): `FERRY_AZURE_CREDENTIAL=managed-identity` (with `AZURE_CLIENT_ID`
//!    for a user-assigned identity) or `developer-tools` (Azure CLI / azd; the default).

use std::fmt;
use std::time::Duration;

use crate::error::{AzureError, Result};
use crate::retry::RetryPolicy;
use crate::throttle::RateLimit;

/// Azurite's well-known development account name.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development account key (public, documented by Microsoft).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Which Entra ID credential to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntraSource {
    /// Azure CLI (`az login`), then Azure Developer CLI (`azd auth login`).
    DeveloperTools,
    /// The VM's or App Service's managed identity; `client_id` picks a user-assigned one.
    ManagedIdentity {
        /// Client id of a user-assigned identity; `None` = system-assigned.
        client_id: Option<String>,
    },
}

/// How requests are authorized.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Shared Key: the account's base64 key signs every request.
    SharedKey {
        /// Base64 account key.
        key: String,
    },
    /// A SAS token appended to every request (without the leading `?`).
    Sas {
        /// The token.
        token: String,
    },
    /// An Entra ID token from `azure_identity`.
    Entra(EntraSource),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        match self {
            Credential::SharedKey { .. } => f.write_str("SharedKey(<redacted>)"),
            Credential::Sas { .. } => f.write_str("Sas(<redacted>)"),
            Credential::Entra(s) => write!(f, "Entra({s:?})"),
        }
    }
}

/// Client tuning; every field has a default suitable for a WAN link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTuning {
    /// Parallel requests in `put_pages_many`. Default 8.
    pub parallelism: usize,
    /// Retry policy of every operation.
    pub retry: RetryPolicy,
    /// TCP+TLS connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response. Default 60 s.
    pub read_timeout: Duration,
    /// Longest single request, body included. Default 5 min.
    pub request_timeout: Duration,
    /// Upload rate limit; `None` = unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Worker threads of the client's internal tokio runtime. Default 2.
    pub runtime_threads: usize,
    /// Longest wait for a server-side copy to finish. Default 6 h.
    pub copy_timeout: Duration,
    /// Results per List Blobs / Get Page Ranges request; `None` = the service's default (5000
    /// blobs). Small values are for tests of paging.
    pub list_page_size: Option<u32>,
}

impl Default for ClientTuning {
    fn default() -> Self {
        ClientTuning {
            parallelism: 8,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(300),
            rate_limit: None,
            runtime_threads: 2,
            copy_timeout: Duration::from_secs(6 * 3600),
            list_page_size: None,
        }
    }
}

/// Everything needed to talk to one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureConfig {
    /// Storage account name.
    pub account: String,
    /// Container name.
    pub container: String,
    /// Blob service endpoint, no trailing `/` (e.g. `https://acct.blob.core.windows.net`,
    /// `http://127.0.0.1:10000/devstoreaccount1`).
    pub endpoint: String,
    /// How requests are authorized.
    pub credential: Credential,
    /// Where the credential came from, for messages (`AZURE_STORAGE_KEY`, `explicit`, ...).
    pub credential_source: &'static str,
    /// Tuning.
    pub tuning: ClientTuning,
    /// Allow a shared key or SAS over plain `http` to a host that is not loopback
    /// (`FERRY_AZURE_ALLOW_HTTP=1`): the request signature (shared key) or the SAS itself then
    /// crosses the network in clear. Off by default; loopback (Azurite) never needs it.
    pub allow_http: bool,
}

impl AzureConfig {
    /// Parse `azure://ACCOUNT/CONTAINER` and take credentials from the process environment.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with_env(url, |k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// As [`AzureConfig::from_url`], reading variables through `env` (for tests).
    pub fn from_url_with_env(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let (account, container) = parse_store_url(url)?;
        let resolved = resolve_env(&account, &env)?;
        let cfg = AzureConfig {
            account,
            container,
            endpoint: resolved.endpoint,
            credential: resolved.credential,
            credential_source: resolved.source,
            tuning: ClientTuning::default(),
            allow_http: env("FERRY_AZURE_ALLOW_HTTP").as_deref() == Some("1"),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Explicit shared-key configuration (tests, Azurite, sovereign clouds).
    pub fn shared_key(endpoint: &str, account: &str, key: &str, container: &str) -> Result<Self> {
        let cfg = AzureConfig {
            account: account.to_string(),
            container: container.to_string(),
            endpoint: trim_endpoint(endpoint),
            credential: Credential::SharedKey {
                key: key.to_string(),
            },
            credential_source: "explicit",
            tuning: ClientTuning::default(),
            allow_http: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check names, endpoint and credential shape; called by every constructor.
    pub fn validate(&self) -> Result<()> {
        check_account(&self.account)?;
        check_container(&self.container)?;
        let url = azure_core::http::Url::parse(&self.endpoint).map_err(|e| {
            AzureError::Config(format!(
                "blob endpoint {:?} is not a URL: {e}",
                self.endpoint
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            return Err(AzureError::Config(format!(
                "blob endpoint {:?} must be an http(s) URL",
                self.endpoint
            )));
        }
        // A user name, password, query or fragment in the endpoint would be a secret echoed in
        // every message that names the endpoint (and is never what an endpoint needs).
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(AzureError::Config(
                "the blob endpoint must be scheme://host[:port][/path] only: no user name, password, query (a SAS goes in SharedAccessSignature or AZURE_STORAGE_SAS_TOKEN) or fragment".into(),
            ));
        }
        if self.endpoint.ends_with('/') {
            return Err(AzureError::Config(format!(
                "blob endpoint {:?} must not end in '/'",
                self.endpoint
            )));
        }
        let loopback = url.host_str().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        });
        if url.scheme() == "http"
            && !loopback
            && !self.allow_http
            && matches!(
                self.credential,
                Credential::SharedKey { .. } | Credential::Sas { .. }
            )
        {
            return Err(AzureError::Config(format!(
                "blob endpoint {:?} is plain http to a host that is not this machine: the {} would \
                 cross the network in clear. Use https, or set FERRY_AZURE_ALLOW_HTTP=1 if this \
                 network is trusted",
                self.endpoint,
                match self.credential {
                    Credential::Sas { .. } => "SAS token",
                    _ => "shared-key signature",
                }
            )));
        }
        match &self.credential {
            Credential::SharedKey { key } => {
                crate::auth::decode_key(key).map_err(AzureError::Config)?;
            }
            Credential::Sas { token } if !token.contains("sig=") => {
                return Err(AzureError::Config(format!(
                    "the SAS token from {} has no signature (sig=...)",
                    self.credential_source
                )));
            }
            Credential::Entra(_) if url.scheme() != "https" => {
                return Err(AzureError::Config(format!(
                    "Entra ID tokens are only sent over https; endpoint {:?} is not https. Use \
                     a shared key or SAS for http endpoints such as Azurite",
                    self.endpoint
                )));
            }
            _ => {}
        }
        if self.tuning.parallelism == 0 || self.tuning.runtime_threads == 0 {
            return Err(AzureError::Config(
                "parallelism and runtime_threads must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// Split `azure://ACCOUNT/CONTAINER` (a trailing `/` is tolerated).
pub fn parse_store_url(url: &str) -> Result<(String, String)> {
    let bad = |reason: &str| AzureError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("azure://")
        .ok_or_else(|| bad("it does not start with azure://"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut parts = rest.split('/');
    let account = parts.next().unwrap_or("");
    let container = parts
        .next()
        .ok_or_else(|| bad("the container is missing"))?;
    if parts.next().is_some() {
        return Err(bad("only ACCOUNT/CONTAINER is allowed after azure://"));
    }
    check_account(account).map_err(|e| bad(&e.to_string()))?;
    check_container(container).map_err(|e| bad(&e.to_string()))?;
    Ok((account.to_string(), container.to_string()))
}

fn check_account(account: &str) -> Result<()> {
    let ok = (3..=24).contains(&account.len())
        && account
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(AzureError::Config(format!(
            "storage account name {account:?} must be 3-24 lowercase letters and digits"
        )))
    }
}

fn check_container(c: &str) -> Result<()> {
    let ok = (3..=63).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !c.starts_with('-')
        && !c.ends_with('-')
        && !c.contains("--");
    if ok {
        Ok(())
    } else {
        Err(AzureError::Config(format!(
            "container name {c:?} must be 3-63 lowercase letters, digits and single hyphens, \
             starting and ending with a letter or digit"
        )))
    }
}

/// Blanks and trailing `/` off (all of them: `"https://h / "` is `"https://h"`, not `"https://h "`,
/// which `validate` would let through and every request URL would then carry).
fn trim_endpoint(e: &str) -> String {
    e.trim()
        .trim_end_matches(|c: char| c == '/' || c.is_whitespace())
        .to_string()
}

struct Resolved {
    endpoint: String,
    credential: Credential,
    source: &'static str,
}

fn default_endpoint(protocol: &str, account: &str, suffix: &str) -> String {
    format!("{protocol}://{account}.blob.{suffix}")
}

fn check_same_account(url_account: &str, cred_account: &str, source: &'static str) -> Result<()> {
    if url_account == cred_account {
        Ok(())
    } else {
        Err(AzureError::AccountMismatch {
            url_account: url_account.to_string(),
            credential_account: cred_account.to_string(),
            source_name: source,
        })
    }
}

fn resolve_env(account: &str, env: &impl Fn(&str) -> Option<String>) -> Result<Resolved> {
    if let Some(cs) = env("AZURE_STORAGE_CONNECTION_STRING") {
        return from_connection_string(account, &cs);
    }
    if let Some(key) = env("AZURE_STORAGE_KEY") {
        let src = "AZURE_STORAGE_ACCOUNT/AZURE_STORAGE_KEY";
        let cred_account = env("AZURE_STORAGE_ACCOUNT").ok_or_else(|| {
            AzureError::Config("AZURE_STORAGE_KEY is set but AZURE_STORAGE_ACCOUNT is not".into())
        })?;
        check_same_account(account, &cred_account, src)?;
        return Ok(Resolved {
            endpoint: default_endpoint("https", account, "core.windows.net"),
            credential: Credential::SharedKey { key },
            source: src,
        });
    }
    if let Some(token) = env("AZURE_STORAGE_SAS_TOKEN") {
        let src = "AZURE_STORAGE_SAS_TOKEN";
        if let Some(cred_account) = env("AZURE_STORAGE_ACCOUNT") {
            check_same_account(account, &cred_account, "AZURE_STORAGE_ACCOUNT")?;
        }
        return Ok(Resolved {
            endpoint: default_endpoint("https", account, "core.windows.net"),
            credential: Credential::Sas {
                token: crate::auth::normalize_sas(&token),
            },
            source: src,
        });
    }
    if let Some(cred_account) = env("AZURE_STORAGE_ACCOUNT") {
        check_same_account(account, &cred_account, "AZURE_STORAGE_ACCOUNT")?;
    }
    let source = match env("FERRY_AZURE_CREDENTIAL").as_deref() {
        None | Some("developer-tools") => EntraSource::DeveloperTools,
        Some("managed-identity") => EntraSource::ManagedIdentity {
            client_id: env("AZURE_CLIENT_ID"),
        },
        Some(other) => {
            return Err(AzureError::Config(format!(
                "FERRY_AZURE_CREDENTIAL={other:?}: expected managed-identity or developer-tools"
            )))
        }
    };
    Ok(Resolved {
        endpoint: default_endpoint("https", account, "core.windows.net"),
        credential: Credential::Entra(source),
        source: "FERRY_AZURE_CREDENTIAL (Entra ID)",
    })
}

/// Parse an Azure Storage connection string for the account named in the store URL.
fn from_connection_string(account: &str, cs: &str) -> Result<Resolved> {
    const SRC: &str = "AZURE_STORAGE_CONNECTION_STRING";
    let mut name = None;
    let mut key = None;
    let mut blob_endpoint = None;
    let mut protocol = None;
    let mut suffix = None;
    let mut sas = None;
    let mut dev = false;
    for part in cs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        // Values (keys, SAS) may contain '=': split at the first one only.
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| AzureError::Config(format!("{SRC}: {part:?} is not Name=Value")))?;
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "accountname" => name = Some(v),
            "accountkey" => key = Some(v),
            "blobendpoint" => blob_endpoint = Some(v),
            "defaultendpointsprotocol" => protocol = Some(v),
            "endpointsuffix" => suffix = Some(v),
            "sharedaccesssignature" => sas = Some(v),
            "usedevelopmentstorage" => dev = v.eq_ignore_ascii_case("true"),
            // Queue/Table/File endpoints and unknown keys do not concern blobs.
            _ => {}
        }
    }
    if dev {
        check_same_account(account, AZURITE_ACCOUNT, SRC)?;
        return Ok(Resolved {
            endpoint: blob_endpoint
                .map(|e| trim_endpoint(&e))
                .unwrap_or_else(|| format!("http://127.0.0.1:10000/{AZURITE_ACCOUNT}")),
            credential: Credential::SharedKey {
                key: AZURITE_KEY.to_string(),
            },
            source: SRC,
        });
    }
    if let Some(n) = &name {
        check_same_account(account, n, SRC)?;
    }
    let endpoint = match blob_endpoint {
        Some(e) => trim_endpoint(&e),
        None => default_endpoint(
            protocol.as_deref().unwrap_or("https"),
            account,
            suffix.as_deref().unwrap_or("core.windows.net"),
        ),
    };
    let credential = match (key, sas) {
        (Some(key), _) => {
            if name.is_none() {
                return Err(AzureError::Config(format!(
                    "{SRC} has AccountKey but no AccountName"
                )));
            }
            Credential::SharedKey { key }
        }
        (None, Some(token)) => Credential::Sas {
            token: crate::auth::normalize_sas(&token),
        },
        (None, None) => {
            return Err(AzureError::Config(format!(
                "{SRC} has neither AccountKey nor SharedAccessSignature"
            )))
        }
    };
    Ok(Resolved {
        endpoint,
        credential,
        source: SRC,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parses_store_url() {
        assert_eq!(
            parse_store_url("azure://acct1/ferry-data").expect("ok"),
            ("acct1".to_string(), "ferry-data".to_string())
        );
        assert!(parse_store_url("azure://acct1/ferry/").is_ok());
        for bad in [
            "s3://a/b",
            "azure://acct1",
            "azure://acct1/c/extra",
            "azure://Acct/cont",
            "azure://acct1/Bad_Container",
            "azure://ab/cont",
        ] {
            assert!(parse_store_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn connection_string_with_blob_endpoint() {
        let cs = format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};\
             BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1/;"
        );
        let c = AzureConfig::from_url_with_env(
            "azure://devstoreaccount1/c1x",
            env(&[("AZURE_STORAGE_CONNECTION_STRING", &cs)]),
        )
        .expect("ok");
        assert_eq!(c.endpoint, "http://127.0.0.1:10000/devstoreaccount1");
        assert_eq!(
            c.credential,
            Credential::SharedKey {
                key: AZURITE_KEY.into()
            }
        );
        assert!(!format!("{c:?}").contains(AZURITE_KEY));
    }

    #[test]
    fn connection_string_suffix_and_sas() {
        let cs = "DefaultEndpointsProtocol=https;AccountName=acct1;EndpointSuffix=core.chinacloudapi.cn;SharedAccessSignature=sv=2024&sig=x%3D";
        let c = AzureConfig::from_url_with_env(
            "azure://acct1/cont",
            env(&[("AZURE_STORAGE_CONNECTION_STRING", cs)]),
        )
        .expect("ok");
        assert_eq!(c.endpoint, "https://acct1.blob.core.chinacloudapi.cn");
        assert_eq!(
            c.credential,
            Credential::Sas {
                token: "sv=2024&sig=x%3D".into()
            }
        );
    }

    #[test]
    fn development_storage_shortcut() {
        let c = AzureConfig::from_url_with_env(
            "azure://devstoreaccount1/cont",
            env(&[(
                "AZURE_STORAGE_CONNECTION_STRING",
                "UseDevelopmentStorage=true",
            )]),
        )
        .expect("ok");
        assert_eq!(c.endpoint, "http://127.0.0.1:10000/devstoreaccount1");
    }

    #[test]
    fn account_mismatch_is_clear() {
        let e = AzureConfig::from_url_with_env(
            "azure://acct1/cont",
            env(&[
                ("AZURE_STORAGE_ACCOUNT", "acct2"),
                ("AZURE_STORAGE_KEY", AZURITE_KEY),
            ]),
        )
        .expect_err("mismatch");
        let msg = e.to_string();
        assert!(msg.contains("acct1") && msg.contains("acct2"), "{msg}");
        let cs = format!("AccountName=other;AccountKey={AZURITE_KEY}");
        assert!(matches!(
            AzureConfig::from_url_with_env(
                "azure://acct1/cont",
                env(&[("AZURE_STORAGE_CONNECTION_STRING", &cs)])
            ),
            Err(AzureError::AccountMismatch { .. })
        ));
    }

    #[test]
    fn precedence_and_fallbacks() {
        let both = env(&[
            ("AZURE_STORAGE_ACCOUNT", "acct1"),
            ("AZURE_STORAGE_KEY", AZURITE_KEY),
            ("AZURE_STORAGE_SAS_TOKEN", "sv=1&sig=2"),
        ]);
        let c = AzureConfig::from_url_with_env("azure://acct1/cont", both).expect("ok");
        assert!(matches!(c.credential, Credential::SharedKey { .. }));
        assert_eq!(c.endpoint, "https://acct1.blob.core.windows.net");

        let sas = env(&[("AZURE_STORAGE_SAS_TOKEN", "?sv=1&sig=2")]);
        let c = AzureConfig::from_url_with_env("azure://acct1/cont", sas).expect("ok");
        assert_eq!(
            c.credential,
            Credential::Sas {
                token: "sv=1&sig=2".into()
            }
        );

        let c = AzureConfig::from_url_with_env("azure://acct1/cont", env(&[])).expect("ok");
        assert_eq!(c.credential, Credential::Entra(EntraSource::DeveloperTools));
        let mi = env(&[
            ("FERRY_AZURE_CREDENTIAL", "managed-identity"),
            ("AZURE_CLIENT_ID", "abc"),
        ]);
        let c = AzureConfig::from_url_with_env("azure://acct1/cont", mi).expect("ok");
        assert_eq!(
            c.credential,
            Credential::Entra(EntraSource::ManagedIdentity {
                client_id: Some("abc".into())
            })
        );
        assert!(AzureConfig::from_url_with_env(
            "azure://acct1/cont",
            env(&[("FERRY_AZURE_CREDENTIAL", "password")])
        )
        .is_err());
    }

    /// Issue 8: a shared key or SAS over plain http only to this machine, or with the opt-in.
    #[test]
    fn keys_and_sas_need_https_beyond_loopback() {
        for host in [
            "http://127.0.0.1:10000/a",
            "http://localhost:1",
            "http://[::1]:1",
        ] {
            AzureConfig::shared_key(host, AZURITE_ACCOUNT, AZURITE_KEY, "cont").expect(host);
        }
        let e = AzureConfig::shared_key(
            "http://10.0.0.5:10000/a",
            AZURITE_ACCOUNT,
            AZURITE_KEY,
            "cont",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("FERRY_AZURE_ALLOW_HTTP=1") && e.contains("shared-key"),
            "{e}"
        );
        let cs = "AccountName=acct1;SharedAccessSignature=sv=1&sig=SECRET;BlobEndpoint=http://blob.example.com/acct1";
        let e = AzureConfig::from_url_with_env(
            "azure://acct1/cont",
            env(&[("AZURE_STORAGE_CONNECTION_STRING", cs)]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("SAS token") && !e.contains("SECRET"), "{e}");
        AzureConfig::from_url_with_env(
            "azure://acct1/cont",
            env(&[
                ("AZURE_STORAGE_CONNECTION_STRING", cs),
                ("FERRY_AZURE_ALLOW_HTTP", "1"),
            ]),
        )
        .expect("allowed");
        AzureConfig::shared_key("https://10.0.0.5/a", AZURITE_ACCOUNT, AZURITE_KEY, "cont")
            .expect("https");
        // Look-alike hosts are not loopback; secrets in the endpoint are refused, not echoed.
        for bad in [
            "http://127.0.0.1.evil.example/a",
            "http://localhost.evil.example",
            "https://user:pw@host/a",
            "https://host/a?sv=1&sig=SECRET",
        ] {
            let e = AzureConfig::shared_key(bad, AZURITE_ACCOUNT, AZURITE_KEY, "cont")
                .unwrap_err()
                .to_string();
            assert!(!e.contains("SECRET") && !e.contains("pw@"), "{bad}: {e}");
        }
    }

    #[test]
    fn entra_refused_on_http_and_bad_key_refused() {
        let mut c = AzureConfig::shared_key(
            "http://127.0.0.1:1/devstoreaccount1/",
            AZURITE_ACCOUNT,
            AZURITE_KEY,
            "cont",
        )
        .expect("ok");
        assert_eq!(c.endpoint, "http://127.0.0.1:1/devstoreaccount1");
        // Blanks between trailing slashes (found by fuzz/azure_config) are trimmed too.
        let t = AzureConfig::shared_key(
            "http://localhost / \t/",
            AZURITE_ACCOUNT,
            AZURITE_KEY,
            "cont",
        );
        assert_eq!(t.expect("ok").endpoint, "http://localhost");
        c.credential = Credential::Entra(EntraSource::DeveloperTools);
        assert!(c.validate().unwrap_err().to_string().contains("https"));
        let e = AzureConfig::shared_key("http://[::1]", AZURITE_ACCOUNT, "%%%", "cont")
            .expect_err("bad");
        assert!(e.to_string().contains("base64"), "{e}");
    }
}
