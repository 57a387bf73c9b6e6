//! Compiles `src/bpf/tracker.bpf.c` with clang into a BPF object and generates its libbpf-rs
//! skeleton in `OUT_DIR` (nothing generated is committed). The kernel types come from the
//! hand-written CO-RE header `src/bpf/kernel_types.h`, so the build needs neither bpftool nor the
//! build machine's `/sys/kernel/btf/vmlinux`: only clang (any version with BPF atomics, >= 12).
//! Set `FERRY_BPF_CLANG` to use a clang other than the one on `PATH`.

use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/tracker.bpf.c";
const HEADER: &str = "src/bpf/kernel_types.h";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut builder = SkeletonBuilder::new();
    builder.source(SRC).clang_args([
        // BPF atomics (fetch-and-or, fetch-and-add with result) need the v3 instruction set (5.12+).
        "-mcpu=v3", "-Wall", "-Werror",
    ]);
    if let Some(clang) = env::var_os("FERRY_BPF_CLANG") {
        builder.clang(clang);
    }
    if let Err(e) = builder.build_and_generate(out.join("tracker.skel.rs")) {
        // `{:#}` prints the whole anyhow chain, including clang's diagnostics.
        panic!(
            "building the BPF tracker failed (needs clang; Debian: apt-get install clang): {e:#}"
        );
    }
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed={HEADER}");
    println!("cargo:rerun-if-env-changed=FERRY_BPF_CLANG");
}
