//! Azure store locations and credentials: `parse_store_url` (`azure://ACCOUNT/CONTAINER`),
//! `AzureConfig::from_url_with_env` (connection string, account key, SAS token and Entra settings
//! from the environment, here from the input) and `AzureConfig::shared_key` (endpoint URL, base64
//! key). Nothing may panic. Round trips: a store URL that parses prints and parses back to the same
//! account and container; every configuration that is built passes `validate`; one built from a
//! connection string, written back as a connection string, gives the same account, container,
//! endpoint and credential.
#![no_main]

use ferry_azure::config::{parse_store_url, AzureConfig, Credential};
use ferry_fuzz::take_chunk;
use libfuzzer_sys::fuzz_target;

const VARS: [&str; 6] = [
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "FERRY_AZURE_CREDENTIAL",
    "AZURE_CLIENT_ID",
];

fn with_env<'a>(vars: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    }
}

/// The connection string that describes `c` (built from one).
fn connection_string(c: &AzureConfig) -> String {
    let mut cs = format!("AccountName={};BlobEndpoint={}", c.account, c.endpoint);
    match &c.credential {
        Credential::SharedKey { key } => cs += &format!(";AccountKey={key}"),
        Credential::Sas { token } => cs += &format!(";SharedAccessSignature={token}"),
        Credential::Entra(_) => unreachable!("a connection string has a key or a SAS"),
    }
    cs
}

fn same_credential(a: &Credential, b: &Credential) -> bool {
    match (a, b) {
        // A connection string's values are trimmed; a token that was `?` then blanks keeps them.
        (Credential::Sas { token: x }, Credential::Sas { token: y }) => x.trim() == y.trim(),
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&present, rest)) = data.split_first() else {
        return;
    };
    let (url, mut rest) = take_chunk(rest);
    let url = String::from_utf8_lossy(url).into_owned();
    if let Ok((account, container)) = parse_store_url(&url) {
        let back = parse_store_url(&format!("azure://{account}/{container}"))
            .expect("a printed store URL parses");
        assert_eq!(back, (account, container));
    }
    let mut vars = Vec::new();
    for (i, name) in VARS.iter().enumerate() {
        let (v, tail) = take_chunk(rest);
        rest = tail;
        if present & (1 << i) != 0 {
            vars.push((*name, String::from_utf8_lossy(v).into_owned()));
        }
    }
    // The URL must be a valid store URL to reach the environment: use the input's account and
    // container when they are, else a fixed one.
    let store_url = if parse_store_url(&url).is_ok() {
        url.clone()
    } else {
        "azure://devstoreaccount1/ferry".to_string()
    };
    if let Ok(c) = AzureConfig::from_url_with_env(&store_url, with_env(&vars)) {
        c.validate().expect("a built configuration is valid");
        if c.credential_source == "AZURE_STORAGE_CONNECTION_STRING" {
            let cs = connection_string(&c);
            let env = [("AZURE_STORAGE_CONNECTION_STRING", cs.clone())];
            let again = AzureConfig::from_url_with_env(
                &format!("azure://{}/{}", c.account, c.container),
                with_env(&env),
            )
            .unwrap_or_else(|e| panic!("written back connection string {cs:?}: {e}"));
            assert_eq!(
                (&again.account, &again.container, &again.endpoint),
                (&c.account, &c.container, &c.endpoint),
                "{cs:?}"
            );
            assert!(same_credential(&again.credential, &c.credential), "{cs:?}");
        }
    }
    // Explicit shared-key configurations: endpoint, account, key and container from the input.
    let (ep, rest) = take_chunk(rest);
    let (acct, rest) = take_chunk(rest);
    let (key, cont) = take_chunk(rest);
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if let Ok(c) = AzureConfig::shared_key(&s(ep), &s(acct), &s(key), &s(cont)) {
        c.validate().expect("a built configuration is valid");
    }
});
