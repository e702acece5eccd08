//! Project tasks. `cargo xtask <task>`; see `--help`.
//!
//! xtask itself depends on nothing that needs the BPF toolchain, so
//! `cargo xtask setup` works on a fresh machine and installs it.

use std::{
    env,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The toolchain pinned in rust-toolchain.toml (preinstalled; its LLVM is 22).
const TOOLCHAIN: &str = "1.95.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// What the project needs from Debian, and how setup proves each package
/// is usable once installed: a program on PATH or a file. A build script
/// failing minutes later on a missing header is what this is here to avoid.
const DEBIAN_PACKAGES: &[(&str, Need)] = &[
    // bpf-linker links against libLLVM 22.
    (
        "llvm-22-dev",
        Need::File("/usr/lib/llvm-22/bin/llvm-config"),
    ),
    ("bpftool", Need::Program("bpftool")),
    // etcd-client's build script runs protoc on etcd's .proto files, which
    // import google/protobuf/*.proto: those come from libprotobuf-dev
    // (protobuf-compiler only recommends it).
    ("protobuf-compiler", Need::Program("protoc")),
    (
        "libprotobuf-dev",
        Need::File("/usr/include/google/protobuf/descriptor.proto"),
    ),
    ("etcd-server", Need::Program("etcd")),
    ("iproute2", Need::Program("ip")),
    ("iperf3", Need::Program("iperf3")),
    ("ethtool", Need::Program("ethtool")),
    ("iputils-ping", Need::Program("ping")),
    ("tcpdump", Need::Program("tcpdump")),
    // The benchmark's kube-proxy comparison programs iptables rules.
    ("iptables", Need::Program("iptables")),
    // The reference CNI plugins: host-local is dataplane-cni's default
    // IPAM, bridge is the stock path the tests keep working.
    (
        "containernetworking-plugins",
        Need::File("/usr/lib/cni/host-local"),
    ),
];

#[derive(Clone, Copy)]
enum Need {
    Program(&'static str),
    File(&'static str),
}

impl Need {
    fn present(self) -> bool {
        match self {
            Need::File(p) => Path::new(p).is_file(),
            Need::Program(name) => find_program(name).is_some(),
        }
    }

    fn describe(self) -> String {
        match self {
            Need::File(p) => p.to_owned(),
            Need::Program(name) => format!("`{name}` on PATH"),
        }
    }
}

/// `name` in PATH, or in the sbin directories a non-login root shell may
/// lack from PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (Debian packages, rust-src,
    /// bpf-linker). Idempotent: a second run does nothing and says so.
    Setup,
    /// Setup, then every test: unit, BPF packet tests, network-namespace
    /// tests with a real etcd (as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. `-p tests --test services`
        /// or a test name filter); after `--`, arguments for the test binaries.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run the agent on this node (as root). Arguments after
    /// `--` go to `dataplane agent`. Without --etcd-endpoints and with
    /// nothing listening on 127.0.0.1:2379, starts a local etcd first.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A small cluster on this machine, in network namespaces: etcd, three
    /// nodes with agents, pods pinging each other. Cleans up after itself.
    Demo,
    /// rustfmt check and clippy with -D warnings: the host crates, then
    /// the BPF crate for its own target.
    Lint,
    /// Build the previous release's agent (what the upgrade test upgrades
    /// from) out of this repository's history, and print its path.
    /// `cargo xtask test` does this when it runs the restart tests.
    PrevRelease,
    /// The benchmark (issues #5, #12): pod to pod per mode and node to
    /// node, ClusterIP against kube-proxy's iptables, control plane
    /// latency, agent RSS, NodePort from outside against kube-proxy's
    /// iptables, BPF per-packet cost. Writes
    /// bench/results/latest.{md,json} and charts.
    Bench {
        /// A short run (about 2 minutes) instead of the full one.
        #[arg(long)]
        quick: bool,
        /// Only the agent memory figures (RSS after the initial sync, with
        /// 1,000 peers, through an hour of churn), to
        /// bench/results/memory.md.
        #[arg(long, conflicts_with = "quick")]
        memory: bool,
        /// Only pod to pod and node to node (every mode, RR/CRR also on
        /// one CPU, the single-stream retransmission counters), to
        /// bench/results/p2p.md.
        #[arg(long, conflicts_with_all = ["memory", "nodeport"])]
        p2p: bool,
        /// Only NodePort from outside the cluster (kube-proxy's iptables
        /// NodePort rules vs this dataplane, 3 and 10,000 Services), to
        /// bench/results/nodeport.md.
        #[arg(long, conflicts_with = "memory")]
        nodeport: bool,
        /// With --p2p: only these modes, comma-separated, of underlay,
        /// host, flannel, tc, xdp.
        #[arg(long, requires = "p2p")]
        modes: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.task {
        Task::Setup => setup(),
        Task::Test { args } => setup().and_then(|()| test(&args)),
        Task::Run { args } => setup().and_then(|()| run(&args)),
        Task::Demo => setup().and_then(|()| demo()),
        Task::Lint => setup().and_then(|()| lint()),
        Task::PrevRelease => setup().and_then(|()| {
            println!("{}", prev_release()?.display());
            Ok(())
        }),
        Task::Bench {
            quick,
            memory,
            p2p,
            nodeport,
            modes,
        } => setup().and_then(|()| {
            let mut args = Vec::new();
            for (on, flag) in [
                (quick, "--quick"),
                (memory, "--memory"),
                (p2p, "--p2p"),
                (nodeport, "--nodeport"),
            ] {
                if on {
                    args.push(flag.to_string());
                }
            }
            if let Some(m) = modes {
                args.push(format!("--modes={m}"));
            }
            bench(&args)
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(mut c: Command) -> anyhow::Result<()> {
    let desc = format!("{c:?}");
    let st = c.status().with_context(|| format!("spawning {desc}"))?;
    if !st.success() {
        bail!("{desc} failed: {st}");
    }
    Ok(())
}

fn output_ok(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

fn setup() -> anyhow::Result<()> {
    let mut did = Vec::new();

    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(p, need)| {
            !need.present()
                || output_ok("dpkg-query", &["-W", "-f=${Status}", p])
                    .is_none_or(|s| !s.contains("install ok installed"))
        })
        .map(|(p, _)| *p)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!("missing Debian packages {missing:?}; run as root to install them");
        }
        eprintln!("setup: installing {}", missing.join(" "));
        let mut c = Command::new("apt-get");
        c.arg("update").arg("-qq");
        status(c)?;
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing);
        status(c)?;
        did.push(format!("installed {}", missing.join(" ")));
    }
    // Fail here, naming the package, rather than in a build script later.
    let absent: Vec<String> = DEBIAN_PACKAGES
        .iter()
        .filter(|(_, need)| !need.present())
        .map(|(p, need)| format!("{} (from Debian package {p})", need.describe()))
        .collect();
    if !absent.is_empty() {
        bail!(
            "still missing after installing: {}. Install those packages and run `cargo xtask setup` again",
            absent.join("; ")
        );
    }

    let components = output_ok(
        "rustup",
        &["component", "list", "--toolchain", TOOLCHAIN, "--installed"],
    )
    .context("rustup cannot list components of the pinned toolchain")?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {TOOLCHAIN}");
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]);
        status(c)?;
        did.push("added rust-src".into());
    }

    if !bpf_linker_ok() {
        eprintln!("setup: building bpf-linker against LLVM 22 (a few minutes)");
        let mut c = cargo();
        c.env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
        status(c)?;
        if !bpf_linker_ok() {
            bail!(
                "bpf-linker is still not usable after `cargo install bpf-linker`: is ~/.cargo/bin on PATH, \
                 and does `bpf-linker --version` find libLLVM 22 (Debian package llvm-22-dev)?"
            );
        }
        did.push("installed bpf-linker".into());
    }

    if did.is_empty() {
        eprintln!("setup: everything is installed, nothing to do");
    } else {
        eprintln!("setup: {}", did.join("; "));
    }
    Ok(())
}

/// bpf-linker is on PATH and runs (it links LLVM dynamically; a removed
/// or upgraded LLVM makes it fail to start).
fn bpf_linker_ok() -> bool {
    output_ok("bpf-linker", &["--version"]).is_some()
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the tests create network namespaces and load BPF programs: run as root");
    }
    // Build the agent and the CNI plugin first: end-to-end tests run them
    // as processes.
    let mut c = cargo();
    c.args(["build", "--locked", "-p", "dataplane", "--bins"]);
    status(c)?;
    // Root-only tests are #[ignore = "needs root ..."] so that a plain
    // `cargo test` shows them as ignored instead of passing them empty;
    // here, as root, they run. decap_perf is a manual measurement.
    let (cargo_args, test_args) = match extra.iter().position(|a| a == "--") {
        Some(i) => (&extra[..i], &extra[i + 1..]),
        None => (extra, &[][..]),
    };
    // The upgrade test runs the previous release's agent: built from this
    // repository's history (once; cached) unless the selection leaves the
    // restart tests out.
    let prev = if runs_restart_tests(cargo_args) {
        Some(prev_release()?)
    } else {
        None
    };
    let mut c = cargo();
    c.args(["test", "--locked", "--no-fail-fast"]);
    if let Some(p) = &prev {
        c.env("DATAPLANE_PREV_BIN", p);
    }
    // `--workspace` would override a `-p` of the caller's.
    if !cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p"))
    {
        c.arg("--workspace");
    }
    c.env("DATAPLANE_BIN", root().join("target/debug/dataplane"))
        .args(cargo_args)
        .args(["--", "--include-ignored", "--skip", "decap_perf"])
        .args(test_args);
    status(c)
}

