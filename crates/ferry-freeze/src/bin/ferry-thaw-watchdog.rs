//! `ferry-thaw-watchdog`: thaws the filesystems a cut froze if the cut outlives its bound or the
//! agent dies. Started by `ferry_freeze::Freezer`, never by hand; the protocol is in
//! `ferry_freeze::watchdog`.

fn main() {
    std::process::exit(ferry_freeze::watchdog::run(std::env::args_os().collect()));
}
