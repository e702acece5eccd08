//! The plugin <-> agent protocol over the agent's Unix socket.
//!
//! One request and one response per connection, both JSON: the client
//! writes its request and shuts down its write half, the server answers
//! and closes. Each side bounds what it reads and how long it waits.
//!
//! Requests (`op` names the request, the other keys are its fields):
//!
//! ```json
//! {"op": "add", "container_id": "...", "ifname": "eth0", "netns": "/run/netns/x",
//!  "ip": "10.244.1.2", "mac": "aa:..", "host_ifindex": 7, "host_ifname": "dp0123456789ab",
//!  "host_mac": "aa:..", "device": "veth"}
//! {"op": "del", "container_id": "...", "ifname": "eth0"}
//! {"op": "check", "container_id": "...", "ifname": "eth0"}
//! {"op": "list"}
//! {"op": "status"}
//! ```
//!
//! Responses: `{"ok": "done"}` (add, del), `{"ok": {"endpoint": {..}}}`
//! (check), `{"ok": {"attachments": [{"container_id", "ifname", "ip"}]}}`
//! (list), `{"ok": {"status": {"ready": true, "reason": null}}}` (status),
//! or `{"error": {"code": "not_found", "msg": "..."}}`.

use std::{fmt, net::Ipv4Addr, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
};

/// How long the plugin waits for the agent: connecting, sending and the
/// answer together. `add` includes attaching the pod's programs.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest request the server reads.
pub const MAX_REQUEST: usize = 64 << 10;

/// Largest response the client reads (a `list` of many attachments).
pub const MAX_RESPONSE: usize = 16 << 20;

/// Which kind of device links the pod to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodDevice {
    Veth,
    Netkit,
}

impl PodDevice {
    /// The kernel's `IFLA_INFO_KIND`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Veth => "veth",
            Self::Netkit => "netkit",
        }
    }
}

