//! `bench-sweep --trace T --capacity 160..256 ...`: every combination of cache settings,
//! simulated on a trace, into `results.parquet` + `results.csv` in a dated run folder.

use clap::Parser;
use shadowmoe_experiments::sweep::{SweepArgs, run};

/// Sweep capacity, pinning, prefetch depth, predictor, policy and miss handling.
#[derive(Parser, Debug)]
#[command(name = "bench-sweep", version)]
struct Cli {
    #[command(flatten)]
    args: SweepArgs,
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        let out = run(&cli.args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
        eprintln!("wrote {}", out.join("results.parquet").display());
        Ok(())
    });
}
