//! `trace-collect --model M --dataset datasets/X.jsonl --out traces/X.parquet [...]`: every
//! routing decision of a model over a prompt set, to Parquet; `--slurm N --out DIR` writes the
//! Slurm job array that collects it in N shares, and `trace-collect merge DIR` joins them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shadowmoe_experiments::collect::{CollectArgs, run};
use shadowmoe_experiments::slurm::{Kind, SlurmArgs, report, write_job};

/// Run a model over a prompt dataset and write one row per (request, token, MoE layer).
#[derive(Parser, Debug)]
#[command(
    name = "trace-collect",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Option<CollectArgs>,
    #[command(flatten)]
    slurm: SlurmArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the shards a `--slurm N --out DIR` job array wrote (DIR/shards/I/traces.parquet)
    /// and join them into DIR/traces.parquet: the rows one process would have written.
    Merge {
        /// The run folder given to --out with --slurm.
        dir: PathBuf,
    },
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        let args = match (cli.command, cli.args) {
            (Some(Command::Merge { dir }), _) => {
                let m = shadowmoe_experiments::shards::merge_traces(&dir)?;
                eprintln!("wrote {}: {} shards, {} rows", m.path.display(), m.shards, m.rows);
                return Ok(());
            }
            (None, Some(args)) => args,
            (None, None) => anyhow::bail!("give the collection's flags (--model …) or `merge DIR`"),
        };
        if let Some(plan) = cli.slurm.plan(args.shard.as_deref())? {
            if args.out.extension().is_some_and(|e| e == "parquet") {
                anyhow::bail!(
                    "--out {}: with --slurm, give a run folder (shards go to OUT/shards/I/, the merged trace to OUT/traces.parquet)",
                    args.out.display()
                );
            }
            // What every task would fail on, caught before anything is written.
            shadowmoe_experiments::dataset::load(&args.dataset)?;
            shadowmoe_engine::Checkpoint::open(&args.model)?;
            let (script, job) = write_job(Kind::TraceCollect, &plan, &args.out)?;
            eprintln!(
                "{}",
                report(Kind::TraceCollect, &plan, &script, job.as_deref(), &args.out)
            );
            return Ok(());
        }
        shadowmoe_engine::init_threads(args.threads)?;
        let c = run(&args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
        let per_row = if c.summary.rows > 0 {
            format!("{:.1} bytes/row", c.summary.bytes as f64 / c.summary.rows as f64)
        } else {
            "no rows".to_string()
        };
        eprintln!(
            "wrote {}: {} requests, {} tokens, {} rows, {:.2} MB ({per_row}) in {:.1}s",
            args.out.display(),
            c.requests,
            c.tokens,
            c.summary.rows,
            c.summary.bytes as f64 / 1e6,
            c.secs
        );
        Ok(())
    });
}
