//! `ferry throttle …`: bandwidth throttles of the process server (`ferry_serve::throttle`), kept in
//! its state directory. They work whether or not `ferry serve` runs; a running server applies a
//! change within a second.

use std::path::PathBuf;

use ferry_job::JobError;
use ferry_serve::throttle::{self, Link, Rate, Schedule, Setting, Throttles};
use serde_json::{json, Value};

use crate::server::ConfigArg;

fn state(state_dir: Option<PathBuf>, config: &ConfigArg) -> Result<PathBuf, JobError> {
    crate::admin::existing_state_dir(state_dir, config)
}

fn check_vm(link: Link, vm: Option<&str>) -> Result<(), JobError> {
    if let Some(vm) = vm {
        throttle::check_vm_name(vm).map_err(JobError::Usage)?;
        if link == Link::Upload {
            return Err(JobError::Usage(
                "the upload throttle is global (uploads of all VMs share one link to Azure); leave out --vm, or throttle the VM's ingest (--link ingest)".into(),
            ));
        }
    }
    Ok(())
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn who(link: Link, vm: Option<&str>) -> String {
    match (link, vm) {
        (Link::Ingest, None) => "ingest from all agents together".into(),
        (Link::Ingest, Some(vm)) => format!("ingest from VM {vm}"),
        (Link::Upload, _) => "uploads to Azure".into(),
    }
}

/// `ferry throttle set` and `ferry throttle schedule`.
pub(crate) fn set(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    link: Link,
    vm: Option<&str>,
    schedule: Schedule,
) -> Result<(), JobError> {
    check_vm(link, vm)?;
    let dir = state(state_dir, &config)?;
    throttle::update(&dir, |t| {
        t.set(link, vm, &schedule, now_rfc3339());
        Ok(())
    })
    .map_err(JobError::Usage)?;
    crate::admin::operator_event(
        &dir,
        ferry_serve::events::Event::new(
            "throttle",
            vm,
            format!("operator set {}: '{}'", who(link, vm), schedule.spec()),
        )
        .with(json!({"link": link, "schedule": schedule.spec()})),
    );
    let now = jiff::Zoned::now();
    let (rate, _) = schedule.at_time(&now);
    if schedule.rules.len() == 1 {
        outln!("{}: {rate}", who(link, vm));
    } else {
        outln!(
            "{}: schedule '{}'; now {rate}",
            who(link, vm),
            schedule.spec()
        );
    }
    errln!(
        "a running ferry serve applies it within a second; `ferry throttle show` says what applies"
    );
    Ok(())
}

/// `ferry throttle weight`.
pub(crate) fn weight(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    vm: &str,
    weight: u32,
) -> Result<(), JobError> {
    check_vm(Link::Ingest, Some(vm))?;
    if weight == 0 || weight > throttle::MAX_WEIGHT {
        return Err(JobError::Usage(format!(
            "weight {weight}: give 1 to {} (1 is the default; a VM with weight 4 gets four times the share of one with 1 under the global ingest throttle)",
            throttle::MAX_WEIGHT
        )));
    }
    let dir = state(state_dir, &config)?;
    throttle::update(&dir, |t| {
        if weight == 1 {
            t.weights.remove(vm);
        } else {
            t.weights.insert(vm.to_owned(), weight);
        }
        Ok(())
    })
    .map_err(JobError::Usage)?;
    crate::admin::operator_event(
        &dir,
        ferry_serve::events::Event::new(
            "throttle",
            Some(vm),
            format!("operator set VM {vm}'s weight to {weight}"),
        ),
    );
    outln!("VM {vm}: weight {weight} in the share of the global ingest throttle");
    Ok(())
}

/// One setting as `show` reports it.
fn describe(s: Option<&Setting>, now: &jiff::Zoned) -> Value {
    let Some(s) = s else {
        return json!({
            "schedule": null, "rate": "unlimited", "rate_bytes_per_second": null,
            "rule": null, "changed_at": null, "next_change": null,
        });
    };
    let Ok(sch) = Schedule::parse(&s.schedule) else {
        return json!({"schedule": s.schedule, "error": "does not parse"});
    };
    let (rate, rule) = sch.at_time(now);
    let next = sch.next_change(now).map(|(at, r)| {
        json!({
            "at": at.timestamp().to_string(),
            "local": at.strftime("%a %Y-%m-%d %H:%M %Z").to_string(),
            "rate": r.to_string(),
            "rate_bytes_per_second": r.bytes(),
        })
    });
    json!({
        "schedule": s.schedule,
        "rate": rate.to_string(),
        "rate_bytes_per_second": rate.bytes(),
        "rule": rule.map(|i| sch.rules[i].text.clone()),
        "rule_number": rule.map(|i| i + 1),
        "changed_at": s.changed_at,
        "next_change": next,
    })
}

fn line(label: &str, v: &Value) -> String {
    let mut out = format!("{label:<34} {}", v["rate"].as_str().unwrap_or("?"));
    match (v["schedule"].as_str(), v["rule"].as_str()) {
        (None, _) => out.push_str("  (not set)"),
        (Some(s), Some(r)) if s == r => {}
        (Some(s), Some(r)) => out.push_str(&format!(
            "  by rule {} '{r}' of '{s}'",
            v["rule_number"].as_u64().unwrap_or(0)
        )),
        (Some(s), None) => out.push_str(&format!("  (no rule of '{s}' matches now)")),
    }
    if let Some(n) = v["next_change"].as_object() {
        out.push_str(&format!(
            "; {} from {}",
            n["rate"].as_str().unwrap_or("?"),
            n["local"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// `ferry throttle show`.
pub(crate) fn show(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    as_json: bool,
) -> Result<(), JobError> {
    let dir = state(state_dir, &config)?;
    let t: Throttles = throttle::load(&dir).map_err(|e| JobError::Usage(e.to_string()))?;
    let now = jiff::Zoned::now();
    let tz = now
        .time_zone()
        .iana_name()
        .map(str::to_owned)
        .unwrap_or_else(|| now.strftime("%Z").to_string());
    let st = ferry_serve::status::read_status(&dir.join(ferry_serve::status::STATUS_FILE))
        .ok()
        .filter(|s| s.running);
    let mut vms = serde_json::Map::new();
    let mut names: std::collections::BTreeSet<String> = t.ingest.vms.keys().cloned().collect();
    names.extend(t.weights.keys().cloned());
    for v in st.iter().flat_map(|s| s.vms.iter()) {
        if v.throttled || t.ingest.vms.contains_key(&v.vm) {
            names.insert(v.vm.clone());
        }
    }
    for vm in &names {
        let mut d = describe(t.ingest.vms.get(vm), &now);
        d["weight"] = json!(t.weight(vm));
        let live = st.iter().flat_map(|s| s.vms.iter()).find(|v| &v.vm == vm);
        d["held_back_now"] = json!(live.map(|v| v.throttled));
        vms.insert(vm.clone(), d);
    }
    let out = json!({
        "time_zone": tz,
        "now": now.timestamp().to_string(),
        "server_running": st.is_some(),
        "ingest": {
            "all": describe(t.ingest.all.as_ref(), &now),
            "vms": vms,
        },
        "upload": { "all": describe(t.upload.all.as_ref(), &now) },
    });
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    outln!(
        "Throttles now ({}, {tz}){}",
        now.strftime("%a %Y-%m-%d %H:%M"),
        if st.is_some() {
            ""
        } else {
            "; ferry serve is not running: they apply when it starts"
        }
    );
    outln!(
        "{}",
        line("ingest, all agents together:", &out["ingest"]["all"])
    );
    outln!("{}", line("upload to Azure:", &out["upload"]["all"]));
    if !names.is_empty() {
        outln!("per VM (ingest; the global ingest throttle is shared by weight):");
        for (vm, v) in &vms {
            let mut l = line(&format!("  {vm}"), v);
            l.push_str(&format!("; weight {}", v["weight"]));
            if v["held_back_now"] == json!(true) {
                l.push_str("; held back now");
            }
            outln!("{l}");
        }
    }
    Ok(())
}

/// A rate argument (`50MiB/s`, `400Mbit/s`, `unlimited`).
pub(crate) fn parse_rate_arg(s: &str) -> Result<Rate, String> {
    throttle::parse_rate(s)
}

/// A schedule argument.
pub(crate) fn parse_schedule_arg(s: &str) -> Result<Schedule, String> {
    Schedule::parse(s)
}
