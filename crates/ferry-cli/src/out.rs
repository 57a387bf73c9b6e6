//! Where the operator commands print. Run from a terminal they print to stdout and stderr; run by
//! `ferry serve` for a client of its admin socket (`ferry_serve::admin`) the same lines are
//! captured, on the command's own thread, and sent back as the reply.

use std::cell::RefCell;

thread_local! {
    static CAPTURE: RefCell<Option<(String, String)>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's output captured; returns its result and (stdout, stderr).
pub(crate) fn captured<T>(f: impl FnOnce() -> T) -> (T, String, String) {
    CAPTURE.with(|c| *c.borrow_mut() = Some((String::new(), String::new())));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CAPTURE.with(|c| *c.borrow_mut() = None);
        }
    }
    let reset = Reset;
    let r = f();
    let (o, e) = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(reset);
    (r, o, e)
}

/// Appends to this thread's capture, if one is on: stderr's half when `err`. False: none is.
fn to_capture(err: bool, s: std::fmt::Arguments<'_>) -> bool {
    CAPTURE.with(|c| match c.borrow_mut().as_mut() {
        Some((o, e)) => {
            use std::fmt::Write;
            let _ = if err { e } else { o }.write_fmt(s);
            true
        }
        None => false,
    })
}

/// Writes to stdout, or to the capture.
pub(crate) fn stdout(s: std::fmt::Arguments<'_>) {
    if to_capture(false, s) {
        return;
    }
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(s) {
        // The reader went away (`ferry status --watch | head -1`): stop, as a shell tool killed
        // by SIGPIPE would (status 128 + 13).
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// Writes to stderr, or to the capture.
pub(crate) fn stderr(s: std::fmt::Arguments<'_>) {
    if !to_capture(true, s) {
        use std::io::Write;
        let _ = std::io::stderr().lock().write_fmt(s);
    }
}

/// `println!` that a server-side run captures.
macro_rules! outln {
    () => { $crate::out::stdout(format_args!("\n")) };
    ($($t:tt)*) => { $crate::out::stdout(format_args!("{}\n", format_args!($($t)*))) };
}
/// `print!` that a server-side run captures.
macro_rules! out {
    ($($t:tt)*) => { $crate::out::stdout(format_args!($($t)*)) };
}
/// `eprintln!` that a server-side run captures.
macro_rules! errln {
    () => { $crate::out::stderr(format_args!("\n")) };
    ($($t:tt)*) => { $crate::out::stderr(format_args!("{}\n", format_args!($($t)*))) };
}
