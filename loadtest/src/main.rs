//! `shoal-loadtest`: drives any MCP URL (see `docs/benchmarks.md`).

fn main() {
    eprintln!("shoal-loadtest: not built yet");
    std::process::exit(2);
}
