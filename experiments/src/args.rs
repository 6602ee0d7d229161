//! The one syntax every binary uses for lists and ranges, and other shared flag parsers.
//!
//! A list is comma-separated items; an item is a value or an inclusive range `A..B`, with an
//! optional step `A..B:STEP`: `160..256:32` is 160,192,224,256; `0,4,8..12` is 0,4,8,9,10,11,12.

use anyhow::{Result, bail};

/// Parses a list of non-negative integers; errors name `flag`.
pub fn parse_list(flag: &str, s: &str) -> Result<Vec<usize>> {
    let expected = "expected values and ranges like 0,4,8 or 160..256 or 160..256:32";
    let num = |t: &str| -> Result<usize> {
        t.trim()
            .parse::<usize>()
            .map_err(|_| anyhow::anyhow!("{flag}: `{t}` is not a non-negative integer ({expected})"))
    };
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        if item.is_empty() {
            bail!("{flag}: empty item in `{s}` ({expected})");
        }
        match item.split_once("..") {
            None => out.push(num(item)?),
            Some((a, rest)) => {
                let (b, step) = match rest.split_once(':') {
                    Some((b, st)) => (b, num(st)?),
                    None => (rest, 1),
                };
                let (a, b) = (num(a)?, num(b)?);
                if step == 0 {
                    bail!("{flag}: step 0 in `{item}` ({expected})");
                }
                if b < a {
                    bail!("{flag}: range `{item}` runs backwards ({expected})");
                }
                out.extend((a..=b).step_by(step));
            }
        }
    }
    Ok(out)
}

/// Parses `I/N` (this process takes every N-th item starting at I).
pub fn parse_shard(flag: &str, s: &str) -> Result<(usize, usize)> {
    let err = || anyhow::anyhow!("{flag}: `{s}` is not I/N with 0 <= I < N (e.g. 0/4)");
    let (i, n) = s.split_once('/').ok_or_else(err)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| err())?,
        n.trim().parse().map_err(|_| err())?,
    );
    if n == 0 || i >= n {
        return Err(err());
    }
    Ok((i, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_ranges() {
        assert_eq!(parse_list("--x", "0,4,8").unwrap(), vec![0, 4, 8]);
        assert_eq!(
            parse_list("--x", "160..256:32").unwrap(),
            vec![160, 192, 224, 256]
        );
        assert_eq!(parse_list("--x", "1,3..5").unwrap(), vec![1, 3, 4, 5]);
        let e = parse_list("--capacity", "8..4").unwrap_err().to_string();
        assert!(e.starts_with("--capacity: range `8..4` runs backwards"), "{e}");
        assert!(
            parse_list("--x", "a")
                .unwrap_err()
                .to_string()
                .contains("`a` is not")
        );
        assert!(parse_list("--x", "1,,2").is_err());
        assert!(parse_list("--x", "1..4:0").is_err());
    }

    #[test]
    fn shards() {
        assert_eq!(parse_shard("--shard", "1/4").unwrap(), (1, 4));
        assert!(parse_shard("--shard", "4/4").is_err());
        assert!(parse_shard("--shard", "x").is_err());
    }
}
