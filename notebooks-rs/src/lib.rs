//! One small program per paper-style figure (`src/bin/figN_*.rs`), each redrawing its figure
//! from a run folder's Parquet and JSON results:
//!
//! ```sh
//! bash notebooks-rs/run.sh fig2 runs/pipeline figures/    # or: all
//! ```
//!
//! The drawing code is `shadowmoe_experiments::figures` (what `plot-figures` runs); a program
//! here is that figure alone, so that it can be read, changed and rerun on its own.

use std::path::PathBuf;

pub use shadowmoe_experiments as experiments;
pub use shadowmoe_trace as trace;

/// The body of a figure program: `figN RUN_DIR [OUT]` (OUT defaults to `figures`).
pub fn figure(name: &str) {
    shadowmoe_experiments::main_with(|| {
        let mut args = std::env::args().skip(1);
        let Some(results) = args.next().map(PathBuf::from) else {
            anyhow::bail!(
                "usage: {name} RUN_DIR [OUT]  (RUN_DIR: the output of experiments/pipeline.sh or bench-sweep)"
            );
        };
        let out = args
            .next()
            .map_or_else(|| PathBuf::from("figures"), PathBuf::from);
        let drawn = shadowmoe_experiments::figures::draw(&results, &out, &[name])?;
        for (stem, r) in drawn {
            match r {
                Ok(()) => println!("{}/{stem}.png, .svg", out.display()),
                Err(why) => anyhow::bail!("{stem}: cannot be drawn from {}: {why}", results.display()),
            }
        }
        Ok(())
    });
}
