//! The fake Kubernetes API server checked with the real kube-rs client (`fakeapi_*`), and
//! the agent in Kubernetes mode against it with real traffic (`kube_*`).

mod client;
mod lab;
mod objects;
mod traffic;

mod agent_lifecycle;
mod fake_api_lists;
mod fake_api_watches;
mod policies;
mod services;
