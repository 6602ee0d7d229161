//! `plot-figures --results RUN_DIR --out figures/`: redraws the paper-style figures (PNG and
//! SVG) from a run folder's results alone.

use std::path::PathBuf;

use clap::Parser;
use shadowmoe_experiments::figures::{FIGURES, draw};

/// Draw the figures of a run folder (experiments/pipeline.sh or bench-sweep output).
#[derive(Parser, Debug)]
#[command(name = "plot-figures", version)]
struct Cli {
    /// Run folder: sweep folders with results.parquet, shadow/report.json, profile.json,
    /// stats/stats.json.
    #[arg(long)]
    results: PathBuf,
    /// Where the figures go.
    #[arg(long, default_value = "figures")]
    out: PathBuf,
    /// Only these figures (fig1, fig2, ...; comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        for o in &cli.only {
            if !FIGURES.iter().any(|(stem, _)| stem.starts_with(o.as_str())) {
                anyhow::bail!("--only: unknown figure `{o}` (expected fig1 … fig8)");
            }
        }
        let only: Vec<&str> = cli.only.iter().map(String::as_str).collect();
        let drawn = draw(&cli.results, &cli.out, &only)?;
        for (stem, r) in &drawn {
            let what = FIGURES.iter().find(|f| f.0 == stem).map_or("", |f| f.1);
            match r {
                Ok(()) => println!("{}/{stem}.{{png,svg}}  {what}", cli.out.display()),
                Err(why) => println!("skipped {stem}: {why}"),
            }
        }
        if drawn.iter().all(|(_, r)| r.is_err()) {
            anyhow::bail!(
                "--results: no figure could be drawn from {}",
                cli.results.display()
            );
        }
        Ok(())
    });
}