/// The release the upgrade test upgrades from: the last one that landed
/// (stop 16: `stats_v2`, `node_cfg_v2`, north-south Services). Move it
/// forward when a release is cut. The conversion from the release before it (`ct_v1`)
/// keeps its own test (`an_older_layout_is_migrated_through_the_pinned_maps`).
const PREV_RELEASE: &str = "1a833edc732085483f0810bbc3aa5a701f2a5eae";

/// Whether `cargo test` with these arguments may run `tests/tests/restart.rs`.
fn runs_restart_tests(cargo_args: &[String]) -> bool {
    let mut it = cargo_args.iter().peekable();
    let (mut packages, mut tests, mut other_targets) = (Vec::new(), Vec::new(), false);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| -> Option<String> {
            if a == flag {
                it.next().cloned()
            } else {
                a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
            }
        };
        if let Some(p) = value("-p").or_else(|| value("--package")) {
            packages.push(p);
        } else if let Some(t) = value("--test") {
            tests.push(t);
        } else if ["--lib", "--bins", "--doc", "--bin", "--example", "--bench"]
            .contains(&a.as_str())
        {
            other_targets = true;
        }
    }
    let package_ok = packages.is_empty() || packages.iter().any(|p| p == "tests");
    let target_ok = if tests.is_empty() {
        !other_targets
    } else {
        tests.iter().any(|t| t == "restart")
    };
    package_ok && target_ok
}

