"""Worker launched by tests/test_distributed.py under torchrun (not a test module itself).

    torchrun --standalone --nproc_per_node=P tests/dist_worker.py equivalence OUT.pt
    torchrun --standalone --nproc_per_node=P tests/dist_worker.py fail ROOT RUN_DIR
    torchrun --standalone --nproc_per_node=P tests/dist_worker.py diverge ROOT RUN_DIR OUT_PREFIX
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mamlpp_ext.training import distributed as D  # noqa: E402
from mamlpp_ext.model.meta_learner import MAMLPlusPlus  # noqa: E402

# shared with test_distributed.py: the runs it compares against
COMBOS = [("batched", True), ("batched", False), ("fused", True), ("fused", False)]
STEPS = 3


def equivalence_config(second_order):
    from mamlpp_ext.model.config import MAMLConfig

    return MAMLConfig(image_channels=1, image_height=16, image_width=16, num_filters=6, ways=3, shots=2, queries=2,
                      meta_batch=4, inner_steps=3, eval_inner_steps=3, msl_epochs=4, total_epochs=20, seed=0,
                      second_order=second_order, first_order_to_second_order_epoch=-1)


def equivalence_batch(cfg, step):
    g = torch.Generator().manual_seed(100 + step)
    T, C, H, W = cfg.meta_batch, *cfg.image_shape

    def labels(per_class):
        base = torch.arange(cfg.ways).repeat_interleave(per_class)
        return torch.stack([base[torch.randperm(len(base), generator=g)] for _ in range(T)])

    sy, qy = labels(cfg.shots), labels(cfg.queries)
    sx = torch.randn(T, sy.shape[1], C, H, W, generator=g, dtype=torch.float64)
    qx = torch.randn(T, qy.shape[1], C, H, W, generator=g, dtype=torch.float64)
    return sx, sy, qx, qy


def run_steps(backend, second_order, rank=0, world=1):
    cfg = equivalence_config(second_order)
    learner = MAMLPlusPlus(cfg, backend=backend, dtype=torch.float64)
    if world > 1:
        learner.cross_process_mean = D.flat_mean_
    per = cfg.meta_batch // world
    for step in range(STEPS):
        batch = [x[rank * per:(rank + 1) * per] for x in equivalence_batch(cfg, step)]
        learner.meta_step(*batch, epoch=0)
    return learner.state_dict()


def equivalence(out_path):
    import mamlpp_ext

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    states = {}
    for backend, so in COMBOS:
        if backend == "fused" and not mamlpp_ext.has_extension():
            continue
        states[f"{backend}-{so}"] = run_steps(backend, so, rank, world)
    if rank == 0:
        torch.save(states, out_path)
    D.leave_process_group()


def fail(root, run_dir):
    """Rank 1 raises at its third meta-step: the job must end, non-zero, on every rank."""
    from mamlpp_ext.model.config import MAMLConfig
    from mamlpp_ext.training import run_data as RD
    from mamlpp_ext.training.trainer import Trainer

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    cfg = MAMLConfig(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=2,
                     eval_inner_steps=2, total_epochs=2, iterations_per_epoch=4, eval_tasks=4, msl_epochs=2)
    data = RD.DataOptions(root=root, split="lake", lake_val_alphabets=1, check_counts=False)
    trainer = Trainer(cfg, run_dir, backend="batched", data=data, progress=False, tensorboard=False,
                      strategy=D.DistributedStrategy())
    if dist.get_rank() == 1:
        real = trainer.learner.train_step

        def flaky(*a, **k):
            if trainer.iteration == 2:
                raise RuntimeError("injected failure on rank 1")
            return real(*a, **k)

        trainer.learner.train_step = flaky
    trainer.fit()


def diverge(root, run_dir, out_prefix):
    """Rank 1 alone gets NaN images in the 6th meta-step: every rank must stop at that step with
    the same learner state (the state after 5 steps); each rank saves what it saw."""
    from mamlpp_ext.model.config import MAMLConfig
    from mamlpp_ext.training import run_data as RD
    from mamlpp_ext.training.trainer import Trainer, TrainingDiverged

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=120))
    rank = dist.get_rank()
    cfg = MAMLConfig(ways=3, shots=1, queries=1, meta_batch=2, num_stages=2, num_filters=4, inner_steps=2,
                     eval_inner_steps=2, total_epochs=3, iterations_per_epoch=4, eval_tasks=4, msl_epochs=2)
    data = RD.DataOptions(root=root, split="lake", lake_val_alphabets=1, check_counts=False)
    trainer = Trainer(cfg, run_dir, backend="batched", data=data, progress=False, tensorboard=False, log_every=0,
                      strategy=D.DistributedStrategy(), handle_signals=False)
    real = trainer.learner.train_step

    def poisoned(sx, sy, qx, qy, epoch):
        if rank == 1 and trainer.iteration == 5:
            sx = torch.full_like(sx, float("nan"))
        return real(sx, sy, qx, qy, epoch=epoch)

    trainer.learner.train_step = poisoned
    out = {"rank": rank}
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        out.update(iteration=exc.iteration, epoch=exc.epoch)
    out["state"] = [t.detach().clone() for t in trainer.learner.parameters() + trainer.learner.running_stats]
    torch.save(out, f"{out_prefix}.{rank}.pt")
    D.leave_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "equivalence":
        equivalence(sys.argv[2])
    elif mode == "fail":
        fail(sys.argv[2], sys.argv[3])
    elif mode == "diverge":
        diverge(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
