//! `ferry events`: what happened and when, from the process server's event log
//! (`ferry_serve::events`).

use std::path::PathBuf;
use std::time::Duration;

use ferry_job::JobError;

use crate::server::ConfigArg;

pub(crate) fn events(
    state_dir: Option<PathBuf>,
    config: ConfigArg,
    since: Option<Duration>,
    vm: Option<&str>,
    kind: Option<&str>,
    as_json: bool,
) -> Result<(), JobError> {
    let dir = crate::admin::existing_state_dir(state_dir, &config)?;
    let r = ferry_serve::events::read(&dir, since, vm).map_err(|e| {
        JobError::Usage(format!(
            "cannot read {}: {e}",
            ferry_serve::events::path(&dir).display()
        ))
    })?;
    let events: Vec<_> = r
        .events
        .into_iter()
        .filter(|e| kind.is_none_or(|k| e.kind == k))
        .collect();
    if r.skipped > 0 {
        errln!(
            "note: {} damaged line(s) of the event log skipped (a write cut short by a crash)",
            r.skipped
        );
    }
    if as_json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&events).expect("events are JSON")
        );
        return Ok(());
    }
    if events.is_empty() {
        errln!(
            "no events{}",
            if since.is_some() { " in that time" } else { "" }
        );
        return Ok(());
    }
    let tz = jiff::tz::TimeZone::system();
    for e in &events {
        let when = e
            .time
            .parse::<jiff::Timestamp>()
            .map(|t| {
                t.to_zoned(tz.clone())
                    .strftime("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_else(|_| e.time.clone());
        // The file may have been edited: nothing reaches the terminal as a control character.
        outln!(
            "{when}  {:<10} {:<12} {}",
            ferry_serve::events::printable(&e.kind),
            ferry_serve::events::printable(e.vm.as_deref().unwrap_or("-")),
            ferry_serve::events::printable(&e.message)
        );
    }
    Ok(())
}
