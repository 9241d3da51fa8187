"""What a finished run leaves beside its metrics: the loss curve (`loss_curve.png`) and the
resolved config (`config.yaml`, URL passwords masked), written to the run directory and logged as
MLflow artifacts. matplotlib and omegaconf are imported only when a run ends.
"""

from dataclasses import asdict
from pathlib import Path

from bln_sweeps.config import RunConfig
from bln_sweeps.credentials import mask_tree
from bln_sweeps.tracking import RunLogger


def plot_losses(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["train_step"], history["train_loss"], label="train (batch statistics)", lw=1)
    for key in sorted(k for k in history if k.startswith("val/")):
        ax.plot(history["eval_step"], history[key], marker="o", ms=3, label=key)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=path.stem)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_artifacts(logger: RunLogger, run_dir: Path, cfg: RunConfig, history: dict) -> None:
    """The loss curve and the resolved config (URL passwords masked) as MLflow artifacts."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True, exist_ok=True)
    plot = run_dir / "loss_curve.png"
    plot_losses(history, plot)
    logger.log_artifact(plot)
    cfg_yaml = run_dir / "config.yaml"
    cfg_yaml.write_text(OmegaConf.to_yaml(mask_tree(asdict(cfg))))  # no URL password
    logger.log_artifact(cfg_yaml)
