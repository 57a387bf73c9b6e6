//! Bandwidth throttles: what the operator set (`ferry throttle`), persisted in the server's state
//! directory as `throttle.json`, and what applies at a given moment.
//!
//! Two links, named as the operator sees them:
//! - **ingest**: what `ferry serve` accepts from agents (the LAN and the appliance's disk). One
//!   global setting for all agents together and one per VM; the server paces agents through their
//!   credit grants ([`crate::pacer`]), so a throttled agent keeps its dirty bits and only its RPO
//!   grows.
//! - **upload**: what leaves the appliance for Azure (the WAN); one global setting.
//!
//! A setting is a weekly **schedule**: rules separated by `;`, the first that matches the
//! appliance's local time wins, no match means unlimited. `ferry throttle set RATE` is the schedule
//! `* RATE`. Rules are matched on the local civil time (the system time zone, `TZ` honoured), so
//! daylight-saving changes move nothing: `08:00-18:00` is 08:00 to 18:00 on the wall clock, also on
//! the day the clocks change.
//!
//! ```text
//! mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s
//! ```
//!
//! Writers (`ferry throttle …`) hold `control.lock` and write the file atomically and durably; a
//! running server re-reads it within [`crate::control::WATCH_EVERY`] and re-evaluates the schedules
//! every [`EVALUATE_EVERY`], so a change or a rule boundary takes effect within a second.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The throttle settings in the state directory.
pub const THROTTLE_FILE: &str = "throttle.json";
/// How often a running server evaluates the schedules against the clock.
pub const EVALUATE_EVERY: Duration = Duration::from_millis(250);
/// The most weight a VM may have in the fair share of a global throttle.
pub const MAX_WEIGHT: u32 = 1000;

const FORMAT: &str = "ferry-throttle";
const VERSION: u32 = 1;

pub use ferry_wire::rate::{human_rate, parse_rate, Rate, MIN_RATE};

/// One rule of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Bit `i` set: matches weekday `i` (0 = Monday).
    days: u8,
    /// Minutes since local midnight; `None`: the whole day. `(from, to)` with `to <= from` runs
    /// past midnight (into the next day, still counted as `from`'s day).
    window: Option<(u16, u16)>,
    pub rate: Rate,
    /// The rule as written (normalised whitespace).
    pub text: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_day(s: &str) -> Option<u8> {
    const FULL: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let s = s.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| s == *d)
        .or_else(|| FULL.iter().position(|d| s == *d))
        .map(|i| i as u8)
}

fn parse_days(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "*" | "daily" | "everyday" => return Ok(0x7f),
        "weekdays" => return Ok(0x1f),
        "weekends" | "weekend" => return Ok(0x60),
        _ => {}
    }
    let mut mask = 0u8;
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, Some(b)),
            None => (part, None),
        };
        let a = parse_day(a).ok_or_else(|| {
            format!("{part:?} is not a day (mon, tue, wed, thu, fri, sat, sun, a range like mon-fri, weekdays, weekends, or *)")
        })?;
        match b {
            None => mask |= 1 << a,
            Some(b) => {
                let b = parse_day(b)
                    .ok_or_else(|| format!("{part:?} is not a day range (like mon-fri)"))?;
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
        }
    }
    Ok(mask)
}

fn parse_clock(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if !(1..=2).contains(&h.len()) || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return None;
    }
    Some(h * 60 + m)
}

