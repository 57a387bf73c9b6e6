//! Recovery plan files (`ferry failover --plan`): what they may say. The runner is the CLI's.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

use crate::PointSelector;

/// A plan file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub point: Option<String>,
    #[serde(default)]
    pub to: Option<PathBuf>,
    #[serde(rename = "group")]
    pub groups: Vec<Group>,
}

/// One group of a plan.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub vms: Vec<String>,
    #[serde(default)]
    pub pre: Option<PathBuf>,
    #[serde(default)]
    pub post: Option<PathBuf>,
    #[serde(default)]
    pub wait: Option<String>,
}

/// Parses and checks a plan (fuzzed: `operator_settings`).
pub fn parse(text: &str) -> Result<Plan, String> {
    let p: Plan = toml::from_str(text).map_err(|e| e.to_string())?;
    if p.groups.is_empty() {
        return Err("a plan needs at least one [[group]]".into());
    }
    let mut seen = BTreeSet::new();
    for g in &p.groups {
        if g.vms.is_empty() {
            return Err(format!("group {:?} has no VMs", g.name));
        }
        for vm in &g.vms {
            crate::validate_name("VM", vm).map_err(|e| format!("group {:?}: {e}", g.name))?;
            if !seen.insert(vm.clone()) {
                return Err(format!("VM {vm} is in the plan twice"));
            }
        }
        if let Some(w) = &g.wait {
            humantime::parse_duration(w)
                .map_err(|e| format!("group {:?}: wait = {w:?}: {e} (e.g. 30s, 2m)", g.name))?;
        }
        for s in [&g.pre, &g.post].into_iter().flatten() {
            if !s.is_absolute() {
                return Err(format!(
                    "group {:?}: script {} must be an absolute path",
                    g.name,
                    s.display()
                ));
            }
        }
    }
    if let Some(p) = &p.point {
        p.parse::<PointSelector>()
            .map_err(|e| format!("point = {p:?}: {e}"))?;
    }
    Ok(p)
}
