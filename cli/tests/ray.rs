//! A split `compress` fanned out over a Ray cluster by `scripts/ray_compress.py`: a local
//! cluster of two nodes (a head and one worker, one CPU each) runs every step as a Ray task. A
//! unit that fails on every try stops the driver with the unit's error; the driver run again
//! continues from where the run stands; there the Ray worker running the unit is killed by
//! SIGKILL mid-unit, its `rfid-moe` child must die with it, Ray retries the unit, the retry
//! resumes from the unit's journal, and the output must equal a single process's byte for byte.
//! Running the driver again on the finished run does nothing. A unit step given another run's
//! options is refused by name.
//!
//! Needs Ray Core (`scripts/ray-env.sh` installs the pinned version outside the clone on first
//! use, about 300 MB and 15 s) or `RFID_MOE_RAY_BIN=/dir/with/python-and-ray`; skips loudly
//! only when Ray cannot be installed (no network, no wheel for this platform) or
//! `RFID_MOE_SKIP_RAY=1` opts out. Linux only (/proc, prctl).
#![cfg(target_os = "linux")]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SKIP_VAR: &str = "RFID_MOE_SKIP_RAY";
const BIN_VAR: &str = "RFID_MOE_RAY_BIN";
const BINARY: &str = env!("CARGO_BIN_EXE_rfid-moe");
/// The unit whose Ray worker is killed, and the one layer it holds (4 layers in 4 units).
const KILLED_UNIT: usize = 2;
/// Long enough to find and kill the paused unit; the retry resumes past the pause point.
const PAUSE: &str = "pause-ms:15000@layer-committed:2";

/// The directory with Ray's `python` and `ray`, or None when the user opted out.
fn ray_bin(test: &str) -> Option<PathBuf> {
    common::external_tool(
        &common::ExternalTool {
            skip_var: SKIP_VAR,
            path_var: BIN_VAR,
            script: "scripts/ray-env.sh",
            unchecked: "compress split over a Ray cluster (scripts/ray_compress.py)",
            usable: |dir| dir.join("python").exists() && dir.join("ray").exists(),
            skip_if_uninstallable: true,
        },
        test,
    )
}

// A writable copy of the bundled model and an output path, with this file's commands.
use common::ModelCopy as Setup;

impl Setup {
    /// The compress arguments (4 layers, a few windows), with `extra`.
    fn args(&self, extra: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = ["--quiet", "--samples", "8", "--seq-len", "64"]
            .iter()
            .map(OsString::from)
            .collect();
        args.extend([
            "--model".into(),
            self.model.clone().into(),
            "--calibration".into(),
            self.model.join("calibration.txt").into(),
            "--out".into(),
            self.out.clone().into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        args
    }

    fn compress(&self, args: &[OsString]) -> Output {
        Command::new(BINARY)
            .arg("compress")
            .args(args)
            .env_remove("RFID_MOE_FAULT_INJECT")
            .output()
            .unwrap()
    }

    /// The run directory the driver uses by default.
    fn run_dir(&self) -> PathBuf {
        self.root.join("out.run")
    }
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every process: pid → (parent pid, state, command line with spaces for NULs).
fn processes() -> BTreeMap<i32, (i32, char, String)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(entry.path().join("stat")),
            std::fs::read(entry.path().join("cmdline")),
        ) else {
            continue;
        };
        // `pid (comm) state ppid ...`, where comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        out.insert(pid, (ppid, state, cmdline));
    }
    out
}

fn is_gone(pid: i32) -> bool {
    processes()
        .get(&pid)
        .is_none_or(|&(_, state, _)| state == 'Z' || state == 'X')
}

