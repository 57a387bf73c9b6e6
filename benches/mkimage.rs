//! `ferry-mkimage`: makes and mutates the deterministic mixed images of `benches/e2e.sh`.
//!
//! ```text
//! ferry-mkimage create PATH BYTES [SEED]            write a mixed image (see ferry_benches)
//! ferry-mkimage rewrite PATH ROUND FRACTION [SEED]  overwrite FRACTION of its chunks with random data
//! ferry-mkimage restore PATH ROUND FRACTION [SEED]  undo that rewrite (original content back)
//! ```
//! Both print one JSON object on stdout describing what they did.

use std::path::PathBuf;
use std::process::ExitCode;

use ferry_benches::{census, restore_chunks, rewrite_chunks, write_image, CHUNK, DEFAULT_SEED};

fn usage() -> ExitCode {
    eprintln!(
        "usage: ferry-mkimage create PATH BYTES [SEED]\n       ferry-mkimage rewrite|restore PATH ROUND FRACTION [SEED]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seed = |i: usize| args.get(i).map_or(Ok(DEFAULT_SEED), |s| s.parse::<u64>());
    let result = match args.first().map(String::as_str) {
        Some("create") if (3..=4).contains(&args.len()) => {
            let (Ok(bytes), Ok(seed)) = (args[2].parse::<u64>(), seed(3)) else {
                return usage();
            };
            let path = PathBuf::from(&args[1]);
            let t = std::time::Instant::now();
            write_image(&path, seed, bytes).map(|()| {
                let [random, text, zero, repeat] = census(seed, bytes.div_ceil(CHUNK as u64));
                format!(
                    r#"{{"path":{:?},"bytes":{bytes},"seed":{seed},"chunks":{{"random":{random},"text":{text},"zero":{zero},"repeat":{repeat}}},"seconds":{:.3}}}"#,
                    path.display().to_string(),
                    t.elapsed().as_secs_f64()
                )
            })
        }
        Some(cmd @ ("rewrite" | "restore")) if (4..=5).contains(&args.len()) => {
            let (Ok(round), Ok(fraction), Ok(seed)) =
                (args[2].parse::<u64>(), args[3].parse::<f64>(), seed(4))
            else {
                return usage();
            };
            let f = if cmd == "rewrite" {
                rewrite_chunks
            } else {
                restore_chunks
            };
            f(&PathBuf::from(&args[1]), seed, round, fraction).map(|picks| {
                format!(
                    r#"{{"action":"{cmd}","round":{round},"chunks":{},"bytes":{}}}"#,
                    picks.len(),
                    picks.len() * CHUNK
                )
            })
        }
        _ => return usage(),
    };
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-mkimage: {}: {e}", args[1]);
            ExitCode::FAILURE
        }
    }
}
