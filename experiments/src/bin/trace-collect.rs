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
        let per_row = if c.summary.rows > 0 {
            format!("{:.1} bytes/row", c.summary.bytes as f64 / c.summary.rows as f64)
        } else {
            "no rows".to_string()
        };
        eprintln!(
            "wrote {}: {} requests, {} tokens, {} rows, {:.2} MB ({per_row}) in {:.1}s",
            cli.args.out.display(),
            c.requests,
            c.tokens,
            c.summary.rows,
            c.summary.bytes as f64 / 1e6,
            c.secs
        );
        Ok(())
    });
}
