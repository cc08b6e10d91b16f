//! A guest cannot wedge its own agent. During a fork bomb, a memory bomb, a CPU hog on every
//! vCPU and a flood of output, the agent answers its health call and kills every user
//! process; afterwards the sandbox is fully usable, and a neighbour's execs succeed
//! throughout. A guest root that dismantles its cgroups can wedge its own agent: the host
//! still destroys that sandbox, and the neighbour is unaffected.
//!
//! Latencies are printed (the figures belong to the reliability report). The time limits are
//! the goal of 2 s for the abuser's health calls and a hang detector of 10 s per call, whose
//! panic says where the hang was.

use std::future::Future;
use std::time::{Duration, Instant};

use kiln_engine::{CreateOptions, Engine, EngineConfig, Sandbox};
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

/// Runs `script` in the victim's guest.
async fn sh(pair: (&Sandbox, &Sandbox), script: &str) -> String {
    on_victim(
        pair,
        script,
        HANG,
        kiln_testinfra::sh(pair.0.agent(), script),
    )
    .await
    .0
}

/// Starts `script` in the victim's guest as a background process whose output the agent
/// collects.
async fn start_background(pair: (&Sandbox, &Sandbox), tag: &str, script: &str) {
    let request = ExecRequest {
        background: true,
        tag: Some(tag.to_owned()),
        ..ExecRequest::new(Command::Shell(script.to_owned()))
    };
    let session = on_victim(pair, tag, HANG, pair.0.agent().exec(request))
        .await
        .0
        .unwrap_or_else(|e| panic!("starting {tag}: {e}"));
    drop(session);
}

/// A call to the victim's agent, which must answer within `limit`. If it does not, the panic
/// says where the hang is: whether the neighbour answers meanwhile (the host's side is not
/// what hangs), whether the victim answers a health call on the same session, whether the
/// hung call then completes (something the host sends wakes the agent), whether the victim
/// answers on a new session, and what its console shows.
async fn on_victim<T>(
    pair: (&Sandbox, &Sandbox),
    what: &str,
    limit: Duration,
    call: impl Future<Output = T>,
) -> (T, Duration) {
    let started = Instant::now();
    let mut call = std::pin::pin!(call);
    if let Ok(value) = tokio::time::timeout(limit, call.as_mut()).await {
        return (value, started.elapsed());
    }
    let (victim, neighbour) = pair;
    let answer = |result: Result<Result<_, kiln_agent_client::ClientError>, _>| match result {
        Ok(Ok(_)) => format!("answered after {:?}", started.elapsed()),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "did not answer".to_owned(),
    };
    let next_door = answer(tokio::time::timeout(HANG, neighbour.agent().info()).await);
    let same = answer(tokio::time::timeout(HANG, victim.agent().info()).await);
    let hung = match tokio::time::timeout(Duration::from_secs(2), call.as_mut()).await {
        Ok(_) => format!("completed after {:?}", started.elapsed()),
        Err(_) => "still waited 2 s later".to_owned(),
    };
    victim.agent().disconnect().await;
    let fresh = answer(tokio::time::timeout(HANG, victim.agent().info()).await);
    panic!(
        "{what} did not answer within {limit:?}. Then, {HANG:?} given to each health call: the \
         neighbour's {next_door}; the victim's on the same session {same}, and the hung call \
         {hung}; the victim's on a new session {fresh}. The victim's console:\n{}",
        victim.console_tail(40)
    )
}

/// A health call slower than this is shown with where its time went.
const SLOW: Duration = Duration::from_millis(500);

/// One health call: when it was sent (since its abuse began), how long its answer took, and
/// the guest's uptime as the agent read it while answering.
struct HealthCall {
    sent: Duration,
    took: Duration,
    guest_uptime: f64,
}