fn parse_window(s: &str) -> Result<Option<(u16, u16)>, String> {
    if s == "*" {
        return Ok(None);
    }
    let bad = || format!("{s:?} is not a time window (HH:MM-HH:MM, like 08:00-18:00, or *)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b) = (
        parse_clock(a).ok_or_else(bad)?,
        parse_clock(b).ok_or_else(bad)?,
    );
    if a == b {
        return Err(format!("{s:?} is an empty window; use * for the whole day"));
    }
    if a == 24 * 60 {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

impl Rule {
    /// Whether the rule covers local `weekday` (0 = Monday) at `minute` past midnight.
    pub fn matches(&self, weekday: u8, minute: u16) -> bool {
        let on = |d: u8| self.days & (1 << d) != 0;
        match self.window {
            None => on(weekday),
            Some((a, b)) if a < b => on(weekday) && minute >= a && minute < b,
            // Past midnight: the evening of a listed day, or the small hours after one.
            Some((a, b)) => (on(weekday) && minute >= a) || (on((weekday + 6) % 7) && minute < b),
        }
    }
}

/// A weekly schedule: the first matching rule wins; no match: unlimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub rules: Vec<Rule>,
}

/// The spec grammar, for error messages and `--help`.
pub const SCHEDULE_HELP: &str = "rules separated by ';', each `[DAYS] [HH:MM-HH:MM|*] RATE` (DAYS: mon..sun, ranges like mon-fri, lists like sat,sun, or *), the first that matches local time wins; e.g. 'mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s'";

impl Schedule {
    /// `set RATE`: the same rate all week.
    pub fn constant(rate: Rate) -> Schedule {
        Schedule {
            rules: vec![Rule {
                days: 0x7f,
                window: None,
                rate,
                text: format!("* {}", rate_spec(rate)),
            }],
        }
    }

    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let mut rules = Vec::new();
        for (i, r) in spec.split(';').enumerate() {
            let words: Vec<&str> = r.split_whitespace().collect();
            if words.is_empty() {
                continue;
            }
            let at = |e: String| format!("rule {} ({:?}): {e}", i + 1, r.trim());
            let (rate, head) = words.split_last().expect("not empty");
            let rate = parse_rate(rate).map_err(at)?;
            let (days, window) = match head {
                [] => (0x7f, None),
                [one] if one.contains(':') => (0x7f, parse_window(one).map_err(at)?),
                [one] => (parse_days(one).map_err(at)?, None),
                [d, w] => (parse_days(d).map_err(at)?, parse_window(w).map_err(at)?),
                _ => {
                    return Err(at(format!(
                        "too many words (a rate is written without spaces, like 50MiB/s); {SCHEDULE_HELP}"
                    )))
                }
            };
            rules.push(Rule {
                days,
                window,
                rate,
                text: words.join(" "),
            });
        }
        if rules.is_empty() {
            return Err(format!("the schedule has no rule; {SCHEDULE_HELP}"));
        }
        if rules.len() > 64 {
            return Err("a schedule has at most 64 rules".into());
        }
        Ok(Schedule { rules })
    }

    /// The spec this schedule parses from.
    pub fn spec(&self) -> String {
        self.rules
            .iter()
            .map(|r| r.text.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The rate at local weekday (0 = Monday) and minute, with the index of the rule that gave
    /// it (`None`: no rule matched, unlimited).
    pub fn at(&self, weekday: u8, minute: u16) -> (Rate, Option<usize>) {
        self.rules
            .iter()
            .position(|r| r.matches(weekday, minute))
            .map(|i| (self.rules[i].rate, Some(i)))
            .unwrap_or((Rate::Unlimited, None))
    }

    /// The rate at a moment, read on that moment's local wall clock.
    pub fn at_time(&self, t: &jiff::Zoned) -> (Rate, Option<usize>) {
        let (wd, min) = civil(t);
        self.at(wd, min)
    }

    /// The first moment after `now`, within 8 days, when the rate changes, with the new rate.
    pub fn next_change(&self, now: &jiff::Zoned) -> Option<(jiff::Zoned, Rate)> {
        let cur = self.at_time(now).0;
        let tz = now.time_zone().clone();
        let start = now.timestamp().as_second().div_euclid(60) * 60;
        for i in 1..=(8 * 24 * 60) {
            let t = jiff::Timestamp::from_second(start + i * 60).ok()?;
            let z = t.to_zoned(tz.clone());
            let r = self.at_time(&z).0;
            if r != cur {
                return Some((z, r));
            }
        }
        None
    }
}

/// (weekday with Monday 0, minute of the day) on `t`'s wall clock.
pub fn civil(t: &jiff::Zoned) -> (u8, u16) {
    (
        t.weekday().to_monday_zero_offset() as u8,
        t.hour() as u16 * 60 + t.minute() as u16,
    )
}

/// A rate as a schedule spec word (exact bytes per second when not a round unit).
fn rate_spec(r: Rate) -> String {
    match r {
        Rate::Unlimited => "unlimited".into(),
        Rate::Bytes(b) => human_rate(b).replace(' ', ""),
    }
}

/// Which link a throttle caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// What `ferry serve` accepts from agents.
    Ingest,
    /// What leaves the appliance for Azure.
    Upload,
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Link::Ingest => "ingest",
            Link::Upload => "upload",
        })
    }
}

