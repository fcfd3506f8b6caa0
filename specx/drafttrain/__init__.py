"""Training feature drafts (`specx train-draft`): the torch side, never imported by the runtime.

    data.py      self-distillation: the target writes its own training text, then one teacher-forced pass records
                 its features and its next-token distributions
    model.py     the draft (one llama-style layer over the target's features), mirroring specx.graphs.feature_draft
    train.py     soft cross-entropy with a training-time unroll on the draft's own states; held-out agreement
    pipeline.py  the command: data -> training -> graphs -> bundle, atomically
"""
