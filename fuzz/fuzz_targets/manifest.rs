//! Per-VM manifests (JSON).
#![no_main]

use ferry_format::manifest::{Manifest, MANIFEST_FORMAT, MANIFEST_VERSION};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// Field names of the manifest schema, so generated objects hit real fields.
const KEYS: &[&str] = &[
    "format", "version", "vm", "key_id", "disks", "points", "next_seq", "size", "applied",
    "segment", "record", "name", "blake3", "id", "seq", "run", "time", "kind",
];

/// A JSON value built from the fuzz input: objects use schema field names, numbers sit near the
/// interesting edges (0, 1, u16/u32/u64 limits, negatives, fractions).
fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let pick = if depth == 0 {
        u.int_in_range(0..=3)?
    } else {
        u.int_in_range(0..=5)?
    };
    Ok(match pick {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => match u.int_in_range(0..=4)? {
            0 => Value::from(u.arbitrary::<u8>()?),
            1 => Value::from(u.arbitrary::<u64>()?),
            2 => Value::from(u.arbitrary::<i64>()?),
            3 => Value::from(*u.choose(&[0u64, 1, 2, 65535, 65536, u32::MAX as u64, u64::MAX])?),
            _ => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        },
        3 => Value::String(u.arbitrary()?),
        4 => {
            let n = u.int_in_range(0..=4)?;
            Value::Array((0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => Value::Object(object(u, depth - 1)?),
    })
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(0..=8)? {
        let k = if u.ratio(7, 8)? {
            (*u.choose(KEYS)?).to_string()
        } else {
            u.arbitrary()?
        };
        m.insert(k, value(u, depth)?);
    }
    Ok(m)
}

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes.
    let _ = Manifest::from_json(data);

    // 2. A generated object carrying the right format and (mostly) the right version: reaches the
    //    schema and the point-sequence checks.
    let mut u = Unstructured::new(data);
    let Ok(mut m) = object(&mut u, 3) else { return };
    m.insert("format".into(), Value::from(MANIFEST_FORMAT));
    if u.ratio(3, 4).unwrap_or(true) {
        m.insert("version".into(), Value::from(MANIFEST_VERSION));
    }
    let json = serde_json::to_vec(&Value::Object(m)).expect("a Value serializes");
    let _ = Manifest::from_json(&json);
});