impl fmt::Display for PodDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// An Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
            *byte = u8::from_str_radix(p, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
        }
        Ok(Self(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An attachment's identity (spec: `(CNI_CONTAINERID, CNI_IFNAME)`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

/// A pod endpoint as ADD registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub container_id: String,
    /// The interface name inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// The pod's netns path (`CNI_NETNS`).
    pub netns: String,
    pub ip: Ipv4Addr,
    /// MAC of the pod-side interface.
    pub mac: Mac,
    /// The host-side device, in the namespace of the agent (and of the
    /// plugin, which the runtime runs there). For netkit this is the
    /// primary device, the one `BPF_LINK_CREATE` takes for both
    /// `BPF_NETKIT_PRIMARY` and `BPF_NETKIT_PEER`.
    pub host_ifindex: u32,
    pub host_ifname: String,
    /// MAC of the host-side device: the pod's gateway neighbour entry.
    pub host_mac: Mac,
    pub device: PodDevice,
}

impl Endpoint {
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// One entry of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

impl Attachment {
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// The agent's readiness, for STATUS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Register an endpoint; the pod must be reachable when `ok` comes
    /// back. Adding a key that exists replaces its endpoint.
    Add(Endpoint),
    /// Forget an endpoint; unknown keys are not an error.
    Del(AttachmentKey),
    /// The registered endpoint of a key (`not_found` if none).
    Check(AttachmentKey),
    /// Every registered attachment.
    List,
    /// Whether the agent can serve `add` now.
    Status,
}

impl Request {
    pub fn op(&self) -> &'static str {
        match self {
            Self::Add(_) => "add",
            Self::Del(_) => "del",
            Self::Check(_) => "check",
            Self::List => "list",
            Self::Status => "status",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(ProtoError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done,
    Endpoint(Endpoint),
    Attachments(Vec<Attachment>),
    Status(Status),
}

/// Why the agent refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be decoded or has wrong values.
    Invalid,
    /// No such attachment (`check`).
    NotFound,
    /// The request clashes with registered state, e.g. an IP that another
    /// attachment holds.
    Conflict,
    /// The agent cannot serve the request yet (no lease, maps not loaded).
    NotReady,
    /// Anything else.
    Internal,
}

/// An error answer; also what an [`super::server::EndpointRegistry`]
/// returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg} ({code:?})")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub msg: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {} did not answer within {timeout:?}", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("bad answer from the agent at {}: {msg}", socket.display())]
    Protocol { socket: PathBuf, msg: String },
    #[error("the agent at {} refused: {error}", socket.display())]
    Refused { socket: PathBuf, error: ProtoError },
}

impl ClientError {
    /// The agent did not take part: nothing it holds was changed by this
    /// call (as far as the caller can know).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}

/// The plugin's side: one call per method, each on a new connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: CLIENT_TIMEOUT,
        }
    }

    pub async fn add(&self, endpoint: &Endpoint) -> Result<(), ClientError> {
        match self.call(&Request::Add(endpoint.clone())).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected("add", &other)),
        }
    }

    pub async fn del(&self, key: &AttachmentKey) -> Result<(), ClientError> {
        match self.call(&Request::Del(key.clone())).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected("del", &other)),
        }
    }

    pub async fn check(&self, key: &AttachmentKey) -> Result<Endpoint, ClientError> {
        match self.call(&Request::Check(key.clone())).await? {
            Reply::Endpoint(e) => Ok(e),
            other => Err(self.unexpected("check", &other)),
        }
    }

    pub async fn list(&self) -> Result<Vec<Attachment>, ClientError> {
        match self.call(&Request::List).await? {
            Reply::Attachments(a) => Ok(a),
            other => Err(self.unexpected("list", &other)),
        }
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        match self.call(&Request::Status).await? {
            Reply::Status(s) => Ok(s),
            other => Err(self.unexpected("status", &other)),
        }
    }

    fn unexpected(&self, op: &str, reply: &Reply) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            msg: format!("unexpected reply to {op}: {reply:?}"),
        }
    }

    /// Sends `req` and returns the `ok` payload; an `error` answer is
    /// [`ClientError::Refused`].
    pub async fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        let socket = self.socket.clone();
        let exchange = async {
            let mut stream =
                UnixStream::connect(&socket)
                    .await
                    .map_err(|source| ClientError::Unreachable {
                        socket: socket.clone(),
                        source,
                    })?;
            let io = |source| ClientError::Unreachable {
                socket: socket.clone(),
                source,
            };
            let bytes = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
                socket: socket.clone(),
                msg: format!("encoding the request: {e}"),
            })?;
            stream.write_all(&bytes).await.map_err(io)?;
            stream.shutdown().await.map_err(io)?;
            let answer = read_bounded(&mut stream, MAX_RESPONSE)
                .await
                .map_err(io)?
                .ok_or_else(|| ClientError::Protocol {
                    socket: socket.clone(),
                    msg: format!("the answer is longer than {MAX_RESPONSE} bytes"),
                })?;
            if answer.is_empty() {
                return Err(ClientError::Protocol {
                    socket: socket.clone(),
                    msg: "the connection closed without an answer".into(),
                });
            }
            serde_json::from_slice::<Response>(&answer).map_err(|e| ClientError::Protocol {
                socket: socket.clone(),
                msg: format!("undecodable answer: {e}"),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(ClientError::Timeout {
                socket,
                timeout: self.timeout,
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Response::Ok(reply))) => Ok(reply),
            Ok(Ok(Response::Error(error))) => Err(ClientError::Refused { socket, error }),
        }
    }
}

/// Reads to EOF; `None` if there is more than `max` bytes.
pub(crate) async fn read_bounded(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(max as u64 + 1).read_to_end(&mut buf).await?;
    Ok((buf.len() <= max).then_some(buf))
}

