"""Training: pretrain, sft, grpo (rollout / score / update), distill, on one run scaffold (run.py:
run directory, resume, metrics, progress, lr, atomic final save); the objective (objective.py,
grpo_loss.py), checkpoints (checkpoint.py) and torchrun helpers (dist.py, expert_parallel.py).

    nanoseek pretrain --out runs/tiny          # or: python -m nanoseek.train.pretrain --out runs/tiny
    from nanoseek.train.pretrain import PretrainArgs, pretrain
    pretrain(PretrainArgs(out="runs/tiny", steps=600))
"""
