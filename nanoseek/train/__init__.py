"""Training: pretraining (MTP, auxiliary-loss-free balancing), checkpoints, torchrun helpers.

    from nanoseek.train.pretrain import PretrainArgs, pretrain
    pretrain(PretrainArgs(out="runs/tiny", steps=600))
"""