/// One setting as stored: the schedule spec and when it was set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub schedule: String,
    /// RFC 3339 UTC.
    pub changed_at: String,
}

/// The throttles of one link.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// All agents (ingest) or all uploads together; `None`: unlimited.
    #[serde(default)]
    pub all: Option<Setting>,
    /// Per VM (ingest only).
    #[serde(default)]
    pub vms: BTreeMap<String, Setting>,
}

/// `throttle.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Throttles {
    pub ingest: LinkSettings,
    pub upload: LinkSettings,
    /// A VM's weight in the fair share of the global ingest throttle (default 1).
    pub weights: BTreeMap<String, u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    format: String,
    version: u32,
    #[serde(default)]
    ingest: LinkSettings,
    #[serde(default)]
    upload: LinkSettings,
    #[serde(default)]
    weights: BTreeMap<String, u32>,
}

impl Throttles {
    /// Parses `throttle.json`, checking every schedule and weight.
    pub fn parse(bytes: &[u8]) -> Result<Throttles, String> {
        let f: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if f.format != FORMAT {
            return Err(format!("not a throttle file (format {:?})", f.format));
        }
        if f.version != VERSION {
            return Err(format!(
                "throttle file version {} (this Ferry reads version {VERSION}); upgrade Ferry",
                f.version
            ));
        }
        let t = Throttles {
            ingest: f.ingest,
            upload: f.upload,
            weights: f.weights,
        };
        for (who, s) in t.settings() {
            Schedule::parse(&s.schedule).map_err(|e| format!("{who}: {e}"))?;
        }
        if !t.upload.vms.is_empty() {
            return Err("upload throttles are global (uploads of all VMs share one link)".into());
        }
        for vm in t.ingest.vms.keys().chain(t.weights.keys()) {
            check_vm_name(vm)?;
        }
        for (vm, w) in &t.weights {
            if *w == 0 || *w > MAX_WEIGHT {
                return Err(format!("weight of {vm}: {w} (1 to {MAX_WEIGHT})"));
            }
        }
        Ok(t)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let f = File {
            format: FORMAT.into(),
            version: VERSION,
            ingest: self.ingest.clone(),
            upload: self.upload.clone(),
            weights: self.weights.clone(),
        };
        let mut v = serde_json::to_vec_pretty(&f).expect("serializable");
        v.push(b'\n');
        v
    }

    fn settings(&self) -> Vec<(String, &Setting)> {
        let mut out = Vec::new();
        for (l, s) in [(Link::Ingest, &self.ingest), (Link::Upload, &self.upload)] {
            if let Some(x) = &s.all {
                out.push((format!("{l} (all)"), x));
            }
            for (vm, x) in &s.vms {
                out.push((format!("{l} {vm}"), x));
            }
        }
        out
    }

    pub fn link(&self, l: Link) -> &LinkSettings {
        match l {
            Link::Ingest => &self.ingest,
            Link::Upload => &self.upload,
        }
    }

    pub fn link_mut(&mut self, l: Link) -> &mut LinkSettings {
        match l {
            Link::Ingest => &mut self.ingest,
            Link::Upload => &mut self.upload,
        }
    }

