//! A guest cannot wedge its own agent. During a fork bomb, a memory bomb, a CPU hog on every
//! vCPU and a flood of output, the agent answers its health call and kills every user
//! process; afterwards the sandbox is fully usable, and a neighbour's execs succeed
//! throughout. A guest root that dismantles its cgroups can wedge its own agent: the host
//! still destroys that sandbox, and the neighbour is unaffected.
//!
//! Latencies are printed (the figures belong to the reliability report); the only time
//! limit is a hang detector of 10 s per call, generous for TCG.

use std::future::Future;
use std::time::{Duration, Instant};

use kiln_agent_client::AgentClient;
use kiln_engine::{CreateOptions, Engine, EngineConfig};
use kiln_proto::messages::{Command, ExecRequest};

/// A call that takes longer than this is a hang.
const HANG: Duration = Duration::from_secs(10);

/// The same for kill-all, which answers once the users' cgroup is empty: under TCG a fork
/// bomb's hundreds of processes take about 2 s to exit (5 to over 25 s before the agent
/// lifted their memory limit for the kill), while health calls during the bomb answer in
/// milliseconds. The agent waits as long as they keep leaving.
const KILL_ALL_HANG: Duration = Duration::from_secs(kiln_proto::KILL_ALL_WAIT.as_secs() + 10);

/// How long each abuse runs before it is killed.
const ABUSE_FOR: Duration = Duration::from_secs(8);

async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> (T, Duration) {
    bounded_by(HANG, what, call).await
}

async fn bounded_by<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = T>,
) -> (T, Duration) {
    let started = Instant::now();
    match tokio::time::timeout(limit, call).await {
        Ok(value) => (value, started.elapsed()),
        Err(_) => panic!("{what} did not answer within {limit:?}"),
    }
}

async fn sh(agent: &AgentClient, script: &str) -> String {
    bounded(script, kiln_testinfra::sh(agent, script)).await.0
}

/// Starts `script` as a background process whose output the agent collects.
async fn start_background(agent: &AgentClient, tag: &str, script: &str) {
    let request = ExecRequest {
        background: true,
        tag: Some(tag.to_owned()),
        ..ExecRequest::new(Command::Shell(script.to_owned()))
    };
    let session = bounded(tag, agent.exec(request))
        .await
        .0
        .unwrap_or_else(|e| panic!("starting {tag}: {e}"));
    drop(session);
}

