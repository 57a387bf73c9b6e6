//! Progress: a bar on a terminal, a log line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Bars {
    tty: bool,
    state: Mutex<State>,
}

struct State {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    started: Instant,
    last_log: Instant,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                bar: None,
                what: String::new(),
                total: 0,
                started: Instant::now(),
                last_log: Instant::now(),
            }),
        }
    }
}

impl ferry_job::Progress for Bars {
    fn start(&self, what: &str, total: u64) {
        let mut st = self.state.lock().expect("poisoned");
        st.what = what.to_owned();
        st.total = total;
        st.started = Instant::now();
        st.last_log = Instant::now();
        if self.tty {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(what.to_owned());
            st.bar = Some(b);
        }
    }

    fn update(&self, done: u64) {
        let mut st = self.state.lock().expect("poisoned");
        if let Some(b) = &st.bar {
            b.set_position(done);
        } else if st.last_log.elapsed() >= Duration::from_secs(5) {
            st.last_log = Instant::now();
            let secs = st.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                "{}: {} of {} MiB ({:.0} MiB/s)",
                st.what,
                done >> 20,
                st.total >> 20,
                done as f64 / secs / 1048576.0
            );
        }
    }

    fn finish(&self) {
        let mut st = self.state.lock().expect("poisoned");
        if let Some(b) = st.bar.take() {
            b.finish_and_clear();
        }
    }
}
