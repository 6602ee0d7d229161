//! Stop strings over streamed text: text that could still become a stop string is held back
//! until it cannot, so a client never sees part of one.

/// What one piece of text gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text that is safe to send now (maybe empty).
    Emit(String),
    /// A stop string was found: the text before it, and which one.
    Stop(String, String),
}

/// Watches the generated text for any of the stop strings.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds a piece of generated text.
    pub fn push(&mut self, piece: &str) -> Step {
        self.held.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = found {
            let stop = stop.clone();
            let before = self.held[..at].to_string();
            self.held.clear();
            return Step::Stop(before, stop);
        }
        // Hold back the longest tail that begins some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .filter(|&k| s.is_char_boundary(k))
                    .find(|&k| self.held.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Step::Emit(out)
    }

    /// The text still held back when generation ends without a stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_possible_stop_and_cuts_at_it() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("abc\n"), Step::Emit("abc".into()));
        assert_eq!(m.push("x"), Step::Emit("\nx".into()));
        assert_eq!(m.push("E"), Step::Emit(String::new()));
        assert_eq!(m.push("NDtail"), Step::Stop(String::new(), "END".into()));
    }

    #[test]
    fn earliest_stop_wins_and_rest_is_flushed() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxab"), Step::Stop("xx".into(), "a".into()));
        let mut m = StopMatcher::new(vec!["zz".into(), String::new()]);
        assert_eq!(m.push("az"), Step::Emit("a".into()));
        assert_eq!(m.finish(), "z");
    }
}