/// Each slow call, split at the moment the agent read the guest's clock: how long the request
/// took to reach the agent's handler, and its answer to come back. The guest's clock runs with
/// the host's, so its offset from the test's clock is that of the fastest call (to within its
/// round trip and the 10 ms of `/proc/uptime`).
fn where_slow(calls: &[HealthCall]) -> String {
    let offset = |call: &HealthCall| call.guest_uptime - call.sent.as_secs_f64();
    let Some(fastest) = calls.iter().min_by_key(|call| call.took) else {
        return "no calls".to_owned();
    };
    let base = offset(fastest);
    calls
        .iter()
        .filter(|call| call.took > SLOW)
        .map(|call| {
            let there = ((offset(call) - base) * 1000.0).clamp(0.0, call.took.as_secs_f64() * 1000.0);
            format!(
                "  sent at {:.2} s: {:.0} ms, reaching the agent in ~{there:.0} ms and coming back in ~{:.0} ms",
                call.sent.as_secs_f64(),
                call.took.as_secs_f64() * 1000.0,
                call.took.as_secs_f64() * 1000.0 - there
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent's pressure-stall totals (µs): some and full, for CPU, memory and I/O, read from
/// its cgroup by the agent itself (no user process needed, so it works during an abuse).
struct Stalls(Vec<(String, u64)>);

async fn stalls(pair: (&Sandbox, &Sandbox)) -> Stalls {
    let mut totals = Vec::new();
    for resource in ["cpu", "memory", "io"] {
        let path = format!("/sys/fs/cgroup/kiln-agent/{resource}.pressure");
        let (text, _) = on_victim(pair, &path, HANG, pair.0.agent().read_file(&path, 4096)).await;
        let text = String::from_utf8(text.unwrap_or_else(|e| panic!("reading {path}: {e}")))
            .expect("pressure is text");
        for line in text.lines() {
            let kind = line.split_whitespace().next().unwrap_or_default();
            let total = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("total="))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no total in {path}: {line:?}"));
            totals.push((format!("{resource} {kind}"), total));
        }
    }
    Stalls(totals)
}

impl Stalls {
    fn growth_since(&self, before: &Stalls) -> String {
        self.0
            .iter()
            .zip(&before.0)
            .map(|((name, now), (_, then))| {
                format!("{name} {:.0} ms", now.saturating_sub(*then) as f64 / 1000.0)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
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

    let pair: (&Sandbox, &Sandbox) = (&victim, &neighbour);

    // The agent and what it starts live apart.
    assert_eq!(
        sh(pair, "cat /proc/self/cgroup; cat /proc/1/cgroup").await,
        "0::/user\n0::/kiln-agent"
    );
    assert_eq!(
        sh(pair, "cat /proc/1/oom_score_adj /proc/self/oom_score_adj").await,
        "-1000\n0"
    );

    // The users' memory limit is met before the guest runs out: a bomb then reclaims and
    // kills inside their cgroup instead of stalling the whole guest (and the agent with it).
    let memory = sh(
        pair,
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
        start_background(pair, "abuse", script).await;
        let (mut health, mut next_door) = (Vec::new(), Vec::new());
        let stalls_before = stalls(pair).await;
        let mut timeline = Vec::new();
        let epoch = Instant::now();
        let until = epoch + ABUSE_FOR;
        let calls = async {
            while Instant::now() < until {
                let sent = epoch.elapsed();
                let (info, took) = on_victim(pair, "health", HANG, victim.agent().info()).await;
                let info = info.unwrap_or_else(|e| panic!("{name}: health call failed: {e}"));
                health.push(took);
                timeline.push(HealthCall {
                    sent,
                    took,
                    guest_uptime: info.uptime_secs,
                });
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
        let (killed, took) =
            on_victim(pair, "kill-all", KILL_ALL_HANG, victim.agent().kill_all()).await;
        let killed = killed.unwrap_or_else(|e| panic!("{name}: kill-all failed: {e}"));
        assert!(killed >= 1, "{name}: nothing to kill");
        let slowest = health.iter().max().copied().unwrap_or_default();
        eprintln!(
            "{name}: kill-all of {killed} processes in {:.0} ms; {}; {}",
            took.as_secs_f64() * 1000.0,
            summary("health", &mut health),
            summary("neighbour exec", &mut next_door)
        );
        eprintln!(
            "{name}: the agent's stalls during the abuse and its kill: {}",
            stalls(pair).await.growth_since(&stalls_before)
        );
        if slowest > SLOW {
            eprintln!(
                "{name}: slow health calls, split where the agent read its clock\n{}",
                where_slow(&timeline)
            );
        }
        // The goal. Calls of 2.2 to 4.4 s were seen at a fork bomb's height while the
        // users' memory limit left the guest too little (the agent's memory stall matched
        // them), and 2.9 to 3.7 s while a starting spawn held the agent.
        assert!(
            slowest < Duration::from_secs(2),
            "{name}: a health call took {slowest:?}"
        );
        // Fully usable afterwards: a shell that forks, files, nothing left of the abuse, and
        // the users' memory limit (lifted during the kill) back in force.
        assert_eq!(
            sh(
                pair,
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
                let (list, _) =
                    on_victim(pair, "process list", HANG, victim.agent().processes()).await;
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
    sh(pair, "echo 8 > /sys/fs/cgroup/user/pids.max").await;
    start_background(pair, "fill", "bash -c 'while :; do sleep 60 & done'").await;
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
    sh(pair, "echo max > /sys/fs/cgroup/user/pids.max").await;
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
    let (alive, _) = bounded(
        "neighbour exec",
        kiln_testinfra::sh(neighbour.agent(), "echo alive"),
    )
    .await;
    assert_eq!(alive, "alive");
    neighbour.destroy().await.expect("destroy");
}
