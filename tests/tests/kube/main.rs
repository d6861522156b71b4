//! The fake Kubernetes API server checked with the real kube-rs client (`fakeapi_*`), and
//! the agent in Kubernetes mode against it with real traffic (`kube_*`).
//!
//! The kit: [`objects`] and [`client`] for the fake server's self-tests, [`lab`] (a
//! topology, the fake server in its node namespace and the agent as node-a) and
//! [`traffic`] (clients and probes) for the agent's tests. The other modules are the
//! behaviours under test. Run as root; every test builds and tears down its own lab.

mod client;
mod lab;
mod objects;
mod traffic;

mod agent_lifecycle;
mod fake_api_lists;
mod fake_api_watches;
mod policies;
mod services;
