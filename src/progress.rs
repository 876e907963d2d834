//! Progress reporting without a user interface: long-running library calls tell a [`Progress`]
//! observer what they are doing, and the front end (the `rfid-moe` CLI draws bars with an ETA)
//! decides how to show it. [`Silent`] shows nothing.

/// Observer of long-running library calls. Work is reported as named tasks: a task is started
/// with its number of steps, advanced, and finished. Several tasks may run at once (a sweep runs
/// compressions and evaluations), so every call names its task. Implementations must accept
/// calls for tasks they do not know (ignore them) and may be called from several threads.
pub trait Progress: Send + Sync {
    /// Task `task` begins; it will take `total` steps.
    fn start(&self, task: &str, total: u64);
    /// `by` more steps of `task` are done.
    fn advance(&self, task: &str, by: u64);
    /// News about `task`: while it runs, what it is doing now (e.g. `layer 3`, shown beside its
    /// bar); for a task not running, a line for the user (a result or a milestone).
    fn message(&self, task: &str, text: &str);
    /// `task` is over (also when it ends early, e.g. on an error).
    fn finish(&self, task: &str);
}

/// A [`Progress`] observer that reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _task: &str, _total: u64) {}
    fn advance(&self, _task: &str, _by: u64) {}
    fn message(&self, _task: &str, _text: &str) {}
    fn finish(&self, _task: &str) {}
}

/// A started task of a [`Progress`] observer, finished when dropped (so an early `?` return
/// still closes it).
pub struct Task<'a> {
    progress: &'a dyn Progress,
    name: String,
}

impl<'a> Task<'a> {
    /// Starts `name` on `progress` with `total` steps.
    pub fn start(progress: &'a dyn Progress, name: impl Into<String>, total: u64) -> Self {
        let name = name.into();
        progress.start(&name, total);
        Self { progress, name }
    }

    /// Reports `by` more steps done.
    pub fn advance(&self, by: u64) {
        self.progress.advance(&self.name, by);
    }

    /// Reports a line for the user about this task.
    pub fn message(&self, text: &str) {
        self.progress.message(&self.name, text);
    }
}

impl Drop for Task<'_> {
    fn drop(&mut self) {
        self.progress.finish(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every call as a line.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Progress for Recorder {
        fn start(&self, task: &str, total: u64) {
            self.0.lock().unwrap().push(format!("start {task} {total}"));
        }
        fn advance(&self, task: &str, by: u64) {
            self.0.lock().unwrap().push(format!("advance {task} {by}"));
        }
        fn message(&self, task: &str, text: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("message {task} {text}"));
        }
        fn finish(&self, task: &str) {
            self.0.lock().unwrap().push(format!("finish {task}"));
        }
    }

    #[test]
    fn task_reports_start_steps_messages_and_finishes_once_when_dropped() {
        let recorder = Recorder::default();
        {
            let task = Task::start(&recorder, "layers", 3);
            task.advance(2);
            task.message("half way");
            task.advance(1);
        }
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [
                "start layers 3",
                "advance layers 2",
                "message layers half way",
                "advance layers 1",
                "finish layers",
            ]
        );
    }

    #[test]
    fn task_finishes_on_an_early_error_return() {
        fn fails(progress: &dyn Progress) -> Result<(), String> {
            let _task = Task::start(progress, "work", 10);
            Err("stopped".into())
        }
        let recorder = Recorder::default();
        assert!(fails(&recorder).is_err());
        assert_eq!(
            *recorder.0.lock().unwrap(),
            ["start work 10", "finish work"]
        );
    }
}
