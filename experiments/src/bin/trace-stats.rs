//! `trace-stats --trace traces/X.parquet [--out DIR] [--profile PATH]`: routing statistics and
//! the expert profile of a trace.

use clap::Parser;
use shadowmoe_experiments::trace_stats::{StatsArgs, run};

/// Per-layer expert frequency, entropy, skew, reuse and co-activation of a trace; writes the
/// expert profile that `--pin` reads.
#[derive(Parser, Debug)]
#[command(name = "trace-stats", version)]
struct Cli {
    #[command(flatten)]
    args: StatsArgs,
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        print!("{}", run(&cli.args)?);
        Ok(())
    });
}
