//! The CLI's progress observer: one indicatif bar with an ETA per running task.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rfid_moe::progress::Progress;

/// Draws a progress bar with an ETA on stderr for every running task; a message about a running
/// task becomes its bar's label, any other message is printed above the bars. Bars disappear when
/// their task finishes; nothing is drawn when stderr is not a terminal (messages still print).
pub struct Bars {
    multi: MultiProgress,
    running: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    /// No bars yet.
    pub fn new() -> Self {
        Self {
            multi: MultiProgress::new(),
            running: Mutex::new(HashMap::new()),
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, ProgressBar>> {
        // A panic while holding the lock leaves the map consistent: keep using it.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }

    fn clear(&self, bar: ProgressBar) {
        bar.finish_and_clear();
        self.multi.remove(&bar);
    }
}

impl Progress for Bars {
    fn start(&self, task: &str, total: u64) {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(Self::style());
        bar.set_message(task.to_string());
        if let Some(previous) = self.running().insert(task.to_string(), bar) {
            self.clear(previous);
        }
    }

    fn advance(&self, task: &str, by: u64) {
        if let Some(bar) = self.running().get(task) {
            bar.inc(by);
        }
    }

    fn message(&self, task: &str, text: &str) {
        if let Some(bar) = self.running().get(task) {
            bar.set_message(text.to_string());
            return;
        }
        if self.multi.is_hidden() || self.multi.println(text).is_err() {
            eprintln!("{text}");
        }
    }

    fn finish(&self, task: &str) {
        let bar = self.running().remove(task);
        if let Some(bar) = bar {
            self.clear(bar);
        }
    }
}

/// Tasks whose messages are warnings about the result, printed even under `--quiet` (`resume`:
/// work of an interrupted run that is recomputed, and why).
const WARNING_TASKS: &[&str] = &["resume"];

/// The `--quiet` observer: no bars and no news, only the warnings of [`WARNING_TASKS`].
pub struct Quiet;

impl Progress for Quiet {
    fn start(&self, _task: &str, _total: u64) {}

    fn advance(&self, _task: &str, _by: u64) {}

    fn message(&self, task: &str, text: &str) {
        if WARNING_TASKS.contains(&task) {
            eprintln!("{text}");
        }
    }

    fn finish(&self, _task: &str) {}
}

/// The observer for a command: [`Quiet`] with `--quiet`, bars otherwise.
pub fn observer(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Quiet)
    } else {
        Box::new(Bars::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::ProgressDrawTarget;

    fn hidden_bars() -> Bars {
        let bars = Bars::new();
        bars.multi.set_draw_target(ProgressDrawTarget::hidden());
        bars
    }

    #[test]
    fn a_bar_runs_from_start_to_finish_of_its_task() {
        let bars = hidden_bars();
        bars.start("layers", 4);
        bars.advance("layers", 3);
        bars.advance("unknown", 1);
        {
            let running = bars.running();
            let bar = &running["layers"];
            assert_eq!((bar.position(), bar.length()), (3, Some(4)));
            assert_eq!(bar.message(), "layers");
        }
        bars.message("layers", "layer 3");
        assert_eq!(bars.running()["layers"].message(), "layer 3");
        bars.start("divergence", 2);
        assert_eq!(bars.running().len(), 2);
        bars.finish("layers");
        bars.finish("never started");
        let running = bars.running();
        assert_eq!(running.keys().collect::<Vec<_>>(), ["divergence"]);
    }

    #[test]
    fn restarting_a_task_replaces_its_bar() {
        let bars = hidden_bars();
        bars.start("layers", 4);
        bars.advance("layers", 4);
        bars.start("layers", 2);
        let running = bars.running();
        assert_eq!(running.len(), 1);
        assert_eq!(
            (running["layers"].position(), running["layers"].length()),
            (0, Some(2))
        );
    }
}
