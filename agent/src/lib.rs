//! knhk-agent: an eBPF node agent for SLO-driven connection admission.
//!
//! The kernel programs (`ebpf/programs`) decide every `connect()`; this library loads them, keeps
//! their maps filled with the compiled policy, and exposes what they count.
//!
//! - [`config`]: the TOML configuration and its validation.
//! - [`policy`]: the pure policy compiler (rules → trie leaves).
//! - [`datapath`]: the only module that touches aya and BPF maps: load, attach, pin, re-adopt,
//!   atomic policy switch, cgroup following, map readers.
//! - [`telemetry`]: Prometheus metrics read from the maps, and the admin HTTP server.
//! - [`beat`]: the beat engine: SLO admission per class (brownout ladder), written to the kernel.
//! - [`control`]: the control core: apply, rollback, dry run, status, SLO view, heat, events.
//! - [`api`]: the gRPC services, which translate and call [`control`].
//! - [`agent`]: `knhk-agent run`, wiring the above together.
//! - [`client`]: the CLI's client commands, over gRPC.
//! - [`secure_dir`]: directories only the agent may write (the API socket's, the state directory).
//! - [`objectstore`]: objects in S3-compatible storage and signed objects (no domain knowledge).
//! - [`bundle`]: the fleet bundle follower: polls, verifies and keeps the signed bundle.
//! - [`archive`]: the receipts archive on S3 with Object Lock (the `s3` feature).
//! - [`dirwatch`]: inotify watches on directories, for following the cgroup tree.
//! - [`workloads`]: the node's Kubernetes pods, from the cgroup tree and the container runtime
//!   (CRI), so rules can select workloads by namespace and labels.
#![warn(missing_docs)]

pub mod abi;
pub mod agent;
pub mod api;
#[cfg(feature = "s3")]
pub mod archive;
pub mod beat;
pub mod bundle;
pub mod client;
pub mod config;
pub mod control;
pub mod datapath;
pub mod dirwatch;
pub mod identity;
pub mod model;
pub mod note;
pub mod objectstore;
pub mod policy;
pub mod receipts;
pub mod resilience;
pub mod secure_dir;
pub mod semconv;
pub mod sync;
pub mod tasks;
pub mod telemetry;
pub mod trace_context;
pub mod witness;
pub mod workloads;
