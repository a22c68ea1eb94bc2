//! Progress of the long phases (loading a model, Fisher estimation, evaluation, export,
//! training): an `indicatif` bar with its ETA on a terminal, and plain lines when stderr is not
//! one (CI, pipes, an experiment's child processes): once the phase has run 10 seconds, then
//! every 10% or 30 seconds, whichever comes later, and at the end, so that logs stay short and
//! a phase over in seconds prints nothing of its own.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// One phase's progress over `total` units.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    unit: &'static str,
    total: u64,
    pos: u64,
    base: u64,
    start: Instant,
    last: Option<(Instant, u64)>,
    quiet: bool,
    eager: bool,
}

/// Whether progress draws bars (stderr is a terminal).
pub fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

impl Progress {
    /// A phase called `label` of `total` `unit`s (`total` 0: unknown, a spinner).
    pub fn new(label: &str, total: u64, unit: &'static str) -> Self {
        Self::with_terminal(label, total, unit, on_terminal())
    }

    /// A phase that shows nothing (a caller that reports on its own).
    pub fn hidden() -> Self {
        let mut p = Self::with_terminal("", 0, "", false);
        p.quiet = true;
        p
    }

    /// As [`Progress::new`], the terminal decided by the caller (tests, `--quiet` callers).
    pub fn with_terminal(label: &str, total: u64, unit: &'static str, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = match total {
                0 => ProgressBar::new_spinner(),
                n => ProgressBar::new(n),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            let template = match total {
                0 => "{spinner} {prefix} {pos} {msg} [{elapsed_precise}]".to_string(),
                _ => {
                    format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} [{{elapsed_precise}}, ETA {{eta}}]")
                }
            };
            let style = ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            label: label.to_string(),
            unit,
            total,
            pos: 0,
            base: 0,
            start: Instant::now(),
            last: None,
            quiet: false,
            eager: false,
        }
    }

    /// Plain lines from the first update on, not only once the phase has run 10 seconds (the
    /// training loop, whose first step says the run is under way).
    pub fn eager(mut self) -> Self {
        self.eager = true;
        self
    }

    /// Moves to `pos` units done, with a short message (loss, rate) beside the count.
    pub fn set(&mut self, pos: u64, msg: &str) {
        self.pos = pos;
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.set_message(msg.to_string());
            return;
        }
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let due = match self.last {
            // A phase over within 10 seconds prints nothing (its caller prints the result).
            None => self.eager || now.duration_since(self.start) >= Duration::from_secs(10),
            Some((t, p)) => {
                let tenth = (self.total / 10).max(1);
                now.duration_since(t) >= Duration::from_secs(30) && pos >= p + tenth || pos == self.total
            }
        };
        if due && Some(pos) != self.last.map(|l| l.1) {
            self.last = Some((now, pos));
            eprintln!("{}", self.line(msg));
        }
    }

    /// Runs `f` with the bar hidden (another phase's bar or lines inside this one).
    pub fn suspend<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    /// Prints a line above the bar (or just prints it without one).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Starts the count at `pos` (a resumed run): the ETA counts only what this process does.
    pub fn resume_at(&mut self, pos: u64) {
        self.pos = pos;
        self.base = pos;
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.reset_eta();
        }
    }

    /// Adds `n` units.
    pub fn inc(&mut self, n: u64, msg: &str) {
        self.set(self.pos + n, msg);
    }

    /// The plain line: `label: pos/total unit (pct%) msg, elapsed, ETA`.
    pub fn line(&self, msg: &str) -> String {
        let el = self.start.elapsed().as_secs_f64();
        let mut s = format!("{}: {}", self.label, self.pos);
        if self.total > 0 {
            s += &format!(
                "/{} {} ({:.0}%)",
                self.total,
                self.unit,
                100.0 * self.pos as f64 / self.total as f64
            );
        } else {
            s += &format!(" {}", self.unit);
        }
        if !msg.is_empty() {
            s += &format!("  {msg}");
        }
        s += &format!("  {}", fmt_secs(el));
        if self.total > 0 && self.pos > self.base && self.pos < self.total {
            let eta = el / (self.pos - self.base) as f64 * (self.total - self.pos) as f64;
            s += &format!(", ETA {}", fmt_secs(eta));
        }
        s
    }

    /// Ends the phase: the bar is cleared (its caller prints the result), a plain log gets its
    /// last line if it has not had it.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
            return;
        }
        if !self.quiet && self.last.is_some_and(|l| l.1 != self.pos) {
            eprintln!("{}", self.line("done"));
        }
        self.last = Some((Instant::now(), self.pos));
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// `1m05s`, or `1h02m` past an hour.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_where_the_phase_is() {
        let mut p = Progress::with_terminal("scoring", 200, "items", false);
        p.pos = 50;
        let l = p.line("12 items/s");
        assert!(l.starts_with("scoring: 50/200 items (25%)  12 items/s"), "{l}");
        assert!(l.contains("ETA"), "{l}");
        p.pos = 200;
        assert!(!p.line("").contains("ETA"));
    }
}
