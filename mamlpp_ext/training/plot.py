"""Plot command of mamlpp_ext: ``mamlpp-plot RUN_DIR [-o curves.png]``.

Reads a run folder's ``metrics.jsonl`` (written by ``mamlpp-train``) and draws one PNG with
six panels: train and validation loss, train and validation accuracy (with the validation
95% confidence band), the meta learning rate per epoch (CA), the multi-step-loss weights per
step (MSL), the learned inner-loop rates per layer over training (LSLR, one colour per layer,
one line per step) and those rates at the last epoch as a layer × step map.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

__all__ = ["read_records", "plot_run", "main"]


def read_records(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train_records, epoch_records)`` from ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a mamlpp-train run folder?)")
    train, epochs = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not JSON: {exc}") from None
        (train if r.get("kind") == "train" else epochs if r.get("kind") == "epoch" else []).append(r)
    if not epochs and not train:
        raise ValueError(f"{path} holds no training records yet")
    return train, epochs


def plot_run(run_dir: str | Path, output: Optional[str | Path] = None, title: Optional[str] = None) -> Path:
    """Draw the learning curves of ``run_dir`` to ``output`` (default ``run_dir/curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    train, epochs = read_records(run_dir)
    out = Path(output) if output else run_dir / "curves.png"
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    (ax_loss, ax_acc, ax_lr), (ax_msl, ax_lslr, ax_map) = axes
    if title is None:
        cfg_file = run_dir / "config.json"
        title = run_dir.name
        if cfg_file.is_file():
            c = json.loads(cfg_file.read_text())
            cfg = c["config"]
            title = (f"{run_dir.name}: {cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot, "
                     f"{cfg['total_epochs']}×{cfg['iterations_per_epoch']} steps, backend {c.get('backend')}")
    fig.suptitle(title, fontsize=13)

    ti = [r["iteration"] for r in train]
    ei = [r["iteration"] for r in epochs]
    # losses
    if train:
        ax_loss.plot(ti, [r["loss"] for r in train], color="tab:blue", alpha=0.35, lw=1, label="train (window)")
    if epochs:
        ax_loss.plot(ei, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train (epoch mean)")
        ax_loss.plot(ei, [r["val_loss"] for r in epochs], "s-", color="tab:orange", label="validation")
    ax_loss.set(title="Query loss", xlabel="meta-step", ylabel="cross-entropy")
    ax_loss.legend()
    # accuracies
    if train:
        ax_acc.plot(ti, [r["accuracy"] for r in train], color="tab:blue", alpha=0.35, lw=1, label="train (window)")
    if epochs:
        va = np.array([r["val_accuracy"] for r in epochs])
        ci = np.array([r.get("val_ci95") or 0.0 for r in epochs])
        ax_acc.plot(ei, [r["train_accuracy"] for r in epochs], "o-", color="tab:blue", label="train (epoch mean)")
        ax_acc.plot(ei, va, "s-", color="tab:orange", label="validation")
        ax_acc.fill_between(ei, va - ci, va + ci, color="tab:orange", alpha=0.2, label="validation 95% CI")
        best = int(np.argmax(va))
        ax_acc.annotate(f"best {100 * va[best]:.2f}%", (ei[best], va[best]), textcoords="offset points",
                        xytext=(0, -16), ha="center", color="tab:orange")
    ax_acc.set(title="Final-step query accuracy", xlabel="meta-step", ylabel="accuracy")
    ax_acc.legend(loc="lower right")
    # meta lr
    if epochs:
        ax_lr.step([r["epoch"] for r in epochs], [r["meta_lr"] for r in epochs], where="post", marker="o")
    ax_lr.set(title="Meta learning rate (CA)", xlabel="epoch", ylabel="Adam lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    # MSL weights
    msl = [r["msl_weights"] for r in epochs if "msl_weights" in r]
    if msl:
        w = np.array(msl)
        ep = [r["epoch"] for r in epochs if "msl_weights" in r]
        for s in range(w.shape[1]):
            last = s == w.shape[1] - 1
            ax_msl.plot(ep, w[:, s], "-" if last else "--", marker="o" if last else "x", ms=4, lw=2 if last else 1,
                        label=f"step {s + 1}" + (" (final)" if last else ""))
        ax_msl.legend(fontsize=8, ncol=2)
    ax_msl.set(title="Multi-step loss weights (MSL)", xlabel="epoch", ylabel="weight of query loss after step")
    # LSLR over training
    lslr = [r for r in epochs if "lslr" in r]
    if lslr:
        rates = np.array([r["lslr"] for r in lslr])  # (E, K, S)
        names = lslr[-1].get("lslr_names") or [f"tensor {k}" for k in range(rates.shape[1])]
        ep = [r["epoch"] for r in lslr]
        cmap = plt.get_cmap("tab10" if rates.shape[1] <= 10 else "tab20")
        for k in range(rates.shape[1]):
            for s in range(rates.shape[2]):
                ax_lslr.plot(ep, rates[:, k, s], "-", color=cmap(k % cmap.N), lw=1,
                             alpha=0.4 + 0.6 * (s + 1) / rates.shape[2], label=names[k] if s == 0 else None)
        ax_lslr.legend(fontsize=7, ncol=2)
        final = rates[-1]
        lim = float(np.abs(final).max()) or 1.0
        im = ax_map.imshow(final, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax_map.set_yticks(range(len(names)), names, fontsize=8)
        ax_map.set_xticks(range(final.shape[1]), [str(s + 1) for s in range(final.shape[1])])
        if final.size <= 80:
            for (k, s), v in np.ndenumerate(final):
                ax_map.text(s, k, f"{v:.3f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax_map, shrink=0.9)
        ax_map.set(title=f"LSLR rates at epoch {ep[-1]}", xlabel="inner step")
    else:
        ax_map.set_axis_off()
    ax_lslr.set(title="Inner learning rates per layer and step (LSLR)", xlabel="epoch", ylabel="rate")
    for ax in (ax_loss, ax_acc, ax_lr, ax_msl, ax_lslr):
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mamlpp-plot", description="Draw a mamlpp-train run's learning curves to PNG.")
    p.add_argument("run_dir", help="the run folder (holds metrics.jsonl)")
    p.add_argument("-o", "--output", help="PNG path (default RUN_DIR/curves.png)")
    p.add_argument("--title", help="figure title (default: from the run's config)")
    args = p.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.output, args.title)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
