//! The API client, configured as kubectl and kube-proxy find theirs, and the source's
//! error type.

use std::path::Path;
use std::time::Duration;

use kube::Client;

use super::READ_TIMEOUT;
use crate::error_chain;

/// The causes are kept as text (their whole chain, without the repetitions kube's
/// errors have), so that a `{:#}` chain prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Infer(String),
    #[error("creating the Kubernetes client: {0}")]
    Client(String),
    #[error(
        "the API server did not complete the initial list of {waiting} within {timeout:?}{}",
        last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    InitialSync {
        timeout: Duration,
        /// The kinds still not listed, e.g. `EndpointSlices, Nodes`.
        waiting: String,
        last_error: Option<String>,
    },
    #[error("the watch streams ended")]
    StreamsEnded,
}

/// A client from `kubeconfig`, or without it from kube's inference (`KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account), as kubectl and kube-proxy do.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let shown = path.display().to_string();
            let bad = |e: kube::config::KubeconfigError| KubeError::Kubeconfig {
                path: shown.clone(),
                reason: error_chain(&e),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Infer(error_chain(&e)))?,
    };
    let mut config = config;
    config.read_timeout = Some(READ_TIMEOUT);
    // Count from the request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    Client::try_from(config).map_err(|e| KubeError::Client(error_chain(&e)))
}
