//! The commands, as the binary runs them: [`run`] takes the environment
//! and stdin and returns what to print and the exit code.
//!
//! - ADD: IPAM ADD, create the pair, address both ends, register the
//!   endpoint with the agent; any failure undoes what was done (an
//!   unreachable or refusing agent is code 11, "try again later").
//! - DEL: agent `del`, remove the pair, IPAM DEL. An unreachable agent
//!   does not stop a pod's teardown (noted on stderr); an agent that
//!   refuses leaves the address allocated and fails with code 11, so that
//!   the runtime's retry releases it once the agent has let go.
//! - CHECK: the pod interface, its addresses, routes and gateway
//!   neighbour, the host end and its route, the agent's record and IPAM's
//!   CHECK, against `prevResult`.
//! - STATUS: the agent's readiness (code 50 if unreachable or not ready),
//!   then IPAM's STATUS if it speaks 1.1.
//! - GC: the agent's attachments minus `cni.dev/valid-attachments` are
//!   deleted (agent, device, IPAM DEL each), then GC goes to IPAM if it
//!   speaks 1.1.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use rtnetlink::Handle;

use super::{
    addressing::{self, Plan},
    device::{self, Pair},
    env::{Command, Env},
    error::{CniError, CniResult, code},
    gc,
    ipam::Ipam,
    netconf::{NetConf, VALID_ATTACHMENTS, version_hint},
    netns::{self, Netns},
    proto::{AgentClient, AttachmentKey, ClientError, Endpoint, Mac},
    result::{CniOutput, Interface, IpConfig, Route, SCOPE_LINK},
    version::{self, GC_STATUS_SINCE},
};

/// What the binary prints on stdout and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self {
            stdout,
            exit_code: 0,
        }
    }

    /// The error result; `version` is the netconf's if known.
    pub fn error(e: &CniError, version: Option<&str>) -> Self {
        Self {
            stdout: e.to_json(version.unwrap_or(version::LATEST)),
            exit_code: 1,
        }
    }
}

/// Logs a line on stderr (the runtime keeps it with the plugin's output).
macro_rules! note {
    ($($arg:tt)*) => { eprintln!("dataplane-cni: {}", format_args!($($arg)*)) };
}

/// Runs one invocation: `get` reads the environment, `stdin` is the
/// netconf.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let env = match Env::parse(get) {
        Ok(env) => env,
        Err(e) => return Outcome::error(&e, version_hint(stdin).as_deref()),
    };
    if env.command == Command::Version {
        #[derive(serde::Deserialize)]
        struct Input {
            #[serde(rename = "cniVersion")]
            cni_version: String,
        }
        let input = serde_json::from_slice::<Input>(stdin).ok();
        return Outcome::ok(version::version_json(
            input.as_ref().map(|i| i.cni_version.as_str()),
        ));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(e) => return Outcome::error(&e, version_hint(stdin).as_deref()),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = CniError::internal(format!("starting the tokio runtime: {e}"));
            return Outcome::error(&e, Some(&conf.cni_version));
        }
    };
    match rt.block_on(dispatch(&env, &conf)) {
        Ok(stdout) => Outcome::ok(stdout),
        Err(e) => Outcome::error(&e, Some(&conf.cni_version)),
    }
}

async fn dispatch(env: &Env, conf: &NetConf) -> CniResult<String> {
    match env.command {
        Command::Add => add(env, conf).await.map(|r| r.to_json()),
        Command::Del => del(env, conf).await.map(|()| String::new()),
        Command::Check => check(env, conf).await.map(|()| String::new()),
        Command::Status => status(env, conf).await.map(|()| String::new()),
        Command::Gc => gc(env, conf).await.map(|()| String::new()),
        Command::Version => Ok(version::version_json(Some(&conf.cni_version))),
    }
}

fn key(env: &Env) -> AttachmentKey {
    AttachmentKey {
        container_id: env.container_id().to_string(),
        ifname: env.ifname().to_string(),
    }
}

fn netns_path(env: &Env) -> CniResult<&std::path::Path> {
    env.netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("CNI_NETNS is missing"))
}

