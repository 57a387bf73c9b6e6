//! What an operator types and what the server keeps of it: throttle rates and weekly schedules
//! (`ferry throttle`), thinning rules (`ferry policy --thin`), the `throttle.json`,
//! `policy.json` and `events.jsonl` files as a damaged disk or a hand edit may leave them, and
//! recovery plans (`plans/NAME.toml`, `ferry_job::plan::parse`). Nothing
//! may panic; a schedule that parses prints a spec that parses to the same schedule, and is
//! evaluated at every minute of a week without panicking; a settings file that parses saves and
//! parses again to the same settings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = ferry_serve::throttle::parse_rate(s);
        if let Ok(sch) = ferry_serve::throttle::Schedule::parse(s) {
            let again = ferry_serve::throttle::Schedule::parse(&sch.spec()).expect("spec parses");
            assert_eq!(again, sch);
            for wd in 0..7u8 {
                for min in (0..24 * 60u16).step_by(7) {
                    let _ = sch.at(wd, min);
                }
            }
        }
        let _ = ferry_serve::policy::parse_thin(s);
        if let Ok(p) = ferry_job::plan::parse(s) {
            assert!(!p.groups.is_empty() && p.groups.iter().all(|g| !g.vms.is_empty()));
        }
    }
    if let Ok(t) = ferry_serve::throttle::Throttles::parse(data) {
        assert_eq!(ferry_serve::throttle::Throttles::parse(&t.to_json()), Ok(t));
    }
    if let Ok(p) = ferry_serve::policy::Policies::parse(data) {
        assert_eq!(ferry_serve::policy::Policies::parse(&p.to_json()), Ok(p));
    }
    for line in data.split(|b| *b == b'\n') {
        if let Ok(e) = serde_json::from_slice::<ferry_serve::events::Event>(line) {
            let _ = e.at();
        }
    }
});