    /// Sets (or with an unlimited constant schedule, removes) the setting of `vm` (`None`: all).
    pub fn set(&mut self, link: Link, vm: Option<&str>, s: &Schedule, now: String) {
        let unlimited = s.rules.iter().all(|r| r.rate == Rate::Unlimited);
        let setting = Setting {
            schedule: s.spec(),
            changed_at: now,
        };
        let l = self.link_mut(link);
        match (vm, unlimited) {
            (None, true) => l.all = None,
            (None, false) => l.all = Some(setting),
            (Some(vm), true) => {
                l.vms.remove(vm);
            }
            (Some(vm), false) => {
                l.vms.insert(vm.to_owned(), setting);
            }
        }
    }

    /// The parsed schedule of `vm`'s own setting (`None`: the link-wide one), if set.
    pub fn schedule(&self, link: Link, vm: Option<&str>) -> Option<Schedule> {
        let l = self.link(link);
        let s = match vm {
            None => l.all.as_ref(),
            Some(vm) => l.vms.get(vm),
        }?;
        // Checked when the file was parsed or the setting made.
        Schedule::parse(&s.schedule).ok()
    }

    pub fn weight(&self, vm: &str) -> u32 {
        self.weights.get(vm).copied().unwrap_or(1)
    }
}

/// Checks a VM name given to a throttle (the same rules as the agents' `--vm`).
pub fn check_vm_name(vm: &str) -> Result<(), String> {
    ferry_wire::check_name("VM name", vm)
}

/// Errors reading or writing `throttle.json`.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}; it is written only by `ferry throttle`: fix or remove it (removed, nothing is throttled)")]
    Damaged { path: PathBuf, why: String },
}

/// Reads `STATE_DIR/throttle.json`; none there: nothing throttled.
pub fn load(state_dir: &Path) -> Result<Throttles, ThrottleError> {
    let path = state_dir.join(THROTTLE_FILE);
    match std::fs::read(&path) {
        Ok(b) => Throttles::parse(&b).map_err(|why| ThrottleError::Damaged { path, why }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Throttles::default()),
        Err(source) => Err(ThrottleError::Io { path, source }),
    }
}

/// Changes `STATE_DIR/throttle.json` under the control lock (re-read first, so concurrent
/// commands never lose each other's change), durably.
pub fn update(
    state_dir: &Path,
    f: impl FnOnce(&mut Throttles) -> Result<(), String>,
) -> Result<Throttles, String> {
    let c = crate::control::Control::new(state_dir);
    let _l = c.lock().map_err(|e| e.to_string())?;
    let mut t = load(state_dir).map_err(|e| e.to_string())?;
    f(&mut t)?;
    let path = state_dir.join(THROTTLE_FILE);
    ferry_durable::write_private(&path, &t.to_json())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(t)
}