/// An agent failure on ADD or GC: transient from the runtime's view.
fn try_again(what: &str, e: &ClientError) -> CniError {
    CniError::new(code::TRY_AGAIN_LATER, format!("{what}: {e}"))
}

async fn add(env: &Env, conf: &NetConf) -> CniResult<CniOutput> {
    let key = key(env);
    let prev = conf.prev_result()?;
    let netns = netns_path(env)?;
    let pod_ns = Netns::open(netns)?;
    let host_nl = netns::current_handle()?;
    let pod_nl = pod_ns.handle()?;
    let host_name = device::host_ifname(&key.container_id, &key.ifname);

    // Refuse before allocating anything.
    if device::link_by_name(&pod_nl, &key.ifname).await?.is_some() {
        return Err(CniError::invalid_env(format!(
            "CNI_IFNAME: {} already exists in {}",
            key.ifname,
            netns.display()
        )));
    }
    if let Some(l) = device::link_by_name(&host_nl, &host_name).await? {
        return Err(CniError::internal(format!(
            "the host-side device {host_name} of {}/{} exists already (ifindex {}): \
             an earlier ADD of this attachment was not deleted",
            key.container_id, key.ifname, l.ifindex
        )));
    }

    let ipam = Ipam::find(conf, env)?;
    let allocated = match ipam.add().await {
        Ok(r) => r,
        Err(e) => {
            // Spec section 4: a failed delegate gets a DEL before we fail.
            if let Err(d) = ipam.del(None).await {
                note!(
                    "ADD {}/{}: IPAM DEL after a failed ADD: {d}",
                    key.container_id,
                    key.ifname
                );
            }
            return Err(e);
        }
    };

    let agent = AgentClient::new(&conf.agent_socket);
    let mut agent_asked = false;
    let attached = attach(
        env,
        conf,
        &ipam,
        &allocated,
        (&host_nl, &pod_nl, &pod_ns),
        &host_name,
        &agent,
        &mut agent_asked,
    )
    .await;
    match attached {
        Ok(result) => Ok(merge(prev.as_ref(), result)),
        Err(e) => {
            note!(
                "ADD {}/{} failed, undoing: {e}",
                key.container_id,
                key.ifname
            );
            if agent_asked && let Err(d) = agent.del(&key).await {
                note!("undo: agent del: {d}");
            }
            if let Err(d) = device::delete_by_name(&host_nl, &host_name).await {
                note!("undo: {d}");
            }
            if let Err(d) = ipam.del(None).await {
                note!("undo: {d}");
            }
            Err(e)
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the steps of one ADD, spelled out"
)]
async fn attach(
    env: &Env,
    conf: &NetConf,
    ipam: &Ipam<'_>,
    allocated: &CniOutput,
    (host_nl, pod_nl, pod_ns): (&Handle, &Handle, &Netns),
    host_name: &str,
    agent: &AgentClient,
    agent_asked: &mut bool,
) -> CniResult<CniOutput> {
    let plan = addressing::plan(allocated, ipam.plugin_name())?;
    let pair = device::create_pair(
        host_nl,
        pod_nl,
        pod_ns,
        conf.pod_device,
        host_name,
        env.ifname(),
        conf.mtu,
    )
    .await?;
    addressing::configure_pod(pod_nl, &pair.pod, &plan, pair.host.mac).await?;
    addressing::configure_host(host_nl, &pair.host, plan.ip, pair.pod.mac).await?;
    let endpoint = Endpoint {
        container_id: env.container_id().to_string(),
        ifname: env.ifname().to_string(),
        netns: pod_ns.path.display().to_string(),
        ip: plan.ip,
        mac: pair.pod.mac,
        host_ifindex: pair.host.ifindex,
        host_ifname: pair.host.name.clone(),
        host_mac: pair.host.mac,
        device: conf.pod_device,
    };
    *agent_asked = true;
    agent
        .add(&endpoint)
        .await
        .map_err(|e| try_again("registering the endpoint with the agent", &e))?;
    Ok(result(
        conf,
        &pod_ns.path.display().to_string(),
        &plan,
        &pair,
        allocated,
    ))
}

/// ADD's result: the host end, the pod end (index 1), the /32 with its
/// gateway, the routes, and DNS from IPAM or else the netconf.
fn result(
    conf: &NetConf,
    netns: &str,
    plan: &Plan,
    pair: &Pair,
    allocated: &CniOutput,
) -> CniOutput {
    let iface = |l: &device::Link, sandbox: Option<String>| Interface {
        name: l.name.clone(),
        mac: Some(l.mac.to_string()),
        mtu: Some(l.mtu),
        sandbox,
        ..Default::default()
    };
    CniOutput {
        cni_version: Some(conf.cni_version.clone()),
        interfaces: vec![
            iface(&pair.host, None),
            iface(&pair.pod, Some(netns.to_string())),
        ],
        ips: vec![IpConfig {
            address: IpNet::V4(Ipv4Net::from(plan.ip)),
            gateway: Some(IpAddr::V4(plan.gateway)),
            interface: Some(1),
        }],
        routes: plan.result_routes(conf.version >= GC_STATUS_SINCE),
        dns: if allocated.dns.is_empty() {
            conf.dns.clone()
        } else {
            allocated.dns.clone()
        },
    }
}

/// ADD with a `prevResult` (we are not first in a chain): ours is
/// appended to it, interface indices shifted.
fn merge(prev: Option<&CniOutput>, ours: CniOutput) -> CniOutput {
    let Some(prev) = prev else { return ours };
    let offset = prev.interfaces.len();
    let mut out = prev.clone();
    out.cni_version = ours.cni_version;
    out.interfaces.extend(ours.interfaces);
    out.ips.extend(ours.ips.into_iter().map(|mut ip| {
        ip.interface = ip.interface.map(|i| i + offset);
        ip
    }));
    out.routes.extend(ours.routes);
    if out.dns.is_empty() {
        out.dns = ours.dns;
    }
    out
}

async fn del(env: &Env, conf: &NetConf) -> CniResult<()> {
    let key = key(env);
    let agent = AgentClient::new(&conf.agent_socket);
    let refused = match agent.del(&key).await {
        Ok(()) => None,
        Err(e) if e.is_unreachable() => {
            note!(
                "DEL {}/{}: {e}; removing the device and the address anyway",
                key.container_id,
                key.ifname
            );
            None
        }
        Err(e) => Some(e),
    };

    let host_nl = netns::current_handle()?;
    let host_name = device::host_ifname(&key.container_id, &key.ifname);
    if !device::delete_by_name(&host_nl, &host_name).await? {
        delete_pod_end(env, conf).await?;
    }

    if let Some(e) = refused {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "DEL {}/{}: {e}; the device is removed, the address stays allocated until DEL succeeds",
                key.container_id, key.ifname
            ),
        ));
    }
    Ipam::find(conf, env)?.del(None).await
}

