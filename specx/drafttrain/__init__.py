"""Training feature drafts (`specx train-draft`): the torch side, never imported by the runtime.

    data.py         self-distillation: the target writes its own training text, then one teacher-forced pass records
                    its features and its next-token distributions
    model.py        the draft (one llama-style layer over the target's features), mirroring specx.graphs.feature_draft
    train.py        soft cross-entropy with a training-time unroll on the draft's own states; held-out agreement
    checkpoint.py   the training state in one safetensors file, replaced atomically
    workdir.py      the work directory: each phase's shards and the manifest of what made them
    phases.py       the data phases (texts, labels) in shards, shared by the processes of a job
    distributed.py  the processes of a torchrun / accelerate job: ranks, barriers, DistributedDataParallel
    pipeline.py     the command: texts -> labels -> training -> graphs -> bundle, each phase resumable
    __main__.py     `python -m specx.drafttrain`: the command under a launcher
"""
