//! The fallback, for real: a seccomp filter on one thread makes `io_uring_setup` fail with `ENOSYS`
//! (as container runtimes' default profiles do). The reader must fall back to buffered `pread`,
//! say why in exactly one `info` line, and still read every chunk correctly.

mod common;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use ferry_read::{ChunkReader, ReadMode, CHUNK_SIZE};

/// Makes `io_uring_setup` fail with `ENOSYS` on the calling thread (and threads it starts), for
/// the rest of its life. Test-only filter: it does not check the syscall ABI (native only).
fn deny_io_uring_on_this_thread() -> io::Result<()> {
    let stmt = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // A = seccomp_data.nr (offset 0)
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        stmt(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_io_uring_setup as u32,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            0,
            0,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `prog` and the `filter` it points to are valid for the call; the kernel copies them.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Collects what the `tracing` formatter writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn without_io_uring_it_falls_back_to_pread_and_says_why_once() {
    const TEST: &str = "without_io_uring_it_falls_back_to_pread_and_says_why_once";
    let size = 20 * CHUNK_SIZE + 777;
    let data = random_bytes(size as usize, 99);
    let file = temp_file_in(Path::new("/var/tmp"), &data);
    let path = file.path().to_owned();
    let log = Captured::default();
    let writer = log.clone();
    let outcome = std::thread::spawn(move || {
        if let Err(e) = deny_io_uring_on_this_thread() {
            return Err(format!("cannot install a seccomp filter: {e}"));
        }
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _log = tracing::subscriber::set_default(subscriber);
        let mut reader = ChunkReader::open(&path, 16).expect("open must fall back, not fail");
        let mode = reader.mode();
        let all: Vec<u64> = (0..size.div_ceil(CHUNK_SIZE)).collect();
        read_and_check(&mut reader, &data, &all);
        read_and_check(&mut reader, &data, &[0, 2, 3, 4, 20]);
        Ok(mode)
    })
    .join()
    .expect("the reader thread panicked");
    let mode = match outcome {
        Ok(mode) => mode,
        Err(why) => {
            skip(TEST, Some(why));
            return;
        }
    };
    match &mode {
        ReadMode::Buffered { why } => assert!(why.contains("io_uring"), "why: {why}"),
        other => panic!("io_uring is denied, yet the mode is {other}"),
    }
    let text =
        String::from_utf8_lossy(&log.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("buffered pread"))
        .collect();
    assert_eq!(lines.len(), 1, "one info line, got: {text}");
    assert!(lines[0].contains("INFO") && lines[0].contains("io_uring is unavailable"));
    eprintln!("fallback logged: {}", lines[0]);
}
