//! Benchmark support (`cargo xtask bench`): a CPU-pinned load generator
//! (TCP RR, TCP CRR, UDP RR), iperf3 driving, kube-proxy-shaped iptables
//! tables, statistics, and hand-written SVG charts.

pub mod kube;
pub mod load;
pub mod netstat;
pub mod stats;
pub mod svg;
