//! What the fake API self-tests share besides the objects: a kube client built from the
//! kubeconfig the fake server writes, as the agent builds its own, and a scratch directory.

use anyhow::{Context as _, Result};
use tests::fakeapi::FakeApi;

/// A kube client configured the way the agent will be: from the kubeconfig the fake
/// server writes.
pub(crate) async fn client_for(api: &FakeApi, dir: &std::path::Path) -> Result<kube::Client> {
    let path = dir.join("kubeconfig");
    api.write_kubeconfig(&path)?;
    let kc = kube::config::Kubeconfig::read_from(&path).context("reading the kubeconfig")?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("kubeconfig to config")?;
    kube::Client::try_from(config).context("building the client")
}

pub(crate) fn scratch(tag: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("xdplb-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}