/// Builds the agent of [`PREV_RELEASE`] (once: the binary is kept as
/// `target/upgrade-from/dataplane-<rev>`) and returns its path. The source
/// comes from this repository's history (`git archive`, fetching the
/// commit first in a shallow clone) and builds with its own lock file in a
/// target directory of its own: sharing ours would let the two
/// workspaces' identically named crates overwrite each other. That build
/// directory is removed afterwards; only the binary is cached.
fn prev_release() -> anyhow::Result<PathBuf> {
    let dir = root().join("target/upgrade-from");
    let bin = dir.join(format!("dataplane-{}", &PREV_RELEASE[..12]));
    if bin.is_file() {
        eprintln!("prev-release: {} (cached)", bin.display());
        return Ok(bin);
    }
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(root()).args(args);
        c
    };
    let commit = format!("{PREV_RELEASE}^{{commit}}");
    let present = || {
        git(&["cat-file", "-e", &commit])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !present() {
        eprintln!("prev-release: fetching {PREV_RELEASE} (shallow clone)");
        let _ = status(git(&[
            "fetch",
            "--quiet",
            "--no-tags",
            "--depth=1",
            "origin",
            PREV_RELEASE,
        ]));
        if !present() {
            bail!(
                "the previous release {PREV_RELEASE} is not in this clone and could not be \
                 fetched from origin; the upgrade test needs it (in CI, check out with full \
                 history, e.g. actions/checkout with fetch-depth: 0)"
            );
        }
    }
    let src = dir.join("src");
    let build = dir.join("build");
    for d in [&src, &build] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(&src)?;
    let tar = dir.join("src.tar");
    status({
        let mut c = git(&["archive", "--format=tar", "-o"]);
        c.arg(&tar).arg(PREV_RELEASE);
        c
    })?;
    status({
        let mut c = Command::new("tar");
        c.arg("-xf").arg(&tar).arg("-C").arg(&src);
        c
    })?;
    std::fs::remove_file(&tar)?;
    eprintln!(
        "prev-release: building the agent of {} (its own target directory: a few minutes, once)",
        &PREV_RELEASE[..12]
    );
    let t0 = std::time::Instant::now();
    // `cargo` from PATH in the old tree: rustup picks its toolchain file.
    let mut c = Command::new("cargo");
    c.current_dir(&src)
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_INCREMENTAL", "0")
        .args(["build", "--locked", "-p", "dataplane", "--bin", "dataplane"])
        .arg("--target-dir")
        .arg(&build);
    status(c)?;
    let tmp = dir.join("dataplane.tmp");
    std::fs::copy(build.join("debug/dataplane"), &tmp)?;
    std::fs::rename(&tmp, &bin)?;
    for d in [&src, &build] {
        std::fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    eprintln!(
        "prev-release: {} built in {:.0?}",
        bin.display(),
        t0.elapsed()
    );
    Ok(bin)
}

fn run(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the agent loads BPF programs and configures interfaces: run as root");
    }
    let mut c = cargo();
    c.args(["build", "--locked", "-p", "dataplane", "--bins"]);
    status(c)?;
    let bin = root().join("target/debug/dataplane");
    let has_endpoints = args.iter().any(|a| a.starts_with("--etcd-endpoints"))
        || env::var_os("DATAPLANE_ETCD_ENDPOINTS").is_some();
    let mut etcd = None;
    if !has_endpoints
        && TcpStream::connect_timeout(&"127.0.0.1:2379".parse()?, Duration::from_millis(300))
            .is_err()
    {
        let dir = PathBuf::from("/var/lib/dataplane/etcd");
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "run: no etcd on 127.0.0.1:2379; starting a local single-member etcd, data in {}",
            dir.display()
        );
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let child = Command::new("etcd")
            .args(["--name", "dataplane-local", "--data-dir"])
            .arg(&dir)
            .args([
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        etcd = Some(child);
        for _ in 0..100 {
            if TcpStream::connect_timeout(&"127.0.0.1:2379".parse()?, Duration::from_millis(100))
                .is_ok()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // One node works out of the box: a default network if none is set.
        let mut c = Command::new(&bin);
        c.args([
            "config",
            "put",
            "--if-absent",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        ]);
        status(c)?;
    }
    let mut c = Command::new(&bin);
    c.arg("agent").args(args);
    let r = status(c);
    if let Some(mut e) = etcd {
        let _ = e.kill();
        let _ = e.wait();
    }
    r
}

fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces: run as root");
    }
    let mut c = cargo();
    c.args(["build", "--locked", "-p", "dataplane", "--bins"]);
    status(c)?;
    let mut c = cargo();
    c.args(["run", "--locked", "-q", "-p", "tests", "--bin", "demo"])
        .env("DATAPLANE_BIN", root().join("target/debug/dataplane"));
    status(c)
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark creates network namespaces and loads BPF programs: run as root");
    }
    // Measure what users run: the release agent.
    let mut c = cargo();
    c.args([
        "build",
        "--locked",
        "--release",
        "-p",
        "dataplane",
        "--bins",
    ]);
    status(c)?;
    let mut c = cargo();
    c.args([
        "run",
        "--locked",
        "-q",
        "--release",
        "-p",
        "tests",
        "--bin",
        "bench",
        "--",
    ])
    .env("DATAPLANE_BIN", root().join("target/release/dataplane"))
    .args(args);
    status(c)
}