/// The identity of the file (every write is a rename: a new inode), to notice changes.
pub fn stamp(state_dir: &Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(state_dir.join(THROTTLE_FILE)).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_bytes_and_bits() {
        assert_eq!(parse_rate("50MiB/s"), Ok(Rate::Bytes(50 << 20)));
        assert_eq!(parse_rate("400Mbit/s"), Ok(Rate::Bytes(50_000_000)));
        assert_eq!(parse_rate("1.5GB/s"), Ok(Rate::Bytes(1_500_000_000)));
        assert_eq!(parse_rate(" 20 MiB/s "), Ok(Rate::Bytes(20 << 20)));
        assert_eq!(parse_rate("unlimited"), Ok(Rate::Unlimited));
        assert_eq!(parse_rate("100Mbps"), Ok(Rate::Bytes(12_500_000)));
        assert!(parse_rate("50").unwrap_err().contains("no unit"));
        assert!(parse_rate("50Mb/s").unwrap_err().contains("bits or bytes"));
        assert!(parse_rate("1KiB/s").unwrap_err().contains("below"));
        assert!(parse_rate("fast").unwrap_err().contains("no number"));
        assert!(parse_rate("5furlongs")
            .unwrap_err()
            .contains("unknown unit"));
        assert_eq!(Rate::Bytes(50 << 20).to_string(), "50 MiB/s");
        assert_eq!(Rate::Bytes(50_000_000).to_string(), "50 MB/s");
        assert_eq!(Rate::Bytes(12_500_000).to_string(), "100 Mbit/s");
        assert_eq!(Rate::Bytes(125_000_000).to_string(), "125 MB/s");
        assert_eq!(Rate::Bytes(312_500_000).to_string(), "2500 Mbit/s");
        assert_eq!(Rate::Bytes(1_000_000).to_string(), "1 MB/s");
    }

    #[test]
    fn the_first_matching_rule_wins_and_none_is_unlimited() {
        let s = Schedule::parse("mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s")
            .unwrap();
        let h = |h: u16, m: u16| h * 60 + m;
        // Monday 07:59, 08:00, 17:59, 18:00.
        assert_eq!(s.at(0, h(7, 59)), (Rate::Bytes(50_000_000), Some(2)));
        assert_eq!(s.at(0, h(8, 0)), (Rate::Bytes(50 << 20), Some(0)));
        assert_eq!(s.at(4, h(17, 59)), (Rate::Bytes(50 << 20), Some(0)));
        assert_eq!(s.at(4, h(18, 0)), (Rate::Bytes(50_000_000), Some(2)));
        assert_eq!(s.at(5, h(12, 0)), (Rate::Unlimited, Some(1)));
        assert_eq!(s.at(6, h(9, 0)), (Rate::Unlimited, Some(1)));
        // Aliases, and an hour of one digit.
        let a = Schedule::parse("weekdays 8:00-18:00 1MiB/s; weekends * 2MiB/s").unwrap();
        assert_eq!(a.at(4, h(8, 0)).0, Rate::Bytes(1 << 20));
        assert_eq!(a.at(4, h(7, 59)).0, Rate::Unlimited);
        assert_eq!(a.at(6, h(7, 0)).0, Rate::Bytes(2 << 20));
        let only = Schedule::parse("mon 09:00-10:00 1MiB/s").unwrap();
        assert_eq!(only.at(1, h(9, 30)), (Rate::Unlimited, None));
        assert_eq!(
            s.spec(),
            "mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s"
        );
    }

    #[test]
    fn windows_past_midnight_belong_to_their_start_day() {
        let s = Schedule::parse("fri 22:00-06:00 10MiB/s").unwrap();
        let r = Rate::Bytes(10 << 20);
        assert_eq!(s.at(4, 23 * 60).0, r); // Friday night
        assert_eq!(s.at(5, 5 * 60).0, r); // Saturday small hours
        assert_eq!(s.at(5, 6 * 60).0, Rate::Unlimited);
        assert_eq!(s.at(4, 5 * 60).0, Rate::Unlimited); // Friday early: Thursday not listed
        let wrap = Schedule::parse("sat-mon * 1MiB/s").unwrap();
        assert_eq!(wrap.at(0, 0).0, Rate::Bytes(1 << 20));
        assert_eq!(wrap.at(1, 0).0, Rate::Unlimited);
        let end = Schedule::parse("* 18:00-24:00 2MiB/s").unwrap();
        assert_eq!(end.at(3, 23 * 60 + 59).0, Rate::Bytes(2 << 20));
        assert_eq!(end.at(4, 0).0, Rate::Unlimited);
    }

    #[test]
    fn bad_schedules_say_which_rule_and_why() {
        for (spec, want) in [
            ("", "no rule"),
            ("mon-fri 08:00-18:00", "rule 1"),
            ("funday 1MiB/s", "not a day"),
            ("mon 8-18 1MiB/s", "not a time window"),
            ("mon 25:00-26:00 1MiB/s", "not a time window"),
            ("mon 08:00-08:00 1MiB/s", "empty window"),
            ("* 1MiB/s; mon 08:00-18:00 50 MiB/s", "rule 2"),
        ] {
            let e = Schedule::parse(spec).unwrap_err();
            assert!(e.contains(want), "{spec:?}: {e}");
        }
    }

    #[test]
    fn schedules_follow_the_wall_clock_across_daylight_saving() {
        // US Eastern: on Sunday 2026-03-08 clocks go from 02:00 to 03:00; on Sunday 2026-11-01
        // from 02:00 back to 01:00.
        let tz = jiff::tz::TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap();
        let s = Schedule::parse("sun 08:00-18:00 50MiB/s; * unlimited").unwrap();
        let at = |y, mo, d, h, mi| {
            jiff::civil::date(y, mo, d)
                .at(h, mi, 0, 0)
                .to_zoned(tz.clone())
                .unwrap()
        };
        for day in [(2026, 3, 8), (2026, 11, 1), (2026, 6, 7)] {
            let (y, m, d) = day;
            assert_eq!(s.at_time(&at(y, m, d, 7, 59)).0, Rate::Unlimited, "{day:?}");
            assert_eq!(s.at_time(&at(y, m, d, 8, 0)).0, Rate::Bytes(50 << 20));
            assert_eq!(s.at_time(&at(y, m, d, 17, 59)).0, Rate::Bytes(50 << 20));
        }
        // On the short day the window opens at 08:00 wall time, EDT (UTC-4): 12:00 UTC.
        let from = at(2026, 3, 8, 0, 0);
        let (when, rate) = s.next_change(&from).unwrap();
        assert_eq!(rate, Rate::Bytes(50 << 20));
        assert_eq!((when.hour(), when.minute()), (8, 0));
        assert_eq!(when.timestamp().to_string(), "2026-03-08T12:00:00Z");
        // On the long day, 08:00 EST = 13:00 UTC.
        let (when, _) = s.next_change(&at(2026, 11, 1, 0, 30)).unwrap();
        assert_eq!(when.timestamp().to_string(), "2026-11-01T13:00:00Z");
        let (when, rate) = s.next_change(&at(2026, 11, 1, 9, 0)).unwrap();
        assert_eq!((when.hour(), rate), (18, Rate::Unlimited));
        assert_eq!(Schedule::constant(Rate::Unlimited).next_change(&from), None);
    }

    #[test]
    fn the_file_round_trips_and_refuses_bad_content() {
        let mut t = Throttles::default();
        let s = Schedule::parse("mon-fri 08:00-18:00 50MiB/s; * unlimited").unwrap();
        t.set(Link::Ingest, None, &s, "2026-12-05T00:00:00Z".into());
        t.set(
            Link::Ingest,
            Some("web01"),
            &Schedule::constant(Rate::Bytes(5 << 20)),
            "x".into(),
        );
        t.set(
            Link::Upload,
            None,
            &Schedule::constant(Rate::Bytes(1 << 20)),
            "x".into(),
        );
        t.weights.insert("db01".into(), 4);
        let back = Throttles::parse(&t.to_json()).unwrap();
        assert_eq!(back, t);
        assert_eq!(
            back.schedule(Link::Ingest, Some("web01")).unwrap().spec(),
            "* 5MiB/s"
        );
        assert_eq!(back.weight("db01"), 4);
        assert_eq!(back.weight("web01"), 1);
        // Unlimited removes the setting.
        t.set(
            Link::Ingest,
            Some("web01"),
            &Schedule::constant(Rate::Unlimited),
            "x".into(),
        );
        assert!(t.ingest.vms.is_empty());
        let bad = String::from_utf8(back.to_json())
            .unwrap()
            .replace("50MiB/s", "50 MiB/s");
        assert!(Throttles::parse(bad.as_bytes())
            .unwrap_err()
            .contains("ingest (all)"));
        assert!(Throttles::parse(b"{}").is_err());
        let w0 = String::from_utf8(back.to_json())
            .unwrap()
            .replace("\"db01\": 4", "\"db01\": 0");
        assert!(Throttles::parse(w0.as_bytes())
            .unwrap_err()
            .contains("weight"));
    }
}
