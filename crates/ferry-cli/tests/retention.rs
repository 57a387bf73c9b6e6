//! Retention: expired points go, the newest stays, data only they needed is deleted, and content that
//! comes back after its chunks were collected is stored again (no dangling dedupe references).

mod common;

use std::fs;
use std::time::Duration;

use common::*;

#[test]
fn expired_points_and_their_data_are_deleted_and_returning_content_is_stored_again() {
    let env = Env::new();
    let disk = env.path("ret.img");
    fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let mut rng = Rng(31);
    write_random(&disk, &mut rng, 0, 8 << 20);
    let v1 = env.path("v1.img");
    fs::copy(&disk, &v1).unwrap();
    env.replicate_ok(&[&disk], &["--retention", "0"]);
    // Version 2 replaces all of v1's data.
    write_random(&disk, &mut rng, 0, 8 << 20);
    env.replicate_ok(&[&disk], &["--retention", "0"]);
    let seg_bytes = |env: &Env| -> u64 {
        fn walk(p: &std::path::Path) -> u64 {
            fs::read_dir(p)
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        walk(&p)
                    } else {
                        fs::metadata(&p).unwrap().len()
                    }
                })
                .sum()
        }
        walk(&env.store().join("journal"))
    };
    let before = seg_bytes(&env);
    assert_eq!(env.points().len(), 2);
    std::thread::sleep(Duration::from_millis(2100));
    // Unchanged disk, retention 2s: both older points expire, the new one stays.
    let j = env.replicate_ok(&[&disk], &["--retention", "2s"]);
    assert_eq!(j["pruned"]["points"].as_array().unwrap().len(), 2, "{j}");
    let pts = env.points();
    assert_eq!(pts.len(), 1);
    let after = seg_bytes(&env);
    assert!(
        after < before / 2 + (1 << 20),
        "v1's data was deleted: {before} -> {after}"
    );
    // v1's content returns: its chunks were collected, so they must be stored again.
    fs::copy(&v1, &disk).unwrap();
    let j = env.replicate_ok(&[&disk], &["--retention", "0"]);
    assert!(
        j["stored"]["unique_bytes"].as_u64().unwrap() >= 8 << 20,
        "{j}"
    );
    let out = env.path("r.img");
    for p in env.points() {
        let o = env.restore(p["id"].as_str().unwrap(), &out, &["--verify"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let o = env.restore("latest", &out, &[]);
    assert!(o.status.success());
    assert!(same_bytes(&out, &v1));
}