/// DEL without a host end (renamed, or a half-made pair): the pod end, if
/// the pod's namespace is still there and the interface is ours.
async fn delete_pod_end(env: &Env, conf: &NetConf) -> CniResult<()> {
    let Some(path) = env.netns.as_deref() else {
        return Ok(());
    };
    // A namespace that is gone took the interface with it.
    let Ok(ns) = Netns::open(path) else {
        return Ok(());
    };
    let nl = ns.handle()?;
    if let Some(link) = device::link_by_name(&nl, env.ifname()).await?
        && link.kind.as_deref() == Some(conf.pod_device.kind())
    {
        device::delete_by_name(&nl, &link.name).await?;
    }
    Ok(())
}

async fn check(env: &Env, conf: &NetConf) -> CniResult<()> {
    let key = key(env);
    let prev = conf
        .prev_result()?
        .ok_or_else(|| CniError::invalid_netconf("CHECK needs prevResult (the result of ADD)"))?;
    let netns = netns_path(env)?;
    let sandbox = netns.display().to_string();
    let fail = |msg: String| CniError::new(code::CHECK_FAILED, msg);
    let pod_index = prev
        .interfaces
        .iter()
        .position(|i| i.name == key.ifname && i.sandbox.as_deref() == Some(sandbox.as_str()))
        .ok_or_else(|| {
            fail(format!(
                "prevResult lists no interface {} in sandbox {sandbox}",
                key.ifname
            ))
        })?;
    let pod_if = &prev.interfaces[pod_index];
    let pod_ips: Vec<(Ipv4Net, Option<Ipv4Addr>)> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(pod_index))
        .filter_map(|ip| match (ip.address, ip.gateway) {
            (IpNet::V4(a), Some(IpAddr::V4(g))) => Some((a, Some(g))),
            (IpNet::V4(a), _) => Some((a, None)),
            _ => None,
        })
        .collect();
    let gateway = pod_ips.iter().find_map(|(_, g)| *g);
    let host_name = device::host_ifname(&key.container_id, &key.ifname);
    let host_if = prev.interfaces.iter().find(|i| i.name == host_name);

    let pod_ns = Netns::open(netns)?;
    let pod_nl = pod_ns.handle()?;
    let host_nl = netns::current_handle()?;
    let mut problems: Vec<String> = Vec::new();
    let expected_mac =
        |i: Option<&Interface>| i.and_then(|i| i.mac.as_deref()?.parse::<Mac>().ok());

    let pod = device::link_by_name(&pod_nl, &key.ifname).await?;
    let host = device::link_by_name(&host_nl, &host_name).await?;
    for (link, name, want_mac) in [
        (
            &pod,
            format!("{} in {sandbox}", key.ifname),
            expected_mac(Some(pod_if)),
        ),
        (
            &host,
            format!("host-side device {host_name}"),
            expected_mac(host_if),
        ),
    ] {
        let Some(link) = link else {
            problems.push(format!("{name} is missing"));
            continue;
        };
        if link.kind.as_deref() != Some(conf.pod_device.kind()) {
            problems.push(format!(
                "{name} is a {} device, not {}",
                link.kind.as_deref().unwrap_or("untyped"),
                conf.pod_device
            ));
        }
        if !link.up {
            problems.push(format!("{name} is down"));
        }
        if let Some(mac) = want_mac
            && link.mac != mac
        {
            problems.push(format!("{name} has MAC {}, not {mac}", link.mac));
        }
        if let Some(mtu) = conf.mtu
            && link.mtu != mtu
        {
            problems.push(format!("{name} has MTU {}, not {mtu}", link.mtu));
        }
    }

    if let Some(pod) = &pod {
        let have = addressing::addresses(&pod_nl, pod.ifindex).await?;
        for (addr, _) in &pod_ips {
            if !have.contains(addr) {
                problems.push(format!(
                    "address {addr} is missing on {} in {sandbox}",
                    pod.name
                ));
            }
        }
        let routes = addressing::routes(&pod_nl).await?;
        problems.extend(
            addressing::missing_routes(&prev.routes, gateway, pod.ifindex, &routes)
                .into_iter()
                .map(|p| format!("in {sandbox}: {p}")),
        );
        if let (Some(gw), Some(host)) = (gateway, &host) {
            let neigh = addressing::neighbours(&pod_nl).await?;
            problems.extend(addressing::neighbour_problem(
                &neigh,
                pod.ifindex,
                gw,
                host.mac,
                &pod.name,
            ));
        }
    }
    if let Some(host) = &host {
        let routes = addressing::routes(&host_nl).await?;
        let neigh = addressing::neighbours(&host_nl).await?;
        for (addr, _) in &pod_ips {
            let host_route = Route {
                scope: Some(SCOPE_LINK),
                ..Route::new(IpNet::V4(Ipv4Net::from(addr.addr())), None)
            };
            problems.extend(addressing::missing_routes(
                &[host_route],
                None,
                host.ifindex,
                &routes,
            ));
            if let Some(pod) = &pod {
                problems.extend(addressing::neighbour_problem(
                    &neigh,
                    host.ifindex,
                    addr.addr(),
                    pod.mac,
                    &host.name,
                ));
            }
        }
    }

    let agent = AgentClient::new(&conf.agent_socket);
    match agent.check(&key).await {
        Ok(ep) => {
            let mut mismatch = |what: &str, theirs: String, ours: String| {
                if theirs != ours {
                    problems.push(format!("the agent has {what} {theirs}, the pod {ours}"));
                }
            };
            if let Some((addr, _)) = pod_ips.first() {
                mismatch("IP", ep.ip.to_string(), addr.addr().to_string());
            }
            if let Some(pod) = &pod {
                mismatch("MAC", ep.mac.to_string(), pod.mac.to_string());
            }
            if let Some(host) = &host {
                mismatch(
                    "host ifindex",
                    ep.host_ifindex.to_string(),
                    host.ifindex.to_string(),
                );
                mismatch("host device", ep.host_ifname.clone(), host.name.clone());
            }
            mismatch(
                "device kind",
                ep.device.to_string(),
                conf.pod_device.to_string(),
            );
            mismatch("netns", ep.netns.clone(), sandbox.clone());
        }
        Err(e) => problems.push(format!("agent check: {e}")),
    }

    if let Err(e) = Ipam::find(conf, env)?.check().await {
        problems.push(e.to_string());
    }

    match problems.as_slice() {
        [] => Ok(()),
        [first, rest @ ..] => {
            let more = if rest.is_empty() {
                String::new()
            } else {
                format!(" (and {} more)", rest.len())
            };
            Err(fail(format!(
                "CHECK of {}/{} failed: {first}{more}",
                key.container_id, key.ifname
            ))
            .with_details(problems.join("; ")))
        }
    }
}

