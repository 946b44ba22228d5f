"""Fine-tune FLAN-T5 on DialogSum: full fine-tuning (--lora-rank 0) or LoRA (--lora-rank R).

    python train.py --lora-rank 8                       # the notebook's LoRA run (10 epochs)
    python train.py --lora-rank 0                       # the notebook's full fine-tuning (10 epochs)
    python train.py --config configs/quick-lora.toml    # one epoch (quick-full.toml likewise)
    python train.py --config configs/tiny-smoke.toml    # minutes on a CPU
    kill -TERM <pid>  (or Ctrl-C)                       # saves last/ at the next step, then exits
    torchrun --nproc_per_node 2 train.py ...            # DDP; --batch-size is per process

Without --config the notebook's recipe for the rank is used: configs/notebook-lora.toml for R > 0,
configs/notebook-full.toml for 0. With --resume DIR the run's own settings.toml is used; flags that
would change its data order or schedule are refused.
"""

import os
import sys

from dialsum_raw.config import TRAIN, build_parser, settings_from
from dialsum_raw.errors import UserError, run_cli

HERE = os.path.dirname(os.path.abspath(__file__))
def main(argv=None):
    parser = build_parser(TRAIN, __doc__.split("\n\n")[0])
    parser.epilog = __doc__.split("\n\n", 1)[1]
    args = parser.parse_args(argv)
    if args.resume:
        if args.config:
            raise UserError("--resume uses the run's own settings.toml; drop --config (flags still override)")
        default = os.path.join(args.resume, "settings.toml")
        args.output_dir = args.output_dir or args.resume
    else:
        preset = "notebook-full.toml" if args.lora_rank == 0 else "notebook-lora.toml"
        default = os.path.join(HERE, "configs", preset)
    if not args.config and not os.path.isfile(default):
        default = None
    settings = settings_from(args, default_config=default)
    from dialsum_raw.training import train
    train(settings)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
