"""`python -m powerinfer_gguf <command> ...`: the console scripts without installing the package
(e.g. on the GPU machine, where the checkout is on PYTHONPATH)."""
import sys

import click

from .cli import bench_cmd, convert_cmd, eval_cmd, info_cmd, quantize_cmd, serve_cmd, setup_cmd, synth_cmd


@click.group()
def main():
    """powerinfer_gguf commands."""


main.add_command(setup_cmd, "setup")
main.add_command(synth_cmd, "synth")
main.add_command(bench_cmd, "bench")
main.add_command(info_cmd, "info")
main.add_command(convert_cmd, "convert")
main.add_command(serve_cmd, "serve")
main.add_command(quantize_cmd, "quantize")
main.add_command(eval_cmd, "eval")

if __name__ == "__main__":
    sys.exit(main())
