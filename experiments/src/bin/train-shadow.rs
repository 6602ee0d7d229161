//! `train-shadow --traces traces/X.parquet --depth 4 --top-k 8 --out predictors/X`: the shadow
//! model, trained and evaluated against the baselines.

use clap::Parser;
use shadowmoe_experiments::train_shadow::{ShadowArgs, run};

/// Train the shadow expert predictor on traces with hidden states; print and write its
/// evaluation next to popularity, previous-token, gate-lookahead and oracle.
#[derive(Parser, Debug)]
#[command(name = "train-shadow", version)]
struct Cli {
    #[command(flatten)]
    args: ShadowArgs,
}

fn main() {
    shadowmoe_experiments::main_with(|| {
        let cli = Cli::parse();
        print!("{}", run(&cli.args)?);
        Ok(())
    });
}