/// A request in a few words, for log lines.
pub fn describe(req: &Request) -> String {
    match req {
        Request::Add(e) => format!("add {}/{} ip {}", e.container_id, e.ifname, e.ip),
        Request::Del(k) | Request::Check(k) => {
            format!("{} {}/{}", req.op(), k.container_id, k.ifname)
        }
        Request::List | Request::Status => req.op().to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn endpoint(id: &str, ip: [u8; 4]) -> Endpoint {
        Endpoint {
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{id}"),
            ip: Ipv4Addr::from(ip),
            mac: Mac([0x02, 0, 0, 0, 0, ip[3]]),
            host_ifindex: 7,
            host_ifname: "dp0123456789ab".into(),
            host_mac: Mac([0x02, 0xaa, 0, 0, 0, ip[3]]),
            device: PodDevice::Netkit,
        }
    }

    #[test]
    fn macs() {
        let m: Mac = "02:aB:00:ff:10:01".parse().unwrap();
        assert_eq!(m, Mac([2, 0xab, 0, 0xff, 0x10, 1]));
        assert_eq!(m.to_string(), "02:ab:00:ff:10:01");
        for bad in [
            "",
            "02:ab:00:ff:10",
            "02:ab:00:ff:10:01:02",
            "2:ab:00:ff:10:01",
            "zz:ab:00:ff:10:01",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn requests_have_the_documented_wire_form() {
        let add = Request::Add(endpoint("c1", [10, 244, 1, 2]));
        let v = serde_json::to_value(&add).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "op": "add", "container_id": "c1", "ifname": "eth0", "netns": "/run/netns/c1",
                "ip": "10.244.1.2", "mac": "02:00:00:00:00:02", "host_ifindex": 7,
                "host_ifname": "dp0123456789ab", "host_mac": "02:aa:00:00:00:02", "device": "netkit"
            })
        );
        assert_eq!(
            serde_json::to_value(Request::List).unwrap(),
            serde_json::json!({"op": "list"})
        );
        let del = Request::Del(AttachmentKey {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        });
        assert_eq!(
            serde_json::to_value(&del).unwrap(),
            serde_json::json!({"op": "del", "container_id": "c1", "ifname": "eth0"})
        );
        for req in [add, del, Request::Status, Request::List] {
            let back: Request = serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn responses_round_trip() {
        let cases = [
            (Response::Ok(Reply::Done), serde_json::json!({"ok": "done"})),
            (
                Response::Ok(Reply::Status(Status {
                    ready: false,
                    reason: Some("no lease yet".into()),
                })),
                serde_json::json!({"ok": {"status": {"ready": false, "reason": "no lease yet"}}}),
            ),
            (
                Response::Ok(Reply::Attachments(vec![Attachment {
                    container_id: "c".into(),
                    ifname: "eth0".into(),
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                }])),
                serde_json::json!({"ok": {"attachments": [{"container_id": "c", "ifname": "eth0", "ip": "10.0.0.2"}]}}),
            ),
            (
                Response::Error(ProtoError::new(ErrorCode::NotFound, "no c/eth0")),
                serde_json::json!({"error": {"code": "not_found", "msg": "no c/eth0"}}),
            ),
        ];
        for (resp, wire) in cases {
            assert_eq!(serde_json::to_value(&resp).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Response>(wire).unwrap(), resp);
        }
        let ep = Response::Ok(Reply::Endpoint(endpoint("c2", [10, 0, 0, 3])));
        let back: Response = serde_json::from_slice(&serde_json::to_vec(&ep).unwrap()).unwrap();
        assert_eq!(back, ep);
        // Unknown ops and bad fields do not decode.
        assert!(serde_json::from_str::<Request>(r#"{"op": "frobnicate"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op": "del", "container_id": "c"}"#).is_err());
    }

    #[tokio::test]
    async fn unreachable_agent() {
        let dir = std::env::temp_dir().join(format!("dp-proto-{}", std::process::id()));
        let client = AgentClient::new(dir.join("nobody.sock"));
        let e = client.status().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("nobody.sock"), "{e}");
    }
}