fn summary(name: &str, samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    match (samples.first(), samples.last()) {
        (Some(_), Some(max)) => format!(
            "{name}: {} calls, p50 {:.0} ms, max {:.0} ms",
            samples.len(),
            ms(samples[samples.len() / 2]),
            ms(*max)
        ),
        _ => format!("{name}: no calls"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_wedge_its_agent() {
    let data = tempfile::tempdir().expect("data dir");
    let engine = Engine::new(EngineConfig::new(data.path())).expect("engine");
    let images = tokio::task::spawn_blocking(|| kiln_testinfra::template_images("base"))
        .await
        .expect("build");
    let template = engine.bake(&images).await.expect("bake");
    let victim = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");
    let neighbour = engine
        .create(&template, CreateOptions::default())
        .await
        .expect("create");

    // The agent and what it starts live apart.
    assert_eq!(
        sh(victim.agent(), "cat /proc/self/cgroup; cat /proc/1/cgroup").await,
        "0::/user\n0::/kiln-agent"
    );
    assert_eq!(
        sh(
            victim.agent(),
            "cat /proc/1/oom_score_adj /proc/self/oom_score_adj"
        )
        .await,
        "-1000\n0"
    );

    // The users' memory limit is met before the guest runs out: a bomb then reclaims and
    // kills inside their cgroup instead of stalling the whole guest (and the agent with it).
    let memory = sh(
        victim.agent(),
        "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; cat /sys/fs/cgroup/user/memory.max",
    )
    .await;
    eprintln!("guest memory and the users' limit: {memory:?}");
    let figures: Vec<u64> = memory
        .lines()
        .map(|line| {
            let kib = line.contains("kB");
            let n: u64 = line
                .split_whitespace()
                .find_map(|word| word.parse().ok())
                .expect("a figure");
            if kib {
                n << 10
            } else {
                n
            }
        })
        .collect();
    assert!(
        figures[2] < figures[1],
        "the users may take more than the guest has free: {memory}"
    );

    let (_, idle) = bounded("health", victim.agent().info()).await;
    eprintln!("idle health call: {:.0} ms", idle.as_secs_f64() * 1000.0);
    // Each abuse is kept up by a loop until it is killed: the guest's OOM killer or the
    // process limit alone would end some of them on their own.
    let abuses = [
        (
            "fork bomb",
            "while :; do bash -c 'f() { f | f & }; f'; sleep 0.2; done",
        ),
        ("memory bomb", "while :; do tail /dev/zero; done"),
        (
            "CPU hog on every vCPU",
            "for i in $(seq $(nproc)); do while :; do :; done & done; wait",
        ),
        ("output flood", "yes kiln-output-flood"),
    ];
    for (name, script) in abuses {
        start_background(victim.agent(), "abuse", script).await;
        let (mut health, mut next_door) = (Vec::new(), Vec::new());
        let until = Instant::now() + ABUSE_FOR;
        let calls = async {
            while Instant::now() < until {
                let (info, took) = bounded("health", victim.agent().info()).await;
                info.unwrap_or_else(|e| panic!("{name}: health call failed: {e}"));
                health.push(took);
                let (out, took) = bounded("neighbour exec", async {
                    kiln_testinfra::sh(neighbour.agent(), "echo next-door").await
                })
                .await;
                assert_eq!(out, "next-door");
                next_door.push(took);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        // Under the fork bomb an exec is starting: its child, in the users' cgroup at its
        // memory limit, may take seconds to exec, and the agent must answer meanwhile (it
        // stalled for the whole spawn while spawns ran on its async workers). Its caller
        // gives up when the abuse ends, most often before it has started: a foreground
        // process whose caller has gone must not run on, or stay listed, once it starts.
        let answered = std::sync::atomic::AtomicBool::new(false);
        let starting = async {
            if name == "fork bomb" {
                tokio::time::sleep(ABUSE_FOR - Duration::from_secs(3)).await;
                let request = ExecRequest::new(Command::Argv(vec!["sleep".into(), "600".into()]));
                let session = victim.agent().exec(request).await;
                answered.store(session.is_ok(), std::sync::atomic::Ordering::SeqCst);
                std::future::pending::<()>().await;
                drop(session);
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = calls => {}
            () = starting => unreachable!("it never ends"),
        }
        // The goal is 2 s (`kiln check abuse` reports it, and its full profile enforces it);
        // this bound is wider because CI under TCG has seen single calls of 2.2-2.3 s at a
        // fork bomb's height, cause not yet found. An agent stalled by a starting spawn
        // (fixed) took 2.9-3.7 s, so below 4 s that stall goes unnoticed here.
        let slowest = health.iter().max().copied().unwrap_or_default();
        assert!(
            slowest < Duration::from_secs(4),
            "{name}: a health call took {slowest:?}"
        );
        let (killed, took) = bounded_by(KILL_ALL_HANG, "kill-all", victim.agent().kill_all()).await;
        let killed = killed.unwrap_or_else(|e| panic!("{name}: kill-all failed: {e}"));
        assert!(killed >= 1, "{name}: nothing to kill");
        eprintln!(
            "{name}: kill-all of {killed} processes in {:.0} ms; {}; {}",
            took.as_secs_f64() * 1000.0,
            summary("health", &mut health),
            summary("neighbour exec", &mut next_door)
        );
        // Fully usable afterwards: a shell that forks, files, nothing left of the abuse, and
        // the users' memory limit (lifted during the kill) back in force.
        assert_eq!(
            sh(
                victim.agent(),
                // Counted with builtins only: the shell itself is the one process left.
                "echo usable > /root/after && cat /root/after && n=0 && \
                 while read -r pid; do n=$((n+1)); done < /sys/fs/cgroup/user/cgroup.procs; echo $n; \
                 cat /sys/fs/cgroup/user/memory.max"
            )
            .await,
            format!("usable\n1\n{}", figures[2]),
            "{name}: only the shell itself runs in the users' cgroup, under its memory limit"
        );
        if name == "fork bomb" {
            let abandoned = |list: &[kiln_proto::messages::ProcessInfo]| {
                list.iter().any(|p| p.argv == ["sleep", "600"])
            };
            let mut listed = true;
            for _ in 0..50 {
                let (list, _) = bounded("process list", victim.agent().processes()).await;
                listed = abandoned(&list.expect("process list"));
                if !listed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            eprintln!(
                "{name}: the abandoned exec {} before its caller left",
                if answered.load(std::sync::atomic::Ordering::SeqCst) {
                    "had started"
                } else {
                    "had not started"
                }
            );
            assert!(
                !listed,
                "{name}: a foreground exec whose caller left is still listed"
            );
        }
    }

    // While the process limit is exhausted, an exec runs from the agent's headroom or fails
    // at once with a clear error; the session stays up.
    sh(victim.agent(), "echo 8 > /sys/fs/cgroup/user/pids.max").await;
    start_background(
        victim.agent(),
        "fill",
        "bash -c 'while :; do sleep 60 & done'",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (result, _) = bounded(
        "exec at the process limit",
        victim.agent().run(
            ExecRequest::new(Command::Argv(vec!["/bin/echo".into(), "headroom".into()])),
            1 << 16,
        ),
    )
    .await;
    match result {
        Ok(done) => assert_eq!(String::from_utf8_lossy(&done.stdout), "headroom\n"),
        Err(e) => assert!(e.to_string().contains("process limit"), "{e}"),
    }
    bounded_by(KILL_ALL_HANG, "kill-all", victim.agent().kill_all())
        .await
        .0
        .expect("kill-all");
    sh(victim.agent(), "echo max > /sys/fs/cgroup/user/pids.max").await;
    bounded("health", victim.agent().info())
        .await
        .0
        .expect("health after the limit");

    // A guest root that takes itself out of the users' cgroup and lifts its limits may wedge
    // its own agent; the host still destroys the sandbox, and the neighbour runs on. (The
    // bomb waits a second so that the agent can say it started; if the agent is wedged
    // before it says so, that is this abuse's allowed outcome, not a failure.)
    let dismantle = ExecRequest {
        background: true,
        tag: Some("dismantled".into()),
        ..ExecRequest::new(Command::Shell(
            "sleep 1; echo $$ > /sys/fs/cgroup/cgroup.procs; bash -c 'f() { f | f & }; f'".into(),
        ))
    };
    match tokio::time::timeout(HANG, victim.agent().exec(dismantle)).await {
        Ok(Ok(session)) => drop(session),
        Ok(Err(e)) => panic!("starting the dismantling bomb: {e}"),
        Err(_) => eprintln!("the dismantling bomb wedged the agent before it said it started"),
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let destroy = tokio::time::timeout(Duration::from_secs(60), victim.destroy()).await;
    assert!(
        matches!(destroy, Ok(Ok(()))),
        "destroying a wedged sandbox: {destroy:?}"
    );
    assert_eq!(sh(neighbour.agent(), "echo alive").await, "alive");
    neighbour.destroy().await.expect("destroy");
}