fn lint() -> anyhow::Result<()> {
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    status(c)?;
    let mut c = cargo();
    c.args([
        "clippy",
        "--locked",
        "-p",
        "dataplane",
        "-p",
        "dataplane-common",
        "-p",
        "xtask",
        "-p",
        "tests",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    status(c)?;
    // The BPF crate only builds for the BPF target (with build-std).
    let mut c = cargo();
    c.current_dir(root().join("dataplane-ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "--locked",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    status(c)
}

#[cfg(test)]
mod tests {
    use super::runs_restart_tests;

    fn runs(args: &str) -> bool {
        let v: Vec<String> = args.split_whitespace().map(String::from).collect();
        runs_restart_tests(&v)
    }

    #[test]
    fn the_previous_release_is_built_only_when_the_restart_tests_may_run() {
        assert!(runs(""));
        assert!(runs("-p tests"));
        assert!(runs("-p tests --test restart"));
        assert!(runs("--package=tests --test=restart"));
        assert!(runs("restarts_in_xdp"));
        assert!(!runs("-p tests --test services"));
        assert!(!runs("-p dataplane"));
        assert!(!runs("-p dataplane --lib"));
        assert!(!runs("--lib"));
        assert!(runs("-p dataplane -p tests --test restart --test services"));
    }
}
