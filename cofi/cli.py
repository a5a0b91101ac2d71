"""The ``cofi`` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="CoFi structured pruning of BERT-family classifiers.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """CoFi structured pruning of BERT-family classifiers."""


@app.command()
def structure(model_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A saved CoFi model directory.")) -> None:
    """Print the per-layer structure of a saved (compact) model: heads and FFN units kept."""
    from cofi.compact import load_model
    from cofi.sparsity import count_prunable_parameters

    model = load_model(model_dir)
    config = model.config
    typer.echo(f"hidden size {config.hidden_size}, head size {config.attention_head_size}")
    typer.echo(f"{'layer':>5} {'heads':>5} {'FFN units':>9}")
    for i, (heads, units) in enumerate(zip(config.layer_num_heads, config.layer_intermediate_size)):
        typer.echo(f"{i:>5} {heads:>5} {units:>9}")
    typer.echo(f"prunable parameters: {count_prunable_parameters(model):,}")