fn sigkill(pid: i32) {
    // SAFETY: sends a signal to a process this test started (directly or through Ray).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// A local Ray cluster whose processes all name `temp_dir` (or descend from one that does);
/// dropped, it kills exactly those by PID (`ray stop` would stop every Ray cluster of the user
/// on this machine), even when the test panicked.
struct Cluster {
    temp_dir: tempfile::TempDir,
    address: String,
}

impl Cluster {
    fn start(ray_bin: &Path) -> Self {
        // Short: Ray puts its sockets under the temporary directory (paths up to 107 bytes).
        let temp_dir = tempfile::Builder::new()
            .prefix("ray")
            .tempdir_in("/tmp")
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            address: format!("127.0.0.1:{port}"),
            temp_dir,
        };
        let port = port.to_string();
        let temp = cluster.temp_dir.path().to_str().unwrap().to_string();
        let head = [
            "start",
            "--head",
            "--port",
            &port,
            "--include-dashboard=false",
        ];
        let worker = ["start", "--address", &cluster.address];
        for (what, args) in [("head", &head[..]), ("worker", &worker[..])] {
            let output = Command::new(ray_bin.join("ray"))
                .args(args)
                .args(["--node-ip-address", "127.0.0.1", "--num-cpus", "1"])
                .args([
                    "--object-store-memory",
                    "100000000",
                    "--disable-usage-stats",
                ])
                .args(["--temp-dir", &temp])
                .env_remove("RFID_MOE_FAULT_INJECT")
                .env_remove("RAY_ADDRESS")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert_success(&output, &format!("ray start ({what} node)"));
        }
        cluster
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let temp = self.temp_dir.path().to_string_lossy().into_owned();
        // Repeated: a process may start a child while its siblings are being killed.
        for _ in 0..5 {
            let all = processes();
            let mut doomed: BTreeSet<i32> = all
                .iter()
                .filter(|(_, (_, state, cmdline))| *state != 'Z' && cmdline.contains(&temp))
                .map(|(&pid, _)| pid)
                .collect();
            loop {
                let children: Vec<i32> = all
                    .iter()
                    .filter(|(pid, (ppid, state, _))| {
                        *state != 'Z' && doomed.contains(ppid) && !doomed.contains(pid)
                    })
                    .map(|(&pid, _)| pid)
                    .collect();
                if children.is_empty() {
                    break;
                }
                doomed.extend(children);
            }
            if doomed.is_empty() {
                break;
            }
            for &pid in &doomed {
                sigkill(pid);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A child process killed when dropped (a driver left running by a failed assertion).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The driver's command: `ray_compress.py --address ADDRESS --units 4 OWN -- ARGS`.
fn driver(ray_bin: &Path, cluster: &Cluster, own: &[&str], args: &[OsString]) -> Command {
    let mut command = Command::new(ray_bin.join("python"));
    command
        .arg(common::repo_root().join("scripts/ray_compress.py"))
        .args(["--address", &cluster.address, "--units", "4"])
        .args(own)
        .arg("--")
        .args(args)
        .env("RFID_MOE_BIN", BINARY)
        .env_remove("RFID_MOE_FAULT_INJECT")
        .env_remove("RAY_ADDRESS")
        .stdin(Stdio::null());
    command
}

/// The pid of the `rfid-moe` process running `--unit unit` of the run at `out`, if any.
fn unit_process(out: &Path, unit: usize) -> Option<i32> {
    let out = out.to_string_lossy();
    let unit = format!(" --unit {unit} ");
    processes()
        .into_iter()
        .find(|(_, (_, state, cmdline))| {
            *state != 'Z'
                && cmdline.starts_with(BINARY)
                && cmdline.contains(" compress ")
                && cmdline.contains(&*out)
                && format!("{cmdline} ").contains(&unit)
        })
        .map(|(pid, _)| pid)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unit given the options of another run is refused, naming the option that differs.
fn a_unit_of_another_run_is_refused(setup: &Setup, args: &[OsString]) {
    let other_run = setup.root.join("other.run");
    let mut other_args = setup.args(&["--ratio", "0.5"]);
    other_args.extend(["--run".into(), other_run.clone().into(), "--plan".into()]);
    assert_success(&setup.compress(&other_args), "planning another run");
    let mut mismatched = args.to_vec();
    mismatched.extend([
        "--run".into(),
        other_run.clone().into(),
        "--unit".into(),
        "0".into(),
    ]);
    let refused = setup.compress(&mismatched);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "must be refused: {stderr}");
    assert!(
        stderr.contains("budget.ratio") && stderr.contains("other.run"),
        "should name the option and the run: {stderr}"
    );
}

/// A step that fails on every try: the driver shows why, keeps the finished units and stops;
/// returns its output.
fn a_failing_step_stops_the_driver(
    ray_bin: &Path,
    cluster: &Cluster,
    setup: &Setup,
    args: &[OsString],
) -> Output {
    let failing = driver(ray_bin, cluster, &["--max-retries", "0"], args)
        .env("RFID_MOE_FAULT_INJECT", format!("factored:{KILLED_UNIT}"))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&failing.stdout),
        String::from_utf8_lossy(&failing.stderr),
    );
    assert_eq!(failing.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("unit {KILLED_UNIT} (apply): FAILED"))
            && stderr.contains(&format!("unit {KILLED_UNIT} (apply) failed"))
            && stderr.contains("killed by signal 6")
            && stderr.contains("run the driver again"),
        "{stdout}\n{stderr}"
    );
    assert!(!setup.out.exists());
    failing
}

/// The driver run again continues with the one unit left, whose Ray worker is killed by PID
/// once the unit committed its layer; returns when, in seconds after the driver started.
fn a_killed_worker_is_retried(
    ray_bin: &Path,
    cluster: &Cluster,
    setup: &Setup,
    args: &[OsString],
) -> f64 {
    let driver_started = Instant::now();
    let (stdout_path, stderr_path) = (setup.root.join("driver.out"), setup.root.join("driver.err"));
    let mut child = KillOnDrop(
        driver(ray_bin, cluster, &[], args)
            .env("RFID_MOE_FAULT_INJECT", PAUSE)
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let driver_log = || {
        format!(
            "driver stdout:\n{}\ndriver stderr:\n{}",
            std::fs::read_to_string(&stdout_path).unwrap_or_default(),
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    };
    // The unit pauses once its layer is committed to its journal, while writing its layers.
    let journal = setup.run_dir().join(format!(
        "units/.unit-{KILLED_UNIT:04}.partial/.resume/layer-{KILLED_UNIT:05}.json"
    ));
    let mut unit = None;
    wait_until(
        "the unit to commit its layer",
        Duration::from_secs(180),
        || {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!(
                    "the driver ended ({status}) before unit {KILLED_UNIT} paused\n{}",
                    driver_log()
                );
            }
            unit = unit_process(&setup.out, KILLED_UNIT).filter(|_| journal.exists());
            unit.is_some()
        },
    );
    let unit = unit.unwrap();
    let worker = processes()[&unit].0;
    let worker_cmdline = processes()
        .get(&worker)
        .map(|p| p.2.clone())
        .unwrap_or_default();
    assert!(
        worker_cmdline.starts_with("ray::"),
        "the unit's parent should be a Ray worker: {worker} `{worker_cmdline}`"
    );
    sigkill(worker);
    let killed_after_s = driver_started.elapsed().as_secs_f64();
    // PR_SET_PDEATHSIG: the unit dies with its worker instead of running on beside the retry.
    wait_until(
        "the unit to die with its worker",
        Duration::from_secs(10),
        || is_gone(unit),
    );

    wait_until("the driver", Duration::from_secs(240), || {
        child.0.try_wait().unwrap().is_some()
    });
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "the driver failed ({status})\n{}",
        driver_log()
    );
    let stdout = std::fs::read_to_string(&stdout_path).unwrap();
    let resumed = format!("unit {KILLED_UNIT} (apply):");
    for step in [resumed.as_str(), "merge:", "done:"] {
        assert!(stdout.contains(step), "no `{step}` line\n{}", driver_log());
    }
    assert!(
        !stdout.contains("offer") && !stdout.contains("unit 0"),
        "{}",
        driver_log()
    );
    println!("{}", driver_log());
    killed_after_s
}

#[test]
fn a_split_run_over_ray_survives_a_killed_worker_and_equals_one_process() {
    let test = "a_split_run_over_ray_survives_a_killed_worker_and_equals_one_process";
    let Some(ray_bin) = ray_bin(test) else {
        return;
    };
    let started = Instant::now();
    let setup = Setup::bundled();
    let args = setup.args(&[]);

    let reference = setup.root.join("reference");
    assert_success(&setup.compress(&args), "the single-process compress");
    // Moved aside: the output path is recorded in compress.toml, so both runs write `out`.
    std::fs::rename(&setup.out, &reference).unwrap();
    let reference_s = started.elapsed().as_secs_f64();
    a_unit_of_another_run_is_refused(&setup, &args);

    let cluster_started = Instant::now();
    let cluster = Cluster::start(&ray_bin);
    let cluster_s = cluster_started.elapsed().as_secs_f64();
    let failing_started = Instant::now();
    let failing = a_failing_step_stops_the_driver(&ray_bin, &cluster, &setup, &args);
    let failing_s = failing_started.elapsed().as_secs_f64();
    let driver_started = Instant::now();
    let killed_after_s = a_killed_worker_is_retried(&ray_bin, &cluster, &setup, &args);
    let driver_s = driver_started.elapsed().as_secs_f64();

    // Four units at once on two one-CPU nodes: both nodes took steps.
    let failing_stdout = String::from_utf8_lossy(&failing.stdout);
    let nodes: BTreeSet<&str> = failing_stdout
        .lines()
        .filter_map(|line| line.split_once("(node ")?.1.split(')').next())
        .collect();
    assert_eq!(nodes.len(), 2, "steps ran on {nodes:?}\n{failing_stdout}");

    common::assert_same_files(&reference, &setup.out);
    let run = setup.run_dir();
    assert!(run.join("run.json").exists());
    for gone in ["inputs", "units"] {
        assert!(!run.join(gone).exists(), "the merge leaves {gone} behind");
    }

    // Running the driver again on the finished run does nothing and succeeds.
    let again_started = Instant::now();
    let again = driver(&ray_bin, &cluster, &[], &args).output().unwrap();
    assert_success(&again, "the driver on a finished run");
    let again_stdout = String::from_utf8_lossy(&again.stdout);
    let steps: Vec<&str> = again_stdout
        .lines()
        .filter(|line| !line.starts_with("Ray cluster at "))
        .collect();
    assert!(
        steps.len() == 1 && steps[0].starts_with("done:"),
        "{again_stdout}"
    );
    common::assert_same_files(&reference, &setup.out);
    let again_s = again_started.elapsed().as_secs_f64();

    drop(cluster);
    println!(
        "reference {reference_s:.1} s; cluster start {cluster_s:.1} s; failing driver \
         {failing_s:.1} s; resumed driver {driver_s:.1} s (worker killed at {killed_after_s:.1} s); \
         driver on the finished run {again_s:.1} s; total {:.1} s",
        started.elapsed().as_secs_f64(),
    );
}
