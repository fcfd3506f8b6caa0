"""`python -m specx.drafttrain BUNDLE [options]`: `specx train-draft` under a launcher, the same options::

    torchrun --standalone --nproc-per-node 4 -m specx.drafttrain BUNDLE --tokens 2000000
    accelerate launch --num_processes 4 -m specx.drafttrain BUNDLE

Every process runs this; they share the phases (distributed.py) and the main one writes the bundle. Alone (no
launcher) it is train-draft itself.
"""

from __future__ import annotations

import typer

from specx.cli.build import train_draft_command


def main() -> None:
    typer.run(train_draft_command)


if __name__ == "__main__":
    main()
