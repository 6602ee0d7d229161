//! `bench-sweep --trace T --capacity 160..256 ...`: every combination of cache settings,
//! simulated on a trace or run live, into `results.parquet` + `results.csv` in a dated run
//! folder; `bench-sweep calibrate --model M --out FILE` measures this machine for the
//! simulator.

use clap::{Parser, Subcommand};
use shadowmoe_experiments::calibrate::CalibrateArgs;
use shadowmoe_experiments::sweep::{SweepArgs, run};

/// Sweep capacity, pinning, prefetch depth and span, predictor, policy and miss handling.
#[derive(Parser, Debug)]
#[command(
    name = "bench-sweep",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Option<SweepArgs>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure this machine for the simulator: O_DIRECT reads of the model's experts at queue
    /// depths 1..N (and of a random-bytes file), compute per layer, predictor time per call.
    Calibrate(CalibrateArgs),
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        match (cli.command, cli.args) {
            (Some(Command::Calibrate(a)), _) => {
                let cal = shadowmoe_experiments::calibrate::run(&a)?;
                eprintln!(
                    "wrote {}: {} depths, {:.3} ms per MoE layer",
                    a.out.display(),
                    cal.io.depths.len(),
                    cal.compute.layer_ms
                );
            }
            (None, Some(args)) => {
                shadowmoe_engine::init_threads(args.threads)?;
                let out = run(&args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
                eprintln!("wrote {}", out.join("results.parquet").display());
            }
            (None, None) => anyhow::bail!("give the sweep's flags (--capacity …) or `calibrate`"),
        }
        Ok(())
    });
}
