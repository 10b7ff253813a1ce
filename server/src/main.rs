//! The `shoal-server` binary: the allocator, then the command (`shoal_server::cli`).

// jemalloc returns freed memory to the system within seconds (background purging), so a replica's
// RSS falls back once idle sessions are gone; glibc's malloc keeps it (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    shoal_server::cli::main()
}
