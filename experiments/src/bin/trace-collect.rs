//! `trace-collect --model M --dataset datasets/X.jsonl --out traces/X.parquet [...]`: every
//! routing decision of a model over a prompt set, to Parquet.

use clap::Parser;
use shadowmoe_experiments::collect::{CollectArgs, run};

/// Run a model over a prompt dataset and write one row per (request, token, MoE layer).
#[derive(Parser, Debug)]
#[command(name = "trace-collect", version)]
struct Cli {
    #[command(flatten)]
    args: CollectArgs,
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        shadowmoe_engine::init_threads(cli.args.threads)?;
        let c = run(&cli.args, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
        eprintln!(
            "wrote {}: {} requests, {} tokens, {} rows, {:.2} MB ({:.1} bytes/row) in {:.1}s",
            cli.args.out.display(),
            c.requests,
            c.tokens,
            c.summary.rows,
            c.summary.bytes as f64 / 1e6,
            c.summary.bytes as f64 / c.summary.rows.max(1) as f64,
            c.secs
        );
        Ok(())
    });
}
