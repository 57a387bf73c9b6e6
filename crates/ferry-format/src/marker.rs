//! Store markers: the identity of an Azure store (`ferry-store.json` in its container), written
//! once when the store is created. See `ferry_job::identity` for how local state is bound to it.

use serde::{Deserialize, Serialize};

/// `format` of an Azure store marker.
pub const AZURE_MARKER_FORMAT: &str = "ferry-azure-store";

/// The identity of an Azure store, as its marker blob holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreMarker {
    pub format: String,
    pub version: u16,
    /// Random, 128 bits, hex.
    pub store_id: String,
    /// Creation generation: 1 for a store created by this version.
    pub generation: u64,
    /// Master key id every object is sealed with.
    pub key_id: String,
    /// RFC 3339 time of creation.
    pub created: String,
}

impl StoreMarker {
    /// Parses a marker blob; clear error for anything else.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let m: StoreMarker =
            serde_json::from_slice(bytes).map_err(|e| format!("not a Ferry store marker: {e}"))?;
        if m.format != AZURE_MARKER_FORMAT {
            return Err(format!(
                "format '{}' is not {AZURE_MARKER_FORMAT}",
                m.format
            ));
        }
        if m.version != 1 {
            return Err(format!(
                "store marker version {} is newer than this Ferry (1)",
                m.version
            ));
        }
        if m.store_id.len() != 32 || !m.store_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("store id '{}' is not 32 hex digits", m.store_id));
        }
        Ok(m)
    }
    /// "ID (generation N)".
    pub fn describe(&self) -> String {
        format!("{} (generation {})", self.store_id, self.generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden marker: committed bytes decode, and re-encode to the same value.
    #[test]
    fn golden_marker_round_trips_and_bad_ones_are_refused() {
        let golden = br#"{"format":"ferry-azure-store","version":1,"store_id":"00112233445566778899aabbccddeeff","generation":1,"key_id":"14dd275e0ece7d11","created":"2026-12-04T12:00:00Z"}"#;
        let m = StoreMarker::parse(golden).unwrap();
        assert_eq!(m.store_id, "00112233445566778899aabbccddeeff");
        assert_eq!(
            m.describe(),
            "00112233445566778899aabbccddeeff (generation 1)"
        );
        assert_eq!(serde_json::to_vec(&m).unwrap(), golden.to_vec());
        let s = std::str::from_utf8(golden).unwrap();
        for bad in [
            s.replace("ferry-azure-store", "ferry-local-store"),
            s.replace("\"version\":1", "\"version\":2"),
            s.replace("00112233445566778899aabbccddeeff", "0011"),
            s.replace("\"generation\":1,", "\"generation\":1,\"extra\":0,"),
            s[..s.len() - 1].to_string(),
        ] {
            assert!(StoreMarker::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
