"""`proper-fed bench`: training-step speed and memory of PROPER's user and group stages against a peft LoRA, the
device step in nf4, and this machine's matmul peak."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from proper_fed.atomic import atomic_write_text
from proper_fed.errors import ProperFedError
from proper_fed_cli.environment import configure_library


def bench(
    out: Annotated[Path, typer.Option("--out", help="JSON file for the results (written atomically).")],
    model: Annotated[
        str, typer.Option("--model", help="'tiny', 'smollm2-135m' or a local Hugging Face model folder.")
    ] = "smollm2-135m",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per step.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per sequence.")] = 128,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps before timing.")] = 1,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto (bf16 autocast where the hardware has native bf16, fp32 otherwise), fp32, bf16 or "
            "fp32-autocast-bf16.",
        ),
    ] = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    nf4: Annotated[
        bool, typer.Option("--nf4/--no-nf4", help="Also time the user stage on the backbone in nf4.")
    ] = True,
) -> None:
    """Time PROPER's user and group stages beside a peft LoRA of the same total rank, the user stage in nf4, and
    this machine's matmul peak; print and save JSON."""
    from proper_fed.tools.bench import run_benchmark  # torch and transformers load only when the command runs

    configure_library()
    try:
        result = run_benchmark(
            model=model,
            batch_size=batch_size,
            seq_len=seq_len,
            steps=steps,
            warmup=warmup,
            dtype=dtype,
            device=device,
            nf4=nf4,
        )
    except ProperFedError as err:  # main() does this too; here it also holds when the app is driven directly
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    text = json.dumps(result, indent=2)
    atomic_write_text(out, text + "\n")
    typer.echo(text)