fn require_1_1(conf: &NetConf, command: Command) -> CniResult<()> {
    if conf.version < GC_STATUS_SINCE {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{command} needs cniVersion {GC_STATUS_SINCE} or later; the config is {}",
                conf.cni_version
            ),
        ));
    }
    Ok(())
}

async fn status(env: &Env, conf: &NetConf) -> CniResult<()> {
    require_1_1(conf, Command::Status)?;
    let agent = AgentClient::new(&conf.agent_socket);
    match agent.status().await {
        Ok(s) if s.ready => {}
        Ok(s) => {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!(
                    "the agent at {} is not ready: {}",
                    conf.agent_socket.display(),
                    s.reason.as_deref().unwrap_or("no reason given")
                ),
            ));
        }
        Err(e) => {
            return Err(CniError::new(
                code::NOT_AVAILABLE,
                format!("plugin not available: {e}"),
            ));
        }
    }
    let ipam = Ipam::find(conf, env).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("plugin not available: {}", e.msg),
        )
    })?;
    if ipam.speaks_1_1().await? {
        ipam.status().await?;
    }
    Ok(())
}

async fn gc(env: &Env, conf: &NetConf) -> CniResult<()> {
    require_1_1(conf, Command::Gc)?;
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::invalid_netconf(format!(
            "GC needs {VALID_ATTACHMENTS} (the attachments still in use)"
        ))
    })?;
    let agent = AgentClient::new(&conf.agent_socket);
    let registered = agent
        .list()
        .await
        .map_err(|e| try_again("GC: listing the agent's attachments", &e))?;
    let stale = gc::stale(&registered, valid);
    let ipam = Ipam::find(conf, env)?;
    let host_nl = netns::current_handle()?;
    let mut errors = Vec::new();
    for a in &stale {
        let key = a.key();
        let name = format!("{}/{}", a.container_id, a.ifname);
        note!("GC: removing stale attachment {name} ({})", a.ip);
        if let Err(e) = agent.del(&key).await {
            // The agent may still route the address: keep it allocated.
            errors.push(format!("{name}: {e}"));
            continue;
        }
        if let Err(e) =
            device::delete_by_name(&host_nl, &device::host_ifname(&a.container_id, &a.ifname)).await
        {
            errors.push(format!("{name}: {e}"));
        }
        if let Err(e) = ipam.del(Some(&key)).await {
            errors.push(format!("{name}: {e}"));
        }
    }
    match ipam.speaks_1_1().await {
        Ok(true) => {
            if let Err(e) = ipam.gc().await {
                errors.push(e.to_string());
            }
        }
        Ok(false) => {}
        Err(e) => errors.push(e.to_string()),
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(CniError::internal(format!(
        "GC of {} stale attachments left {} errors: {}",
        stale.len(),
        errors.len(),
        errors[0]
    ))
    .with_details(errors.join("; ")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run_with(vars: &[(&str, &str)], stdin: &str) -> (serde_json::Value, i32) {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = run(|k| map.get(k).cloned(), stdin.as_bytes());
        let v = if out.stdout.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&out.stdout).expect("stdout is JSON")
        };
        (v, out.exit_code)
    }

    const CONF: &str = r#"{"cniVersion": "1.0.0", "name": "n", "type": "dataplane-cni",
        "agentSocket": "/nonexistent/agent.sock", "ipam": {"type": "host-local"}}"#;

    #[test]
    fn version_needs_nothing_else() {
        let (v, rc) = run_with(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion": "1.0.0"}"#);
        assert_eq!(rc, 0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
        let (v, rc) = run_with(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(rc, 0);
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn errors_before_any_work() {
        // Bad env: code 4, with the netconf's version.
        let (v, rc) = run_with(&[("CNI_COMMAND", "ADD")], CONF);
        assert_eq!(rc, 1);
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let (v, rc) = run_with(&del, "{not json");
        assert_eq!((v["code"].as_u64(), rc), (Some(6), 1));
        assert_eq!(v["cniVersion"], "1.1.0");
        let (v, _) = run_with(&del, &CONF.replace("dataplane-cni", "bridge"));
        assert_eq!(v["code"], 7);
        // GC and STATUS are 1.1 commands.
        for cmd in ["GC", "STATUS"] {
            let (v, rc) = run_with(&[("CNI_COMMAND", cmd), ("CNI_PATH", "/x")], CONF);
            assert_eq!((v["code"].as_u64(), rc), (Some(1), 1), "{cmd}");
        }
    }

    #[test]
    fn status_without_an_agent_is_not_available() {
        let conf = CONF.replace("1.0.0", "1.1.0");
        let (v, rc) = run_with(&[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")], &conf);
        assert_eq!(rc, 1);
        assert_eq!(v["code"], 50);
        assert!(
            v["msg"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/agent.sock"),
            "{v}"
        );
        // GC without the agent cannot know what is stale: try again later.
        let gc_conf = conf.replacen('{', r#"{"cni.dev/valid-attachments": [],"#, 1);
        let (v, rc) = run_with(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")], &gc_conf);
        assert_eq!((v["code"].as_u64(), rc), (Some(11), 1), "{v}");
        // And GC without the list of valid attachments is refused.
        let (v, _) = run_with(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")], &conf);
        assert_eq!(v["code"], 7, "{v}");
    }

    #[test]
    fn merges_after_a_previous_plugin() {
        let prev = CniOutput {
            cni_version: Some("1.1.0".into()),
            interfaces: vec![Interface {
                name: "other0".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "192.168.0.2/24".parse().unwrap(),
                gateway: None,
                interface: Some(0),
            }],
            dns: crate::cni::result::Dns {
                nameservers: vec!["192.168.0.1".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let ours = CniOutput {
            cni_version: Some("1.1.0".into()),
            interfaces: vec![
                Interface {
                    name: "dpx".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some("/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![IpConfig {
                address: "10.0.0.2/32".parse().unwrap(),
                gateway: Some("10.0.0.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route::new(
                "0.0.0.0/0".parse().unwrap(),
                Some("10.0.0.1".parse().unwrap()),
            )],
            ..Default::default()
        };
        assert_eq!(merge(None, ours.clone()), ours);
        let m = merge(Some(&prev), ours);
        assert_eq!(m.interfaces.len(), 3);
        assert_eq!(m.ips[0].interface, Some(0));
        assert_eq!(m.ips[1].interface, Some(2));
        assert_eq!(m.interfaces[2].name, "eth0");
        assert_eq!(m.routes.len(), 1);
        assert_eq!(m.dns.nameservers, vec!["192.168.0.1".to_string()]);
    }
}
