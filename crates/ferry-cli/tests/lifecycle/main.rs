//! The migration and recovery lifecycle against the real binaries, in one test binary (each
//! integration test file links separately: one binary for the three keeps CI's link time down):
//! real failover and complete migration with a running server and agents ([`migration`]),
//! failback ([`failback`]), recovery plans ([`plan`]). The cutover with MariaDB needs loop devices
//! and eBPF: it is in `tests/agent.rs`.

#[path = "../common/mod.rs"]
mod common;

mod failback;
mod migration;
mod plan;
