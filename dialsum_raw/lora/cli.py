"""python -m dialsum_raw.lora merge | export-peft | inspect | combine"""

import argparse

from .adapter import merge_to_model
from .peft_format import export_peft


def main(argv=None):
    from . import combine, inspect  # analysis and combination live in their own modules
    p = argparse.ArgumentParser(prog="python -m dialsum_raw.lora", description="LoRA adapter tools.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base and save a standard model folder")
    m.add_argument("--base", required=True, help="hub id or folder of the base model")
    m.add_argument("--adapter", required=True, help="adapter folder written by train.py")
    m.add_argument("--out", required=True, help="output model folder")
    m.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights of the merged model (a QLoRA adapter's is never quantized again)")
    e = sub.add_parser("export-peft", help="write the adapter in peft's format")
    e.add_argument("--adapter", required=True)
    e.add_argument("--out", required=True)
    inspect.add_arguments(sub.add_parser("inspect", help=inspect.HELP, description=inspect.HELP))
    combine.add_arguments(
        sub.add_parser(
            "combine",
            help=combine.HELP,
            description=combine.__doc__.split("\n\n")[0],
            epilog=combine.__doc__.split("\n\n", 1)[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    a = p.parse_args(argv)
    if a.command in ("inspect", "combine"):
        return (inspect if a.command == "inspect" else combine).run(a)
    print(
        merge_to_model(a.base, a.adapter, a.out, a.dtype)
        if a.command == "merge"
        else export_peft(a.adapter, a.out)
    )
