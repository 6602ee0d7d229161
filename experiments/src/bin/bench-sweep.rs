//! `bench-sweep --trace T --capacity 160..256 ...`: every combination of cache settings,
//! simulated on a trace or run live, into `results.parquet` + `results.csv` in a dated run
//! folder; `bench-sweep calibrate --model M --out FILE` measures this machine for the
//! simulator.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shadowmoe_experiments::calibrate::CalibrateArgs;
use shadowmoe_experiments::slurm::{Kind, SlurmArgs, report, write_job};
use shadowmoe_experiments::sweep::{SweepArgs, merge, out_dir, preflight, run};

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
    #[command(flatten)]
    slurm: SlurmArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure this machine for the simulator: O_DIRECT reads of the model's experts at queue
    /// depths 1..N (and of a random-bytes file), compute per layer, predictor time per call.
    Calibrate(Box<CalibrateArgs>),
    /// Check the shards a `--slurm N --out DIR` job array wrote (DIR/shards/I/) and join them
    /// into DIR/results.parquet (+ CSV, summary, manifest, figures): the rows one process
    /// running the whole sweep would have written.
    Merge {
        /// The run folder given to --out with --slurm.
        dir: PathBuf,
    },
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
            (Some(Command::Merge { dir }), _) => {
                let m = merge(&dir)?;
                eprintln!("wrote {}: {} shards, {} rows", m.path.display(), m.shards, m.rows);
            }
            (None, Some(args)) => {
                if let Some(plan) = cli.slurm.plan(args.shard.as_deref())? {
                    preflight(&args)?;
                    let out = out_dir(&args);
                    let (script, job) = write_job(Kind::BenchSweep, &plan, &out)?;
                    eprintln!(
                        "{}",
                        report(Kind::BenchSweep, &plan, &script, job.as_deref(), &out)
                    );
                    return Ok(());
                }
                shadowmoe_engine::init_threads(args.threads)?;
                let out = run(&args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
                eprintln!("wrote {}", out.join("results.parquet").display());
            }
            (None, None) => anyhow::bail!("give the sweep's flags (--capacity …) or `calibrate`"),
        }
        Ok(())
    });
}
