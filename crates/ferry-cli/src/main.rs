//! `ferry`: the operator's command. Thin: parse arguments, call `ferry-job`, print, map errors to exit
//! codes (0 ok, 1 error, 2 usage).

#[macro_use]
mod out;
mod admin;
mod appliance;
mod config;
mod events;
mod failback;
mod failover;
mod plan;
mod policy;
mod progress;
mod remote;
mod server;
mod status;
mod throttle;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_format::segment::PointKind;
use ferry_job::{JobError, PointSelector, ReplicateOptions, RestoreRequest, StoreLocation};
use server::{ConfigArg, ServeArgs, StatusArgs};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Block replication to a local store or Azure: replicate disks, keep recovery points, restore them.",
    long_about = "Ferry replicates Linux disks (raw images or block devices) into a store, keeps \
crash- and app-consistent recovery points, and restores any of them byte-for-byte.\n\n\
Quick tour:\n  \
ferry replicate disk.img --store ./store --once     # first run copies, later runs ship changes\n  \
ferry points list --store ./store                   # what can be restored\n  \
ferry restore --store ./store --point latest --out restored.img --verify\n\n\
Everything in a store is encrypted with a master key (--key-file; created on first use, mode 0600). \
Keep a copy of it: without it nothing can be restored.",
    after_help = "Operator commands (status, throttle, policy, events, agents, vms, passphrase rotate) run inside a running `ferry serve` through its admin socket STATE_DIR/admin.sock (root, or a member of the server's admin group, ferry by default), and on the state directory when none runs.\n\nLogs go to stderr (FERRY_LOG=debug for more). Exit codes: 0 ok, 1 error, 2 usage, 3 `ferry status`: a critical condition holds, 75 the server runs too many operator commands: try again."
)]
struct Cli {
    /// Log as JSON lines (for journald / log shippers) instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate disks into a store and cut recovery points.
    ///
    /// Each run reads every SOURCE, ships only the 64 KiB chunks whose content differs from the
    /// replica (zero chunks as zero ranges, known content as references), and cuts one point for all
    /// SOURCEs together. Without --once it repeats every --interval until SIGINT/SIGTERM.
    Replicate(ReplicateArgs),
    /// Recovery points.
    Points {
        #[command(subcommand)]
        cmd: PointsCmd,
    },
    /// Restore a recovery point to a raw image or a fixed VHD (`.vhd`).
    ///
    /// Examples:
    ///   ferry restore --store ./store --point latest --out web01.img --verify
    ///   ferry restore --store ./store --point 0003 --vm web01 --disk os --out os.vhd
    #[command(verbatim_doc_comment)]
    Restore(RestoreArgs),
    /// Failover and test failover: every disk of a VM at one recovery point, as new fixed VHDs
    /// (or raw images) in a new directory.
    ///
    /// --test: while replication goes on, into a new directory VM-ID under --to; `--cleanup`
    /// removes exactly what it made. One test failover per VM at a time.
    /// Without --test (a real failover, the source gone or cut over): into the new directory
    /// --to/VM, for good; the process server stops expecting the VM's agent; `ferry
    /// complete-migration` ends its replication once the VM runs from these disks.
    /// An Azure store (test failovers only): page blobs by server-side copy under
    /// --to azure://ACCOUNT/CONTAINER/PREFIX, and the `az` commands that make a VM of them.
    ///
    /// The point is held against retention while it is read (`STORE/pins/…hold`; a test
    /// failover's until its cleanup), and a record in
    /// `STORE/failovers/` lists what was made, so a cleanup after Ctrl-C or a crash removes only
    /// that; a failover that fails removes what it made. `--point latest` is the newest point the
    /// server committed (the incumbent's "latest processed"); `--point final` is the point
    /// `ferry-agent cutover` made after blocking the source's writes (nothing written on the
    /// source is missing from it). The output says how to boot the disks with QEMU.
    ///
    /// Examples:
    ///   ferry failover --test --vm web01 --store /srv/ferry-store --to /var/tmp
    ///   ferry failover --test --vm web01 --point latest-app --json --store /srv/ferry-store
    ///   ferry failover --test --cleanup --vm web01 --store /srv/ferry-store
    ///   ferry failover --vm web01 --point final --store /srv/ferry-store --to /srv/vms
    ///   ferry failover list --store /srv/ferry-store
    ///   ferry failover --plan shop --test --store /srv/ferry-store --to /var/tmp
    ///   ferry failover --plan shop --test --cleanup --store /srv/ferry-store
    #[command(verbatim_doc_comment)]
    Failover(FailoverArgs),
    /// End a failed-over VM's replication for good: its agent is refused from now on, and its
    /// points, replicas, holds and the journal segments no other VM needs are removed. The
    /// failed-over disks, the failover records and the event log stay.
    ///
    /// Refused for a VM that was not failed over (`--force` ends it anyway) or that has a test
    /// failover open. With `ferry serve` running, the server removes the data once it has applied
    /// the VM's last records; the command waits for it (--wait).
    ///
    /// Examples:
    ///   ferry complete-migration --vm web01 --store /srv/ferry-store
    ///   ferry complete-migration --vm old-test-vm --force --store /srv/ferry-store --json
    ///   ferry complete-migration --vm web01 --store azure://ferrydr/ferry   # on the appliance
    #[command(verbatim_doc_comment)]
    CompleteMigration(CompleteMigrationArgs),
    /// Failback: bring on-premises disks (the originals, or new ones) to the state of the
    /// failed-over disks, writing only the 64 KiB chunks that differ.
    ///
    /// Each --from (a fixed VHD or a raw image, or the failed-over page blob as
    /// azure://ACCOUNT/CONTAINER/PATH.vhd: only its written pages are downloaded) pairs with the
    /// --to in the same position (a block device, unmounted, or an image file; a file that does
    /// not exist is created). The targets are synced before it reports; --verify reads them back.
    /// Then protect the disks again: only what the store does not hold is sent.
    ///
    /// Examples:
    ///   ferry failback --vm web01 --from web01-os.vhd --to /dev/sdb --verify
    ///   ferry failback --vm web01 --from os.vhd --to /dev/sdb --from data.vhd --to /dev/sdc
    ///   ferry failback --vm web01 --from os.vhd --to /dev/sdb --dry-run
    ///   ferry failback --vm web01 --to /dev/sdb \
    ///       --from azure://ferrydr/ferry/failback/web01-os.vhd   # exported
    #[command(verbatim_doc_comment)]
    Failback(FailbackArgs),
    /// Split mode, near the store: apply uploaded segments to the replica page blobs, snapshot them
    /// at each cut and publish recovery points. Idempotent and resumable: run it again after any
    /// interruption. Without --once it keeps polling every --interval.
    Apply(ApplyArgs),
    /// Process server: accept agents over TLS 1.3, make their changes durable in the cache, and
    /// turn each agent's cut into a recovery point in the store. Runs until SIGINT/SIGTERM.
    ///
    /// Settings come from flags, then environment variables, then the [serve] table of the config
    /// file, then the built-in defaults.
    ///
    /// Examples:
    ///   ferry serve --config /etc/ferry/ferry.toml
    ///   ferry serve --listen 0.0.0.0:7443 --store ./store --cache-dir ./cache --state-dir ./ps
    #[command(verbatim_doc_comment)]
    Serve(ServeArgs),
    /// Health, and per VM and disk: state, RPO, backlog and its ETA, rates, last points, and the
    /// health conditions that hold — from the process server's status file and the store's
    /// manifests.
    ///
    /// RPO is the time since the newest recovery point. Reads STATE_DIR/status.json, which a
    /// running `ferry serve` rewrites every second (an older file whose process still runs is
    /// reported as running but not writing its status).
    ///
    /// Exit status: 0 healthy or warnings only, 3 while a critical condition holds (an RPO over
    /// twice its threshold, a quarantined VM, the server not running, … see docs/OPERATIONS.md),
    /// 1 and 2 on errors. Monitoring can run `ferry status >/dev/null || alert`.
    ///
    /// Examples:
    ///   ferry status
    ///   ferry status --watch
    ///   ferry status --json | jq '.vms[] | {vm, rpo_seconds, conditions}'
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// The appliance's boot-time configuration from OVF properties or a cloud-init NoCloud
    /// volume (docs/APPLIANCE.md).
    Appliance {
        #[command(subcommand)]
        cmd: appliance::ApplianceCmd,
    },
    /// The master key's backup: `ferry key export` (keep it offline) and `ferry key import`.
    Key {
        #[command(subcommand)]
        cmd: appliance::KeyCmd,
    },
    /// The registration passphrase agents need (`ferry-agent register --passphrase-file`).
    Passphrase {
        #[command(subcommand)]
        cmd: PassphraseCmd,
    },
    /// Registered agents: list them, revoke one.
    ///
    /// A running `ferry serve` runs it through its admin socket (as root or a member of the group
    /// ferry); with none running it works on the state directory. A revocation applies within a
    /// second.
    ///
    /// Examples:
    ///   ferry agents list
    ///   ferry agents revoke 3f9c0a…   (the id from `ferry agents list`)
    #[command(verbatim_doc_comment)]
    Agents {
        #[command(subcommand)]
        cmd: AgentsCmd,
    },
    /// VMs and the agent each belongs to.
    ///
    /// A VM belongs to the first agent that replicates it, from then on: another agent using the
    /// same --vm name is refused, whether or not the owner is connected. After rebuilding a
    /// machine (a new agent), give its VM to the new agent with `ferry vms move`.
    ///
    /// A VM whose data the process server cannot apply is quarantined: it alone stops
    /// replicating (`ferry status` says why), every other VM goes on. Fix the cause, then
    /// `ferry vms release` it.
    ///
    /// Examples:
    ///   ferry vms list --json
    ///   ferry vms move web01 --to 3f9c0a…
    ///   ferry vms release web01
    #[command(verbatim_doc_comment)]
    Vms {
        #[command(subcommand)]
        cmd: VmsCmd,
    },
    /// Bandwidth throttles of the process server, changed live.
    ///
    /// Two links: `ingest` (default) caps what `ferry serve` accepts from agents, for all agents
    /// together and per VM; `upload` caps what leaves for Azure. Throttled agents are paced by
    /// the server's credit: they send more slowly and keep their changes, so nothing is lost,
    /// only the RPO grows. Under the global ingest throttle each VM gets a fair share
    /// (`ferry throttle weight`), and what a VM does not use goes to the others.
    ///
    /// Rates: 50MiB/s, 400Mbit/s, 1.5GB/s, unlimited. Schedules are weekly, in the appliance's
    /// local time zone (daylight saving follows the wall clock); the first rule that matches
    /// wins, none matching means unlimited. Settings live in the server's state directory
    /// (throttle.json): they go through a running server's admin socket (root or the group
    /// ferry), work on the files when none runs, survive restarts, and a running server applies
    /// a change within a second.
    ///
    /// Examples:
    ///   ferry throttle set 50MiB/s                       # all agents together
    ///   ferry throttle set 5MiB/s --vm web01             # one VM
    ///   ferry throttle set 100Mbit/s --link upload       # the WAN link to Azure
    ///   ferry throttle schedule 'mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s'
    ///   ferry throttle weight 4 --vm db01
    ///   ferry throttle show --json
    #[command(verbatim_doc_comment)]
    Throttle {
        #[command(subcommand)]
        cmd: ThrottleCmd,
    },
    /// The replication policy: RPO threshold, how long points are kept (with thinning), and how
    /// often agents cut points.
    ///
    /// Defaults (the incumbent's): RPO threshold 60m, retention 24h (or `ferry serve --retention`),
    /// app-consistent points every 1h kept as long as the retention, crash-consistent points every
    /// 30s. Unset cut intervals leave each agent its own (agent.toml). Set for all VMs, or per VM
    /// with --vm (the VM's settings win). Kept in the server's state directory (policy.json); a
    /// running server applies a change within a second: connected agents get their new cut
    /// intervals, the next retention check prunes by the new rules. Retention never removes a
    /// VM's newest point, its newest app-consistent point, or a point a restore is reading.
    ///
    /// Thinning (--thin '2h:all,24h:hourly,7d:daily'): points younger than 2h are all kept,
    /// younger than 24h one an hour (the newest of each hour), younger than 7d one a day.
    ///
    /// Examples:
    ///   ferry policy set --rpo-threshold 30m --retention 72h --app-every 1h --app-retention 7d
    ///   ferry policy set --vm db01 --crash-every 1m --thin '2h:all,24h:hourly'
    ///   ferry policy set --retention 12h --dry-run       # what the next prune would remove
    ///   ferry policy show --vm db01 --json
    #[command(verbatim_doc_comment)]
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// What happened and when: agents registered, connected, revoked or moved; throttle and
    /// policy changes; quarantines and releases; points pruned; health going bad and recovering;
    /// the server starting and stopping. Kept in the server's state directory (events.jsonl,
    /// about 8 MiB at most: the oldest go first), across restarts. Times in local time.
    ///
    /// Examples:
    ///   ferry events --since 1h
    ///   ferry events --vm web01 --json
    ///   ferry events --kind health --since 7d
    #[command(verbatim_doc_comment)]
    Events {
        /// Only events this recent (e.g. 30m, 1h, 7d).
        #[arg(long, value_parser = ferry_job::serve_config::parse_interval)]
        since: Option<Duration>,
        /// Only events of this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Only events of this kind (server, agent, throttle, policy, health, quarantine, prune, cut, hook, resync).
        #[arg(long)]
        kind: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: StateDirArg,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct FailoverArgs {
    #[command(subcommand)]
    cmd: Option<FailoverCmd>,
    /// A test failover (without it: a real failover).
    #[arg(long)]
    test: bool,
    /// Remove the VM's test failover: its files, its directory if it made it and it is empty, and
    /// its hold on the point.
    #[arg(long, requires = "test")]
    cleanup: bool,
    /// The VM.
    #[arg(long)]
    vm: Option<String>,
    /// `latest` (the newest point in the store, by its time), `latest-app`, `final` (the point
    /// `ferry-agent cutover` made), or a point id (or unique prefix). Default: latest (for a
    /// plan: the plan's `point`, else latest).
    #[arg(long)]
    point: Option<PointSelector>,
    /// A recovery plan: PLANS_DIR/NAME.toml (or a path): its groups of VMs in order, with their
    /// scripts and waits; with --test a test failover of each, with --test --cleanup their
    /// cleanup.
    #[arg(long, conflicts_with = "vm")]
    plan: Option<String>,
    /// Where plans are [default: /etc/ferry/plans].
    #[arg(long, env = "FERRY_PLANS_DIR")]
    plans_dir: Option<PathBuf>,
    /// An existing directory: the failover makes a new directory in it (mode 0700) for the
    /// disks: VM-ID for a test, VM for a real failover. Default: the current directory.
    #[arg(long)]
    to: Option<PathBuf>,
    /// Disk files: fixed VHD (`vhd`, bootable as they are) or raw images (`raw`).
    #[arg(long, value_enum, default_value = "vhd")]
    format: DiskFormat,
    /// Re-read each disk and check it against the point's blake3.
    #[arg(long)]
    verify: bool,
    /// The store (a local directory).
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: Option<StoreLocation>,
    #[command(flatten)]
    key: KeyArgs,
    /// Worker threads. Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The process server's state directory, for its event log. Default: STATE_ROOT/server
    /// when it exists.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Planned failover from the appliance: ask the VM's agent, through the running `ferry
    /// serve`, to cut over (as `ferry-agent cutover --allow-writable` on the machine: hooks,
    /// filesystems read-only, final point), then fail over to that final point. Only agents
    /// whose configuration allows it (`allow_remote_cutover = true`) accept.
    #[arg(long, conflicts_with_all = ["test", "point"])]
    shutdown_source: bool,
    /// With --shutdown-source: how long to wait for the final point.
    #[arg(long, default_value = "10m", value_parser = parse_wait, requires = "shutdown_source")]
    shutdown_wait: std::time::Duration,
}

#[derive(Args)]
struct CompleteMigrationArgs {
    /// The VM.
    #[arg(long)]
    vm: String,
    /// End the replication of a VM that was not failed over (its points are deleted).
    #[arg(long)]
    force: bool,
    /// The store (a local directory).
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: StoreLocation,
    #[command(flatten)]
    key: KeyArgs,
    /// The process server's state directory, for its event log. Default: STATE_ROOT/server
    /// when it exists.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How long to wait for a running server to remove the data, e.g. 2m.
    #[arg(long, default_value = "2m", value_parser = parse_wait)]
    wait: std::time::Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FailbackArgs {
    /// The VM (for the event log and the report).
    #[arg(long)]
    vm: String,
    /// A failed-over disk: a fixed VHD or a raw image (repeat, one per disk).
    #[arg(long, required = true)]
    from: Vec<PathBuf>,
    /// The on-premises disk to bring to that state: a block device or an image file (repeat, in
    /// the order of --from).
    #[arg(long, required = true)]
    to: Vec<PathBuf>,
    /// Read each target back and compare it with its source (blake3).
    #[arg(long)]
    verify: bool,
    /// Compare only: say how much would be written, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// The process server's state directory, for its event log. Default: STATE_ROOT/server
    /// when it exists.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 2m)"))
}

#[derive(Clone, Copy, ValueEnum)]
enum DiskFormat {
    Vhd,
    Raw,
}

#[derive(Subcommand)]
enum FailoverCmd {
    /// Failovers and test failovers of the store, present and cleaned up, with their points and
    /// files, and each failed-over or migrated VM's state.
    List {
        #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
        store: StoreLocation,
        #[arg(long)]
        json: bool,
    },
}

fn failover_cmd(a: FailoverArgs) -> Result<(), JobError> {
    if let Some(FailoverCmd::List { store, json }) = a.cmd {
        return failover::list(&store, json);
    }
    let store = a.store.ok_or_else(|| {
        JobError::Usage(
            "give --store STORE (or set FERRY_STORE): the store the VM replicates into".into(),
        )
    })?;
    if let Some(name) = a.plan {
        if a.vm.is_some() {
            return Err(JobError::Usage(
                "give --plan or --vm, not both (the plan names its VMs)".into(),
            ));
        }
        return plan::run(plan::Args {
            name,
            plans_dir: a
                .plans_dir
                .unwrap_or_else(|| PathBuf::from(plan::DEFAULT_PLANS_DIR)),
            test: a.test,
            cleanup: a.cleanup,
            store,
            key_file: a.key.key_file.unwrap_or_else(ferry_job::default_key_file),
            point: a.point,
            to: a.to,
            raw: matches!(a.format, DiskFormat::Raw),
            threads: threads(a.threads),
            json: a.json,
            state_dir: a.state_dir,
        });
    }
    let vm =
        a.vm.ok_or_else(|| JobError::Usage("give --vm VM (or --plan NAME)".into()))?;
    if a.cleanup {
        return failover::cleanup(&store, &vm, a.json);
    }
    failover::test(failover::TestArgs {
        store,
        key_file: a.key.key_file.unwrap_or_else(ferry_job::default_key_file),
        vm,
        point: a.point.unwrap_or(PointSelector::Latest),
        to: a.to,
        raw: matches!(a.format, DiskFormat::Raw),
        verify: a.verify,
        threads: threads(a.threads),
        json: a.json,
        real: !a.test,
        state_dir: a.state_dir,
        shutdown_source: a.shutdown_source.then_some(a.shutdown_wait),
    })
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Change the policy of all VMs (the default) or of one (--vm); fields not given keep theirs.
    Set {
        /// Only this VM (its settings win over the default).
        #[arg(long)]
        vm: Option<String>,
        /// Warn when the newest point is older than this (critical at twice it), e.g. 60m.
        #[arg(long)]
        rpo_threshold: Option<String>,
        /// Keep points this long, e.g. 24h or 7d.
        #[arg(long)]
        retention: Option<String>,
        /// App-consistent points this often (e.g. 1h), or off.
        #[arg(long)]
        app_every: Option<String>,
        /// Keep app-consistent points this long (default: the retention).
        #[arg(long)]
        app_retention: Option<String>,
        /// Crash-consistent points this often (at least 10s).
        #[arg(long)]
        crash_every: Option<String>,
        /// Thinning rules, e.g. '2h:all,24h:hourly,7d:daily', or none.
        #[arg(long)]
        thin: Option<String>,
        /// Save nothing; print the resulting policy and what the next prune would remove.
        #[arg(long)]
        dry_run: bool,
        /// The store (for --dry-run). Default: the one the server's status file names.
        #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
        store: Option<StoreLocation>,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// The policy in effect (default and per VM, and where each value comes from) and what the
    /// next prune would remove.
    Show {
        #[arg(long)]
        vm: Option<String>,
        /// The store to preview the next prune on. Default: the one the server's status file names.
        #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
        store: Option<StoreLocation>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: StateDirArg,
    },
}

/// Which link a throttle caps.
#[derive(Clone, Copy, ValueEnum)]
enum LinkArg {
    /// What ferry serve accepts from agents (the LAN, the appliance's disk).
    Ingest,
    /// What leaves the appliance for Azure (the WAN).
    Upload,
}

impl From<LinkArg> for ferry_serve::throttle::Link {
    fn from(l: LinkArg) -> Self {
        match l {
            LinkArg::Ingest => ferry_serve::throttle::Link::Ingest,
            LinkArg::Upload => ferry_serve::throttle::Link::Upload,
        }
    }
}

#[derive(Subcommand)]
enum ThrottleCmd {
    /// One rate all week (replaces a schedule). `unlimited` removes the throttle.
    Set {
        /// 50MiB/s, 400Mbit/s, 1.5GB/s or unlimited.
        #[arg(value_parser = throttle::parse_rate_arg)]
        rate: ferry_serve::throttle::Rate,
        /// Throttle only this VM's ingest (default: all agents together).
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, value_enum, default_value = "ingest")]
        link: LinkArg,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// A weekly schedule: rules separated by ';', each `[DAYS] [HH:MM-HH:MM|*] RATE`; DAYS are
    /// mon..sun, ranges (mon-fri), lists (sat,sun) or *; a window past midnight (22:00-06:00)
    /// belongs to its start day; the first rule that matches local time wins, none: unlimited.
    Schedule {
        /// e.g. 'mon-fri 08:00-18:00 50MiB/s; sat,sun * unlimited; * 400Mbit/s'
        #[arg(value_parser = throttle::parse_schedule_arg)]
        spec: ferry_serve::throttle::Schedule,
        /// Schedule only this VM's ingest (default: all agents together).
        #[arg(long)]
        vm: Option<String>,
        #[arg(long, value_enum, default_value = "ingest")]
        link: LinkArg,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// A VM's weight in the share of the global ingest throttle (default 1; a VM with weight 4
    /// gets four times the share of one with 1 when both want more than they get).
    Weight {
        /// 1 to 1000.
        weight: u32,
        #[arg(long)]
        vm: String,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// What applies now, to whom, by which rule, and when it changes next.
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: StateDirArg,
    },
}

/// Where the process server keeps its state (`--state-dir`, else the config file's).
#[derive(Args)]
struct StateDirArg {
    /// The process server's state directory (as given to `ferry serve`). Default: state_dir of
    /// the config file's [serve] table, else STATE_ROOT/server.
    #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// Registered agents: id, hostname, when registered, the VMs each owns, whether connected
    /// (and from where) per the running server's status.
    List {
        #[command(flatten)]
        at: StateDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A one-time enrollment token for one machine: `ferry-agent register --passphrase-file` takes
    /// it like the passphrase, registers once, before it expires, and gives the new agent VM
    /// --vm (taking it from its former owner, who is disconnected). Printed on stdout.
    Token {
        /// The VM the new agent will replicate.
        #[arg(long)]
        vm: String,
        /// How long the token stays valid (at most 30 days).
        #[arg(long, default_value = "24h", value_parser = ferry_job::serve_config::parse_interval)]
        expires: std::time::Duration,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// Revoke an agent: it can no longer connect, and a running `ferry serve` closes its
    /// connections within a second. Its VMs keep their points and stay reserved for it until
    /// moved (`ferry vms move`).
    Revoke {
        /// The agent id (from `ferry agents list`).
        id: String,
        #[command(flatten)]
        at: StateDirArg,
    },
}

#[derive(Subcommand)]
enum VmsCmd {
    /// Each VM with its owning agent.
    List {
        #[command(flatten)]
        at: StateDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a VM to another registered agent (a rebuilt machine's): its points, replicas and
    /// disk identities stay; the former owner is disconnected and refused from then on.
    Move {
        /// The VM name.
        vm: String,
        /// The agent id that replicates it from now on (from `ferry agents list`).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        at: StateDirArg,
    },
    /// End a VM's quarantine. The process server skips what its cache still holds of the VM,
    /// drops the VM's changes that are not in a point yet, and accepts its agent again; the agent
    /// then sends everything the VM's newest point does not hold (a resync). Points stay.
    Release {
        /// The VM name.
        vm: String,
        /// The store the server replicates into (as given to `ferry serve`). Default: the one
        /// the server's status file names.
        #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
        store: Option<StoreLocation>,
        #[command(flatten)]
        at: StateDirArg,
    },
}

#[derive(Subcommand)]
enum PassphraseCmd {
    /// Replace the passphrase with a new one: new agents need it, registered agents are not
    /// affected, a running `ferry serve` uses it within a second. Prints the new passphrase.
    Rotate {
        #[command(flatten)]
        at: StateDirArg,
    },
    /// Print the passphrase (created with the server's TLS identity on first use).
    ///
    /// With --fingerprint: the SHA-256 fingerprint of the server's TLS certificate instead, the
    /// one the passphrase pins (the appliance's console shows both).
    Show {
        /// Print the certificate's fingerprint (sha256:HEX) instead of the passphrase.
        #[arg(long)]
        fingerprint: bool,
        /// The process server's state directory (as given to `ferry serve`). Default: state_dir of
        /// the config file's [serve] table, else STATE_ROOT/server.
        #[arg(long, env = "FERRY_SERVER_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Args)]
struct ApplyArgs {
    /// The store: azure://ACCOUNT/CONTAINER.
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: StoreLocation,
    #[command(flatten)]
    key: KeyArgs,
    /// Apply what is there and exit.
    #[arg(long)]
    once: bool,
    /// Time between polls without --once.
    #[arg(long, default_value = "30s", value_parser = units::parse_interval)]
    interval: Duration,
    /// Keep points this long; older ones' snapshots are deleted (newest never). `0` keeps all.
    #[arg(long, default_value = "24h", value_parser = units::parse_retention)]
    retention: Duration,
    /// Print a JSON summary of each pass on stdout.
    #[arg(long)]
    json: bool,
}

fn parse_store(s: &str) -> Result<StoreLocation, String> {
    StoreLocation::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum PointsCmd {
    /// List recovery points, oldest first.
    List {
        /// The store: a directory, or azure://ACCOUNT/CONTAINER.
        #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
        store: StoreLocation,
        /// Only this VM's points.
        #[arg(long)]
        vm: Option<String>,
        /// JSON array: id, vm, time (RFC 3339), kind, disks (name, size, blake3).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct KeyArgs {
    /// Master key file (32 bytes or 64 hex digits, mode 0600). `replicate` creates it when it
    /// makes a new store; other commands need the existing one.
    /// Default: /etc/ferry/master.key as root, else ~/.config/ferry/master.key.
    #[arg(long, env = "FERRY_KEY_FILE")]
    key_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    /// Crash-consistent: the disks as a power cut would leave them.
    Crash,
    /// App-consistent: taken with applications quiesced (needs the agent's freeze and hooks).
    App,
}

#[derive(Args)]
struct ReplicateArgs {
    /// Disks of one VM: raw image files or block devices. All share each point.
    #[arg(required = true)]
    sources: Vec<PathBuf>,
    /// The store: a directory (created if missing or empty), or azure://ACCOUNT/CONTAINER
    /// (credentials from AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY,
    /// or AZURE_STORAGE_SAS_TOKEN).
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: StoreLocation,
    /// Azure only: upload only sealed segments (deduped, compressed, encrypted — the WAN bytes);
    /// `ferry apply` near the store writes the replicas. Without it (direct mode) this process
    /// writes the page blobs itself.
    #[arg(long)]
    split: bool,
    /// Run once (sync + one point) and exit.
    #[arg(long)]
    once: bool,
    /// Kind of point to cut.
    #[arg(long, value_enum, default_value = "crash")]
    point: Kind,
    /// Time between points without --once (at least 1s).
    #[arg(long, default_value = "30s", value_parser = units::parse_interval)]
    interval: Duration,
    /// Name of the protected machine. Default: the first SOURCE's file name without extension.
    #[arg(long)]
    vm: Option<String>,
    /// Name of each disk, once per SOURCE in order. Default: each SOURCE's file name without extension.
    #[arg(long = "disk")]
    disks: Vec<String>,
    #[command(flatten)]
    key: KeyArgs,
    /// Cache directory (durable staging). Default: /var/lib/ferry/cache/STORE-ID as root, else
    /// ~/.local/state/ferry/cache/STORE-ID.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Cache quota; above it, scanning waits for the pipeline (e.g. 4GiB, 512MiB).
    #[arg(long, default_value = "4GiB", value_parser = units::parse_size)]
    cache_size: u64,
    /// Worker threads for hashing, compression and encryption. Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// zstd level for stored chunks (1 = fastest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(-7..=19))]
    zstd_level: i32,
    /// Azure: cap on upload bandwidth, e.g. 50MiB/s or 400Mbit/s (token bucket). Default: unlimited.
    #[arg(long, value_parser = units::parse_rate)]
    rate_limit: Option<u64>,
    /// Keep recovery points this long (e.g. 24h, 7d); older ones and the data only they need are
    /// deleted after each run. The newest point is never deleted. `0` keeps everything.
    #[arg(long, default_value = "24h", value_parser = units::parse_retention)]
    retention: Duration,
    /// Print a JSON summary of each run on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RestoreArgs {
    /// The store: a directory, or azure://ACCOUNT/CONTAINER.
    #[arg(long, env = "FERRY_STORE", value_parser = parse_store)]
    store: StoreLocation,
    /// Point id (or a unique prefix), `latest`, or `latest-app`.
    #[arg(long)]
    point: PointSelector,
    /// VM to restore (needed when the store holds several).
    #[arg(long)]
    vm: Option<String>,
    /// Disk to restore (needed when the point has several).
    #[arg(long)]
    disk: Option<String>,
    /// Output: a file (raw image, or fixed VHD if it ends in `.vhd`), or, with an Azure store,
    /// azure://ACCOUNT/CONTAINER/PATH.vhd — a new page blob made by server-side copy of the point.
    #[arg(long)]
    out: String,
    /// Re-read the output and check it against the point's blake3.
    #[arg(long)]
    verify: bool,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    key: KeyArgs,
    /// Worker threads. Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

/// glibc's allocator, tuned for moving 64 KiB records between threads (connections, the
/// cache's committer, the drain and its workers): a few arenas instead of 8 per core, and a fixed
/// mmap threshold, so buffers of 256 KiB and more (segments, read-ahead) go back to the system
/// when freed instead of staying in an arena. See docs/PERFORMANCE.md ("Memory").
fn tune_allocator() {
    // SAFETY: mallopt only sets glibc's allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let mut cli = Cli::parse();
    if let Cmd::Serve(a) = cli.cmd {
        // The config file may turn on JSON logs: read it before logging starts.
        return match a.config.load() {
            Ok(cfg) => server::serve(a, cfg, cli.log_json),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code() as u8)
            }
        };
    }
    init_logging(cli.log_json);
    let cli_cmd = match cli.cmd {
        Cmd::Passphrase {
            cmd:
                PassphraseCmd::Show {
                    state_dir,
                    config,
                    fingerprint,
                },
        } => return server::passphrase_show(state_dir, config, fingerprint),
        Cmd::Appliance {
            cmd: appliance::ApplianceCmd::Configure(a),
        } => return appliance::configure(a),
        Cmd::Key { cmd } => return appliance::key(cmd),
        other => other,
    };
    cli.cmd = cli_cmd;
    if let Some(code) = remote::through_server(&mut cli.cmd) {
        return ExitCode::from(code);
    }
    let r = match cli.cmd {
        Cmd::Replicate(a) => replicate(a),
        Cmd::Points {
            cmd: PointsCmd::List { store, vm, json },
        } => points_list(store, vm, json),
        Cmd::Restore(a) => restore(a),
        Cmd::Failover(a) => failover_cmd(a),
        Cmd::Failback(a) => failback::run(failback::Args {
            vm: a.vm,
            from: a.from,
            to: a.to,
            verify: a.verify,
            dry_run: a.dry_run,
            json: a.json,
            state_dir: a.state_dir,
        }),
        Cmd::CompleteMigration(a) => failover::complete_migration(failover::CompleteArgs {
            store: a.store,
            key_file: a.key.key_file.unwrap_or_else(ferry_job::default_key_file),
            vm: a.vm,
            force: a.force,
            json: a.json,
            state_dir: a.state_dir,
            wait: a.wait,
        }),
        Cmd::Apply(a) => apply(a),
        Cmd::Serve(_)
        | Cmd::Appliance { .. }
        | Cmd::Key { .. }
        | Cmd::Passphrase {
            cmd: PassphraseCmd::Show { .. },
        } => {
            unreachable!("handled above")
        }
        operator => return ExitCode::from(run_operator(operator)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// The operator's commands on a process server (status, throttle, policy, events, agents, vms,
/// passphrase rotate): run here on its state directory, or inside the running server for a
/// client of its admin socket ([`remote`]). Returns the exit status.
fn run_operator(cmd: Cmd) -> u8 {
    let r = match cmd {
        Cmd::Status(a) => match server::status_cmd(a) {
            Ok(server::StatusOutcome::Ok) => Ok(()),
            Ok(server::StatusOutcome::Critical) => return 3,
            Err(e) => Err(e),
        },
        Cmd::Passphrase {
            cmd: PassphraseCmd::Rotate { at },
        } => admin::passphrase_rotate(at.state_dir, at.config),
        Cmd::Agents {
            cmd: AgentsCmd::List { at, json },
        } => admin::agents_list(at.state_dir, at.config, json),
        Cmd::Agents {
            cmd: AgentsCmd::Revoke { id, at },
        } => admin::agents_revoke(at.state_dir, at.config, &id),
        Cmd::Agents {
            cmd: AgentsCmd::Token { vm, expires, at },
        } => admin::agents_token(at.state_dir, at.config, &vm, expires),
        Cmd::Vms {
            cmd: VmsCmd::List { at, json },
        } => admin::vms_list(at.state_dir, at.config, json),
        Cmd::Vms {
            cmd: VmsCmd::Move { vm, to, at },
        } => admin::vms_move(at.state_dir, at.config, &vm, &to),
        Cmd::Vms {
            cmd: VmsCmd::Release { vm, store, at },
        } => admin::vms_release(at.state_dir, at.config, &vm, store),
        Cmd::Throttle {
            cmd: ThrottleCmd::Set { rate, vm, link, at },
        } => throttle::set(
            at.state_dir,
            at.config,
            link.into(),
            vm.as_deref(),
            ferry_serve::throttle::Schedule::constant(rate),
        ),
        Cmd::Throttle {
            cmd: ThrottleCmd::Schedule { spec, vm, link, at },
        } => throttle::set(at.state_dir, at.config, link.into(), vm.as_deref(), spec),
        Cmd::Throttle {
            cmd: ThrottleCmd::Weight { weight, vm, at },
        } => throttle::weight(at.state_dir, at.config, &vm, weight),
        Cmd::Throttle {
            cmd: ThrottleCmd::Show { json, at },
        } => throttle::show(at.state_dir, at.config, json),
        Cmd::Policy {
            cmd:
                PolicyCmd::Set {
                    vm,
                    rpo_threshold,
                    retention,
                    app_every,
                    app_retention,
                    crash_every,
                    thin,
                    dry_run,
                    store,
                    at,
                },
        } => policy::set(
            at.state_dir,
            at.config,
            vm.as_deref(),
            ferry_serve::policy::Fields {
                rpo_threshold,
                retention,
                app_every,
                app_retention,
                crash_every,
                thin,
            },
            dry_run,
            store,
        ),
        Cmd::Policy {
            cmd:
                PolicyCmd::Show {
                    vm,
                    store,
                    json,
                    at,
                },
        } => policy::show(at.state_dir, at.config, vm.as_deref(), store, json),
        Cmd::Events {
            since,
            vm,
            kind,
            json,
            at,
        } => events::events(
            at.state_dir,
            at.config,
            since,
            vm.as_deref(),
            kind.as_deref(),
            json,
        ),
        Cmd::Serve(_)
        | Cmd::Appliance { .. }
        | Cmd::Key { .. }
        | Cmd::Passphrase {
            cmd: PassphraseCmd::Show { .. },
        }
        | Cmd::Replicate(_)
        | Cmd::Points { .. }
        | Cmd::Restore(_)
        | Cmd::Failover(_)
        | Cmd::CompleteMigration(_)
        | Cmd::Failback(_)
        | Cmd::Apply(_) => {
            errln!("error: not an operator command");
            return 2;
        }
    };
    match r {
        Ok(()) => 0,
        Err(e) => {
            errln!("error: {e}");
            e.exit_code() as u8
        }
    }
}

/// Whether log lines may carry colour escapes: only on a terminal, and never with `NO_COLOR` set
/// (<https://no-color.org>); journald and files get plain text.
fn log_colors() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

pub(crate) fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(log_colors());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn replicate(a: ReplicateArgs) -> Result<(), JobError> {
    let vm =
        a.vm.clone()
            .unwrap_or_else(|| ferry_job::disk_name_from_path(&a.sources[0]));
    let disks = if a.disks.is_empty() {
        a.sources
            .iter()
            .map(|s| ferry_job::disk_name_from_path(s))
            .collect()
    } else if a.disks.len() == a.sources.len() {
        a.disks.clone()
    } else {
        return Err(JobError::Usage(format!(
            "{} --disk names for {} SOURCEs; give one --disk per SOURCE, in order",
            a.disks.len(),
            a.sources.len()
        )));
    };
    let key_file = a
        .key
        .key_file
        .clone()
        .unwrap_or_else(ferry_job::default_key_file);
    let cache_dir = match &a.cache_dir {
        Some(d) => d.clone(),
        None => {
            // The cache belongs to one store: name it by the store id (after creating the store).
            let store = ferry_job::open_store(&a.store.local_dir(), &key_file, true)?;
            ferry_job::default_cache_root().join(store.store_id())
        }
    };
    let threads = threads(a.threads);
    let o = ReplicateOptions {
        sources: a.sources.clone(),
        vm,
        disks,
        store: a.store.clone(),
        split: a.split,
        key_file,
        cache_dir,
        cache_size: a.cache_size,
        kind: match a.point {
            Kind::Crash => PointKind::Crash,
            Kind::App => PointKind::App,
        },
        pipeline: ferry_pipeline::PipelineConfig {
            threads,
            zstd_level: a.zstd_level,
            ..Default::default()
        },
        group_commit: 64 << 20,
        retention: (!a.retention.is_zero()).then_some(a.retention),
        rate_limit: a.rate_limit,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| JobError::Usage(format!("cannot install signal handler: {e}")))?;
    }
    let progress = progress::Bars::new();
    // A continuous run owns the store for its whole life (no other writer between its cycles);
    // readers (restore, points list) never need the lock.
    let held = if a.once {
        None
    } else {
        Some(ferry_job::lock_store(&o)?)
    };
    loop {
        let started = Instant::now();
        let run = match &held {
            Some(l) => ferry_job::replicate_held(&o, &progress, &stop, l),
            None => ferry_job::replicate_once(&o, &progress, &stop),
        };
        match run {
            Ok(r) => print_run(&o, &r, a.json),
            Err(JobError::Stopped) => {
                tracing::info!("stopped by signal before the cut; the next run picks up from here");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if a.once || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let next = started + a.interval;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                tracing::info!("stopping: signal received");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn print_run(o: &ReplicateOptions, r: &ferry_job::RunReport, json: bool) {
    let changed: u64 = r.scans.iter().map(|s| s.1.changed_bytes).sum();
    let read: u64 = r.scans.iter().map(|s| s.1.bytes_read).sum();
    let holes: u64 = r.scans.iter().map(|s| s.1.hole_bytes).sum();
    if json {
        let v = serde_json::json!({
            "vm": o.vm,
            "point": r.point,
            "committed": r.committed.iter().map(|c| serde_json::json!({"vm": c.vm, "point": c.point})).collect::<Vec<_>>(),
            "disks": r.scans.iter().map(|(d, s)| serde_json::json!({
                "name": d, "bytes_read": s.bytes_read, "hole_bytes": s.hole_bytes,
                "changed_chunks": s.changed_chunks,
                "changed_bytes": s.changed_bytes, "zeroed_chunks": s.zeroed_chunks,
                "blake3": s.blake3.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            })).collect::<Vec<_>>(),
            "stored": {
                "data_bytes": r.pipeline.data_bytes, "zero_bytes": r.pipeline.zero_bytes,
                "dedupe_bytes": r.pipeline.dedupe_bytes, "unique_bytes": r.pipeline.unique_bytes,
                "sealed_bytes": r.pipeline.sealed_bytes, "segments": r.pipeline.segments,
                "segment_bytes": r.pipeline.segment_bytes,
            },
            "pruned": {
                "points": r.pruned.points.iter().map(|(vm, id)| serde_json::json!({"vm": vm, "id": id})).collect::<Vec<_>>(),
                "segments": r.pruned.segments, "segment_bytes": r.pruned.segment_bytes,
            },
            "wan_bytes": r.wan_bytes,
            "seconds": r.seconds,
        });
        println!("{v}");
        return;
    }
    match &r.point {
        Some(p) => println!(
            "point {} ({}) of VM {}: read {}{}, changed {}, stored {} in {} segment(s), {:.1}s",
            p.id,
            p.kind,
            o.vm,
            units::human(read - holes),
            if holes > 0 {
                format!(" (and {} of holes, not read)", units::human(holes))
            } else {
                String::new()
            },
            units::human(changed),
            units::human(r.pipeline.segment_bytes),
            r.pipeline.segments,
            r.seconds
        ),
        None => println!("no point was cut"),
    }
}

fn points_list(store: StoreLocation, vm: Option<String>, json: bool) -> Result<(), JobError> {
    // Listing reads manifests only: no key is needed.
    let store = ferry_job::open_recovery(&store, None)?;
    let pts = ferry_job::list_points(store.as_ref(), vm.as_deref())?;
    if json {
        let v: Vec<_> = pts
            .iter()
            .map(|(vm, p)| {
                serde_json::json!({
                    "id": p.id, "vm": vm, "time": p.time, "kind": p.kind,
                    "disks": p.disks,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(());
    }
    if pts.is_empty() {
        println!("no recovery points yet");
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:<22} {:<6} DISKS",
        "ID", "VM", "TIME", "KIND"
    );
    for (vm, p) in pts {
        let disks: Vec<String> = p
            .disks
            .iter()
            .map(|d| format!("{} ({})", d.name, units::human(d.size)))
            .collect();
        println!(
            "{:<24} {:<16} {:<22} {:<6} {}",
            p.id,
            vm,
            p.time,
            p.kind,
            disks.join(", ")
        );
    }
    Ok(())
}

fn restore(a: RestoreArgs) -> Result<(), JobError> {
    let req = RestoreRequest {
        store: a.store,
        key_file: a.key.key_file.unwrap_or_else(ferry_job::default_key_file),
        vm: a.vm,
        disk: a.disk,
        point: a.point,
        out: a.out.clone(),
        verify: a.verify,
        force: a.force,
        threads: threads(a.threads),
    };
    let progress = progress::Bars::new();
    let (vm, disk, point, rep) = ferry_job::restore_point(&req, &progress)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "vm": vm, "disk": disk, "point": point.id, "out": a.out,
                "bytes": rep.bytes, "verified": a.verify,
            })
        );
    } else {
        println!(
            "restored point {} of {vm}/{disk} to {} ({}){}",
            point.id,
            a.out,
            units::human(rep.bytes),
            if a.verify { ", verified" } else { "" }
        );
    }
    Ok(())
}

fn apply(a: ApplyArgs) -> Result<(), JobError> {
    let StoreLocation::Azure { url, .. } = &a.store else {
        return Err(JobError::Usage(
            "ferry apply works on azure:// stores (split mode); a local store is applied as it is written".into(),
        ));
    };
    let key_file = a
        .key
        .key_file
        .clone()
        .unwrap_or_else(ferry_job::default_key_file);
    let key = ferry_job::load_key(&key_file)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| JobError::Usage(format!("cannot install signal handler: {e}")))?;
    }
    let blobs = ferry_job::azure::connect(url)?;
    loop {
        let started = Instant::now();
        let r = ferry_job::remote::apply_all(&blobs, &key, &stop)?;
        if !a.retention.is_zero() {
            ferry_job::remote::prune(&blobs, a.retention)?;
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "points": r.points.iter().map(|(vm, p)| serde_json::json!({"vm": vm, "point": p})).collect::<Vec<_>>(),
                    "segments_read": r.segments_read,
                    "bytes_read": r.bytes_read,
                })
            );
        } else {
            for (vm, p) in &r.points {
                println!("applied point {} ({}) of VM {vm}", p.id, p.kind);
            }
            if r.points.is_empty() {
                println!("nothing new to apply");
            }
        }
        if a.once || stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let next = started + a.interval;
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
